# Helpers of the workflow: config validation, target lists, input functions.
from pathlib import Path

from brainprop.config import validate_config

validate_config(config, workflow.source_path("../workflow/schemas/config.schema.yaml"))

RESULTS = config["results"]
DATASETS = config["features"]["datasets"]
LAYERS = config["features"]["layers"]


wildcard_constraints:
    dataset="|".join(DATASETS),
    model="[A-Za-z0-9_\-]+",
    checkpoint=r"it\d+",


def checkpoints_of(model):
    """Checkpoint labels of a model: the training iterations of a model trained here."""
    entry = config["models"][model]
    if entry["kind"] == "dino_checkpoint":
        return [f"it{it}" for it in config["training"]["checkpoints"]]
    raise ValueError(f"models.{model}.kind={entry['kind']!r} is not supported")


def stimulus_root(dataset):
    """Folder the stimulus table's ``source`` paths are relative to."""
    if config["demo"]:
        return f"{RESULTS}/demo/stimuli/{dataset}"
    if dataset == "things":
        return config["data"]["things_images"]
    return f"{config['data']['nsd']}/nsddata_stimuli/stimuli/nsd"


def stimulus_table_inputs(wildcards):
    """Files a stimulus table is built from: the demo generator's outputs or the dataset's own files."""
    root = stimulus_root(wildcards.dataset)
    if wildcards.dataset == "things":
        return {"marker": f"{root}/captions.csv" if config["demo"] else root}
    info = (f"{root}/nsd_stim_info_merged.csv" if config["demo"]
            else f"{config['data']['nsd']}/nsddata/experiments/nsd/nsd_stim_info_merged.csv")
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
    """Stimulus roots of the training datasets, in the order of training.datasets."""
    return [stimulus_root(d) for d in config["training"]["datasets"]]


def training_image_size(wildcards):
    """Size images are loaded at for training (the model's image_size)."""
    return config["models"][wildcards.model]["image_size"]


def brain_root(dataset):
    """Root of a brain dataset: the demo's simulated tree or the configured real root."""
    if config["demo"]:
        return f"{RESULTS}/demo/{dataset}"
    return config["data"][dataset]


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


ENCODING_ARRAYS = ["scores", "split_scores", "alphas", "pvalues"]


def _pca_features(wildcards, dataset):
    folder = feature_dir("pca", wildcards.model, wildcards.checkpoint, dataset)
    return [f"{folder}/{layer}.{s}.npy" for layer in LAYERS for s in ("forward", "backprop")] + [f"{folder}/index.parquet"]


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
    return [f"{RESULTS}/encoding/meg/{wildcards.model}/{wildcards.checkpoint}/sub-BIGMEG{s}/scores.parquet"
            for s in config["meg"]["subjects"]]


def fmri_subject_scores(wildcards):
    return [f"{RESULTS}/encoding/fmri/{wildcards.model}/{wildcards.checkpoint}/subj{s:02d}/scores.parquet"
            for s in config["nsd"]["subjects"]]


def encoding_targets():
    """Group statistics of every (modality, model, checkpoint)."""
    return [f"{RESULTS}/encoding/{modality}/{m}/{c}/group.parquet"
            for modality in ("fmri", "meg") for m in config["models"] for c in checkpoints_of(m)]


def bank_tables(wildcards):
    """Stimulus tables of the training datasets (the image-wise loss's Sinkhorn bank), in the order of training_roots."""
    return [f"{RESULTS}/stimuli/{d}.parquet" for d in config["training"]["datasets"]]
