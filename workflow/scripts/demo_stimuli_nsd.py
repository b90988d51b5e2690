from pathlib import Path
from brainprop.stimuli import generate_nsd_demo
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
p = snakemake.params
generate_nsd_demo(Path(snakemake.output.hdf5).parent, image_size=p.image_size, seed=p.seed, **p.stimuli)
