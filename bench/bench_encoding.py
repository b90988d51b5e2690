"""Benchmark of the ridge encoding engine against scikit-learn and himalaya (one run, same data).

Default sizes: n=5000 images, 300 features, 20,000 targets, 5 outer splits, 10 alphas
(``np.logspace(0, 8, 10)``). Prints, in one table:

* our engine, all splits, ``inner_cv="loo"`` and ``inner_cv=5``, seconds per split;
* the references on ONE split (to keep the run short): the sklearn pipeline
  ``StandardScaler + RidgeCV(alpha_per_target=True)`` and
  ``StandardScaler + himalaya RidgeCV(cv=KFold(5), correlation score)`` (numpy backend);
* speed-ups per split, the largest |r| difference and the share of identical alphas on that split;
* the machine's measured float32 ``torch.mm`` rate and the share of it the engine achieves,
  from an analytic count of the engine's matrix-product flops;
* the permutation null: time per shuffle of ``refit`` and ``shuffle_predictions`` against the
  naive loop that refits the sklearn pipeline on all splits per shuffle (extrapolated from the
  one-split sklearn time: 5 x).

Usage::

    python bench/bench_encoding.py                      # full size (~10 min on 2 cores)
    python bench/bench_encoding.py --n 500 --targets 2000
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from brainprop.encoding import (
    RidgeEncoder,
    cross_validated_ridge,
    kfold_splits,
    refit_null_scores,
    row_permutations,
    shuffled_prediction_null_scores,
    split_permutations,
)


def _pearson(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def mm_rate(dtype=torch.float32, repeats=3) -> float:
    """Best measured torch.mm GFLOP/s over a square and two engine-shaped products."""
    best = 0.0
    for m, k, n in ((4096, 4096, 4096), (1500, 4000, 8192), (300, 4000, 8192)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def engine_flops(enc: RidgeEncoder, n_targets: int) -> float:
    """Matrix-product flops of the per-target work of all splits (precomputation excluded)."""
    total = 0.0
    A = len(enc.alphas)
    for st in enc.states:
        n_te = st.B_test.shape[0]
        if enc.inner_cv == "loo":
            per = st.flops_per_column()
        else:
            n, p = st.n_train, st.n_features
            per = 2 * n * p + 2 * p * p + 2 * n_te * p
            for f in st.folds:
                per += 2 * f["n_v"] * p + 2 * 2 * p * p + 2 * A * p
                if st.partial_fractions:  # one float64 p x p product, A x p products per term
                    per += 2 * p * p + 2 * A * p * (2 + len(f["offsets"]))
                else:
                    per += 2 * A * p * p
        total += per * n_targets
    return total


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="number of images")
    ap.add_argument("--features", type=int, default=300, help="number of features (PCA components)")
    ap.add_argument("--targets", type=int, default=20000, help="number of targets (vertices)")
    ap.add_argument("--splits", type=int, default=5, help="outer splits")
    ap.add_argument("--shuffles", type=int, default=100, help="shuffles for the shuffle_predictions timing")
    ap.add_argument("--refit-shuffles", type=int, default=2, help="shuffles for the refit timing")
    ap.add_argument("--skip-references", action="store_true", help="do not time sklearn / himalaya")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(args.seed)
    n, p, t = args.n, args.features, args.targets
    # PCA-like features (decreasing variance) and targets with a planted low-rank signal
    X = (rng.standard_normal((n, p)) * np.linspace(3.0, 0.3, p)).astype(np.float32)
    W = rng.standard_normal((p, t)).astype(np.float32) * (rng.uniform(0, 0.2, t).astype(np.float32) / np.sqrt(p))
    Y = X @ W + rng.standard_normal((n, t)).astype(np.float32)
    alphas = np.logspace(0, 8, 10)
    train, test = kfold_splits(n, args.splits, 0)[0]
    load0 = os.getloadavg()[0]
    rows = []

    rate = mm_rate()
    rows.append(("torch.mm float32 rate (this machine, now)", f"{rate:.1f} GFLOP/s"))

    res = {}
    for cv in ("loo", 5):
        enc, t_pre = timed(lambda: RidgeEncoder(X, alphas, args.splits, 0, cv, True, "cpu", torch.float32))
        out, t_all = timed(lambda: cross_validated_ridge(X, Y, alphas, args.splits, 0, cv, device="cpu",
                                                         progress=False))
        flops = engine_flops(enc, t)
        res[cv] = dict(out=out, per_split=t_all / args.splits, pre=t_pre, gflops=flops / (t_all - t_pre) / 1e9)
        label = "LOO" if cv == "loo" else f"inner {cv}-fold"
        extra = f", basis sizes {[s.n_basis for s in enc.states]}" if cv == "loo" else ""
        rows.append((f"engine {label}: all {args.splits} splits", f"{t_all:.1f} s ({t_all / args.splits:.2f} s/split, "
                     f"precompute {t_pre:.1f} s{extra})"))
        rows.append((f"engine {label}: matmul rate (analytic flops / time)",
                     f"{res[cv]['gflops']:.1f} GFLOP/s = {res[cv]['gflops'] / rate:.0%} of torch.mm"))

    def rerun(cv):
        """Time the engine again right after a reference, so both see the same machine load."""
        _, t_again = timed(lambda: cross_validated_ridge(X, Y, alphas, args.splits, 0, cv, device="cpu", progress=False))
        res[cv]["per_split_again"] = t_again / args.splits
        return (res[cv]["per_split"] + res[cv]["per_split_again"]) / 2

    if not args.skip_references:
        from sklearn.linear_model import RidgeCV
        from sklearn.model_selection import KFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model, t_sk = timed(lambda: make_pipeline(StandardScaler(), RidgeCV(alphas=alphas, alpha_per_target=True))
                            .fit(X[train], Y[train]))
        r_sk = _pearson(model.predict(X[test]).astype(np.float64), Y[test].astype(np.float64))
        ours = res["loo"]["out"]
        ours_split = rerun("loo")
        rows.append(("sklearn pipeline, ONE split", f"{t_sk:.1f} s"))
        rows.append(("engine LOO rerun after it (s/split; mean of both runs)",
                     f"{res['loo']['per_split_again']:.2f} s ({ours_split:.2f} s)"))
        rows.append(("speed-up vs sklearn (per split), target >= 8x", f"{t_sk / ours_split:.1f}x"))
        same = ours.alphas[0] == model[-1].alpha_
        rows.append(("  identical alphas (split 0)", f"{same.mean():.2%}"))
        rows.append(("  max |r ours - r sklearn|, identical / all alphas",
                     f"{np.nanmax(np.abs(ours.scores[0] - r_sk)[same]):.2e} / {np.nanmax(np.abs(ours.scores[0] - r_sk)):.2e}"))
        # float32 differences in alpha are near-ties of the LOO curve: float64 must agree everywhere
        ours64, t64 = timed(lambda: cross_validated_ridge(X, Y, alphas, args.splits, 0, "loo", device="cpu",
                                                          dtype=torch.float64, progress=False))
        # (sklearn selects alpha in float64 internally; its predictions here are float32)
        rows.append(("  engine LOO float64: s/split, identical alphas (split 0)",
                     f"{t64 / args.splits:.2f} s, {np.mean(ours64.alphas[0] == model[-1].alpha_):.2%}"))
        del model

        from himalaya.ridge import RidgeCV as HimalayaRidgeCV
        from himalaya.scoring import correlation_score

        hm = HimalayaRidgeCV(alphas=alphas, fit_intercept=True, cv=KFold(5),
                             solver_params=dict(score_func=correlation_score))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, t_hm = timed(lambda: make_pipeline(StandardScaler(), hm).fit(X[train], Y[train]))
        Xs = model[0].transform(X[test]).astype(np.float64)
        r_hm = _pearson(Xs @ np.asarray(hm.coef_, dtype=np.float64), Y[test].astype(np.float64))
        ours = res[5]["out"]
        a_hm = np.asarray(hm.best_alphas_, dtype=np.float64)
        ours_split = rerun(5)
        rows.append(("himalaya RidgeCV (numpy backend), ONE split", f"{t_hm:.1f} s"))
        rows.append(("engine inner 5-fold rerun after it (s/split; mean of both runs)",
                     f"{res[5]['per_split_again']:.2f} s ({ours_split:.2f} s)"))
        rows.append(("speed-up vs himalaya (per split), target >= 20x", f"{t_hm / ours_split:.1f}x"))
        same = np.isclose(ours.alphas[0], a_hm, rtol=1e-4)
        rows.append(("  identical alphas (split 0)", f"{same.mean():.2%}"))
        rows.append(("  max |r ours - r himalaya|, identical / all alphas",
                     f"{np.nanmax(np.abs(ours.scores[0] - r_hm)[same]):.2e} / {np.nanmax(np.abs(ours.scores[0] - r_hm)):.2e}"))
        del model, hm
    else:
        t_sk = float("nan")

    perms = row_permutations(n, args.refit_shuffles, 1)
    _, t_refit = timed(lambda: refit_null_scores(X, Y, alphas, perms, args.splits, 0, progress=False))
    per_refit = t_refit / (args.refit_shuffles + 1)  # the observed fit plus one full refit per shuffle
    tests = [te for _, te in kfold_splits(n, args.splits, 0)]
    sp = split_permutations(tests, args.shuffles, 1)
    _, t_shuf = timed(lambda: shuffled_prediction_null_scores(X, Y, alphas, sp, args.splits, 0, progress=False))
    sp0 = split_permutations(tests, 0, 1)  # the same call without shuffles: the fit alone
    _, t_fit = timed(lambda: shuffled_prediction_null_scores(X, Y, alphas, sp0, args.splits, 0, progress=False))
    per_shuf = (t_shuf - t_fit) / args.shuffles
    naive = t_sk * args.splits
    rows.append((f"permutation null, refit (engine): {args.refit_shuffles} shuffles + observed",
                 f"{t_refit:.1f} s = {per_refit:.1f} s per shuffle"))
    rows.append((f"permutation null, shuffle_predictions (engine): fit + {args.shuffles} shuffles",
                 f"{t_shuf:.1f} s = {per_shuf:.3f} s per shuffle after the fit"))
    rows.append(("permutation null, naive sklearn refit: per shuffle (5 x one split)", f"{naive:.1f} s"))
    if not args.skip_references:
        rows.append(("  refit speed-up vs naive", f"{naive / per_refit:.1f}x"))
        rows.append(("  shuffle_predictions speed-up vs naive", f"{naive / per_shuf:.0f}x"))
    rows.append(("load average (1 min) at start / end", f"{load0:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"))

    print(f"\nridge encoding benchmark: n={n}, features={p}, targets={t}, splits={args.splits}, "
          f"alphas={len(alphas)}, float32, CPU threads={torch.get_num_threads()}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
