from brainprop.simulate.nsd import simulate_nsd_from_files
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
i, p = snakemake.input, snakemake.params
simulate_nsd_from_files(snakemake.output.root, i.table, i.hdf5, i.forward, i.backprop, i.index,
                        params=p.simulation, seed=p.seed)
