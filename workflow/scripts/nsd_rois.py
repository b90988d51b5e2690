from brainprop.brain.atlas import prepare_roi_table
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
prepare_roi_table(snakemake.input.root, snakemake.output.rois, snakemake.output.vertex_rois,
                  surface=snakemake.params.surface)
