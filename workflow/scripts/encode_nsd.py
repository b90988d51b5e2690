from pathlib import Path

from brainprop.scoring import encode_nsd_subject
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
i, p = snakemake.input, snakemake.params
encode_nsd_subject(Path(i.features[-1]).parent, p.layers, i.betas, i.images, i.mask, Path(snakemake.output.meta).parent,
                   p.encoding, p.pca["dim"], p.pca["residual_dim"], seed=p.seed, keys=p.table_keys)
