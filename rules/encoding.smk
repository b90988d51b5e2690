# Ridge encoding of every (subject, model, checkpoint, layer, signal), and group statistics.


rule encode_nsd:
    input:
        features=nsd_pca_features,
        betas=rules.prepare_nsd.output.betas,
        images=rules.prepare_nsd.output.images,
        mask=rules.prepare_nsd.output.mask,
    output:
        meta=f"{RESULTS}/encoding/fmri/{{model}}/{{checkpoint}}/subj{{subject}}/meta.json",
        arrays=[f"{RESULTS}/encoding/fmri/{{model}}/{{checkpoint}}/subj{{subject}}/{name}.npy"
                for name in FMRI_SUBJECT_ARRAYS],
    log:
        f"{RESULTS}/logs/encoding/fmri_{{model}}_{{checkpoint}}_subj{{subject}}.log",
    params:
        layers=layers_param,
        encoding=config["encoding"],
        pca=config["features"]["pca"],
        seed=config["seed"],
        table_keys=encoding_keys,
    threads: 1
    resources:
        gpu=1,
    script:
        "../workflow/scripts/encode_nsd.py"


rule encode_meg:
    input:
        features=things_pca_features,
        data=rules.prepare_meg.output.data,
        images=rules.prepare_meg.output.images,
        times=rules.prepare_meg.output.times,
    output:
        scores=f"{RESULTS}/encoding/meg/{{model}}/{{checkpoint}}/sub-BIGMEG{{subject}}/scores.parquet",
        arrays=[f"{RESULTS}/encoding/meg/{{model}}/{{checkpoint}}/sub-BIGMEG{{subject}}/{name}.npy" for name in ENCODING_ARRAYS],
    log:
        f"{RESULTS}/logs/encoding/meg_{{model}}_{{checkpoint}}_sub-BIGMEG{{subject}}.log",
    params:
        layers=layers_param,
        encoding=config["encoding"],
        pca=config["features"]["pca"],
        seed=config["seed"],
        table_keys=encoding_keys,
    threads: 1
    resources:
        gpu=1,
    script:
        "../workflow/scripts/encode_meg.py"


rule group_meg:
    input:
        scores=meg_subject_scores,
    output:
        group=f"{RESULTS}/encoding/meg/{{model}}/{{checkpoint}}/group.parquet",
    log:
        f"{RESULTS}/logs/encoding/meg_{{model}}_{{checkpoint}}_group.log",
    params:
        q=config["encoding"]["fdr_q"],
    script:
        "../workflow/scripts/group_meg.py"


rule group_fmri:
    input:
        subjects=fmri_subject_scores,
    output:
        meta=f"{RESULTS}/encoding/fmri/{{model}}/{{checkpoint}}/group/meta.json",
        arrays=[f"{RESULTS}/encoding/fmri/{{model}}/{{checkpoint}}/group/{name}.npy" for name in FMRI_GROUP_ARRAYS],
    log:
        f"{RESULTS}/logs/encoding/fmri_{{model}}_{{checkpoint}}_group.log",
    script:
        "../workflow/scripts/group_fmri.py"
