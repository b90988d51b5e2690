"""Configuration: the method is the base, the demo and the paper are overlays; validation, suggestions,
documentation of every key, the resolved-config command, and dry runs of every shipped config
(the paper's with its roots at datasets simulated in the real layouts)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from brainprop.config import ConfigError, merge_config, resolve_config, set_key, validate_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
BASE = ROOT / "config/base.yaml"
DEMO = ROOT / "config/config.yaml"
PAPER = ROOT / "config/paper.yaml"
PAPER_LAYERS = [f"blocks.{i}.mlp.fc2" for i in range(12)]
BENCHMARK_MODELS = ["vit_mae", "vit_l16", "convnext_l", "resnet50", "owlvit", "clip", "siglip2"]
PAPER_CHECKPOINTS = [0, 1000, 3000, 10000, 30000, 100000, 300000, 500000]
FIGURES = ["fig2_hierarchy", "fig3_residual", "fig4_models_mean", "fig5_training", "fig6_training_maps",
           "fig7_training_meg", "figS1_models_hierarchy", "figS2_robustness", "fig_halftime"]


def _yaml(path):
    return yaml.safe_load(Path(path).read_text())


def _leaves(d, like, prefix=()):
    """Leaf keys of ``d``, descending where ``like`` (the base) has a non-empty mapping (free-form
    mappings such as ``training.arch.kwargs`` are leaves)."""
    for k, v in d.items():
        if isinstance(v, dict) and isinstance(like.get(k), dict) and like[k]:
            yield from _leaves(v, like[k], (*prefix, k))
        else:
            yield (*prefix, k), v


def _get(d, path):
    for k in path:
        d = d[k]
    return d


def demo_config():
    return resolve_config(workflow_dir=ROOT, workdir=ROOT)


# ----------------------------------------------------------------------------- the stack


def test_no_configfile_means_base_plus_demo_overlay():
    demo = demo_config()
    assert demo == validate_config(merge_config(_yaml(BASE), _yaml(DEMO)), SCHEMA)
    assert demo["demo"] is True and demo["training"]["arch"]["kwargs"]["embed_dim"] == 48


def test_the_paper_run_inherits_no_demo_value():
    paper = resolve_config([PAPER], workflow_dir=ROOT)
    base = validate_config(_yaml(BASE), SCHEMA)
    assert paper == base  # the paper overlay only names the (unset) dataset roots
    demo_changes = [path for path, _ in _leaves(_yaml(DEMO), base)]
    assert len(demo_changes) > 20
    for path in demo_changes:
        assert _get(paper, path) == _get(base, path), ".".join(path)
    differs = [p for p in demo_changes if _get(paper, p) != _get(demo_config(), p)]
    assert len(differs) == len(demo_changes), "every demo key must change something"


def test_overlays_and_overrides_merge_in_order(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("features:\n  projection:\n    dim: 400\n")
    cfg = resolve_config([PAPER, mine], {"seed": 7}, workflow_dir=ROOT)
    assert cfg["features"]["projection"]["dim"] == 400  # nested keys merge, siblings stay
    assert cfg["features"]["projection"]["method"] == "gaussian" and cfg["features"]["pca"]["dim"] == 300
    assert cfg["seed"] == 7
    local = tmp_path / "config/config.yaml"  # a working directory's own demo overlay replaces the shipped one
    local.parent.mkdir()
    local.write_text(DEMO.read_text() + "\nseed: 3\n")
    assert resolve_config(workflow_dir=ROOT, workdir=tmp_path)["seed"] == 3


def test_set_key_sets_one_nested_value_and_names_unknown_keys():
    cfg = demo_config()
    set_key(cfg, "training.optim.lr=0.002")
    set_key(cfg, "features.layers=[blocks.0.mlp.fc2]")
    assert cfg["training"]["optim"]["lr"] == 0.002 and cfg["features"]["layers"] == ["blocks.0.mlp.fc2"]
    with pytest.raises(KeyError, match="unknown key 'lrr'"):
        set_key(cfg, "training.optim.lrr=1")
    with pytest.raises(KeyError, match="'seed' is not a section"):
        set_key(cfg, "seed.x=1")


def test_schema_defaults_are_the_method_and_the_base_sets_every_key():
    """One source for the method: the base sets every schema key, and the schema's defaults equal it."""
    schema, base = _yaml(SCHEMA), _yaml(BASE)
    missing, differ = [], []

    def walk(node, values, path):
        for name, sub in node.get("properties", {}).items():
            key = f"{path}{name}"
            if sub.get("type") == "object" and "properties" in sub:
                walk(sub, values.get(name, {}), key + ".")
            elif name not in values:
                missing.append(key)
            elif "default" in sub and sub["default"] != values[name]:
                differ.append(f"{key}: schema {sub['default']!r}, base {values[name]!r}")

    walk(schema, base, "")
    assert not missing, f"keys of the schema not set in config/base.yaml: {missing}"
    assert not differ, f"schema defaults that are not the method: {differ}"


def test_the_library_defaults_are_the_method():
    """brainprop.models' training and image-wise loss defaults repeat config/base.yaml (no second method)."""
    from brainprop.models import DEFAULT_IMAGEWISE_LOSS_CONFIG, resolve_training_config

    base = validate_config(_yaml(BASE), SCHEMA)
    assert resolve_training_config(base["training"]) == resolve_training_config({})
    assert base["models"]["dinov3_s"]["loss"] == DEFAULT_IMAGEWISE_LOSS_CONFIG


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["features"].__setitem__("poolin", "mean"),
     r"features\.poolin: unknown key; did you mean 'features\.pooling'\?"),
    (lambda c: c["training"]["crops"].__setitem__("globl_size", 3),
     r"training\.crops\.globl_size: unknown key; did you mean 'training\.crops\.global_size'\?"),
    (lambda c: c["features"]["projection"].__setitem__("dim", "800"), r"features\.projection\.dim: '800' is not of type 'integer'"),
    (lambda c: c["features"].__setitem__("pooling", "max"), r"features\.pooling: 'max' is not one of"),
    (lambda c: c["features"]["pca"].__setitem__("residual_dim", 100), r"residual_dim \(100\) must be <= features\.pca\.dim"),
    (lambda c: c["training"].__setitem__("checkpoints", [0, 10_000]), r"training\.checkpoints: 10000 exceeds"),
    (lambda c: c["figures"].__setitem__("model", "dino"), r"figures\.model \('dino'\) must be one of the models"),
    (lambda c: c["figures"].__setitem__("model", "clip"), r"figures\.model \('clip'\) must be a model trained here"),
    (lambda c: c["models"]["clip"].__setitem__("loss", {}), r"models\.clip\.loss: not a key of kind clip"),
    (lambda c: c["models"]["vit_l16"]["bridge"].__setitem__("text_model", "vit_mae"),
     r"models\.vit_l16\.bridge\.text_model \('vit_mae'\) must name a configured model of kind clip"),
    (lambda c: c["models"]["clip"].pop("source"), r"models\.clip: 'source' is a required property"),
    (lambda c: c["models"]["owlvit"].__setitem__("kind", "owl"), r"models\.owlvit\.kind: 'owl' is not one of"),
    (lambda c: c["models"]["vit_mae"].__setitem__("mask_ratio", 1.5), r"models\.vit_mae\.mask_ratio: 1\.5 is greater"),
    (lambda c: c.__setitem__("selected_models", ["clip", "owl"]), r"selected_models: \['owl'\] are not models"),
    (lambda c: c.__setitem__("selected_models", ["clip"]), r"selected_models must include figures\.model \('dinov3_s'\)"),
    (lambda c: c.__setitem__("selected_models", ["dinov3_s", "resnet50"]),
     r"selected_models must include 'clip', the CLIP bridge of 'resnet50'"),
    (lambda c: c["figures"].__setitem__("stages", [10, 20]), r"figures\.stages \[20\] are not in training\.checkpoints"),
    (lambda c: c["robustness"].__setitem__("layer", "head"), r"robustness\.layer \('head'\) must be one of features\.layers"),
])
def test_bad_configs_name_the_key(mutate, message):
    cfg = demo_config()
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, SCHEMA)


def test_selected_models_reduce_the_run_to_those_models(tmp_path):
    overlay = tmp_path / "two.yaml"
    overlay.write_text("selected_models: [clip, dinov3_s]\n")
    cfg = resolve_config([str(overlay)], workflow_dir=ROOT, workdir=tmp_path)
    assert list(cfg["models"]) == ["dinov3_s", "clip"]
    assert list(resolve_config([], workflow_dir=ROOT, workdir=tmp_path)["models"])[:2] == ["dinov3_s", "vit_mae"]


def test_a_key_with_no_near_match_gets_no_suggestion():
    cfg = demo_config()
    cfg["zzz"] = 1
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, SCHEMA)
    assert "zzz: unknown key (allowed here:" in str(err.value)


def test_every_problem_is_reported_at_once():
    cfg = demo_config()
    cfg["seeed"] = 1
    cfg["features"]["batch_size"] = 0
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, SCHEMA)
    assert "seeed: unknown key; did you mean 'seed'?" in str(err.value) and "features.batch_size" in str(err.value)


def test_bad_config_files_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("features: [1, 2\n")
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(bad))} is not valid YAML"):
        resolve_config([bad], workflow_dir=ROOT)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config([tmp_path / "absent.yaml"], workflow_dir=ROOT)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        resolve_config([bad], workflow_dir=ROOT)


def _schema_keys(node, prefix=""):
    for name, sub in node.get("properties", {}).items():
        yield f"{prefix}{name}", sub
        yield from _schema_keys(sub, f"{prefix}{name}.")


@pytest.mark.parametrize("path", [BASE, DEMO, PAPER], ids=lambda p: p.name)
def test_every_key_is_documented(path):
    schema = yaml.safe_load(SCHEMA.read_text())
    undocumented = [k for k, sub in _schema_keys(schema) if "description" not in sub and sub.get("type") != "object"]
    assert not undocumented, f"schema keys without description: {undocumented}"
    # every leaf key of a shipped config file carries a comment line right above it
    text = path.read_text().splitlines()
    leaves = [i for i, line in enumerate(text) if re.match(r"^\s*[a-z_0-9]+:\s*\S", line) and not line.strip().startswith("#")]
    uncommented = [text[i].strip() for i in leaves if not text[i - 1].strip().startswith("#")]
    assert not uncommented, f"{path.name}: keys without a comment: {uncommented}"


# ----------------------------------------------------------------------------- brainprop config show


def brainprop(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", "import sys; from brainprop.config import main; sys.exit(main())",
                           *args], cwd=cwd, capture_output=True, text=True)


def test_config_show_prints_the_paper_method():
    out = brainprop("config", "show", "--configfile", "config/paper.yaml")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg == resolve_config([PAPER], workflow_dir=ROOT)
    tr = cfg["training"]
    assert cfg["demo"] is False and tr["arch"] == {"timm_name": "vit_small_patch16_dinov3", "kwargs": {}}
    assert tr["head"]["n_prototypes"] == tr["head"]["ibot_n_prototypes"] == 65536
    assert (tr["head"]["hidden_dim"], tr["head"]["bottleneck_dim"]) == (2048, 256)
    c = tr["crops"]
    assert (c["global_size"], c["local_size"], c["n_local"]) == (224, 96, 8)
    assert (c["jitter_p"], c["grayscale_p"], c["blur_p"], c["solarize_p"]) == (0.8, 0.2, [1.0, 0.1, 0.5], 0.2)
    assert (tr["iterations"], tr["checkpoints"]) == (500000, PAPER_CHECKPOINTS)
    assert tr["loss"]["centering"] == "sinkhorn" and tr["optim"]["momentum_teacher"] == 0.992
    f = cfg["features"]
    assert f["layers"] == PAPER_LAYERS and f["projection"]["dim"] == 800
    assert (f["pca"]["dim"], f["pca"]["residual_dim"]) == (300, 150)
    e = cfg["encoding"]
    assert (e["alphas"], e["n_splits"]) == ({"log10_min": 0, "log10_max": 8, "n": 10}, 5)
    assert e["permutation"] == {"n": 1000, "method": "refit", "null_distribution": "per_target", "modalities": ["nsd"],
                                "signals": ["forward", "backprop"], "sequential_block": 50}
    assert e["residual"] == {"n": 1000, "pvalues": "empirical", "layers": "last", "sequential_block": 50}
    assert cfg["models"]["dinov3_s"]["image_size"] == 224
    assert cfg["nsd"]["subjects"] == list(range(1, 9)) and cfg["meg"]["subjects"] == [1, 2, 3, 4]


def test_the_paper_backbone_is_vit_small_16_with_registers():
    """The resolved architecture, built: ViT-S/16 with 4 registers (the config's values reach the model)."""
    from brainprop.models import build_backbone

    cfg = resolve_config([PAPER], workflow_dir=ROOT)
    net = build_backbone(cfg["training"]["arch"])
    assert (net.embed_dim, len(net.blocks), tuple(net.patch_embed.patch_size)) == (384, 12, (16, 16))
    assert net.blocks[0].attn.num_heads == 6 and net.reg_token.shape[1] == 4 and net.num_prefix_tokens == 5
    modules = dict(net.named_modules())
    assert all(modules[name].weight.shape == (384, 1536) for name in cfg["features"]["layers"])


def test_config_show_defaults_to_the_demo_and_reports_bad_keys():
    out = brainprop("config", "show")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == demo_config()
    out = brainprop("config", "show", "--configfile", "config/paper.yaml", "--config", "seeed=1")
    assert out.returncode == 2 and "seeed: unknown key; did you mean 'seed'?" in out.stderr


# ----------------------------------------------------------------------------- dry runs


def snakemake(*args):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=ROOT, capture_output=True, text=True)


def dry_run_jobs(text: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job a ``snakemake -n`` run lists."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if m:
            wc = re.search(r"^\s+wildcards: (.*)$", block, re.M)
            jobs.append((m.group(1), dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}))
    return jobs


def test_demo_dag_builds():
    out = snakemake("-n", "--forceall", "--quiet", "rules")
    assert out.returncode == 0, out.stderr
    assert "train_dino_segment" in out.stdout and "extract_features" in out.stdout
    assert "pretraining_table" not in out.stdout  # the demo trains on its stimuli


def test_paper_config_without_roots_fails_in_the_rule_that_reads_them():
    out = snakemake("-n", "--configfile", "config/paper.yaml")
    assert out.returncode != 0
    log = out.stderr + out.stdout
    assert re.search(r"Missing input files for rule (stimulus_table|prepare_nsd|prepare_meg|nsd_rois)", log), log[-2000:]
    assert re.search(r"<data\.(things_images|things_meg|nsd) is not set: give the dataset root", log), log[-2000:]


@pytest.fixture(scope="module")
def real_layout_roots(tmp_path_factory):
    """THINGS images, THINGS-MEG (BIDS, 4 participants), NSD (8 subjects) simulated in the real layouts,
    and a pretraining image folder in the ImageFolder layout."""
    import numpy as np
    from PIL import Image

    from brainprop.simulate.meg import simulate_things_meg, toy_features
    from brainprop.simulate.nsd import make_toy_inputs, simulate_nsd
    from brainprop.stimuli import generate_things_demo, things_stimulus_table

    root = tmp_path_factory.mktemp("datasets")
    generate_things_demo(root / "things", 4, 2, 2, 2, 16, seed=0)
    stim = things_stimulus_table(root / "things")
    fwd, bwd = toy_features(len(stim), 4, 6, 0)
    simulate_things_meg(root / "things-meg", stim, fwd, bwd, list(stim.image_id),
                        {"subjects": [1, 2, 3, 4], "n_sessions": 1, "n_runs": 1, "n_catch_trials": 2,
                         "n_catch_images": 2}, seed=0)
    table, hdf5, fwd, bwd, ids = make_toy_inputs(root / "toy", n_images=40)
    simulate_nsd(root / "nsd", table, hdf5, fwd, bwd, ids,
                 {"n_subjects": 8, "n_sessions": 1, "trials_per_session": 40, "n_areas": 10}, seed=0)
    for k in range(4):
        path = root / "imagenet/train" / f"n0{k % 2}" / f"img{k}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 24, 3), 40 * k, np.uint8)).save(path)
    return {"things_images": str(root / "things"), "things_meg": str(root / "things-meg"), "nsd": str(root / "nsd"),
            "pretraining_images": str(root / "imagenet/train")}


@pytest.fixture(scope="module")
def paper_dry_run(real_layout_roots, tmp_path_factory):
    """The paper config with its roots at the simulated datasets and the pretrained models' weights at
    local folders: (overlay file, ``snakemake -n all`` output)."""
    overlay = tmp_path_factory.mktemp("overlay") / "roots.yaml"
    paper = _yaml(PAPER)
    paper["data"].update(real_layout_roots)
    weights = tmp_path_factory.mktemp("weights")
    paper["models"] = {}
    for name in BENCHMARK_MODELS:
        (weights / name).mkdir()
        paper["models"][name] = {"source": str(weights / name)}
    overlay.write_text(yaml.safe_dump(paper))
    out = snakemake("all", "-n", "--forceall", "--configfile", str(overlay))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return overlay, out.stdout


def test_paper_dag_with_real_layout_datasets_lists_the_whole_run(paper_dry_run):
    jobs = dry_run_jobs(paper_dry_run[1])
    rules = {r for r, _ in jobs}
    assert {"pretraining_table", "train_dino_init"} <= rules
    segments = {int(w["iteration"]) for r, w in jobs if r == "train_dino_segment" and w["model"] == "dinov3_s"}
    assert segments == set(PAPER_CHECKPOINTS) - {0}
    ckpts = {f"it{i}" for i in PAPER_CHECKPOINTS}
    for dataset in ("things", "nsd"):
        got = {w["checkpoint"] for r, w in jobs if r == "extract_features" and w["dataset"] == dataset
               and w["model"] == "dinov3_s"}
        assert got == ckpts, dataset
    nsd = {(w["model"], w["subject"], w["checkpoint"]) for r, w in jobs if r == "encode_nsd"}
    meg = {(w["model"], w["subject"], w["checkpoint"]) for r, w in jobs if r == "encode_meg"}
    models = {"dinov3_s": ckpts, **{m: {"pretrained"} for m in BENCHMARK_MODELS}}
    assert nsd == {(m, f"{s:02d}", c) for m, cs in models.items() for s in range(1, 9) for c in cs}
    assert meg == {(m, str(s), c) for m, cs in models.items() for s in range(1, 5) for c in cs}
    # the seven pretrained models: one extraction per dataset from their local weights, no tiny demo model
    bench = {(w["model"], w["dataset"]) for r, w in jobs if r == "extract_benchmark_features"}
    assert bench == {(m, d) for m in BENCHMARK_MODELS for d in ("things", "nsd")}
    assert {(w["model"], w["dataset"]) for r, w in jobs if r == "pca_benchmark_features"} == bench
    assert "tiny_model" not in rules
    sources = {m: e["source"] for m, e in _yaml(paper_dry_run[0])["models"].items()}
    for name in BENCHMARK_MODELS:  # each extraction reads its model's folder (and a classifier its CLIP's)
        inputs = [block for block in re.split(r"\n(?=(?:local)?rule \w+:)", paper_dry_run[1])
                  if block.startswith("rule extract_benchmark_features:") and f"model={name}," in block]
        assert inputs and all(sources[name] in block.split("output:")[0] for block in inputs), name
        if name in ("vit_l16", "convnext_l", "resnet50"):
            assert all(sources["clip"] in block.split("output:")[0] for block in inputs), name
    assert {w["subject"] for r, w in jobs if r == "prepare_nsd"} == {f"{s:02d}" for s in range(1, 9)}
    assert set(FIGURES) <= rules and "headline" in rules
    assert not rules & {"simulate_nsd", "simulate_meg", "demo_stimuli_things", "demo_stimuli_nsd"}


def test_a_figure_from_existing_intermediates_needs_no_dataset_root(paper_dry_run, tmp_path):
    """Every intermediate of the paper run present (empty files, one mtime), no roots set: rebuilding a
    figure runs that figure alone; asking for an upstream product names the unset root."""
    import os

    outputs = []
    for line in paper_dry_run[1].splitlines():
        m = re.match(r"^\s+output: (.*)$", line)
        if m:
            outputs += m.group(1).split(", ")
    assert "results/fig3_residual.pdf" in outputs and len(outputs) > 500
    stamp = 1_700_000_000
    for rel in outputs:
        if rel == "results/fig3_residual.pdf":
            continue
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (stamp, stamp))
    # archived intermediates carry no Snakemake metadata: only their timestamps decide (docs: config/README.md)
    run = lambda *a: subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d",
                                     str(tmp_path), *a, "-n", "--rerun-triggers", "mtime", "--configfile",
                                     str(PAPER)], capture_output=True, text=True)
    out = run("results/fig3_residual.pdf")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert [r for r, _ in dry_run_jobs(out.stdout)] == ["fig3_residual"], out.stdout[:3000]
    (tmp_path / "results/stimuli/things.parquet").unlink()
    out = run("results/stimuli/things.parquet")
    assert out.returncode != 0 and "data.things_images is not set" in out.stdout + out.stderr
