# Brain data: the demo's simulated THINGS-MEG and NSD (real layouts, planted effects), then
# the loaders that prepare real or simulated data identically.


rule simulate_nsd:
    input:
        table=f"{RESULTS}/stimuli/nsd.parquet",
        hdf5=f"{RESULTS}/demo/stimuli/nsd/nsd_stimuli.hdf5",
        forward=generator_features("nsd", "forward"),
        backprop=generator_features("nsd", "backprop"),
        index=generator_features("nsd", "index"),
    output:
        root=directory(f"{RESULTS}/demo/nsd"),
    log:
        f"{RESULTS}/logs/simulate_nsd.log",
    params:
        simulation=simulation_nsd_params(),
        seed=config["seed"],
    script:
        "../workflow/scripts/simulate_nsd.py"


rule simulate_meg:
    input:
        table=f"{RESULTS}/stimuli/things.parquet",
        forward=generator_features("things", "forward"),
        backprop=generator_features("things", "backprop"),
        index=generator_features("things", "index"),
    output:
        root=directory(f"{RESULTS}/demo/things_meg"),
    log:
        f"{RESULTS}/logs/simulate_meg.log",
    params:
        layers=LAYERS,
        simulation=simulation_meg_params(),
        seed=config["seed"],
    script:
        "../workflow/scripts/simulate_meg.py"


rule prepare_nsd:
    input:
        root=brain_root("nsd"),
    output:
        betas=f"{RESULTS}/brain/nsd/subj{{subject}}/betas.npy",
        images=f"{RESULTS}/brain/nsd/subj{{subject}}/images.parquet",
        mask=f"{RESULTS}/brain/nsd/subj{{subject}}/vertex_mask.npy",
    log:
        f"{RESULTS}/logs/prepare_nsd_subj{{subject}}.log",
    params:
        sessions=config["nsd"]["sessions"],
        n_sessions=nsd_n_sessions,
    script:
        "../workflow/scripts/prepare_nsd.py"


rule nsd_rois:
    input:
        root=brain_root("nsd"),
    output:
        rois=f"{RESULTS}/brain/nsd/rois.parquet",
        vertex_rois=f"{RESULTS}/brain/nsd/vertex_rois.npy",
    log:
        f"{RESULTS}/logs/nsd_rois.log",
    params:
        surface=config["nsd"]["roi_surface"],
    script:
        "../workflow/scripts/nsd_rois.py"


rule prepare_meg:
    input:
        root=brain_root("things_meg"),
        table=f"{RESULTS}/stimuli/things.parquet",
    output:
        data=f"{RESULTS}/brain/meg/sub-BIGMEG{{subject}}/data.npy",
        images=f"{RESULTS}/brain/meg/sub-BIGMEG{{subject}}/images.parquet",
        times=f"{RESULTS}/brain/meg/sub-BIGMEG{{subject}}/times.npy",
        mismatches=f"{RESULTS}/brain/meg/sub-BIGMEG{{subject}}/mismatches.parquet",
    log:
        f"{RESULTS}/logs/prepare_meg_sub-BIGMEG{{subject}}.log",
    params:
        source=config["meg"]["source"],
        preprocessing=config["meg"]["preprocessing"],
    script:
        "../workflow/scripts/prepare_meg.py"
