# Stimuli: the embedded demo's images (in the real layouts) and one stimulus table per dataset.


rule demo_stimuli_things:
    output:
        captions=f"{RESULTS}/demo/stimuli/things/captions.csv",
    log:
        f"{RESULTS}/logs/demo_stimuli_things.log",
    params:
        stimuli=config["stimuli"]["things"],
        image_size=config["stimuli"]["image_size"],
        seed=config["seed"],
    script:
        "../workflow/scripts/demo_stimuli_things.py"


rule demo_stimuli_nsd:
    output:
        hdf5=f"{RESULTS}/demo/stimuli/nsd/nsd_stimuli.hdf5",
        stim_info=f"{RESULTS}/demo/stimuli/nsd/nsd_stim_info_merged.csv",
        captions=f"{RESULTS}/demo/stimuli/nsd/captions.csv",
    log:
        f"{RESULTS}/logs/demo_stimuli_nsd.log",
    params:
        stimuli=config["stimuli"]["nsd"],
        image_size=config["stimuli"]["image_size"],
        seed=config["seed"],
    script:
        "../workflow/scripts/demo_stimuli_nsd.py"


rule stimulus_table:
    input:
        unpack(stimulus_table_inputs),
        sample_attributes=things_sample_attributes,
    output:
        table=f"{RESULTS}/stimuli/{{dataset}}.parquet",
    log:
        f"{RESULTS}/logs/stimulus_table_{{dataset}}.log",
    params:
        root=stimulus_root_param,
        captions=captions_param,
        subjects=config["nsd"]["subjects"],
    script:
        "../workflow/scripts/stimulus_table.py"
