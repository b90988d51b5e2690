from pathlib import Path

from brainprop.features import run_benchmark_extraction, run_feature_extraction
from brainprop.models.benchmark import BENCHMARK_KINDS
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
p = snakemake.params
out_dir = Path(snakemake.output.index).parent
if p.model["kind"] in BENCHMARK_KINDS:  # rule extract_benchmark_features
    run_benchmark_extraction(snakemake.input.table, p.root, out_dir, p.model, p.features, seed=p.seed)
else:
    run_feature_extraction(snakemake.input.checkpoint, snakemake.input.table, p.root, out_dir, p.model, p.features,
                           seed=p.seed, bank_tables=list(snakemake.input.bank_tables), bank_roots=list(p.bank_roots))
