from pathlib import Path

from brainprop.features import run_pca
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
p = snakemake.params
run_pca(Path(snakemake.input.index).parent, Path(snakemake.output.index).parent, p.layers, p.dim, seed=p.seed)
