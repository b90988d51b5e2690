"""Cost model of the paper's statistics on one H200 (docs/scale.md): GPU-hours from counted flops.

Steps, each printed:

1. **Work.** From the resolved paper config (``config/base.yaml`` + ``config/paper.yaml``): models, layers,
   checkpoints, ``encoding.permutation`` (N, tested signals, sequential block), ``encoding.residual``, PCA
   dimensions, alphas, splits; and the data sizes of the paper (NSD: 8 subjects, their image counts,
   327,684 fsaverage vertices; THINGS-MEG: 4 subjects, 22,448 images, 271 channels x 106 times, no
   permutations). Every (model, layer, checkpoint, subject) costs target fits: the observed fits of the
   three fitted signals, N refit shuffles per target of each tested signal, N joint refits of every target
   for the residual test at its tested layers (plus one precomputation per permutation).
2. **Flops per target fit** of the engine's LOO path (:func:`brainprop.encoding.loo_flops_per_target`,
   summed over the outer splits), with the basis size J and exact rows |S| of real splits: a
   ``RidgeEncoder`` is built on PCA-like features of the paper's size (its J and |S| depend on the
   leverages of the design, not on the brain data).
3. **Efficiency.** The engine's measured CPU rate (counted flops / seconds of a real fit, precomputation
   excluded) over this CPU's best ``torch.mm`` rate; the GPU is assumed to reach the same share of its
   peak. The engine's element-wise passes (counted bytes per target fit) run as separate kernels at the
   HBM bandwidth: their time is added (conservative: the CPU efficiency already includes them).
4. **Sequential stopping**, measured: the engine's per-target refit test at N = 1000 with
   ``sequential_block`` on a small simulated problem (a share of signal targets with r^2 spread over
   [0.002, 0.2], latent-factor correlated noise); the share of the N x targets shuffles actually run.
5. **Totals**: a baseline (N refit shuffles for every fitted signal, the residual test at every layer,
   float32 CUDA cores) and the levers applied in turn (restriction to what the figures need, sequential
   stopping, then tensor-core precisions that are NOT implemented and enter as stated assumptions).

Usage::

    python bench/bench_scale.py            # ~10 min on 2 cores (stopping measured at N = 1000)
    python bench/bench_scale.py --quick    # seconds: small sizes, checks the arithmetic (tests)

Timings on a shared 2-core machine are noisy; the efficiency is what carries over.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_encoding import mm_rate  # noqa: E402

from brainprop.config import resolve_config  # noqa: E402
from brainprop.encoding import DEFAULT_MEMORY_BUDGET, RidgeEncoder, cross_validated_ridge  # noqa: E402
from brainprop.simulate.nulls import correlated_null  # noqa: E402
from brainprop.stats import fdr_bh, permutation_test  # noqa: E402

#: NVIDIA H200 SXM datasheet, dense (the datasheet's tensor-core figures are "with sparsity": halved here).
H200 = {"fp32": 67e12, "tf32": 989e12 / 2, "bf16": 1979e12 / 2}
H200_HBM = 4.8e12  # bytes/s
#: Unique images per NSD subject (subj01..subj08: 40, 40, 32, 30, 40, 32, 40, 30 sessions).
NSD_IMAGES = (10000, 10000, 9411, 9209, 10000, 9411, 10000, 9209)
NSD_VERTICES = 327_684  # fsaverage, both hemispheres
MEG_SUBJECTS, MEG_IMAGES, MEG_TARGETS = 4, 22_448, 271 * 106  # channels x time points (-0.5..3 s at 30 Hz)
#: The seven other models of the paper (issue 11): 10 layers, 1 checkpoint each.
OTHER_MODELS, OTHER_LAYERS = 7, 10


@dataclass
class Split:
    """Per-split sizes of the LOO engine: training rows, rank, basis size J, exact rows |S|, held-out rows."""

    n_train: int
    rank: int
    n_basis: int
    n_special: int
    n_test: int


def fit_flops(splits: list[Split], n_alphas: int) -> int:
    """Matrix-product flops of one target fit (all outer splits)."""
    from brainprop.encoding import loo_flops_per_target

    return sum(loo_flops_per_target(s.n_train, s.rank, n_alphas, s.n_basis, s.n_special, s.n_test) for s in splits)


def fit_bytes(splits: list[Split], n_alphas: int, item: int = 4) -> int:
    """HBM bytes of the element-wise passes of one target fit (all splits): per split the training gather,
    centring, ``y_perp`` update and square (about 11 passes over n_train values), the ``(A + J) r`` work
    buffers written and read, and 3 passes over the held-out rows (prediction, data, Pearson r)."""
    return item * sum(11 * s.n_train + 2 * (n_alphas + s.n_basis) * s.rank + 3 * s.n_test for s in splits)


def precompute_flops(splits: list[Split], n_features: int) -> int:
    """Flops of one encoder's per-split precomputation: ``Xc^T Xc`` and ``U = Xc V`` (2 x 2 n p^2), the
    eigendecomposition (~10 p^3) and ``U^T diag(phi_j) U`` (2 J n r^2)."""
    p = n_features
    return sum(4 * s.n_train * p * p + 10 * p**3 + 2 * s.n_basis * s.n_train * s.rank**2 for s in splits)


def pca_like(rng, n: int, p: int) -> np.ndarray:
    """Features with decreasing component variances, as PCA scores."""
    return (rng.standard_normal((n, p)) * np.linspace(3.0, 0.3, p)).astype(np.float32)


def real_splits(n_images: int, n_features: int, alphas, n_splits: int, seed: int = 0) -> list[Split]:
    """Split sizes (J and |S| included) of a ``RidgeEncoder`` on PCA-like features of this size."""
    X = pca_like(np.random.default_rng(seed), n_images, n_features)
    enc = RidgeEncoder(X, alphas, n_splits, 0, "loo", True, "cpu", torch.float32)
    return [Split(s.n_train, s.rank, s.n_basis, len(s.special), s.B_test.shape[0]) for s in enc.states]


def measure_rate(n_images: int, n_features: int, n_targets: int, alphas, n_splits: int) -> dict:
    """The engine's CPU flop rate on real fits (counted flops / seconds of ``score_batch`` over all target
    batches, best of 2 passes; precomputation excluded) and this CPU's best ``torch.mm`` float32 rate
    measured right after; ``efficiency`` is their ratio, at most 1."""
    rng = np.random.default_rng(1)
    X = pca_like(rng, n_images, n_features)
    Y = X @ (rng.standard_normal((n_features, n_targets)).astype(np.float32) * 0.05) + \
        rng.standard_normal((n_images, n_targets)).astype(np.float32)
    enc = RidgeEncoder(X, alphas, n_splits, 0, "loo", True, "cpu", torch.float32)
    batch = enc.batch_size(DEFAULT_MEMORY_BUDGET)
    batches = [enc.load(Y, slice(c, min(c + batch, n_targets)))[0] for c in range(0, n_targets, batch)]
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        for Yb in batches:
            enc.score_batch(Yb)
        seconds.append(time.perf_counter() - t0)
    engine = sum(s.flops_per_column() for s in enc.states) * n_targets / min(seconds)
    mm = mm_rate() * 1e9  # mm_rate is in GFLOP/s
    return dict(engine=engine, mm=mm, ratio=engine / mm, efficiency=min(1.0, engine / mm), seconds=min(seconds))


def stopping_share(n_images: int, n_features: int, n_targets: int, signal_share: float, n_permutations: int,
                   block: int, q: float, alphas, n_splits: int, seed: int = 0) -> dict:
    """Share of the N x targets refit shuffles that the sequential test runs, on simulated data: a share of
    signal targets whose r^2 is log-uniform in [0.003, 0.5] (at 400 images z = r sqrt(n) from about 1 to 14,
    undetectable to clear: the z of NSD vertices with r = 0.01 to 0.14 at 10,000 images; stronger ones
    run all N shuffles as these do) and latent-factor noise (2 factors, 50 % of the noise variance)."""
    X, noise = correlated_null(seed, n_images, n_features, n_targets, n_factors=2, shared=0.5)
    rng = np.random.default_rng(seed + 1)
    signal = rng.random(n_targets) < signal_share
    r2 = np.where(signal, np.exp(rng.uniform(np.log(0.003), np.log(0.5), n_targets)), 0.0)
    drive = X @ rng.standard_normal((n_features, n_targets))
    Y = (np.sqrt(r2) * drive / drive.std(0) + np.sqrt(1 - r2) * noise).astype(np.float32)
    kw = dict(n_splits=n_splits, device="cpu", progress=False)
    obs = cross_validated_ridge(X, Y, alphas, **kw).mean_scores
    res = permutation_test(X, Y, alphas, n_permutations, permutation_seed=seed + 2, observed=obs,
                           sequential_block=block, fdr_q=q, **kw)
    tested = np.isfinite(res.pvalues)
    return dict(share=float(res.n_shuffles[tested].sum() / (n_permutations * tested.sum())),
                rejected=float(fdr_bh(res.pvalues, q)[0].mean()), signal=float(signal.mean()))


def workload(config: dict, nsd_images, n_vertices: int, restricted: bool, stop_share: float | None) -> dict:
    """Target fits of the paper's statistics: fMRI observed fits, permutation refits, residual refits, MEG
    observed fits, and encoder precomputations (one per residual permutation; one per tested signal, or
    one per sequential block); ``restricted``: the config's tested signals and residual layers, else every
    fitted signal and every layer; ``stop_share``: share of the shuffles run (None: no stopping, all)."""
    enc = config["encoding"]
    n_perm, n_res = enc["permutation"]["n"], enc["residual"]["n"]
    n_layers = len(config["features"]["layers"])
    n_ckpt = len(config["training"]["checkpoints"])
    layer_ckpts = n_layers * n_ckpt + OTHER_MODELS * OTHER_LAYERS  # (layer, checkpoint) of every model
    last_layers = n_ckpt + OTHER_MODELS  # the last layer of every (model, checkpoint)
    tested = len(enc["permutation"]["signals"]) if restricted else 3
    res_layers = (last_layers if enc["residual"]["layers"] == "last" else layer_ckpts) if restricted else layer_ckpts
    share = 1.0 if stop_share is None else stop_share
    blocks = 1 if stop_share is None else -(-n_perm // enc["permutation"]["sequential_block"])
    targets = len(nsd_images) * n_vertices
    fmri_obs = 3 * layer_ckpts * targets
    perm = tested * layer_ckpts * targets * n_perm * share
    residual = res_layers * targets * n_res * share
    meg = 3 * layer_ckpts * MEG_SUBJECTS * MEG_TARGETS
    encoders = (res_layers * n_res + tested * layer_ckpts * blocks) * len(nsd_images)
    return dict(fmri_obs=fmri_obs, perm=perm, residual=residual, meg=meg, encoders=encoders)


def cost_rows(config: dict, splits_nsd: list[Split], splits_meg: list[Split], rate: dict, stop: float,
              nsd_images=NSD_IMAGES, n_vertices: int = NSD_VERTICES) -> list[dict]:
    """GPU-hours of each stage (baseline, then levers in turn)."""
    enc = config["encoding"]
    A, p = enc["alphas"]["n"], config["features"]["pca"]["dim"]
    f_nsd, f_meg = fit_flops(splits_nsd, A), fit_flops(splits_meg, A)
    b_nsd, b_meg = fit_bytes(splits_nsd, A), fit_bytes(splits_meg, A)
    pre = precompute_flops(splits_nsd, p)
    stages = [("baseline: 3 signals x N refit shuffles, residual test at every layer, FP32", False, None, "fp32", 4),
              ("+ restriction: tested signals and residual layers of the config", True, None, "fp32", 4),
              (f"+ sequential stopping (measured: {stop:.1%} of the shuffles run)", True, stop, "fp32", 4),
              ("+ TF32 tensor cores for the products (assumption: NOT implemented)", True, stop, "tf32", 4),
              ("+ BF16 inputs, FP32 accumulation, bf16 Y (assumption: NOT implemented)", True, stop, "bf16", 2)]
    rows = []
    for label, restricted, share, precision, item in stages:
        w = workload(config, nsd_images, n_vertices, restricted, share)
        fits_nsd = w["fmri_obs"] + w["perm"] + w["residual"]
        flops = fits_nsd * f_nsd + w["meg"] * f_meg + w["encoders"] * pre
        nbytes = (fits_nsd * b_nsd + w["meg"] * b_meg) * item / 4
        t_flops = flops / (H200[precision] * rate["efficiency"])
        t_bytes = nbytes / H200_HBM
        # products and element-wise passes are separate kernels, run one after the other: times add up
        rows.append(dict(stage=label, fits=fits_nsd + w["meg"], flops=flops, hours_flops=t_flops / 3600,
                         hours_hbm=t_bytes / 3600, hours=(t_flops + t_bytes) / 3600))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: seconds, checks the arithmetic")
    ap.add_argument("--signal-shares", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                    help="shares of signal targets of the stopping measurement; the middle one enters the totals")
    ap.add_argument("--budget", type=float, default=48.0, help="GPU-hour goal")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    config = resolve_config([ROOT / "config/paper.yaml"], workflow_dir=ROOT)
    enc = config["encoding"]
    alphas = np.logspace(enc["alphas"]["log10_min"], enc["alphas"]["log10_max"], enc["alphas"]["n"])
    k, p = enc["n_splits"], config["features"]["pca"]["dim"]
    if args.quick:
        n_nsd, n_meg, rate_size, stop_size, n_perm = 400, 600, (400, 300, 200), (120, 8, 60), 60
    else:
        n_nsd, n_meg = int(np.mean(NSD_IMAGES)), MEG_IMAGES
        rate_size, stop_size, n_perm = (int(np.mean(NSD_IMAGES)), p, 2000), (400, 20, 1500), enc["permutation"]["n"]
    splits_nsd = real_splits(n_nsd, p, alphas, k)
    splits_meg = real_splits(n_meg, p, alphas, k)
    rate = measure_rate(*rate_size, alphas, k)
    block = enc["permutation"]["sequential_block"]
    stops = [stopping_share(*stop_size, s, n_perm, block, enc["fdr_q"], alphas, k, seed=i)
             for i, s in enumerate(args.signal_shares)]
    stop = stops[len(stops) // 2]["share"]
    rows = cost_rows(config, splits_nsd, splits_meg, rate, stop)

    print(f"\nbrainprop statistics cost model ({'QUICK: small sizes' if args.quick else 'paper sizes'}); "
          f"{torch.get_num_threads()} CPU threads, load {os.getloadavg()[0]:.1f}")
    s = splits_nsd[0]
    print(f"  NSD split: n_train {s.n_train}, rank {s.rank}, alphas {len(alphas)}, basis J "
          f"{[x.n_basis for x in splits_nsd]}, exact rows |S| {[x.n_special for x in splits_nsd]}, n_test {s.n_test}")
    print(f"  flops per target fit ({k} splits): NSD {fit_flops(splits_nsd, len(alphas)) / 1e6:.1f} M, "
          f"MEG {fit_flops(splits_meg, len(alphas)) / 1e6:.1f} M; HBM bytes per NSD fit "
          f"{fit_bytes(splits_nsd, len(alphas)) / 1e3:.0f} kB")
    print(f"  CPU: engine {rate['engine'] / 1e9:.1f} GFLOP/s on {rate_size[2]} targets x {rate_size[0]} images "
          f"({rate['seconds']:.1f} s), torch.mm {rate['mm'] / 1e9:.1f} GFLOP/s: ratio {rate['ratio']:.0%}, "
          f"efficiency used {rate['efficiency']:.0%}")
    print(f"  H200 SXM (dense): FP32 {H200['fp32'] / 1e12:.0f}, TF32 {H200['tf32'] / 1e12:.1f}, BF16 "
          f"{H200['bf16'] / 1e12:.1f} TFLOP/s, HBM {H200_HBM / 1e12:.1f} TB/s")
    for st, share in zip(stops, args.signal_shares):
        print(f"  sequential stopping, N={n_perm}, block {block}, {stop_size[2]} targets x {stop_size[0]} images, "
              f"signal share {share:.0%} (drawn {st['signal']:.0%}): {st['share']:.1%} of the shuffles run, "
              f"{st['rejected']:.0%} rejected")
    width = max(len(r["stage"]) for r in rows)
    print(f"\n  {'stage':<{width}}  {'target fits':>12}  {'PFLOP':>10}  {'h (flops)':>10}  {'h (HBM)':>8}  {'GPU-h':>8}")
    for r in rows:
        print(f"  {r['stage']:<{width}}  {r['fits']:12.3e}  {r['flops'] / 1e15:10.0f}  {r['hours_flops']:10.1f}  "
              f"{r['hours_hbm']:8.1f}  {r['hours']:8.1f}")
    implemented = [r for r in rows if "NOT implemented" not in r["stage"]][-1]
    print(f"\n  implemented levers: {implemented['hours']:.0f} GPU-hours; goal {args.budget:.0f}: "
          f"{'met' if implemented['hours'] <= args.budget else 'not met'} without the assumed precisions; "
          f"with them: {rows[-1]['hours']:.0f}")
    return dict(rows=rows, rate=rate, stops=stops, splits_nsd=splits_nsd, splits_meg=splits_meg, config=config)


if __name__ == "__main__":
    main()
