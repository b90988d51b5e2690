from brainprop.scoring import group_meg
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
group_meg(snakemake.input.scores, snakemake.output.group, q=snakemake.params.q)
