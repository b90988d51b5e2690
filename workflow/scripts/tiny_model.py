from brainprop.models import run_tiny_model
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
run_tiny_model(snakemake.params.model, list(snakemake.input.tables), snakemake.output[0], snakemake.params.seed)
