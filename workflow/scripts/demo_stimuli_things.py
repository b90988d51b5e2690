from pathlib import Path
from brainprop.stimuli import generate_things_demo
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
p = snakemake.params
generate_things_demo(Path(snakemake.output.captions).parent, image_size=p.image_size, seed=p.seed, **p.stimuli)
