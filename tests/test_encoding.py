"""Equivalence of the ridge encoding engine with scikit-learn and himalaya, and planted effects."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainprop.encoding import (
    cross_validated_ridge,
    kfold_splits,
    refit_null_scores,
    residual_scores,
    row_permutations,
    shuffled_prediction_null_scores,
    split_permutations,
)

ALPHAS = np.logspace(0, 8, 10)
# r tolerance per working precision (the brief: 1e-4 in float32, 1e-8 in float64)
R_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}
# relative (LOO MSE) / absolute (inner r) gap below which two alphas are a genuine near-tie
TIE_LOO = {torch.float32: 1e-5, torch.float64: 1e-10}
TIE_KFOLD = {torch.float32: 1e-5, torch.float64: 1e-10}


def _pearson(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def _simulate(n, p, t, seed=0, offset=3.0):
    """Features with unequal scales; targets whose noise spans 3 decades (different best alphas)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * rng.uniform(0.5, 3.0, p) + rng.normal(0, 2, p)
    W = rng.standard_normal((p, t)) / np.sqrt(p)
    noise = np.logspace(-1.5, 0.7, t)
    Y = X @ W + rng.standard_normal((n, t)) * noise + offset
    return X, Y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("shape", [(250, 30), (60, 80), (2000, 100)], ids=["long", "wide", "many-images"])
def test_loo_matches_sklearn_ridgecv_pipeline(dtype, standardize, shape):
    n, p = shape
    X, Y = _simulate(n, p, 48)
    if shape == (2000, 100) and dtype == torch.float32 and standardize:
        # this size exercises the exact correction of the highest-leverage rows (see _LooSplit)
        from brainprop.encoding import RidgeEncoder

        enc = RidgeEncoder(X, ALPHAS, dtype=dtype, standardize=standardize, device="cpu")
        assert all(len(st.special) > 0 for st in enc.states)
    res = cross_validated_ridge(X, Y, ALPHAS, dtype=dtype, standardize=standardize, device="cpu", progress=False)
    assert res.scores.shape == res.alphas.shape == (5, 48)
    n_ties = 0
    chosen = set()
    for s, (train, test) in enumerate(kfold_splits(n, 5, 0)):
        steps = [StandardScaler()] if standardize else []
        ref = make_pipeline(*steps, RidgeCV(alphas=ALPHAS, alpha_per_target=True, store_cv_results=True))
        ref.fit(X[train], Y[train])
        r_ref = _pearson(ref.predict(X[test]), Y[test])
        # sklearn's own LOO mean squared errors (n_targets, n_alphas) tell genuine near-ties
        mse = ref[-1].cv_results_.mean(0)
        two = np.sort(mse, axis=1)[:, :2]
        tie = (two[:, 1] - two[:, 0]) <= TIE_LOO[dtype] * two[:, 0]
        n_ties += int(tie.sum())
        np.testing.assert_array_equal(res.alphas[s][~tie], ref[-1].alpha_[~tie])
        same = res.alphas[s] == ref[-1].alpha_
        assert same.sum() >= 0.9 * len(same)
        np.testing.assert_allclose(res.scores[s][same], r_ref[same], rtol=0, atol=R_TOL[dtype])
        chosen |= set(ref[-1].alpha_.tolist())
    assert n_ties <= 0.05 * Y.shape[1] * 5, n_ties
    assert len(chosen) >= 4, "the simulation must make different targets choose different alphas"


@pytest.mark.parametrize("max_basis", [None, 2, 0], ids=["auto", "short-basis", "all-rows-exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loo_error_curve_equals_sklearn_cv_results(dtype, max_basis):
    """The leave-one-out mean squared error of every alpha, not only the argmin, equals RidgeCV's.

    ``max_basis`` forces a short expansion of the LOO weights so that most rows take the exact
    correction path (0: all of them), which must give the same curve."""
    from brainprop.encoding import _LooSplit, _Workspace

    n, p = 300, 25
    X, Y = _simulate(n, p, 30, seed=10)
    train, test = kfold_splits(n, 5, 0)[1]
    st = _LooSplit(torch.as_tensor(X), train, test, ALPHAS, True, dtype, max_basis=max_basis)
    if max_basis is not None:
        assert st.n_basis <= max_basis and len(st.special) > n // 2
    sse, _, _ = st.loo_sse(torch.as_tensor(Y).to(dtype), _Workspace(torch.device("cpu"), dtype))
    ref = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS, alpha_per_target=True, store_cv_results=True))
    ref.fit(X[train], Y[train])
    mse_ref = ref[-1].cv_results_.mean(0).T  # (n_alphas, n_targets)
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(sse.double().numpy() / len(train), mse_ref, rtol=rtol, atol=0)


def _himalaya_reference_scores(Xtr, Ytr, alphas, n_inner):
    """Mean inner-fold Pearson r per (alpha, target), by plain sklearn Ridge refits (for ties)."""
    out = np.zeros((len(alphas), Ytr.shape[1]))
    for t_idx, v_idx in KFold(n_inner).split(Xtr):
        for k, a in enumerate(alphas):
            pred = Ridge(alpha=a).fit(Xtr[t_idx], Ytr[t_idx]).predict(Xtr[v_idx])
            out[k] += _pearson(pred, Ytr[v_idx])
    return out / n_inner


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("standardize", [True, False])
def test_inner_kfold_matches_himalaya_ridgecv(dtype, standardize):
    from himalaya.ridge import RidgeCV as HimalayaRidgeCV
    from himalaya.scoring import correlation_score

    n, p, t = 200, 15, 36
    X, Y = _simulate(n, p, t, seed=1)
    res = cross_validated_ridge(X, Y, ALPHAS, inner_cv=5, dtype=dtype, standardize=standardize, device="cpu",
                                progress=False)
    n_ties = 0
    chosen = set()
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    for s, (train, test) in enumerate(kfold_splits(n, 5, 0)):
        hm = HimalayaRidgeCV(alphas=ALPHAS, fit_intercept=True, cv=KFold(5),
                             solver_params=dict(score_func=correlation_score))
        ref = make_pipeline(StandardScaler() if standardize else "passthrough", hm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.fit(X[train].astype(np_dtype), Y[train].astype(np_dtype))
        # predictions from himalaya's coefficients without its float32 intercept addition, which
        # rounds away the tiny prediction variance of heavily penalised targets (r is shift-invariant)
        Xs_test = (ref[0].transform(X[test].astype(np_dtype)) if standardize else X[test]).astype(np.float64)
        r_ref = _pearson(Xs_test @ np.asarray(hm.coef_, dtype=np.float64), Y[test])
        # himalaya reports alphas as exp(-log(1/alpha)): map back to the grid before comparing
        ref_alpha = ALPHAS[np.argmin(np.abs(np.log(np.asarray(hm.best_alphas_, dtype=np.float64))[:, None]
                                            - np.log(ALPHAS)[None]), axis=1)]
        Xs = StandardScaler().fit_transform(X[train]) if standardize else X[train]
        inner = _himalaya_reference_scores(Xs, Y[train], ALPHAS, 5)
        two = -np.sort(-inner, axis=0)[:2]
        tie = (two[0] - two[1]) <= TIE_KFOLD[dtype]
        n_ties += int(tie.sum())
        np.testing.assert_array_equal(res.alphas[s][~tie], ref_alpha[~tie])
        same = res.alphas[s] == ref_alpha
        np.testing.assert_allclose(res.scores[s][same], r_ref[same], rtol=0, atol=R_TOL[dtype])
        chosen |= set(ref_alpha.tolist())
    assert n_ties <= 0.05 * t * 5, n_ties
    assert len(chosen) >= 4


def test_invalid_targets_get_nan_and_leave_others_unchanged(caplog):
    X, Y = _simulate(150, 12, 10, seed=2)
    Y_bad = np.concatenate([Y[:, :3], np.full((150, 1), 7.0), Y[:, 3:6], Y[:, 6:7] * np.nan, Y[:, 6:]], axis=1)
    Y_bad[5, 9] = np.inf  # one inf in a column (index 9) that is otherwise fine
    keep = np.ones(Y_bad.shape[1], dtype=bool)
    keep[[3, 7, 9]] = False
    before = Y_bad.copy()
    Y_bad.setflags(write=False)  # like a read-only memmap: the engine must work on copies
    with caplog.at_level(logging.WARNING, logger="brainprop.encoding"):
        res = cross_validated_ridge(X, Y_bad, ALPHAS, dtype=torch.float64, device="cpu", progress=False)
    np.testing.assert_array_equal(Y_bad, before)  # NaN/inf columns were not zeroed in the caller's array
    np.testing.assert_array_equal(res.invalid, ~keep)
    assert np.isnan(res.scores[:, ~keep]).all() and np.isnan(res.alphas[:, ~keep]).all()
    assert "3 of 12 targets" in caplog.text
    clean = cross_validated_ridge(X, Y_bad[:, keep], ALPHAS, dtype=torch.float64, device="cpu", progress=False)
    np.testing.assert_allclose(res.scores[:, keep], clean.scores, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res.alphas[:, keep], clean.alphas)


@pytest.mark.parametrize("inner_cv", ["loo", 4])
def test_target_batching_does_not_change_results(inner_cv):
    X, Y = _simulate(120, 10, 25, seed=3)
    one = cross_validated_ridge(X, Y, ALPHAS, inner_cv=inner_cv, dtype=torch.float64, device="cpu",
                                return_predictions=True, progress=False)
    # a budget just above the fixed precomputation forces batches of a few targets
    from brainprop.encoding import RidgeEncoder

    enc = RidgeEncoder(X, ALPHAS, inner_cv=inner_cv, dtype=torch.float64, device="cpu")
    budget = sum(s.fixed_bytes() for s in enc.states) + 8 * 3 * (3 * 120 + max(s.floats_per_column() for s in enc.states))
    assert enc.batch_size(budget) == 3
    many = cross_validated_ridge(X, Y, ALPHAS, inner_cv=inner_cv, dtype=torch.float64, device="cpu",
                                 memory_budget=budget, return_predictions=True, progress=False)
    np.testing.assert_allclose(many.scores, one.scores, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(many.alphas, one.alphas)
    np.testing.assert_allclose(many.predictions, one.predictions, rtol=1e-10, atol=1e-10)
    # held-out predictions are those of the split that holds each row out
    for s, te in enumerate(one.test_indices):
        np.testing.assert_allclose(_pearson(one.predictions[te], Y[te]), one.scores[s], atol=1e-10)


def test_planted_signal_recovers_theoretical_correlation():
    """Y = X w + noise with R^2 = s / (s + 1): held-out r ~ sqrt(R^2), shrunk by estimation noise.

    With ordinary least squares on n_train images and p features, the held-out correlation is
    sqrt(R^2) / sqrt(1 + p (1 - R^2) / (n_train R^2)) to first order; ridge with a chosen
    alpha can only be closer to sqrt(R^2). Checked for three strengths, 24 targets each.
    """
    rng = np.random.default_rng(4)
    n, p, per = 3000, 10, 24
    X = rng.standard_normal((n, p))
    r2 = np.repeat([0.04, 0.25, 0.64], per)
    W = rng.standard_normal((p, r2.size))
    W *= np.sqrt(r2 / (1 - r2)) / np.linalg.norm(W, axis=0)  # var(x w) = |w|^2 = R^2 / (1 - R^2)
    Y = X @ W + rng.standard_normal((n, r2.size))
    res = cross_validated_ridge(X, Y, ALPHAS, device="cpu", progress=False)
    n_train = n * 4 // 5
    for level in np.unique(r2):
        got = res.mean_scores[r2 == level].mean()
        ols = np.sqrt(level) / np.sqrt(1 + p * (1 - level) / (n_train * level))
        assert ols - 0.02 <= got <= np.sqrt(level) + 0.02, (level, got, ols)
        assert abs(got - ols) < 0.02, (level, got, ols)


def test_residual_scores_select_the_right_columns():
    rng = np.random.default_rng(5)
    n = 400
    Xf = rng.standard_normal((n, 12))
    Xb = rng.standard_normal((n, 12))
    # targets 0-4: driven by backprop PCs inside the first n_backprop; 5-9: by forward PCs beyond n_forward
    Y = np.concatenate([Xb[:, :3] @ rng.standard_normal((3, 5)), Xf[:, 8:11] @ rng.standard_normal((3, 5))], axis=1)
    Y += rng.standard_normal(Y.shape)
    res = residual_scores(Xf, Xb, Y, ALPHAS, n_forward=6, n_backprop=6, n_total=12, device="cpu",
                          dtype=torch.float64, progress=False)
    joint = cross_validated_ridge(np.concatenate([Xf[:, :6], Xb[:, :6]], axis=1), Y, ALPHAS, device="cpu",
                                  dtype=torch.float64, progress=False)
    forward = cross_validated_ridge(Xf, Y, ALPHAS, device="cpu", dtype=torch.float64, progress=False)
    np.testing.assert_allclose(res.joint.scores, joint.scores, atol=1e-12)
    np.testing.assert_allclose(res.forward.scores, forward.scores, atol=1e-12)
    np.testing.assert_allclose(res.residual, joint.mean_scores - forward.mean_scores, atol=1e-12)
    assert (res.residual[:5] > 0.3).all() and (res.residual[5:] < -0.3).all()
    with pytest.raises(ValueError, match="X_backprop"):
        residual_scores(Xf, Xb[:, :4], Y, ALPHAS, n_forward=6, n_backprop=6, n_total=12)


def _naive_pipeline_scores(X, Y, train, test):
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS, alpha_per_target=True)).fit(X[train], Y[train])
    return model.predict(X[test])


def test_refit_null_equals_naive_sklearn_loop():
    X, Y = _simulate(100, 6, 8, seed=6)
    perms = row_permutations(100, 3, seed=11)
    observed, null, invalid = refit_null_scores(X, Y, ALPHAS, perms, dtype=torch.float64, device="cpu",
                                                progress=False)
    assert not invalid.any()
    splits = kfold_splits(100, 5, 0)
    for k, perm in enumerate([np.arange(100), *perms]):
        Yp = Y[perm]
        ref = np.mean([_pearson(_naive_pipeline_scores(X, Yp, tr, te), Yp[te]) for tr, te in splits], axis=0)
        got = observed if k == 0 else null[k - 1]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-8)
    again = refit_null_scores(X, Y, ALPHAS, row_permutations(100, 3, seed=11), dtype=torch.float64,
                              device="cpu", progress=False, memory_budget=300_000)
    np.testing.assert_allclose(again[1], null, rtol=0, atol=1e-12)  # seeded; chunked differently


def test_shuffled_prediction_null_equals_naive_loop():
    X, Y = _simulate(100, 6, 8, seed=7)
    splits = kfold_splits(100, 5, 0)
    perms = split_permutations([te for _, te in splits], 4, seed=3)
    observed, null, _ = shuffled_prediction_null_scores(X, Y, ALPHAS, perms, dtype=torch.float64, device="cpu",
                                                        progress=False)
    preds = [_naive_pipeline_scores(X, Y, tr, te) for tr, te in splits]
    np.testing.assert_allclose(observed, np.mean([_pearson(pr, Y[te]) for pr, (_, te) in zip(preds, splits)], 0),
                               atol=1e-8)
    for k in range(4):
        ref = np.mean([_pearson(pr[pm[k]], Y[te]) for pr, (_, te), pm in zip(preds, splits, perms)], axis=0)
        np.testing.assert_allclose(null[k], ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize("case", ["iid", "near_duplicate_features", "more_features_than_images", "decaying_scales"])
def test_partial_fraction_variance_equals_direct_sum(case):
    """float32 inner k-fold: prediction variances for all alphas by partial fractions (float64)."""
    from brainprop.encoding import _partial_fraction_terms, _variance_partial_fractions, _Workspace

    rng = np.random.default_rng(9)
    n_t, n_v, p = (60, 20, 80) if case == "more_features_than_images" else (400, 100, 40)
    X = rng.standard_normal((n_t + n_v, p))
    if case == "near_duplicate_features":
        X[:, 1] = X[:, 0] * (1 + 1e-7) + 1e-9 * rng.standard_normal(n_t + n_v)
        X[:, 3] = X[:, 2]
    if case == "decaying_scales":
        X *= np.logspace(0, -3, p)
    Xt = torch.as_tensor(X[:n_t] - X[:n_t].mean(0))
    Xv = torch.as_tensor(X[n_t:] - X[n_t:].mean(0))
    L, V = torch.linalg.eigh(Xt.T @ Xt)
    L = L.clamp_min(0.0)
    K = (Xv @ V).T @ (Xv @ V)
    inv = 1.0 / (L[None] + torch.as_tensor(ALPHAS)[:, None])
    Z = (torch.randn(p, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
         * torch.rand(p, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).float()
    terms = _partial_fraction_terms(L, K, inv)
    got = _variance_partial_fractions(terms, Z, _Workspace(torch.device("cpu"), torch.float32))
    Z64 = Z.double()
    direct = torch.stack([((inv[a][:, None] * Z64) * (K @ (inv[a][:, None] * Z64))).sum(0) for a in range(len(ALPHAS))])
    np.testing.assert_allclose(got.numpy(), direct.numpy(), rtol=1e-7, atol=0)
    if case != "iid":
        assert len(terms["offsets"]) >= 1  # close eigenvalues were summed directly


def test_splits_are_sklearn_kfold_and_inputs_are_checked():
    for (tr, te), (tr2, te2) in zip(kfold_splits(50, 5, 3), KFold(5, shuffle=True, random_state=3).split(np.zeros(50))):
        np.testing.assert_array_equal(tr, tr2)
        np.testing.assert_array_equal(te, te2)
    X, Y = _simulate(50, 4, 3)
    with pytest.raises(ValueError, match="same number of rows"):
        cross_validated_ridge(X, Y[:40], ALPHAS)
    with pytest.raises(ValueError, match="inner_cv"):
        cross_validated_ridge(X, Y, ALPHAS, inner_cv="gcv")
    with pytest.raises(ValueError, match="alphas"):
        cross_validated_ridge(X, Y, [-1.0, 1.0])
    with pytest.raises(ValueError, match="dtype"):
        cross_validated_ridge(X, Y, ALPHAS, dtype="float16")
    with pytest.raises(ValueError, match="dtype"):
        cross_validated_ridge(X, Y, ALPHAS, dtype=int)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("inner_cv", ["loo", 5])
def test_cuda_matches_cpu(inner_cv):
    X, Y = _simulate(300, 20, 40, seed=8)
    cpu = cross_validated_ridge(X, Y, ALPHAS, inner_cv=inner_cv, dtype=torch.float64, device="cpu", progress=False)
    gpu = cross_validated_ridge(X, Y, ALPHAS, inner_cv=inner_cv, dtype=torch.float64, device="cuda", progress=False)
    np.testing.assert_allclose(gpu.scores, cpu.scores, atol=1e-10)
    np.testing.assert_array_equal(gpu.alphas, cpu.alphas)
