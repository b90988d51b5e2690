from brainprop.stimuli import build_stimulus_table
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
build_stimulus_table(snakemake.wildcards.dataset, snakemake.params.root, snakemake.output.table,
                     captions=snakemake.params.captions, subjects=snakemake.params.subjects,
                     sample_attributes=list(snakemake.input.sample_attributes))
