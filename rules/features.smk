# Per-image forward activations and backpropagated gradients, then PCA.


rule extract_features:
    input:
        checkpoint=checkpoint_file,
        table=f"{RESULTS}/stimuli/{{dataset}}.parquet",
        # the training images: the fixed Sinkhorn bank of the image-wise loss (docs/dino.md)
        bank_tables=training_tables,
    output:
        forward=[f"{feature_dir('raw', '{model}', '{checkpoint}', '{dataset}')}/{layer}.forward.npy" for layer in LAYERS],
        backprop=[f"{feature_dir('raw', '{model}', '{checkpoint}', '{dataset}')}/{layer}.backprop.npy" for layer in LAYERS],
        index=f"{feature_dir('raw', '{model}', '{checkpoint}', '{dataset}')}/index.parquet",
        losses=f"{feature_dir('raw', '{model}', '{checkpoint}', '{dataset}')}/losses.parquet",
    log:
        f"{RESULTS}/logs/features/{{model}}_{{checkpoint}}_{{dataset}}.log",
    params:
        root=stimulus_root_param,
        bank_roots=training_roots,
        model=model_config,
        features=features_config,
        seed=config["seed"],
    resources:
        gpu=1,
    script:
        "../workflow/scripts/extract_features.py"


rule pca_features:
    input:
        raw=rules.extract_features.output.forward + rules.extract_features.output.backprop,
        index=rules.extract_features.output.index,
    output:
        forward=[f"{feature_dir('pca', '{model}', '{checkpoint}', '{dataset}')}/{layer}.forward.npy" for layer in LAYERS],
        backprop=[f"{feature_dir('pca', '{model}', '{checkpoint}', '{dataset}')}/{layer}.backprop.npy" for layer in LAYERS],
        index=f"{feature_dir('pca', '{model}', '{checkpoint}', '{dataset}')}/index.parquet",
        summary=f"{feature_dir('pca', '{model}', '{checkpoint}', '{dataset}')}/pca_summary.parquet",
    log:
        f"{RESULTS}/logs/pca/{{model}}_{{checkpoint}}_{{dataset}}.log",
    params:
        layers=LAYERS,
        dim=config["features"]["pca"]["dim"],
        seed=config["seed"],
    script:
        "../workflow/scripts/pca_features.py"
