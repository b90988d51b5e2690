from brainprop.figures import make_figure
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
make_figure(snakemake.rule, snakemake.input, snakemake.params.fig, snakemake.output.pdf, snakemake.output.table)
