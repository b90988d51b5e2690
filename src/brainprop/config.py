"""The workflow configuration: a stack of YAML files over the method, validated against the schema.

Every run is ``config/base.yaml`` (the paper's method) plus overlays merged key by key in order,
then ``--config`` values (:func:`resolve_config`). Without ``--configfile`` the overlay is the
embedded demo (``config/config.yaml``); with ``--configfile A B`` the overlays are A then B and the
demo overlay is not applied, so a real run never inherits a demo value. The Snakefile and the
``brainprop config show`` command resolve the same stack.

``validate_config`` fills defaults from the schema, then reports every problem at once (unknown
keys with the nearest valid key, wrong types, cross-key inconsistencies) as one error naming each
key by its dotted path, so a typo fails at DAG construction, before any job runs. Dataset roots are
not checked here: the rules that read them do (a figure rebuilt from existing intermediates needs
no raw data).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

BASE_CONFIG = "config/base.yaml"
DEMO_OVERLAY = "config/config.yaml"
SCHEMA = "workflow/schemas/config.schema.yaml"


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
    for clause in schema.get("allOf", []):  # defaults of the clauses whose condition holds (e.g. a model's kind)
        if "if" in clause and isinstance(instance, dict) and _holds(instance, clause["if"]):
            _fill_defaults(instance, clause["then"])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("type") == "object" and isinstance(instance, dict):
        for name, value in instance.items():
            if name not in schema.get("properties", {}):
                _fill_defaults(value, extra)


def _holds(instance: dict, condition: dict) -> bool:
    import jsonschema

    return jsonschema.Draft7Validator(condition).is_valid(instance)


def _unknown_key(path, name: str, allowed: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {_key([*path, near[0]])!r}?" if near else ""
    return f"{_key([*path, name])}: unknown key{hint} (allowed here: {', '.join(allowed)})"


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
            for name in sorted(set(err.instance) - set(allowed)):
                problems.append(_unknown_key(err.absolute_path, name, allowed))
        else:
            problems.append(f"{_key(err.absolute_path)}: {err.message}")
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
    if pca and pca.get("dim") != 2 * pca.get("residual_dim", 0):
        # the residual compares residual_dim + residual_dim components with dim forward ones: fair only at equal size
        out.append(f"features.pca.dim ({pca.get('dim')}) must be 2 x features.pca.residual_dim ({pca.get('residual_dim')}): "
                   "the residual R(forward+backprop) - R(forward) compares models of equal dimension")
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
    chosen = config.get("selected_models")
    if chosen is not None:
        unknown = [m for m in chosen if m not in config.get("models", {})]
        if unknown:
            out.append(f"selected_models: {unknown} are not models (models: {sorted(config.get('models', {}))})")
        for key, name in (("figures.model", fig.get("model")), ("simulation.model", sim.get("model"))):
            if name not in chosen and (key == "figures.model" or config.get("demo", True)):
                out.append(f"selected_models must include {key} ({name!r})")
        for name in chosen:
            text = config.get("models", {}).get(name, {}).get("bridge", {}).get("text_model")
            if text is not None and text not in chosen:
                out.append(f"selected_models must include {text!r}, the CLIP bridge of {name!r}")
    return out + _model_problems(config.get("models", {}))


#: Keys a model entry of each kind may set (besides kind and family).
KIND_KEYS = {
    "dino_checkpoint": {"image_size", "forward_network", "loss"},
    "mae": {"image_size", "source", "mask_ratio", "norm_pix_loss"},
    "timm": {"image_size", "source", "name", "bridge"},
    "clip": {"image_size", "source", "bank_size"},
    "owlvit": {"image_size", "source", "bank_size"},
    "siglip2": {"image_size", "source", "bank_size"},
}


def _model_problems(models: Mapping) -> list[str]:
    """Keys that do not belong to a model's kind, and CLIP bridges that name no CLIP model."""
    out = []
    for name, entry in models.items():
        kind = entry.get("kind")
        if kind not in KIND_KEYS:
            continue
        for key in sorted(set(entry) - KIND_KEYS[kind] - {"kind", "family"}):
            out.append(f"models.{name}.{key}: not a key of kind {kind} (its keys: {', '.join(sorted(KIND_KEYS[kind]))})")
        text = entry.get("bridge", {}).get("text_model") if kind == "timm" else None
        if text is not None and models.get(text, {}).get("kind") != "clip":
            out.append(f"models.{name}.bridge.text_model ({text!r}) must name a configured model of kind clip")
    return out


def merge_config(base: dict, overlay: Mapping) -> dict:
    """``base`` with ``overlay`` merged key by key (nested mappings merged, everything else replaced),
    as Snakemake merges config files; neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_key(config: dict, assignment: str) -> None:
    """Set one nested value in place from ``"a.b.c=VALUE"`` (VALUE parsed as YAML), e.g. a benchmark's
    ``--set optim.lr=0.002``; an unknown key raises KeyError naming it."""
    key, value = assignment.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        if not isinstance(node.get(name), dict):
            raise KeyError(f"{key}: {name!r} is not a section here")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"{key}: unknown key {leaf!r} (here: {', '.join(sorted(node))})")
    node[leaf] = yaml.safe_load(value)


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def config_stack(configfiles: Sequence[str | os.PathLike] | None, workflow_dir: str | os.PathLike,
                 workdir: str | os.PathLike | None = None) -> list[Path]:
    """The files of a run, in merge order: the method, then ``configfiles`` or, when none are given,
    the demo overlay (``config/config.yaml`` of ``workdir`` if it has one, else of the workflow)."""
    workflow_dir = Path(workflow_dir)
    if configfiles:
        return [workflow_dir / BASE_CONFIG, *map(Path, configfiles)]
    local = Path(workdir or os.getcwd()) / DEMO_OVERLAY
    return [workflow_dir / BASE_CONFIG, local if local.is_file() else workflow_dir / DEMO_OVERLAY]


def resolve_config(configfiles: Sequence[str | os.PathLike] | None = None, overrides: Mapping | None = None,
                   workflow_dir: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None) -> dict:
    """Merge the run's config stack (:func:`config_stack`), then ``overrides`` (``--config``), fill the
    schema's defaults and validate; returns the complete configuration of the run."""
    if workflow_dir is None:  # this checkout (editable install), else the current folder
        checkout = Path(__file__).resolve().parents[2]
        workflow_dir = checkout if (checkout / BASE_CONFIG).is_file() else Path.cwd()
    workflow_dir = Path(workflow_dir)
    config: dict = {}
    for path in config_stack(configfiles, workflow_dir, workdir):
        config = merge_config(config, _load_yaml(path))
    config = merge_config(config, overrides or {})
    return select_models(validate_config(config, workflow_dir / SCHEMA))


def select_models(config: dict) -> dict:
    """``config`` with ``models`` reduced to ``selected_models`` (in the order of ``models``), when given."""
    chosen = config.get("selected_models")
    if chosen is not None:
        config["models"] = {name: entry for name, entry in config["models"].items() if name in chosen}
    return config


def config_hash(section: dict) -> str:
    """sha256 of the canonical JSON of a config section (used to tag checkpoints)."""
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """``brainprop config show [--configfile F ...] [--config KEY=VALUE ...]``: print the resolved run."""
    parser = argparse.ArgumentParser(prog="brainprop", description="brainprop workflow utilities")
    commands = parser.add_subparsers(dest="command", required=True)
    cfg = commands.add_parser("config", help="the workflow configuration")
    actions = cfg.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the resolved, validated configuration of a config stack as YAML")
    show.add_argument("--configfile", "--configfiles", nargs="+", default=None, metavar="FILE",
                      help="overlays over config/base.yaml, as for snakemake (default: the demo overlay)")
    show.add_argument("--config", "-C", nargs="+", default=None, metavar="KEY=VALUE",
                      help="values set last, parsed as snakemake parses --config")
    show.add_argument("--directory", "-d", default=None, help="working directory of the run (default: here)")
    show.add_argument("--workflow-dir", default=None, help="the workflow's folder (default: this checkout)")
    args = parser.parse_args(argv)
    from snakemake.cli import parse_config

    try:
        resolved = resolve_config(args.configfile, parse_config(args.config), args.workflow_dir, args.directory)
    except (ConfigError, ValueError) as err:
        print(f"brainprop: {err}", file=sys.stderr)
        return 2
    yaml.safe_dump(resolved, sys.stdout, sort_keys=False, default_flow_style=False, width=110)
    return 0
