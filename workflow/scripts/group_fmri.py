from pathlib import Path

from brainprop.fmri_arrays import group_fmri
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
group_fmri(snakemake.input.subjects, Path(snakemake.output.meta).parent)
