"""Config validation: defaults, unknown keys, types, required dataset roots; every key documented."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from brainprop.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


def demo_config():
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def test_demo_config_is_valid_and_defaults_are_filled():
    cfg = demo_config()
    del cfg["features"]["pooling"]
    validate_config(cfg, SCHEMA)
    assert cfg["features"]["pooling"] == "mean"


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["features"].__setitem__("poolin", "mean"), r"features\.poolin: unknown key"),
    (lambda c: c["features"]["projection"].__setitem__("dim", "800"), r"features\.projection\.dim: '800' is not of type 'integer'"),
    (lambda c: c["features"].__setitem__("pooling", "max"), r"features\.pooling: 'max' is not one of"),
    (lambda c: c["features"]["pca"].__setitem__("residual_dim", 100), r"residual_dim \(100\) must be <= features\.pca\.dim"),
    (lambda c: c["training"].__setitem__("checkpoints", [0, 10_000]), r"training\.checkpoints: 10000 exceeds"),
    (lambda c: c.__setitem__("demo", False), r"data\.things_images, data\.things_meg, data\.nsd: required when demo is false"),
    (lambda c: c["figures"].__setitem__("model", "clip"), r"figures\.model \('clip'\) must be one of the models"),
    (lambda c: c["figures"].__setitem__("stages", [10, 20]), r"figures\.stages \[20\] are not in training\.checkpoints"),
    (lambda c: c["robustness"].__setitem__("layer", "head"), r"robustness\.layer \('head'\) must be one of features\.layers"),
])
def test_bad_configs_name_the_key(mutate, message):
    cfg = demo_config()
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, SCHEMA)


def test_every_problem_is_reported_at_once():
    cfg = demo_config()
    cfg["seeed"] = 1
    cfg["features"]["batch_size"] = 0
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, SCHEMA)
    assert "seeed: unknown key" in str(err.value) and "features.batch_size" in str(err.value)


def _schema_keys(node, prefix=""):
    for name, sub in node.get("properties", {}).items():
        yield f"{prefix}{name}", sub
        yield from _schema_keys(sub, f"{prefix}{name}.")


def test_every_schema_key_is_documented():
    schema = yaml.safe_load(SCHEMA.read_text())
    undocumented = [k for k, sub in _schema_keys(schema) if "description" not in sub and sub.get("type") != "object"]
    assert not undocumented, f"schema keys without description: {undocumented}"
    # every leaf key of the demo config carries a comment line right above it in config.yaml
    text = (ROOT / "config/config.yaml").read_text().splitlines()
    leaves = [i for i, line in enumerate(text) if re.match(r"^\s*[a-z_0-9]+:\s*\S", line) and not line.strip().startswith("#")]
    uncommented = [text[i].strip() for i in leaves if not text[i - 1].strip().startswith("#")]
    assert not uncommented, f"config keys without a comment: {uncommented}"


def snakemake(*args):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=ROOT, capture_output=True, text=True)


def test_demo_dag_builds():
    out = snakemake("-n", "--forceall", "--quiet", "rules")
    assert out.returncode == 0, out.stderr
    assert "train_dino" in out.stdout and "extract_features" in out.stdout


def test_paper_config_without_roots_fails_naming_them():
    out = snakemake("-n", "--configfile", "config/paper.yaml")
    assert out.returncode != 0
    assert "data.things_images, data.things_meg, data.nsd: required when demo is false" in out.stderr + out.stdout
