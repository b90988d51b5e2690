"""Configuration validation against the workflow's JSON schema (written in YAML).

``validate_config`` fills defaults from the schema, then reports every problem at once
(unknown keys, wrong types, missing dataset roots) as one error naming each key by its
dotted path, so a typo fails at DAG construction, before any job runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

DATA_ROOTS = ("things_images", "things_meg", "nsd")


class ConfigError(ValueError):
    """The workflow configuration does not match the schema."""


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _fill_defaults(instance: dict, schema: dict) -> None:
    """Recursively insert ``default`` values of object properties that are absent."""
    for name, sub in schema.get("properties", {}).items():
        if not isinstance(instance, dict):
            return
        if name not in instance and "default" in sub:
            instance[name] = json.loads(json.dumps(sub["default"]))
        if name in instance and sub.get("type") == "object":
            _fill_defaults(instance[name], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("type") == "object" and isinstance(instance, dict):
        for name, value in instance.items():
            if name not in schema.get("properties", {}):
                _fill_defaults(value, extra)


def validate_config(config: dict, schema_path: str | os.PathLike) -> dict:
    """Fill defaults into ``config`` (in place) and raise :class:`ConfigError` listing every problem."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    _fill_defaults(config, schema)
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            unknown = sorted(set(err.instance) - set(allowed))
            for name in unknown:
                problems.append(f"{_key([*err.absolute_path, name])}: unknown key (allowed here: {', '.join(allowed)})")
        else:
            problems.append(f"{_key(err.absolute_path)}: {err.message}")
    if not config.get("demo", True):
        missing = [f"data.{k}" for k in DATA_ROOTS if not (config.get("data") or {}).get(k)]
        if missing:
            problems.append(f"{', '.join(missing)}: required when demo is false (set the dataset roots, "
                            "e.g. in config/paper.yaml)")
        for k in DATA_ROOTS:
            root = (config.get("data") or {}).get(k)
            if root and not Path(root).exists():
                problems.append(f"data.{k}: dataset root {root} does not exist")
    problems += _consistency(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def _consistency(config: dict) -> list[str]:
    """Cross-key checks that JSON schema cannot express."""
    out = []
    pca = config.get("features", {}).get("pca", {})
    if pca and pca.get("residual_dim", 0) > pca.get("dim", 0):
        out.append(f"features.pca.residual_dim ({pca['residual_dim']}) must be <= features.pca.dim ({pca['dim']})")
    ckpts = config.get("training", {}).get("checkpoints", [])
    iters = config.get("training", {}).get("iterations")
    if ckpts and iters is not None and max(ckpts) > iters:
        out.append(f"training.checkpoints: {max(ckpts)} exceeds training.iterations ({iters})")
    sim = config.get("simulation", {})
    if config.get("demo", True) and sim and ckpts and sim.get("checkpoint") not in ckpts:
        out.append(f"simulation.checkpoint ({sim.get('checkpoint')}) must be one of training.checkpoints {ckpts}")
    if config.get("demo", True) and sim and sim.get("model") not in config.get("models", {}):
        out.append(f"simulation.model ({sim.get('model')!r}) must be one of the models: {sorted(config.get('models', {}))}")
    fig = config.get("figures", {})
    if fig.get("model") not in config.get("models", {}):
        out.append(f"figures.model ({fig.get('model')!r}) must be one of the models: {sorted(config.get('models', {}))}")
    elif config["models"][fig["model"]].get("kind") != "dino_checkpoint":
        out.append(f"figures.model ({fig['model']!r}) must be a model trained here (kind: dino_checkpoint)")
    missing = [s for s in fig.get("stages", []) if s not in ckpts]
    if missing:
        out.append(f"figures.stages {missing} are not in training.checkpoints {ckpts}")
    layer = config.get("robustness", {}).get("layer")
    layers = config.get("features", {}).get("layers", [])
    if layer is not None and layer not in layers:
        out.append(f"robustness.layer ({layer!r}) must be one of features.layers")
    return out



def config_hash(section: dict) -> str:
    """sha256 of the canonical JSON of a config section (used to tag checkpoints)."""
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()
