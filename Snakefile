# brainprop: do backpropagated gradients map onto the brain like forward activations?
# (Raugel et al. 2026). This file only wires: config, validation, stages, targets.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/stimuli.smk"
include: "rules/training.smk"
include: "rules/features.smk"
include: "rules/brain.smk"
include: "rules/encoding.smk"
include: "rules/figures.smk"


rule all:
    default_target: True
    input:
        all_feature_targets(),
        brain_targets(),
        encoding_targets(),
        figure_targets(),
