from brainprop.brain.meg import prepare_meg_subject
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
o, p = snakemake.output, snakemake.params
prepare_meg_subject(snakemake.input.root, int(snakemake.wildcards.subject), p.source, o.data, o.images, o.times,
                    params=p.preprocessing, stimulus_table=snakemake.input.table, out_mismatches=o.mismatches)
