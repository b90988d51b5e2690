"""Statistics of encoding scores (paper section 2.1, "Statistics").

* fMRI: per-vertex permutation null of the split-averaged Pearson r (paper: 1000 shuffles),
  empirical p-values with the +1 correction, Benjamini-Hochberg FDR over vertices; or a null
  pooled over many shuffles of a subset of vertices (the demo, :func:`pooled_null_pvalues`).
* fMRI residual backprop: its own test, backprop's part unexplained by forward permuted
  (:func:`residual_permutation_test`).
* MEG: per time point, one-sample one-tailed t-test across subjects of the channel-averaged
  score, Benjamini-Hochberg FDR over time points.

See ``docs/statistics.md`` for the floor ``1/(N+1)`` that N shuffles put on p-values, what it
implies for BH-FDR over 327,684 vertices, and the Gaussian-tail alternative implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps

from brainprop import encoding
from brainprop.utils import get_logger

log = get_logger(__name__)

PERMUTATION_METHODS = ("refit", "shuffle_predictions")


def fdr_bh(pvalues, q: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg false discovery rate control.

    Equals ``statsmodels.stats.multitest.fdrcorrection(p, alpha=q)`` on the non-NaN entries;
    NaN p-values are left out of the family (never rejected, adjusted p-value NaN).

    Parameters
    ----------
    pvalues : array-like, any shape
        p-values in [0, 1] (NaN allowed).
    q : float
        Target false discovery rate, in (0, 1).

    Returns
    -------
    reject : ndarray of bool, same shape
        True where the null hypothesis is rejected at FDR ``q``.
    p_adjusted : ndarray of float64, same shape
        BH-adjusted p-values (NaN where the input is NaN).
    """
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    p = np.asarray(pvalues, dtype=np.float64)
    ok = ~np.isnan(p)
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    reject = np.zeros(p.shape, dtype=bool)
    adjusted = np.full(p.shape, np.nan)
    if not ok.all():
        log.info("fdr_bh: %d of %d p-values are NaN and left out of the family", int((~ok).sum()), p.size)
    pv = p[ok]
    m = pv.size
    if m == 0:
        return reject, adjusted
    order = np.argsort(pv)
    p_sorted = pv[order]
    ecdf = np.arange(1, m + 1) / m
    rej = p_sorted <= ecdf * q
    if rej.any():
        rej[: np.nonzero(rej)[0].max()] = True
    adj = np.minimum.accumulate((p_sorted / ecdf)[::-1])[::-1]
    adj[adj > 1] = 1.0
    rej_out, adj_out = np.empty(m, dtype=bool), np.empty(m)
    rej_out[order], adj_out[order] = rej, adj
    reject[ok], adjusted[ok] = rej_out, adj_out
    return reject, adjusted


def _observed_and_null(observed, null) -> tuple[np.ndarray, np.ndarray]:
    observed, null = np.asarray(observed, dtype=np.float64), np.asarray(null, dtype=np.float64)
    if null.ndim != 2 or null.shape[1:] != observed.shape:
        raise ValueError(f"null must have shape (n_permutations, {observed.shape}), got {null.shape}")
    return observed, null


def permutation_pvalues(observed, null) -> np.ndarray:
    """Empirical one-sided permutation p-values with the +1 correction.

    ``p = (1 + #{null >= observed}) / (N + 1)`` per target, so ``p >= 1 / (N + 1)``. A NaN null
    value (shuffle whose prediction was constant) counts as exceeding the observed value
    (conservative); a NaN observed value gives a NaN p-value.

    Parameters
    ----------
    observed : ndarray, shape (n_targets,)
        Split-averaged Pearson r of the unshuffled data.
    null : ndarray, shape (n_permutations, n_targets)
        Split-averaged Pearson r of each shuffle.

    Returns
    -------
    ndarray, shape (n_targets,), float64
    """
    observed, null = _observed_and_null(observed, null)
    nan_null = np.isnan(null) & ~np.isnan(observed)
    if nan_null.any():
        log.warning("%d null scores (in %d targets) are NaN (constant shuffled prediction): counted as "
                    "exceeding the observed score", int(nan_null.sum()), int(nan_null.any(0).sum()))
    exceed = (null >= observed) | np.isnan(null)
    p = (1.0 + exceed.sum(0)) / (null.shape[0] + 1.0)
    p[np.isnan(observed)] = np.nan
    return p


def pooled_permutation_pvalues(observed, null) -> np.ndarray:
    """Permutation p-values against the null pooled over all targets (a documented alternative).

    ``p_t = (1 + #{(k, u): null[k, u] >= observed[t]}) / (N * T' + 1)`` with T' the targets of finite
    null, so ``p >= 1 / (N T' + 1)``: a few shuffles of many targets resolve small p-values. Valid when
    the targets share one null distribution, as z-scored vertices encoded from the same features
    approximately do (the null of r depends on X and the number of images, not on the target).
    NaN observed values give NaN p-values.

    Parameters
    ----------
    observed : ndarray, shape (n_targets,)
    null : ndarray, shape (n_permutations, n_pool)
        Null scores of any targets sharing the null (all targets, or a subset: :func:`pooled_null_pvalues`).

    Returns
    -------
    ndarray, shape (n_targets,), float64
    """
    observed, null = np.asarray(observed, dtype=np.float64), np.asarray(null, dtype=np.float64)
    if observed.ndim != 1 or null.ndim != 2:
        raise ValueError(f"observed must be 1-D and null 2-D, got shapes {observed.shape} and {null.shape}")
    pool = np.sort(null[np.isfinite(null)])
    exceed = pool.size - np.searchsorted(pool, observed, side="left")
    p = (1.0 + exceed) / (pool.size + 1.0)
    p[np.isnan(observed)] = np.nan
    return p


def gaussian_tail_pvalues(observed, null) -> np.ndarray:
    """Parametric (Gaussian) permutation p-values: NOT the paper's method, an alternative.

    Treats each target's ``N`` null scores and its observed score as ``N + 1`` draws of one normal
    distribution of unknown mean and SD, and returns the predictive tail
    ``p = 1 - F_{N-1}((r_obs - mean) / (sd * sqrt(1 + 1/N)))`` with ``F_{N-1}`` the Student t CDF
    (mean, SD with ddof=1 of the null): exact when the null is Gaussian, whatever ``N``, and the normal
    tail ``1 - Phi((r_obs - mean) / sd)`` for large ``N``. Unlike :func:`permutation_pvalues` these
    are not floored at ``1/(N+1)``; they rely on the null of a split-averaged r over many held-out
    images being close to Gaussian (its tails are lighter than Gaussian, which makes the far tail
    conservative; see docs/statistics.md).

    Parameters
    ----------
    observed : ndarray, shape (n_targets,)
    null : ndarray, shape (n_permutations, n_targets); at least 2 finite values per target.

    Returns
    -------
    ndarray, shape (n_targets,), float64 (NaN where observed or the null is undefined)
    """
    observed, null = _observed_and_null(observed, null)
    finite = np.isfinite(null)
    count = finite.sum(0)
    valid = (count >= 2) & np.isfinite(observed)
    mu, sd = np.full(observed.shape, np.nan), np.full(observed.shape, np.nan)
    nz = np.where(finite, null, 0.0)
    mu[valid] = nz[:, valid].sum(0) / count[valid]
    sd[valid] = np.sqrt((np.where(finite, null - mu, 0.0)[:, valid] ** 2).sum(0) / (count[valid] - 1))
    df = np.maximum(count - 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = sps.t.sf((observed - mu) / (sd * np.sqrt(1.0 + 1.0 / np.maximum(count, 1))), df)
    p[~(sd > 0)] = np.nan
    return p


#: Relative margin by which the stopping rule's lower bounds are shrunk: the stored p-values are rounded
#: to float32 (relative error <= 2**-24) before BH, and the rule must bound those too.
_ROUNDING_MARGIN = 2.0**-23


@dataclass
class SequentialNull:
    """Outcome of :func:`sequential_null`.

    Attributes
    ----------
    null : ndarray (n_permutations, n_targets) float64
        Null scores of the shuffles run; NaN for the shuffles a stopped target skipped.
    exceedances : ndarray (n_targets,) int
        ``#{null >= observed}`` (a NaN null score counts) over the shuffles run.
    n_shuffles : ndarray (n_targets,) int
        Shuffles run per target (``n_permutations`` unless stopped).
    stopped : ndarray (n_targets,) bool
        Targets stopped early: they cannot be rejected by BH at ``q`` over the full null.
    pvalues : ndarray (n_targets,) float64
        ``(1 + c) / (N + 1)`` for targets that ran all N shuffles (the full test's value); for stopped
        targets the largest value the full test's p-value can take, ``(1 + c + N - n) / (N + 1)``
        (valid whatever the stopping rule, since it is never below the full test's p-value); NaN where
        the observed score is NaN.
    """

    null: np.ndarray
    exceedances: np.ndarray
    n_shuffles: np.ndarray
    stopped: np.ndarray
    pvalues: np.ndarray


def sequential_null(observed, null_block, n_permutations: int, block: int, q: float) -> SequentialNull:
    """Permutation p-values with sequential stopping of the targets that cannot be significant at BH-FDR ``q``.

    Shuffles ``0..N-1`` run in blocks of ``block`` for the targets still alive (at first every target
    with a finite observed score). After each block (but the last), with ``c_i`` the exceedance count of
    target ``i`` so far, ``L_i = (1 + c_i) / (N + 1)`` is a lower bound of its full-test p-value ``p_i``
    (later shuffles can only add exceedances). BH at ``q`` applied to the lower bounds of the ``m`` targets
    with a finite observed score rejects ``K`` of them; every target it does not reject stops.

    Why the rejection set is that of the full N-shuffle test (same shuffles): write ``N_x(k) = #{i: x_i <=
    q k / m}``; BH rejects ``{i: x_i <= q k* / m}`` with ``k* = max{k: N_x(k) >= k}``, and ``k*`` is
    non-decreasing when p-values decrease. (1) Since ``p >= L``, ``k*(p) <= k*(L) = K``; a stopped target
    has ``L_i > q K / m >= q k*(p) / m``, so the full test does not reject it. Lower bounds only grow, so
    ``K`` only shrinks and this holds for the targets stopped at every check. (2) The reported p-values
    ``p'`` equal ``p`` on the targets that ran all N shuffles and are ``>= L_i`` on stopped ones. For
    ``k <= K`` no stopped target counts in ``N_p'(k)`` nor in ``N_p(k)``, so the two counts are equal;
    for ``k > K``, ``N_p'(k) <= N_L(k) < k``. Hence ``k*(p') = k*(p)`` and both tests reject the same
    targets (all among those run to the end, with identical p-values). The bounds are shrunk by a
    relative ``2**-23`` so that the same holds after rounding the p-values to float32 (monotone).
    The identity takes the null scores as they are in the full test. The engine computes them in batches
    whose width changes as targets stop, and a BLAS product's kernels and thread partition depend on the
    width: a null score can differ in its last bits (float32: ~1e-7 relative) from the full test's, which
    changes a count only where that score ties the observed one to those bits.

    Parameters
    ----------
    observed : ndarray (n_targets,)
        Observed statistic; NaN: not tested (NaN p-value, left out of the BH family).
    null_block : callable ``(rows: range, columns: ndarray of int) -> ndarray (len(rows), len(columns))``
        Null statistics of shuffles ``rows`` for targets ``columns``.
    n_permutations : int
        N, as in the full test.
    block : int
        Shuffles between two checks (>= 1; ``>= N``: no stopping).
    q : float
        The BH-FDR level of the analysis (``encoding.fdr_q``).

    Returns
    -------
    SequentialNull
    """
    observed = np.asarray(observed, dtype=np.float64)
    n_perm, block = int(n_permutations), int(block)
    if n_perm < 1 or block < 1:
        raise ValueError(f"n_permutations and block must be >= 1, got {n_perm} and {block}")
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    n_targets = observed.shape[0]
    tested = np.isfinite(observed)
    null = np.full((n_perm, n_targets), np.nan)
    count = np.zeros(n_targets, dtype=np.int64)
    n_run = np.zeros(n_targets, dtype=np.int64)
    alive = tested.copy()
    for k0 in range(0, n_perm, block):
        rows = range(k0, min(k0 + block, n_perm))
        cols = np.flatnonzero(alive)
        if cols.size == 0:
            break
        s = np.asarray(null_block(rows, cols), dtype=np.float64)
        if s.shape != (len(rows), cols.size):
            raise ValueError(f"null_block returned shape {s.shape}, expected {(len(rows), cols.size)}")
        null[rows.start:rows.stop, cols] = s
        count[cols] += ((s >= observed[cols]) | np.isnan(s)).sum(0)
        n_run[cols] += len(rows)
        if rows.stop < n_perm and tested.any():
            lower = (1.0 + count[tested]) / (n_perm + 1.0) * (1.0 - _ROUNDING_MARGIN)
            keep = np.zeros(n_targets, dtype=bool)
            keep[tested] = fdr_bh(lower, q)[0]
            alive &= keep
    stopped = tested & (n_run < n_perm)
    p = (1.0 + count + (n_perm - n_run)) / (n_perm + 1.0)  # = (1 + c) / (N + 1) where all N ran
    p[~tested] = np.nan
    log.info("sequential null: %d of %d tested targets stopped early; %.1f %% of the N x targets shuffles run",
             int(stopped.sum()), int(tested.sum()), 100.0 * n_run[tested].sum() / max(1, n_perm * tested.sum()))
    return SequentialNull(null=null, exceedances=count, n_shuffles=n_run, stopped=stopped, pvalues=p)


@dataclass
class PermutationResult:
    """Permutation test of encoding scores.

    Attributes
    ----------
    observed : ndarray (n_targets,)
        Split-averaged Pearson r of the unshuffled data.
    null : ndarray (n_permutations, n_targets)
        Split-averaged r of each shuffle.
    pvalues : ndarray (n_targets,)
        Empirical p-values ``(1 + #{null >= observed}) / (N + 1)`` (the paper's); with sequential
        stopping, stopped targets get the valid upper bound of :class:`SequentialNull`.
    pvalues_gaussian : ndarray (n_targets,)
        Gaussian-tail p-values (alternative, see :func:`gaussian_tail_pvalues`; of the shuffles run).
    invalid : ndarray (n_targets,) bool
        Constant or non-finite targets (NaN everywhere).
    method : str
        "refit" or "shuffle_predictions".
    n_shuffles : ndarray (n_targets,) int
        Shuffles run per target (N unless stopped).
    stopped : ndarray (n_targets,) bool
        Targets stopped early by :func:`sequential_null` (never significant at its ``q``).
    """

    observed: np.ndarray
    null: np.ndarray
    pvalues: np.ndarray
    pvalues_gaussian: np.ndarray
    invalid: np.ndarray
    method: str
    n_shuffles: np.ndarray
    stopped: np.ndarray


def permutation_test(X, Y, alphas, n_permutations: int = 1000, method: str = "refit",
                     permutation_seed: int = 0, observed=None, sequential_block: int = 0, fdr_q: float = 0.05,
                     **encoding_kwargs) -> PermutationResult:
    """Per-target permutation null of the split-averaged encoding score.

    Parameters
    ----------
    X : ndarray, shape (n_images, n_features)
    Y : ndarray, shape (n_images, n_targets)
    alphas : array-like
        As in :func:`brainprop.encoding.cross_validated_ridge`.
    n_permutations : int
        Number of shuffles N (paper: 1000); p-values are at least ``1/(N+1)``.
    method : {"refit", "shuffle_predictions"}
        "refit": shuffle the image labels (rows) of ``Y`` and rerun the whole procedure (same
        outer splits, alpha selection included); the per-split decompositions of X are reused.
        "shuffle_predictions": fit once, then shuffle the held-out predictions against the
        held-out data within each split (much cheaper; conditional on the fitted models).
    permutation_seed : int
        Seed of the shuffles (``numpy.random.default_rng``).
    observed : ndarray (n_targets,), optional
        The observed split-averaged scores, when already computed with the same ``X``, ``Y``,
        alphas and ``encoding_kwargs`` (``cross_validated_ridge(...).mean_scores``): "refit" then
        skips its own observed fit.
    sequential_block : int
        "refit" only: > 0 runs the shuffles in blocks of this size and stops the targets that can no
        longer be significant at BH-FDR ``fdr_q`` (:func:`sequential_null`: same rejections as all N
        shuffles, same p-values for the targets that run all N); 0: every target gets all N.
    fdr_q : float
        BH-FDR level the stopping rule guarantees (the analysis's ``encoding.fdr_q``).
    **encoding_kwargs
        n_splits, seed (outer KFold), inner_cv, standardize, device, dtype, memory_budget,
        progress: as in :func:`brainprop.encoding.cross_validated_ridge`.

    Returns
    -------
    PermutationResult
    """
    if method not in PERMUTATION_METHODS:
        raise ValueError(f"method must be one of {PERMUTATION_METHODS}, got {method!r}")
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    if int(sequential_block) < 0:
        raise ValueError(f"sequential_block must be >= 0, got {sequential_block}")
    n_samples = np.shape(X)[0]
    if method == "refit" and sequential_block:
        return _sequential_refit_test(X, Y, alphas, int(n_permutations), permutation_seed, observed,
                                      int(sequential_block), fdr_q, encoding_kwargs)
    if method == "refit":
        perms = encoding.row_permutations(n_samples, int(n_permutations), permutation_seed)
        if observed is None:
            observed, null, invalid = encoding.refit_null_scores(X, Y, alphas, perms, **encoding_kwargs)
        else:
            _, null, invalid = encoding.refit_null_scores(X, Y, alphas, perms, observed=False, **encoding_kwargs)
            observed = np.where(invalid, np.nan, np.asarray(observed, dtype=np.float64))
    else:
        log.warning("shuffle_predictions: this null is narrower than the actual null of the split-averaged "
                    "score (anti-conservative p-values); use method='refit' for inference (docs/statistics.md)")
        splits = encoding.kfold_splits(n_samples, encoding_kwargs.get("n_splits", 5), encoding_kwargs.get("seed", 0))
        perms = encoding.split_permutations([te for _, te in splits], int(n_permutations), permutation_seed)
        observed, null, invalid = encoding.shuffled_prediction_null_scores(X, Y, alphas, perms, **encoding_kwargs)
    return PermutationResult(observed=observed, null=null, pvalues=permutation_pvalues(observed, null),
                             pvalues_gaussian=gaussian_tail_pvalues(observed, null), invalid=invalid,
                             method=method, n_shuffles=np.full(len(observed), null.shape[0]),
                             stopped=np.zeros(len(observed), dtype=bool))


def _sequential_refit_test(X, Y, alphas, n_permutations: int, permutation_seed: int, observed, block: int,
                           q: float, encoding_kwargs: dict) -> PermutationResult:
    """The "refit" test of :func:`permutation_test` through :func:`sequential_null`: each block refits the
    shuffled rows of the targets still alive (``refit_null_scores`` on those columns, same permutations)."""
    Y = Y[:, None] if np.ndim(Y) == 1 else Y
    perms = encoding.row_permutations(np.shape(X)[0], n_permutations, permutation_seed)
    if observed is None:
        observed = encoding.cross_validated_ridge(X, Y, alphas, **encoding_kwargs).mean_scores
    invalid = encoding.invalid_columns(Y, encoding_kwargs.get("dtype", torch.float32))
    observed = np.where(invalid, np.nan, np.asarray(observed, dtype=np.float64))

    def null_block(rows, cols):
        return encoding.refit_null_scores(X, Y[:, cols], alphas, perms[rows.start:rows.stop], observed=False,
                                          **encoding_kwargs)[1]

    seq = sequential_null(observed, null_block, n_permutations, block, q)
    return PermutationResult(observed=observed, null=seq.null, pvalues=seq.pvalues,
                             pvalues_gaussian=gaussian_tail_pvalues(observed, seq.null), invalid=invalid,
                             method="refit", n_shuffles=seq.n_shuffles, stopped=seq.stopped)


def pooled_null_pvalues(X, Y, alphas, observed, n_permutations: int, n_pool_targets: int | None = None,
                        permutation_seed: int = 0, **encoding_kwargs) -> np.ndarray:
    """Pooled-null p-values from ``N`` refit shuffles of a seeded random subset of the targets.

    Every target's observed score is ranked (:func:`pooled_permutation_pvalues`) against the refit
    null (:func:`permutation_test`, ``method="refit"``) of ``S = n_pool_targets`` targets drawn at
    random (seeded by ``permutation_seed``), so ``p >= 1 / (N S + 1)`` at the cost of ``N S`` target
    fits. What calibrates a pooled null is the number of shuffles ``N``, not ``N S``: targets that
    share latent factors (neighbouring vertices) make one shuffle of all targets one draw of a
    correlated field, and the observed field is one more draw; a pool of many shuffles of a few
    targets averages over field draws (docs/statistics.md, "Calibration under correlated nulls").

    Parameters
    ----------
    X : ndarray, shape (n_images, n_features)
    Y : ndarray or memmap, shape (n_images, n_targets)
    alphas : array-like
    observed : ndarray, shape (n_targets,)
        Split-averaged scores of the unshuffled data (``cross_validated_ridge(...).mean_scores`` with
        the same ``encoding_kwargs``); NaN gives a NaN p-value.
    n_permutations : int
        Shuffles ``N`` of the pooled subset.
    n_pool_targets : int or None
        Targets ``S`` in the pool; None (or more than there are): all targets.
    permutation_seed : int
        Seed of the subset and of the shuffles.
    **encoding_kwargs
        As in :func:`permutation_test`.

    Returns
    -------
    ndarray, shape (n_targets,), float64
    """
    observed = np.asarray(observed, dtype=np.float64)
    n_targets = np.shape(Y)[1]
    if observed.shape != (n_targets,):
        raise ValueError(f"observed must have shape ({n_targets},), got {observed.shape}")
    if n_pool_targets is None or n_pool_targets >= n_targets:
        cols = np.arange(n_targets)
    else:
        if int(n_pool_targets) < 1:
            raise ValueError(f"n_pool_targets must be >= 1 or None, got {n_pool_targets}")
        cols = np.sort(np.random.default_rng(permutation_seed).choice(n_targets, int(n_pool_targets), replace=False))
    Ys = Y if len(cols) == n_targets else np.asarray(Y[:, cols])
    res = permutation_test(X, Ys, alphas, n_permutations=n_permutations, method="refit",
                           permutation_seed=permutation_seed, observed=observed[cols], **encoding_kwargs)
    return pooled_permutation_pvalues(observed, res.null)


@dataclass
class ResidualTest:
    """Permutation test of the residual backprop score of each target.

    Attributes
    ----------
    observed : ndarray (n_targets,)
        Residual ``R(forward_r ++ backprop_r) - R(forward_d)`` of the data (NaN for invalid targets).
    null : ndarray (n_permutations, n_targets)
        The same difference with backprop's part that forward does not explain permuted over images.
    pvalues : ndarray (n_targets,)
        Empirical ``(1 + #{null >= observed}) / (N + 1)`` (stopped targets: the upper bound of
        :class:`SequentialNull`).
    pvalues_gaussian : ndarray (n_targets,)
        Gaussian predictive p-values of the same null (:func:`gaussian_tail_pvalues`; of the permutations run).
    n_shuffles : ndarray (n_targets,) int
        Permutations run per target (N unless stopped).
    stopped : ndarray (n_targets,) bool
        Targets stopped early by :func:`sequential_null`.
    """

    observed: np.ndarray
    null: np.ndarray
    pvalues: np.ndarray
    pvalues_gaussian: np.ndarray
    n_shuffles: np.ndarray
    stopped: np.ndarray


def backprop_null_designs(X_forward, X_backprop, n_forward: int, n_backprop: int, n_total: int,
                          permutations):
    """Joint designs of the residual's null, one per permutation: ``forward_r ++ B*`` with
    ``B* = F C + E[perm]``, where ``F C`` is the least-squares fit (with intercept) of
    ``backprop[:, :n_backprop]`` on ``forward[:, :n_total]`` and ``E`` its residual.

    Keeping ``F C`` keeps everything backprop shares linearly with forward (including forward's
    components beyond ``n_forward`` that the joint model would otherwise lack); permuting ``E``
    breaks any relation of the rest of backprop with the brain data. Under "backprop carries nothing
    beyond forward" the data's joint design is one more draw of this family (conditional permutation,
    as Freedman-Lane do for a nuisance covariate); when backprop is not correlated with forward it is
    simply a shuffle of backprop's rows.

    Parameters
    ----------
    X_forward, X_backprop, n_forward, n_backprop, n_total
        As in :func:`brainprop.encoding.residual_inputs`.
    permutations : ndarray, shape (n_permutations, n_images)

    Yields
    ------
    ndarray, shape (n_images, n_forward + n_backprop), float64
    """
    joint, forward = encoding.residual_inputs(X_forward, X_backprop, n_forward, n_backprop, n_total)
    n = forward.shape[0]
    if n <= n_total + 1:
        raise ValueError(f"the residual test regresses backprop on {n_total} forward components: it needs more "
                         f"than {n_total + 1} images, got {n}")
    design = np.column_stack([np.ones(n), forward]).astype(np.float64)
    backprop = joint[:, n_forward:].astype(np.float64)
    fitted = design @ np.linalg.lstsq(design, backprop, rcond=None)[0]
    rest = backprop - fitted
    head = joint[:, :n_forward].astype(np.float64)
    for perm in permutations:
        yield np.concatenate([head, fitted + rest[perm]], axis=1)


def residual_permutation_test(X_forward, X_backprop, Y, alphas, n_forward: int = 150, n_backprop: int = 150,
                              n_total: int = 300, n_permutations: int = 1000, permutation_seed: int = 0,
                              observed: encoding.ResidualResult | None = None, sequential_block: int = 0,
                              fdr_q: float = 0.05, **encoding_kwargs) -> ResidualTest:
    """Per-target test of "backprop adds nothing beyond forward" for the residual backprop score.

    The statistic is the residual itself, ``R(forward_r ++ backprop_r) - R(forward_d)``
    (:func:`brainprop.encoding.residual_scores`); its null refits the joint model on the designs of
    :func:`backprop_null_designs` (the brain data and the forward-only model are untouched, so
    ``R(forward_d)`` is fitted once). Selecting vertices by this test, rather than by the significance
    of the joint model, does not pick up vertices that forward alone explains.

    Parameters
    ----------
    X_forward, X_backprop, n_forward, n_backprop, n_total
        As in :func:`brainprop.encoding.residual_inputs` (paper: 150, 150, 300).
    Y : ndarray or memmap, shape (n_images, n_targets)
    alphas : array-like
    n_permutations : int
        Permutations ``N`` of backprop's unexplained part (one joint refit of all targets each).
    permutation_seed : int
    observed : ResidualResult, optional
        :func:`brainprop.encoding.residual_scores` of the same data and ``encoding_kwargs`` (saves
        its two fits).
    sequential_block, fdr_q
        As in :func:`permutation_test`: > 0 refits, block by block, only the targets that can still be
        significant at BH-FDR ``fdr_q`` of the empirical p-values (:func:`sequential_null`).
    **encoding_kwargs
        As in :func:`brainprop.encoding.cross_validated_ridge`.

    Returns
    -------
    ResidualTest
    """
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    if observed is None:
        observed = encoding.residual_scores(X_forward, X_backprop, Y, alphas, n_forward, n_backprop, n_total,
                                            **encoding_kwargs)
    if int(sequential_block) < 0:
        raise ValueError(f"sequential_block must be >= 0, got {sequential_block}")
    forward = observed.forward.mean_scores.astype(np.float64)
    n_perm, n_targets = int(n_permutations), len(forward)
    perms = encoding.row_permutations(np.shape(Y)[0], n_perm, permutation_seed)
    obs = observed.residual.astype(np.float64)
    obs[observed.joint.invalid] = np.nan

    def null_block(rows, cols):
        Yc = Y if len(cols) == n_targets else Y[:, cols]
        designs = backprop_null_designs(X_forward, X_backprop, n_forward, n_backprop, n_total,
                                        perms[rows.start:rows.stop])
        return np.stack([encoding.cross_validated_ridge(X, Yc, alphas, **encoding_kwargs).mean_scores - forward[cols]
                         for X in designs])

    if sequential_block:
        seq = sequential_null(obs, null_block, n_perm, int(sequential_block), fdr_q)
        null, pvalues, n_shuffles, stopped = seq.null, seq.pvalues, seq.n_shuffles, seq.stopped
    else:
        null = null_block(range(n_perm), np.arange(n_targets))
        pvalues, n_shuffles, stopped = permutation_pvalues(obs, null), np.full(n_targets, n_perm), np.zeros(n_targets, bool)
    return ResidualTest(observed=obs, null=null, pvalues=pvalues, pvalues_gaussian=gaussian_tail_pvalues(obs, null),
                        n_shuffles=n_shuffles, stopped=stopped)


@dataclass
class TimeResolvedTest:
    """One-sample one-tailed t-test across subjects at each time point, with BH-FDR over time.

    Attributes
    ----------
    t : ndarray (n_times,)
        t statistic of the mean score against 0.
    pvalues : ndarray (n_times,)
        One-tailed p-values (alternative: mean > 0).
    pvalues_fdr : ndarray (n_times,)
        BH-adjusted p-values over time points.
    significant : ndarray (n_times,) bool
        ``pvalues_fdr``-based rejections at FDR ``q``.
    """

    t: np.ndarray
    pvalues: np.ndarray
    pvalues_fdr: np.ndarray
    significant: np.ndarray


def ttest_across_subjects(scores, q: float = 0.05) -> TimeResolvedTest:
    """MEG statistics: per time point, is the (channel-averaged) encoding score > 0 across subjects?

    Equals ``scipy.stats.ttest_1samp(scores, 0, axis=0, alternative="greater")``, followed by
    :func:`fdr_bh` over time points. A time point with a NaN score in any subject gets NaN
    t and p (as scipy's default ``nan_policy="propagate"``) and is left out of the FDR family.

    Parameters
    ----------
    scores : ndarray, shape (n_subjects, n_times)
        Encoding score (Pearson r, averaged over splits and channels) per subject and time.
    q : float
        FDR level.

    Returns
    -------
    TimeResolvedTest
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"scores must have shape (n_subjects >= 2, n_times), got {x.shape}")
    n = x.shape[0]
    mean = x.mean(0)
    sd = x.std(0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (sd / np.sqrt(n))
    p = sps.t.sf(t, df=n - 1)
    significant, p_fdr = fdr_bh(p, q)
    return TimeResolvedTest(t=t, pvalues=p, pvalues_fdr=p_fdr, significant=significant)


__all__ = ["sequential_null", "SequentialNull", "fdr_bh", "permutation_pvalues", "pooled_permutation_pvalues", "gaussian_tail_pvalues", "permutation_test",
           "PermutationResult", "pooled_null_pvalues", "backprop_null_designs", "residual_permutation_test",
           "ResidualTest", "ttest_across_subjects", "TimeResolvedTest", "PERMUTATION_METHODS"]
