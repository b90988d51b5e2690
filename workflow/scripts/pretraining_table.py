from brainprop.stimuli import build_pretraining_table
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
build_pretraining_table(snakemake.params.root, snakemake.params.image_list, snakemake.output.table)
