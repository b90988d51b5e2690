from pathlib import Path

from brainprop.features import run_feature_extraction
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
p = snakemake.params
run_feature_extraction(snakemake.input.checkpoint, snakemake.input.table, p.root,
                       Path(snakemake.output.index).parent, p.model, p.features, seed=p.seed,
                       bank_tables=list(snakemake.input.bank_tables), bank_roots=list(p.bank_roots))
