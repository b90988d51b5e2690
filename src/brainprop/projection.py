"""Random projections of per-image gradients, and PCA of features.

Two seeded Johnson-Lindenstrauss projections map a layer's flattened weight gradient
``G`` (``out x in``, ``D = out * in`` values) to ``k`` dimensions, the same map for every image:

* ``GaussianProjection``: ``g @ P`` with ``P`` (D x k) i.i.d. N(0, 1/k). ``P`` is generated
  in fixed blocks of ``BLOCK_ROWS`` rows, block ``j`` from its own seed ``(seed, j)``, so the
  matrix is the same whatever the memory budget. Memory: the whole matrix takes
  ``4 * D * k`` bytes (paper, DINOv3-S ``mlp.fc2``: 384 x 1536 x 800 x 4 B = 1.9 GB per
  layer, 22.6 GB for 12 layers). When that exceeds ``memory_budget_mb`` the blocks are
  regenerated for every batch (``4 * BLOCK_ROWS * k`` bytes at a time) instead of cached:
  slower (one Gaussian draw of D x k numbers per batch and layer), never more memory.
* ``KroneckerProjection``: ``A^T G B`` with ``A`` (out x a), ``B`` (in x b) Gaussian,
  giving ``k = a * b`` dimensions; equivalent to ``vec(G) @ (A kron B)`` without ever
  forming it. Memory ``4 * (out * a + in * b)`` bytes (paper: 384*16 + 1536*50 floats,
  0.3 MB), and applied to per-token factors it never forms ``G`` at all.

PCA (scikit-learn, exact SVD) reduces features to the configured dimensions; the first
``m`` components of an ``n``-component fit are the ``m``-component fit, so one fit per
(layer, signal) serves both the 300-dim single-signal and the 150+150 residual analyses.
"""

from __future__ import annotations

import numpy as np
import torch

from brainprop.utils import get_logger, stable_seed

log = get_logger(__name__)

BLOCK_ROWS = 8192


def _generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(stable_seed("projection", seed, *keys))


class GaussianProjection:
    """Seeded Gaussian projection R^D -> R^k, generated in blocks of rows.

    Parameters
    ----------
    in_dim : int
        D, the flattened dimension (``out * in`` for a weight gradient).
    out_dim : int
        k, the projected dimension.
    seed : int
        Seed; block ``j`` of ``BLOCK_ROWS`` rows is drawn from ``(seed, j)``.
    memory_budget_mb : float
        Cache the whole matrix when ``4 * D * k`` bytes fit in this budget, else regenerate blocks per call.
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int, memory_budget_mb: float = 1024.0):
        self.in_dim, self.out_dim, self.seed = int(in_dim), int(out_dim), int(seed)
        self.cache = 4 * self.in_dim * self.out_dim <= memory_budget_mb * 2**20
        self._blocks: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self.out_dim

    def block(self, j: int, device: torch.device) -> torch.Tensor:
        """Rows ``j * BLOCK_ROWS`` .. of the projection matrix, float32 on ``device``."""
        key = (j, str(device))
        if key in self._blocks:
            return self._blocks[key]
        rows = min(BLOCK_ROWS, self.in_dim - j * BLOCK_ROWS)
        p = torch.randn(rows, self.out_dim, generator=_generator(self.seed, j)) / np.sqrt(self.out_dim)
        p = p.to(device)
        if self.cache:
            self._blocks[key] = p
        return p

    def matrix(self) -> torch.Tensor:
        """The whole D x k matrix (for tests and small D only)."""
        n_blocks = -(-self.in_dim // BLOCK_ROWS)
        return torch.cat([self.block(j, torch.device("cpu")) for j in range(n_blocks)])

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """Project ``flat`` (B, D) to (B, k), accumulating block by block in float32."""
        if flat.shape[-1] != self.in_dim:
            raise ValueError(f"projection expects {self.in_dim} input dims, got {flat.shape[-1]}")
        out = torch.zeros(flat.shape[0], self.out_dim, dtype=torch.float32, device=flat.device)
        for j, start in enumerate(range(0, self.in_dim, BLOCK_ROWS)):
            out += flat[:, start:start + BLOCK_ROWS].float() @ self.block(j, flat.device)
        return out


def kronecker_factors(k: int, rows: int, cols: int) -> tuple[int, int]:
    """Choose (a, b) with a * b = k, a the divisor of k closest to sqrt(k * rows / cols)."""
    target = np.sqrt(k * rows / cols)
    divisors = [d for d in range(1, k + 1) if k % d == 0 and d <= rows and k // d <= cols]
    if not divisors:
        raise ValueError(f"cannot factor projection dim {k} for a {rows} x {cols} gradient")
    a = min(divisors, key=lambda d: (abs(np.log(d / target)), d))
    return a, k // a


class KroneckerProjection:
    """Seeded Kronecker-structured projection of a (rows x cols) matrix: ``A^T G B`` flattened.

    ``A`` (rows x a) and ``B`` (cols x b) are i.i.d. N(0, 1/a) and N(0, 1/b) so that
    ``E ||A^T G B||^2 = ||G||^2`` like the Gaussian projection.
    """

    def __init__(self, rows: int, cols: int, out_dim: int, seed: int, factors: tuple[int, int] | None = None):
        self.rows, self.cols = int(rows), int(cols)
        a, b = factors if factors else kronecker_factors(out_dim, rows, cols)
        self.a = torch.randn(rows, a, generator=_generator(seed, 0)) / np.sqrt(a)
        self.b = torch.randn(cols, b, generator=_generator(seed, 1)) / np.sqrt(b)

    @property
    def dim(self) -> int:
        return self.a.shape[1] * self.b.shape[1]

    def factors_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.a.device != device:
            self.a, self.b = self.a.to(device), self.b.to(device)
        return self.a, self.b

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """Project flattened matrices (B, rows * cols) -> (B, a * b)."""
        a, b = self.factors_on(flat.device)
        g = flat.float().reshape(-1, self.rows, self.cols)
        return (a.T @ g @ b).reshape(flat.shape[0], -1)

    def from_factors(self, left: torch.Tensor, right: torch.Tensor, owner: torch.Tensor, n_images: int) -> torch.Tensor:
        """Project per-image sums of outer products without forming them.

        ``G_i = sum_{n: owner[n] = i} sum_t left[n, t]^T right[n, t]`` with ``left`` (N, T, rows)
        and ``right`` (N, T, cols); returns (n_images, a * b) = ``vec(A^T G_i B)``.
        """
        a, b = self.factors_on(left.device)
        la, rb = left.float() @ a, right.float() @ b  # (N, T, a), (N, T, b)
        per_row = torch.einsum("nta,ntb->nab", la, rb).reshape(left.shape[0], -1)
        out = torch.zeros(n_images, per_row.shape[1], dtype=per_row.dtype, device=per_row.device)
        return out.index_add_(0, owner.to(per_row.device), per_row)


def fit_pca(features: np.ndarray, n_components: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of (n_images, d) features; returns (scores (n_images, m) float32, explained variance ratio (m,)).

    ``m = min(n_components, n_images, d)``; a reduction below ``n_components`` is logged.
    """
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"features contain {np.size(x) - np.isfinite(x).sum()} non-finite values; refusing PCA")
    m = min(n_components, *x.shape)
    if m < n_components:
        log.warning("PCA: %d components requested, only %d possible for a %s matrix", n_components, m, x.shape)
    pca = PCA(n_components=m, svd_solver="full", random_state=seed)
    scores = pca.fit_transform(x)
    # fix the arbitrary sign of each component for reproducibility across solvers
    signs = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(m)])
    signs[signs == 0] = 1
    return (scores * signs).astype(np.float32), pca.explained_variance_ratio_.astype(np.float32)
