from brainprop.models import run_training
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
p = snakemake.params
run_training(snakemake.input.tables, p.roots, p.image_size, p.training, snakemake.output.checkpoints,
             seed=p.seed, threads=snakemake.threads)
