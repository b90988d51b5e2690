from brainprop.figures import headline_table
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
headline_table(dict(snakemake.input.items()), snakemake.output[0])
