from brainprop.robustness import run_robustness
from brainprop.utils import log_to_file

log_to_file(snakemake.log[0])
i, p = snakemake.input, snakemake.params
nsd = [{"betas": b, "images": im, "mask": m} for b, im, m in zip(i.betas, i.nsd_images, i.masks)]
meg = [{"data": d, "images": im, "times": t} for d, im, t in zip(i.meg, i.meg_images, i.times)]
run_robustness(p.nsd_dir, p.things_dir, p.layer, p.projection_dims, nsd, meg, i.fmri_group[0], p.pca_dims,
               p.encoding, p.seed, p.min_significant, snakemake.output.grid)
