# Two entry points: `make demo` (run the embedded demo) and `make test` (the test suite).
# Both create .venv on first use and install the pinned dependencies into it.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CORES ?= all

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# GPU rules at once: one per CUDA device; on a machine without one they run on the CPU, as many as cores.
GPU_JOBS = $$($(BIN)/python -c "import os, torch; print(torch.cuda.device_count() or os.cpu_count())")

demo: $(BIN)/.installed
	$(BIN)/snakemake all --profile profiles/local --cores $(CORES) --resources gpu=$(GPU_JOBS)
	$(BIN)/snakemake --profile profiles/local --cores $(CORES) all --report results/report.html

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
