from brainprop.brain.nsd import prepare_nsd_subject
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
o, p = snakemake.output, snakemake.params
prepare_nsd_subject(snakemake.input.root, int(snakemake.wildcards.subject), o.betas, o.images, o.mask,
                    sessions=p.sessions, n_sessions=p.n_sessions)
