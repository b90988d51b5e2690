from pathlib import Path

from brainprop.simulate.meg import run_simulate_things_meg
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
p = snakemake.params
run_simulate_things_meg(snakemake.output.root, snakemake.input.table, Path(snakemake.input.index).parent,
                        p.layers, p.simulation, p.seed)
