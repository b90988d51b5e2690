# Analyses and figures of the paper (each its own target), the robustness grid and the headline table.

FIGURE_MODEL = config["figures"]["model"]
FIGURE_NAMES = ["fig2_hierarchy", "fig3_residual", "fig4_models_mean", "fig5_training", "fig6_training_maps",
                "fig7_training_meg", "figS1_models_hierarchy", "figS2_robustness", "fig_halftime"]
ROBUST_LAYER = config["robustness"]["layer"] or LAYERS[-1]
SURFACE = config["figures"]["surface"]
SURFACE_FILES = [f"{RESULTS}/brain/nsd/surf/{hemi}.{SURFACE}" for hemi in ("lh", "rh")]
FIGURE_MAPS = ["surface", "smoothing_iterations", "smoothing_weight"]
FIGURE_ROIS = ["roi_hemispheres", "roi_best_layer", "roi_fraction", "distance"]


def final_checkpoint(model):
    return checkpoints_of(model)[-1]


def group_tables(modality, models, checkpoints=None):
    """Group results of (model, checkpoint) pairs: the given checkpoints, or each model's last."""
    return [group_result(modality, m, c) for m in models for c in (checkpoints or [final_checkpoint(m)])]


def subject_tables(modality, models, checkpoints=None):
    """Per-subject results of (model, checkpoint) pairs (default: each model's last checkpoint)."""
    return [subject_result(modality, m, c, s) for m in models for c in (checkpoints or [final_checkpoint(m)])
            for s in modality_subjects(modality)]


def figure_params(*keys, **extra):
    """Only the settings a figure uses, so that changing one reruns only the figures that use it."""
    params = {k: config["figures"][k] for k in keys}
    if "surface" in keys:
        params["fsaverage_dir"] = f"{RESULTS}/brain/nsd"
    return {**params, **extra}


def robustness_features(wildcards):
    """Feature settings of the robustness grid: one layer, the Gaussian projection at the grid's largest
    dimension (the smaller ones are derived from it: the Gaussian matrix is column-nested)."""
    features = features_config(wildcards)
    projection = {**features["projection"], "method": "gaussian", "dim": max(config["robustness"]["projection_dims"])}
    return {**features, "layers": [ROBUST_LAYER], "projection": projection}


def robustness_dir(dataset):
    """The grid's one feature extraction of a stimulus set (last checkpoint of figures.model)."""
    return f"{RESULTS}/robustness/{FIGURE_MODEL}/{final_checkpoint(FIGURE_MODEL)}/{dataset}"


def robustness_inputs(dataset):
    return [f"{robustness_dir(dataset)}/{name}"
            for name in (f"{ROBUST_LAYER}.forward.npy", f"{ROBUST_LAYER}.backprop.npy", "index.parquet")]


def brain_files(modality, name):
    """A prepared file of every subject of a modality."""
    if modality == "nsd":
        return [f"{RESULTS}/brain/nsd/subj{s:02d}/{name}" for s in config["nsd"]["subjects"]]
    return [f"{RESULTS}/brain/meg/sub-BIGMEG{s}/{name}" for s in config["meg"]["subjects"]]


def figure_targets():
    return [f"{RESULTS}/{name}.pdf" for name in FIGURE_NAMES] + [f"{RESULTS}/tables/headline.csv"]


rule fsaverage_surface:
    input:
        root=brain_root("nsd"),
    output:
        f"{RESULTS}/brain/nsd/surf/{{hemi}}.{{surface}}",
    wildcard_constraints:
        hemi="lh|rh",
        surface="inflated|pial|white|sphere",
    log:
        f"{RESULTS}/logs/fsaverage_surface_{{hemi}}.{{surface}}.log",
    shell:
        "cp {input.root}/nsddata/freesurfer/fsaverage/surf/{wildcards.hemi}.{wildcards.surface} {output} 2> {log}"


rule extract_robustness:
    input:
        checkpoint=checkpoint_file,
        table=f"{RESULTS}/stimuli/{{dataset}}.parquet",
        bank_tables=training_tables,
    output:
        forward=f"{RESULTS}/robustness/{{model}}/{{checkpoint}}/{{dataset}}/{ROBUST_LAYER}.forward.npy",
        backprop=f"{RESULTS}/robustness/{{model}}/{{checkpoint}}/{{dataset}}/{ROBUST_LAYER}.backprop.npy",
        index=f"{RESULTS}/robustness/{{model}}/{{checkpoint}}/{{dataset}}/index.parquet",
        losses=f"{RESULTS}/robustness/{{model}}/{{checkpoint}}/{{dataset}}/losses.parquet",
    wildcard_constraints:
        model=r"[^/]+",
        checkpoint=r"[^/]+",
        dataset=r"[^/]+",
    log:
        f"{RESULTS}/logs/robustness/{{model}}_{{checkpoint}}_{{dataset}}.log",
    params:
        root=stimulus_root_param,
        bank_roots=training_roots,
        model=model_config,
        features=robustness_features,
        seed=config["seed"],
    resources:
        gpu=1,
    script:
        "../workflow/scripts/extract_features.py"


rule robustness:
    input:
        nsd=robustness_inputs("nsd"),
        things=robustness_inputs("things"),
        betas=brain_files("nsd", "betas.npy"),
        nsd_images=brain_files("nsd", "images.parquet"),
        masks=brain_files("nsd", "vertex_mask.npy"),
        meg=brain_files("meg", "data.npy"),
        meg_images=brain_files("meg", "images.parquet"),
        times=brain_files("meg", "times.npy"),
        fmri_group=group_tables("fmri", [FIGURE_MODEL]),
    output:
        grid=f"{RESULTS}/tables/robustness_grid.parquet",
    log:
        f"{RESULTS}/logs/robustness/grid.log",
    params:
        nsd_dir=robustness_dir("nsd"),
        things_dir=robustness_dir("things"),
        layer=ROBUST_LAYER,
        projection_dims=config["robustness"]["projection_dims"],
        pca_dims=config["robustness"]["pca_dims"],
        encoding=config["encoding"],
        seed=config["seed"],
        min_significant=config["figures"]["min_significant"],
    threads: 1
    resources:
        gpu=1,
    script:
        "../workflow/scripts/robustness.py"


rule fig2_hierarchy:
    input:
        fmri=group_tables("fmri", [FIGURE_MODEL]),
        meg=group_tables("meg", [FIGURE_MODEL]),
        rois=rules.nsd_rois.output.rois,
        vertex_rois=rules.nsd_rois.output.vertex_rois,
        surf=SURFACE_FILES,
    output:
        pdf=report(f"{RESULTS}/fig2_hierarchy.pdf", caption="../workflow/report/fig2_hierarchy.rst",
                   category="Figures"),
        table=f"{RESULTS}/tables/fig2_hierarchy.csv",
    log:
        f"{RESULTS}/logs/figures/fig2_hierarchy.log",
    params:
        fig=figure_params("min_significant", *FIGURE_ROIS, *FIGURE_MAPS,
                          title=f"{FIGURE_MODEL}, {final_checkpoint(FIGURE_MODEL)}: forward vs backprop hierarchy"),
    script:
        "../workflow/scripts/figure.py"


use rule fig2_hierarchy as figS1_models_hierarchy with:
    input:
        fmri=group_tables("fmri", config["models"]),
        meg=group_tables("meg", config["models"]),
        rois=rules.nsd_rois.output.rois,
        vertex_rois=rules.nsd_rois.output.vertex_rois,
        surf=SURFACE_FILES,
    output:
        pdf=report(f"{RESULTS}/figS1_models_hierarchy.pdf", caption="../workflow/report/figS1_models_hierarchy.rst",
                   category="Figures"),
        table=f"{RESULTS}/tables/figS1_models_hierarchy.csv",
    log:
        f"{RESULTS}/logs/figures/figS1_models_hierarchy.log",
    params:
        fig=figure_params("min_significant", *FIGURE_ROIS, *FIGURE_MAPS,
                          title=f"All models ({', '.join(config['models'])}), last checkpoints: hierarchy"),


rule fig3_residual:
    input:
        fmri=group_tables("fmri", config["models"]),
        fmri_subjects=subject_tables("fmri", config["models"]),
        meg=group_tables("meg", config["models"]),
    output:
        pdf=report(f"{RESULTS}/fig3_residual.pdf", caption="../workflow/report/fig3_residual.rst", category="Figures"),
        table=f"{RESULTS}/tables/fig3_residual.csv",
    log:
        f"{RESULTS}/logs/figures/fig3_residual.log",
    params:
        fig=figure_params("min_significant", models=list(config["models"]),
                          families={m: e["family"] for m, e in config["models"].items()}),
    script:
        "../workflow/scripts/figure.py"


rule fig4_models_mean:
    input:
        fmri=group_tables("fmri", config["models"]),
        meg_subjects=subject_tables("meg", config["models"]),
        vertex_rois=rules.nsd_rois.output.vertex_rois,
        surf=SURFACE_FILES,
    output:
        pdf=report(f"{RESULTS}/fig4_models_mean.pdf", caption="../workflow/report/fig4_models_mean.rst",
                   category="Figures"),
        table=f"{RESULTS}/tables/fig4_models_mean.csv",
    log:
        f"{RESULTS}/logs/figures/fig4_models_mean.log",
    params:
        fig=figure_params("min_significant", *FIGURE_MAPS, q=config["encoding"]["fdr_q"]),
    script:
        "../workflow/scripts/figure.py"


rule fig5_training:
    input:
        fmri=group_tables("fmri", [FIGURE_MODEL], checkpoints_of(FIGURE_MODEL)),
        fmri_subjects=subject_tables("fmri", [FIGURE_MODEL], checkpoints_of(FIGURE_MODEL)),
        meg=group_tables("meg", [FIGURE_MODEL], checkpoints_of(FIGURE_MODEL)),
    output:
        pdf=report(f"{RESULTS}/fig5_training.pdf", caption="../workflow/report/fig5_training.rst", category="Figures"),
        table=f"{RESULTS}/tables/fig5_training.csv",
    log:
        f"{RESULTS}/logs/figures/fig5_training.log",
    params:
        fig=figure_params("min_significant", model=FIGURE_MODEL),
    script:
        "../workflow/scripts/figure.py"


rule fig6_training_maps:
    input:
        fmri=group_tables("fmri", [FIGURE_MODEL], [f"it{s}" for s in config["figures"]["stages"]]),
        vertex_rois=rules.nsd_rois.output.vertex_rois,
        surf=SURFACE_FILES,
    output:
        pdf=report(f"{RESULTS}/fig6_training_maps.pdf", caption="../workflow/report/fig6_training_maps.rst",
                   category="Figures"),
        table=f"{RESULTS}/tables/fig6_training_maps.csv",
    log:
        f"{RESULTS}/logs/figures/fig6_training_maps.log",
    params:
        fig=figure_params("min_significant", "stages", *FIGURE_MAPS, model=FIGURE_MODEL),
    script:
        "../workflow/scripts/figure.py"


rule fig7_training_meg:
    input:
        meg=group_tables("meg", [FIGURE_MODEL], [f"it{s}" for s in config["figures"]["stages"]]),
    output:
        pdf=report(f"{RESULTS}/fig7_training_meg.pdf", caption="../workflow/report/fig7_training_meg.rst",
                   category="Figures"),
        table=f"{RESULTS}/tables/fig7_training_meg.csv",
    log:
        f"{RESULTS}/logs/figures/fig7_training_meg.log",
    params:
        fig=figure_params("stages", model=FIGURE_MODEL),
    script:
        "../workflow/scripts/figure.py"


rule figS2_robustness:
    input:
        grid=rules.robustness.output.grid,
    output:
        pdf=report(f"{RESULTS}/figS2_robustness.pdf", caption="../workflow/report/figS2_robustness.rst",
                   category="Figures"),
        table=f"{RESULTS}/tables/figS2_robustness.csv",
    log:
        f"{RESULTS}/logs/figures/figS2_robustness.log",
    params:
        fig=figure_params(model=FIGURE_MODEL, checkpoint=final_checkpoint(FIGURE_MODEL), layer=ROBUST_LAYER),
    script:
        "../workflow/scripts/figure.py"


rule fig_halftime:
    input:
        fmri=group_tables("fmri", [FIGURE_MODEL], checkpoints_of(FIGURE_MODEL)),
        meg=group_tables("meg", [FIGURE_MODEL], checkpoints_of(FIGURE_MODEL)),
        rois=rules.nsd_rois.output.rois,
        vertex_rois=rules.nsd_rois.output.vertex_rois,
    output:
        pdf=report(f"{RESULTS}/fig_halftime.pdf", caption="../workflow/report/fig_halftime.rst", category="Figures"),
        table=f"{RESULTS}/tables/fig_halftime.csv",
    log:
        f"{RESULTS}/logs/figures/fig_halftime.log",
    params:
        fig=figure_params("min_significant", *FIGURE_ROIS, "halftime_fraction", model=FIGURE_MODEL),
    script:
        "../workflow/scripts/figure.py"


rule headline:
    input:
        **{name: f"{RESULTS}/tables/{name}.csv" for name in FIGURE_NAMES},
    output:
        report(f"{RESULTS}/tables/headline.csv", caption="../workflow/report/headline.rst", category="Tables"),
    log:
        f"{RESULTS}/logs/figures/headline.log",
    script:
        "../workflow/scripts/headline.py"


rule all_figures:
    input:
        figure_targets(),
