from brainprop.models import run_training_segment
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
p = snakemake.params
run_training_segment(snakemake.input.tables, p.roots, p.training, snakemake.input.previous, p.until,
                     snakemake.output.checkpoint, snakemake.output.log, threads=snakemake.threads)
