"""Family-wise false-positive rate of the shipped fMRI statistics under correlated nulls.

Runs ``--realisations`` null data sets through the code path of ``encode_nsd``
(:func:`brainprop.scoring.signal_pvalues`, :func:`brainprop.scoring.residual_pvalues`, then BH at
``encoding.fdr_q``) with the ``encoding`` section of a config stack, and counts the realisations
in which anything is rejected. Under the complete null BH controls this rate at q.

* signals: :func:`brainprop.simulate.nulls.correlated_null` (targets sharing latent factors,
  independent of the features);
* residual: :func:`brainprop.simulate.nulls.forward_encoded_null` (forward strongly encoded,
  backprop correlated with forward and carrying nothing beyond it).

Usage::

    python bench/bench_null_calibration.py                       # the demo overlay's settings
    python bench/bench_null_calibration.py --configfile config/paper.yaml --targets 300
    python bench/bench_null_calibration.py --set permutation.n=1 --set pooled_targets=null   # the old demo
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy import stats as sps

from brainprop.config import resolve_config, set_key
from brainprop.encoding import cross_validated_ridge, residual_scores
from brainprop.scoring import alphas_from_config, engine_kwargs, residual_pvalues, signal_pvalues
from brainprop.simulate.nulls import correlated_null, forward_encoded_null
from brainprop.stats import fdr_bh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", nargs="*", default=None, help="overlays over config/base.yaml (default: demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="encoding.KEY override")
    parser.add_argument("--realisations", type=int, default=40)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--dim", type=int, default=None, help="forward/backprop dimension (default features.pca.dim)")
    parser.add_argument("--targets", type=int, default=2000)
    parser.add_argument("--which", choices=["signal", "residual", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = resolve_config(args.configfile)
    enc = cfg["encoding"]
    for item in args.set:
        set_key(enc, item)
    dim = args.dim or cfg["features"]["pca"]["dim"]
    q = enc["fdr_q"]
    print(f"permutation={enc['permutation']} pooled_targets={enc['pooled_targets']} residual={enc['residual']}")
    print(f"n_images={args.images} dim={dim} targets={args.targets} q={q} realisations={args.realisations}")
    alphas, kw = alphas_from_config(enc), engine_kwargs(enc, 0)
    for which in (["signal", "residual"] if args.which == "both" else [args.which]):
        hits, shares, t0 = 0, [], time.perf_counter()
        for r in range(args.realisations):
            if which == "signal":
                X, Y = correlated_null(r, args.images, dim, args.targets)
                obs = cross_validated_ridge(X, Y, alphas, **kw).mean_scores
                p = signal_pvalues(X, Y, obs, enc, 0, 1000 + r)
            else:
                F, B, Y = forward_encoded_null(r, args.images, dim, args.targets)
                res = residual_scores(F, B, Y, alphas, dim // 2, dim // 2, dim, **kw)
                p = residual_pvalues(F, B, Y, res, enc, dim, dim // 2, 0, 1000 + r)
            reject = fdr_bh(p, q)[0]
            hits += bool(reject.any())
            shares.append(reject.mean())
        bound = sps.binom.ppf(0.999, args.realisations, q)
        rate = hits / args.realisations
        print(f"{which:8s}: {hits} of {args.realisations} realisations rejected something (rate {rate:.3f}; "
              f"BH allows {q}; 99.9% binomial bound {int(bound)}), largest share rejected {max(shares):.3f}, "
              f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
