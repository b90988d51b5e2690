# Helpers of the workflow: config resolution and validation, target lists, input functions.
import os
from pathlib import Path

from brainprop.config import resolve_config
from brainprop.fmri_arrays import GROUP_ARRAYS as FMRI_GROUP_ARRAYS, SUBJECT_ARRAYS as FMRI_SUBJECT_ARRAYS
from brainprop.models.benchmark import BENCHMARK_KINDS, BENCHMARK_LAYERS, PRETRAINED

# The run's configuration: base.yaml + overlays + --config, validated (brainprop.config.resolve_config).
_resolved = resolve_config(workflow.overwrite_configfiles, dict(workflow.config_settings.config),
                           workflow_dir=workflow.basedir, workdir=os.getcwd())
config.clear()
config.update(_resolved)

RESULTS = config["results"]
DATASETS = config["features"]["datasets"]
LAYERS = config["features"]["layers"]
# Models trained here (checkpoints it<N>, layers features.layers) and pretrained benchmark models
# (one checkpoint, "pretrained"; layers block0..block9, the ten evenly spaced residual blocks).
TRAINED_MODELS = [m for m, e in config["models"].items() if e["kind"] == "dino_checkpoint"]
BENCHMARK_MODELS = [m for m, e in config["models"].items() if e["kind"] in BENCHMARK_KINDS]


def one_of(names):
    """A wildcard regex matching exactly these names (none: a regex that matches nothing)."""
    return "|".join(names) if names else "(?!)"


wildcard_constraints:
    dataset="|".join(DATASETS),
    model="[A-Za-z0-9_\-]+",
    checkpoint=rf"it\d+|{PRETRAINED}",


def checkpoints_of(model):
    """Checkpoint labels of a model: the training iterations of a model trained here, or the one
    pretrained state of a benchmark model."""
    if model in TRAINED_MODELS:
        return [f"it{it}" for it in config["training"]["checkpoints"]]
    return [PRETRAINED]


def layers_of(model):
    """Layer labels of a model's feature files: features.layers, or block0..block9."""
    return LAYERS if model in TRAINED_MODELS else BENCHMARK_LAYERS


def layers_param(wildcards):
    return layers_of(wildcards.model)


def tiny_model_dir(model):
    """The demo's tiny random version of a benchmark model (rule tiny_model)."""
    return f"{RESULTS}/demo/models/{model}"


def model_source(model):
    """Where a benchmark model's weights are read: the demo's tiny folder, or models.<name>.source."""
    return tiny_model_dir(model) if config["demo"] else config["models"][model]["source"]


def model_sources(wildcards):
    """Weight folders/files a benchmark model reads that exist as paths (its own and, for a CLIP-bridged
    classifier, its text model's); a hub id read from the local cache is not a file input."""
    entry = config["models"][wildcards.model]
    names = [wildcards.model] + ([entry["bridge"]["text_model"]] if "bridge" in entry else [])
    if config["demo"]:
        return [tiny_model_dir(m) for m in names]
    return [model_source(m) for m in names if os.path.exists(model_source(m))]


def benchmark_params(wildcards):
    """A benchmark model's config entry with its resolved source (and its bridge's text model's)."""
    entry = dict(config["models"][wildcards.model], source=model_source(wildcards.model),
                 config_key=f"models.{wildcards.model}")
    if "bridge" in entry:
        entry["bridge"] = dict(entry["bridge"], text_source=model_source(entry["bridge"]["text_model"]))
    return entry


def data_root(key):
    """``data.<key>``; when unset, a path that names the key, so the rule that reads it (and only
    that rule, when it has to run) fails with Snakemake's missing-input error naming it."""
    return config["data"][key] or f"<data.{key} is not set: give the dataset root in a config overlay, see config/paper.yaml>"


def stimulus_root(dataset):
    """Folder the stimulus table's ``source`` paths are relative to."""
    if config["demo"]:
        return f"{RESULTS}/demo/stimuli/{dataset}"
    if dataset == "things":
        return data_root("things_images")
    return f"{data_root('nsd')}/nsddata_stimuli/stimuli/nsd"


def stimulus_table_inputs(wildcards):
    """Files a stimulus table is built from: the demo generator's outputs or the dataset's own files."""
    root = stimulus_root(wildcards.dataset)
    if wildcards.dataset == "things":
        return {"marker": f"{root}/captions.csv" if config["demo"] else root}
    info = (f"{root}/nsd_stim_info_merged.csv" if config["demo"]
            else f"{data_root('nsd')}/nsddata/experiments/nsd/nsd_stim_info_merged.csv")
    return {"hdf5": f"{root}/nsd_stimuli.hdf5", "stim_info": info}


def stimulus_root_param(wildcards):
    return stimulus_root(wildcards.dataset)


def captions_param(wildcards):
    """Captions file of a dataset: the demo's captions.csv, or data.<dataset>_captions (may be null)."""
    if config["demo"]:
        return f"{stimulus_root(wildcards.dataset)}/captions.csv"
    return config["data"].get(f"{wildcards.dataset}_captions")


def checkpoint_file(wildcards):
    return f"{RESULTS}/training/{wildcards.model}/checkpoint_{wildcards.checkpoint}.pt"


def feature_dir(kind, model, checkpoint, dataset):
    return f"{RESULTS}/features/{model}/{checkpoint}/{dataset}/{kind}"


def all_feature_targets():
    """PCA features of every (model, checkpoint, dataset)."""
    return [
        f"{feature_dir('pca', m, c, d)}/pca_summary.parquet"
        for m in config["models"]
        for c in checkpoints_of(m)
        for d in DATASETS
    ]


def model_config(wildcards):
    """The model's config entry (narrow params: only this model's settings)."""
    return config["models"][wildcards.model]


def features_config(wildcards):
    """Feature-extraction settings (layers, pooling, backprop target, projection, batch size)."""
    return {k: v for k, v in config["features"].items() if k not in ("pca", "datasets")}


def training_roots(wildcards):
    """Roots of the training tables (same order as training_tables): the pretraining folder, or the
    stimulus roots of training.datasets (training.images: stimuli)."""
    if config["training"]["images"] == "pretraining":
        return [config["data"]["pretraining_images"]]
    return [stimulus_root(d) for d in config["training"]["datasets"]]


def brain_root(dataset):
    """Root of a brain dataset: the demo's simulated tree or the configured real root."""
    if config["demo"]:
        return f"{RESULTS}/demo/{dataset}"
    return data_root(dataset)


def generator_features(dataset, kind):
    """PCA features of the simulation's generator checkpoint (planted effects come from these)."""
    sim = config["simulation"]
    folder = feature_dir("pca", sim["model"], f"it{sim['checkpoint']}", dataset)
    if kind == "index":
        return f"{folder}/index.parquet"
    return [f"{folder}/{layer}.{kind}.npy" for layer in LAYERS]


def simulation_nsd_params():
    """Simulator parameters; the number of subjects follows nsd.subjects."""
    return {**config["simulation"]["nsd"], "n_subjects": max(config["nsd"]["subjects"])}


def simulation_meg_params():
    """Simulator parameters; the participants follow meg.subjects."""
    return {**config["simulation"]["meg"], "subjects": config["meg"]["subjects"]}


def nsd_n_sessions(wildcards):
    """Sessions expected for a subject: nsd.n_sessions[subject - 1] when given, else what is found."""
    counts = config["nsd"]["n_sessions"]
    return None if counts is None else counts[int(wildcards.subject) - 1]


def brain_targets():
    return (
        [f"{RESULTS}/brain/nsd/subj{s:02d}/betas.npy" for s in config["nsd"]["subjects"]]
        + [f"{RESULTS}/brain/meg/sub-BIGMEG{s}/data.npy" for s in config["meg"]["subjects"]]
        + [f"{RESULTS}/brain/nsd/rois.parquet"]
    )


ENCODING_ARRAYS = ["scores", "split_scores", "alphas", "pvalues"]  # MEG subject folders (plus scores.parquet)


def subject_result(modality, model, checkpoint, subject):
    """A subject's encoding result: fMRI its folder's meta.json (arrays, brainprop.fmri_arrays), MEG its tidy table."""
    if modality == "fmri":
        return f"{RESULTS}/encoding/fmri/{model}/{checkpoint}/subj{int(subject):02d}/meta.json"
    return f"{RESULTS}/encoding/meg/{model}/{checkpoint}/sub-BIGMEG{subject}/scores.parquet"


def group_result(modality, model, checkpoint):
    """Group statistics of a (model, checkpoint): fMRI the group folder's meta.json, MEG the tidy table."""
    if modality == "fmri":
        return f"{RESULTS}/encoding/fmri/{model}/{checkpoint}/group/meta.json"
    return f"{RESULTS}/encoding/meg/{model}/{checkpoint}/group.parquet"


def modality_subjects(modality):
    return config["nsd"]["subjects"] if modality == "fmri" else config["meg"]["subjects"]


def _pca_features(wildcards, dataset):
    folder = feature_dir("pca", wildcards.model, wildcards.checkpoint, dataset)
    return ([f"{folder}/{layer}.{s}.npy" for layer in layers_of(wildcards.model) for s in ("forward", "backprop")]
            + [f"{folder}/index.parquet"])


def nsd_pca_features(wildcards):
    """PCA features of the NSD images for a model checkpoint."""
    return _pca_features(wildcards, "nsd")


def things_pca_features(wildcards):
    """PCA features of the THINGS images for a model checkpoint."""
    return _pca_features(wildcards, "things")


def encoding_keys(wildcards):
    """Key columns of the tidy score tables."""
    return {"subject": int(wildcards.subject), "model": wildcards.model, "checkpoint": wildcards.checkpoint}


def meg_subject_scores(wildcards):
    return [subject_result("meg", wildcards.model, wildcards.checkpoint, s) for s in config["meg"]["subjects"]]


def fmri_subject_scores(wildcards):
    return [subject_result("fmri", wildcards.model, wildcards.checkpoint, s) for s in config["nsd"]["subjects"]]


def encoding_targets():
    """Group statistics of every (modality, model, checkpoint)."""
    return [group_result(modality, m, c) for modality in ("fmri", "meg") for m in config["models"]
            for c in checkpoints_of(m)]


def training_tables(wildcards):
    """Stimulus-format tables of the training images (training.images): the pretraining set, or the
    stimulus tables of training.datasets. Pairs with training_roots, in the same order."""
    if config["training"]["images"] == "pretraining":
        return [f"{RESULTS}/training/pretraining.parquet"]
    return [f"{RESULTS}/stimuli/{d}.parquet" for d in config["training"]["datasets"]]


def previous_training_checkpoint(wildcards):
    """The checkpoint a training segment resumes from: the last of training.checkpoints (or the
    initialisation, iteration 0) before the segment's iteration."""
    it = int(wildcards.iteration)
    listed = config["training"]["checkpoints"]
    if it not in listed:
        raise ValueError(f"checkpoint_it{it}.pt: iteration {it} is not in training.checkpoints {listed}")
    previous = max(c for c in [0, *listed] if c < it)
    return f"{RESULTS}/training/{wildcards.model}/checkpoint_it{previous}.pt"


def training_segment_end(wildcards):
    """Iteration a training segment stops at (its checkpoint's)."""
    return int(wildcards.iteration)


def training_section(wildcards):
    """training config without the keys that only choose checkpoints and images (narrow params:
    adding a checkpoint or switching image sets does not rerun finished segments by itself)."""
    return {k: v for k, v in config["training"].items() if k not in ("checkpoints", "datasets", "images")}


def things_sample_attributes(wildcards):
    """THINGS-MEG sample attributes that select the THINGS images of a real run (either image layout,
    docs/meg.md); none for NSD or the demo (whose image tree is the MEG layout the simulator reads)."""
    if wildcards.dataset != "things" or config["demo"]:
        return []
    return [f"{brain_root('things_meg')}/sourcedata/sample_attributes_P{n}.csv" for n in config["meg"]["subjects"]]
