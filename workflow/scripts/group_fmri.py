from brainprop.scoring import group_fmri
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
group_fmri(snakemake.input.scores, snakemake.output.group)
