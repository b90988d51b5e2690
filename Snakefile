# brainprop: do backpropagated gradients map onto the brain like forward activations?
# (Raugel et al. 2026). This file only wires: config, validation, stages, targets.
from snakemake.utils import min_version

min_version("9.0")


# The method; common.smk resolves the run's stack over it: base.yaml + (--configfile files, or the
# demo overlay config/config.yaml when none are given) + --config (see config/README.md).
configfile: f"{workflow.basedir}/config/base.yaml"


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
