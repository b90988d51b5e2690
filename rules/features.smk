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
    wildcard_constraints:
        model=one_of(TRAINED_MODELS),
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
    wildcard_constraints:
        model=one_of(TRAINED_MODELS),
    script:
        "../workflow/scripts/pca_features.py"


# The benchmark models (kinds mae, timm, clip, owlvit, siglip: pretrained, one checkpoint "pretrained"):
# the image-wise loss of models.<name> on its weights, gradients at the outputs of ten evenly spaced
# residual blocks, written as block0..block9 with their module names in layers.parquet.
use rule extract_features as extract_benchmark_features with:
    input:
        weights=model_sources,
        table=f"{RESULTS}/stimuli/{{dataset}}.parquet",
    output:
        forward=[f"{feature_dir('raw', '{model}', PRETRAINED, '{dataset}')}/{layer}.forward.npy" for layer in BENCHMARK_LAYERS],
        backprop=[f"{feature_dir('raw', '{model}', PRETRAINED, '{dataset}')}/{layer}.backprop.npy" for layer in BENCHMARK_LAYERS],
        index=f"{feature_dir('raw', '{model}', PRETRAINED, '{dataset}')}/index.parquet",
        losses=f"{feature_dir('raw', '{model}', PRETRAINED, '{dataset}')}/losses.parquet",
        layers=f"{feature_dir('raw', '{model}', PRETRAINED, '{dataset}')}/layers.parquet",
    log:
        f"{RESULTS}/logs/features/{{model}}_{PRETRAINED}_{{dataset}}.log",
    params:
        root=stimulus_root_param,
        model=benchmark_params,
        features=features_config,
        seed=config["seed"],
    wildcard_constraints:
        model=one_of(BENCHMARK_MODELS),


use rule pca_features as pca_benchmark_features with:
    input:
        raw=rules.extract_benchmark_features.output.forward + rules.extract_benchmark_features.output.backprop,
        index=rules.extract_benchmark_features.output.index,
    output:
        forward=[f"{feature_dir('pca', '{model}', PRETRAINED, '{dataset}')}/{layer}.forward.npy" for layer in BENCHMARK_LAYERS],
        backprop=[f"{feature_dir('pca', '{model}', PRETRAINED, '{dataset}')}/{layer}.backprop.npy" for layer in BENCHMARK_LAYERS],
        index=f"{feature_dir('pca', '{model}', PRETRAINED, '{dataset}')}/index.parquet",
        summary=f"{feature_dir('pca', '{model}', PRETRAINED, '{dataset}')}/pca_summary.parquet",
    log:
        f"{RESULTS}/logs/pca/{{model}}_{PRETRAINED}_{{dataset}}.log",
    params:
        layers=BENCHMARK_LAYERS,
        dim=config["features"]["pca"]["dim"],
        seed=config["seed"],
    wildcard_constraints:
        model=one_of(BENCHMARK_MODELS),


# The demo's tiny random version of a benchmark model, in the real checkpoint's on-disk layout, so the
# demo runs the real loading code on it (docs/models.md).
rule tiny_model:
    input:
        tables=expand(f"{RESULTS}/stimuli/{{dataset}}.parquet", dataset=DATASETS),
    output:
        directory(tiny_model_dir("{model}")),
    log:
        f"{RESULTS}/logs/models/tiny_{{model}}.log",
    params:
        model=model_config,
        seed=config["seed"],
    wildcard_constraints:
        model=one_of(BENCHMARK_MODELS),
    script:
        "../workflow/scripts/tiny_model.py"
