"""Statistics: BH-FDR and t-test against statsmodels/scipy; calibration of the permutation nulls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps
from statsmodels.stats.multitest import fdrcorrection

from brainprop.stats import (
    fdr_bh,
    gaussian_tail_pvalues,
    permutation_pvalues,
    permutation_test,
    ttest_across_subjects,
)

ALPHAS = np.logspace(0, 8, 10)


@pytest.mark.parametrize("q", [0.01, 0.05, 0.2])
def test_fdr_bh_equals_statsmodels(q):
    rng = np.random.default_rng(0)
    # a mixture of nulls, signals, exact ties and the boundary values 0 and 1
    p = np.concatenate([rng.uniform(size=400), rng.uniform(0, 1e-3, 60), [0.0, 1.0, 0.01, 0.01, 0.01]])
    rng.shuffle(p)
    reject, adjusted = fdr_bh(p, q)
    ref_reject, ref_adjusted = fdrcorrection(p, alpha=q)
    np.testing.assert_array_equal(reject, ref_reject)
    np.testing.assert_allclose(adjusted, ref_adjusted, rtol=1e-15, atol=0)
    assert 0 < reject.sum() < len(p)


def test_fdr_bh_ignores_nan_and_keeps_shape():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.02, size=(6, 7))
    p[0, :3] = np.nan
    p[4, 4] = np.nan
    reject, adjusted = fdr_bh(p, 0.05)
    assert reject.shape == adjusted.shape == p.shape
    nan = np.isnan(p)
    assert not reject[nan].any() and np.isnan(adjusted[nan]).all()
    ref_reject, ref_adjusted = fdrcorrection(p[~nan], alpha=0.05)
    np.testing.assert_array_equal(reject[~nan], ref_reject)
    np.testing.assert_allclose(adjusted[~nan], ref_adjusted, rtol=1e-15)
    with pytest.raises(ValueError, match="p-values"):
        fdr_bh(np.array([0.5, 1.5]))


def test_ttest_across_subjects_equals_scipy():
    rng = np.random.default_rng(2)
    scores = rng.normal(0.0, 0.02, size=(8, 50)) + np.linspace(-0.02, 0.08, 50)
    scores[2, 10] = np.nan  # propagates to that time point only
    res = ttest_across_subjects(scores, q=0.05)
    ref = sps.ttest_1samp(scores, 0.0, axis=0, alternative="greater")
    np.testing.assert_allclose(res.t, ref.statistic, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(res.pvalues, ref.pvalue, rtol=1e-10, equal_nan=True)
    assert np.isnan(res.pvalues[10]) and not res.significant[10]
    ok = ~np.isnan(ref.pvalue)
    ref_reject, ref_adjusted = fdrcorrection(ref.pvalue[ok], alpha=0.05)
    np.testing.assert_array_equal(res.significant[ok], ref_reject)
    np.testing.assert_allclose(res.pvalues_fdr[ok], ref_adjusted, rtol=1e-10)
    assert res.significant.any() and not res.significant.all()
    with pytest.raises(ValueError, match="n_subjects"):
        ttest_across_subjects(scores[:1])


def test_permutation_pvalues_count_with_plus_one():
    observed = np.array([0.5, 0.0, np.nan])
    null = np.array([[0.1, 0.2, 0.0], [0.5, -0.1, 0.0], [0.7, np.nan, 0.0]])
    # target 0: 2 of 3 nulls >= 0.5; target 1: 0.2 and the NaN shuffle (counted, conservative)
    np.testing.assert_array_equal(permutation_pvalues(observed, null)[:2], [3 / 4, 3 / 4])
    assert np.isnan(permutation_pvalues(observed, null)[2])


def _null_data(seed, n=120, p=6, t=300):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, p)), rng.standard_normal((n, t))


def test_refit_permutation_pvalues_are_uniform_without_signal():
    X, Y = _null_data(3)
    res = permutation_test(X, Y, ALPHAS, n_permutations=99, method="refit", permutation_seed=5, device="cpu",
                           progress=False)
    assert res.null.shape == (99, 300) and not res.invalid.any()
    assert res.pvalues.min() >= 1 / 100
    # uniform on {1/100, ..., 1}: compare with a continuous uniform (KS) ...
    assert sps.kstest(res.pvalues, "uniform").pvalue > 0.01
    assert sps.kstest(res.pvalues_gaussian, "uniform").pvalue > 0.01
    # ... and check that the test has power to reject a miscalibrated version (p without the +1)
    biased = (res.null >= res.observed).sum(0) / 99 / 2
    assert sps.kstest(biased, "uniform").pvalue < 0.01


def test_shuffle_predictions_null_is_too_narrow_for_the_split_average():
    """Documented limitation (docs/statistics.md): under H0 the split scores of one target are
    positively correlated (each split's test rows are in the other splits' training rows), which
    shuffling predictions within splits with the models fixed cannot reproduce. The cheap null is
    narrower than the spread of observed scores, the refit null is not."""
    X, Y = _null_data(8, n=300, p=10, t=400)
    cheap = permutation_test(X, Y, ALPHAS, n_permutations=49, method="shuffle_predictions", device="cpu",
                             progress=False)
    refit = permutation_test(X, Y, ALPHAS, n_permutations=49, method="refit", device="cpu", progress=False)
    np.testing.assert_allclose(cheap.observed, refit.observed, atol=1e-6)
    spread = cheap.observed.std()  # across null targets: the actual H0 spread of the statistic
    assert cheap.null.std() < 0.85 * spread
    assert 0.9 * spread < refit.null.std() < 1.1 * spread


def test_permutation_test_is_seeded():
    X, Y = _null_data(4, t=20)
    a = permutation_test(X, Y, ALPHAS, n_permutations=10, permutation_seed=1, device="cpu", progress=False)
    b = permutation_test(X, Y, ALPHAS, n_permutations=10, permutation_seed=1, device="cpu", progress=False)
    c = permutation_test(X, Y, ALPHAS, n_permutations=10, permutation_seed=2, device="cpu", progress=False)
    np.testing.assert_array_equal(a.null, b.null)
    assert not np.allclose(a.null, c.null)
    with pytest.raises(ValueError, match="method"):
        permutation_test(X, Y, ALPHAS, n_permutations=10, method="bootstrap")


def test_fdr_controls_false_discovery_proportion_over_seeds():
    """40 of 200 targets carry signal; BH at q on permutation p-values keeps mean FDP <= q."""
    q, n_seeds = 0.1, 10
    fdp, fdp_uncorrected, power = [], [], []
    for seed in range(n_seeds):
        rng = np.random.default_rng(100 + seed)
        X = rng.standard_normal((150, 5))
        Y = rng.standard_normal((150, 200))
        signal = np.zeros(200, dtype=bool)
        signal[:40] = True
        Y[:, signal] += X @ rng.standard_normal((5, 40)) * 0.2
        res = permutation_test(X, Y, ALPHAS, n_permutations=99, method="refit", permutation_seed=seed,
                               device="cpu", progress=False)
        reject, _ = fdr_bh(res.pvalues, q)
        fdp.append((reject & ~signal).sum() / max(reject.sum(), 1))
        naive = res.pvalues <= q
        fdp_uncorrected.append((naive & ~signal).sum() / max(naive.sum(), 1))
        power.append((reject & signal).sum() / signal.sum())
    assert np.mean(fdp) <= q, fdp  # BH guarantees E[FDP] <= q * 160 / 200
    assert np.mean(power) > 0.5, power  # the check is not vacuous: there are discoveries
    assert np.mean(fdp_uncorrected) > 2 * q  # without correction the proportion is far above q


def test_gaussian_tail_goes_below_the_permutation_floor_for_strong_signal():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((300, 5))
    Y = rng.standard_normal((300, 6))
    Y[:, :3] += X[:, :2] @ rng.standard_normal((2, 3))
    res = permutation_test(X, Y, ALPHAS, n_permutations=49, method="refit", device="cpu", dtype=torch.float64,
                           progress=False)
    np.testing.assert_allclose(res.pvalues[:3], 1 / 50)  # floored at 1 / (N + 1)
    assert (res.pvalues_gaussian[:3] < 1e-6).all()
    mu, sd = res.null.mean(0), res.null.std(0, ddof=1)
    np.testing.assert_allclose(gaussian_tail_pvalues(res.observed, res.null), sps.norm.sf((res.observed - mu) / sd))


def test_pooled_permutation_pvalues_reference_and_calibration():
    from brainprop.stats import pooled_permutation_pvalues

    rng = np.random.default_rng(0)
    null = rng.normal(size=(5, 400))
    observed = rng.normal(size=400)  # exchangeable with the null: p must be uniform
    p = pooled_permutation_pvalues(observed, null)
    ref = np.array([(1 + (null.ravel() >= o).sum()) / (null.size + 1) for o in observed])
    np.testing.assert_allclose(p, ref)
    assert sps.kstest(p, "uniform").pvalue > 0.01
    assert pooled_permutation_pvalues(np.array([10.0]), null[:, :1]).item() == 1 / 6  # floor 1/(N T + 1)
    with_nan = pooled_permutation_pvalues(np.array([np.nan, 0.0]), np.zeros((3, 2)))
    assert np.isnan(with_nan[0]) and with_nan[1] == 1.0


def test_refit_with_precomputed_observed_scores_skips_only_the_observed_fit():
    """Passing cross_validated_ridge's mean scores gives the same null and p-values as refitting them."""
    from brainprop.encoding import cross_validated_ridge

    X, Y = _null_data(9, t=30)
    Y[:, 3] = 1.0  # a constant (invalid) target stays NaN
    Y[:, 0] += 3 * X[:, 0]  # one real effect
    full = permutation_test(X, Y, ALPHAS, n_permutations=7, permutation_seed=3, device="cpu", progress=False)
    obs = cross_validated_ridge(X, Y, ALPHAS, device="cpu", progress=False).mean_scores
    reused = permutation_test(X, Y, ALPHAS, n_permutations=7, permutation_seed=3, observed=obs, device="cpu",
                              progress=False)
    np.testing.assert_allclose(reused.observed, full.observed, atol=1e-6)
    np.testing.assert_array_equal(reused.null, full.null)
    np.testing.assert_array_equal(reused.pvalues, full.pvalues)
    assert np.isnan(reused.observed[3]) and reused.pvalues[0] == 1 / 8
