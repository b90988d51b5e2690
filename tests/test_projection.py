"""Random projections and PCA against direct references."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from brainprop.projection import BLOCK_ROWS, GaussianProjection, KroneckerProjection, fit_pca, kronecker_factors


def test_gaussian_projection_equals_matrix_product_and_ignores_budget():
    d = 2 * BLOCK_ROWS + 123  # three blocks, the last partial
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    cached = GaussianProjection(d, 16, seed=5, memory_budget_mb=1e3)
    streamed = GaussianProjection(d, 16, seed=5, memory_budget_mb=1e-3)
    assert cached.cache and not streamed.cache
    ref = x @ cached.matrix()
    torch.testing.assert_close(cached(x), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(streamed(x), ref, rtol=1e-5, atol=1e-4)
    assert not streamed._blocks  # nothing kept beyond one block at a time


def test_gaussian_projection_preserves_norms_on_average():
    d, k = 3000, 400
    x = torch.randn(200, d, generator=torch.Generator().manual_seed(1))
    y = GaussianProjection(d, k, seed=0)(x)
    ratio = (y.norm(dim=1) ** 2 / x.norm(dim=1) ** 2).numpy()
    assert abs(ratio.mean() - 1) < 0.03  # JL: E||Px||^2 = ||x||^2, sd of the ratio ~ sqrt(2/k)
    assert ratio.std() < 2 * np.sqrt(2 / k)


def test_kronecker_projection_equals_explicit_kron():
    rows, cols = 12, 30
    proj = KroneckerProjection(rows, cols, 20, seed=3)
    g = torch.randn(5, rows, cols, generator=torch.Generator().manual_seed(2))
    ref = g.reshape(5, -1) @ torch.kron(proj.a, proj.b)
    torch.testing.assert_close(proj(g.reshape(5, -1)), ref, rtol=1e-5, atol=1e-5)
    assert proj.dim == 20


def test_kronecker_from_factors_never_needs_g():
    rows, cols, n, t = 6, 10, 7, 5
    gen = torch.Generator().manual_seed(4)
    left, right = torch.randn(n, t, rows, generator=gen), torch.randn(n, t, cols, generator=gen)
    owner = torch.tensor([0, 1, 0, 2, 2, 1, 0])
    proj = KroneckerProjection(rows, cols, 15, seed=0)
    g = torch.zeros(3, rows, cols)
    for i in range(n):
        g[owner[i]] += left[i].T @ right[i]
    torch.testing.assert_close(proj.from_factors(left, right, owner, 3), proj(g.reshape(3, -1)), rtol=1e-4, atol=1e-5)


def test_kronecker_factors():
    assert kronecker_factors(800, 384, 1536) == (16, 50)
    a, b = kronecker_factors(64, 48, 192)
    assert a * b == 64
    with pytest.raises(ValueError):
        kronecker_factors(7, 2, 3)


def test_pca_matches_sklearn_and_nests():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 30)) @ rng.normal(size=(30, 30))
    scores, ratio = fit_pca(x, 10, seed=0)
    ref = PCA(10).fit(x)
    ref_scores = ref.transform(x)
    assert scores.dtype == np.float32 and scores.shape == (80, 10)
    np.testing.assert_allclose(np.abs(scores), np.abs(ref_scores), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-5)
    small, _ = fit_pca(x, 4, seed=0)
    np.testing.assert_allclose(small, scores[:, :4], rtol=1e-4, atol=1e-4)  # first m of n = m-component fit


def test_pca_refuses_non_finite_and_clips_components(caplog):
    x = np.ones((5, 3))
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_pca(x, 2, seed=0)
    scores, _ = fit_pca(np.random.default_rng(0).normal(size=(5, 3)), 10, seed=0)
    assert scores.shape == (5, 3)
    assert "only 3 possible" in caplog.text
