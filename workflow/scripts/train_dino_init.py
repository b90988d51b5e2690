from brainprop.models import run_training_init
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
run_training_init(snakemake.params.training, snakemake.output.checkpoint, seed=snakemake.params.seed)
