"""Random projections and PCA against direct references."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from brainprop.projection import (
    BLOCK_ROWS,
    GaussianProjection,
    KroneckerProjection,
    fit_pca,
    gaussian_matrix,
    gaussian_tile,
    kronecker_factors,
    layer_seed,
    nested_gaussian,
    storage_plan,
)


def test_gaussian_projection_is_the_same_matrix_in_memory_and_memory_mapped(tmp_path):
    d = 2 * BLOCK_ROWS + 123  # three row blocks, the last partial
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    ref_matrix = gaussian_matrix(d, 40, seed=5)  # 40: one full and one cut column chunk
    in_memory = GaussianProjection(d, 40, seed=5, storage="device")
    mapped = GaussianProjection(d, 40, seed=5, storage="memmap", scratch_dir=tmp_path)
    ref = x.double() @ ref_matrix.double()
    torch.testing.assert_close(in_memory(x).double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mapped(x).double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(in_memory.matrix(), ref_matrix) and torch.equal(mapped.matrix(), ref_matrix)
    # the memory-mapped matrix lives in one scratch file, generated once, deleted on close
    (scratch,) = tmp_path.iterdir()
    assert scratch.stat().st_size >= mapped.nbytes == 4 * d * 40
    mtime = scratch.stat().st_mtime_ns
    mapped(x)
    assert scratch.stat().st_mtime_ns == mtime and isinstance(mapped._z, np.memmap)
    mapped.close()
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="storage"):
        GaussianProjection(d, 4, seed=0, storage="disk")


def test_gaussian_projection_is_column_nested():
    d, big = BLOCK_ROWS + 77, 70
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(3))
    tiles_big = [gaussian_tile(2, j, rows, big) for j, rows in enumerate((BLOCK_ROWS, 77))]
    full = GaussianProjection(d, big, seed=2)(x).numpy()
    for k in (1, 31, 32, 33, 64, 70):
        # the unscaled matrix's first k columns do not depend on the projected dimension
        assert all(torch.equal(gaussian_tile(2, j, t.shape[0], k), t[:, :k]) for j, t in enumerate(tiles_big))
        torch.testing.assert_close(gaussian_matrix(d, k, seed=2) * np.sqrt(k), torch.cat(tiles_big)[:, :k])
        direct = GaussianProjection(d, k, seed=2)(x).numpy()
        # float32 products over D = 8269 terms: |error| <= 1e-5 relative to the largest value
        np.testing.assert_allclose(nested_gaussian(full, k), direct, rtol=0, atol=1e-5 * np.abs(direct).max())
    with pytest.raises(ValueError, match="cannot derive"):
        nested_gaussian(full, big + 1)


def test_storage_plan_fills_the_budget_in_order():
    mib = 2**20
    assert storage_plan([mib, mib, mib], 2) == ["device", "device", "memmap"]
    assert storage_plan([3 * mib, mib], 2) == ["memmap", "device"]
    assert storage_plan([mib], 0.5) == ["memmap"]


def test_layer_seed_depends_on_the_name_only():
    assert layer_seed(0, "blocks.11.mlp.fc2") == layer_seed(0, "blocks.11.mlp.fc2")
    assert len({layer_seed(0, "blocks.1.mlp.fc2"), layer_seed(0, "blocks.11.mlp.fc2"),
                layer_seed(1, "blocks.1.mlp.fc2")}) == 3


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
