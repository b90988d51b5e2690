"""Random projections of per-image gradients, and PCA of features.

Two seeded Johnson-Lindenstrauss projections map a layer's flattened weight gradient
``G`` (``out x in``, ``D = out * in`` values) to ``k`` dimensions, the same map for every image.
Each layer's map is seeded by the layer's NAME (:func:`layer_seed`), so a layer gets the same
matrix whichever other layers are extracted with it.

* ``GaussianProjection``: ``g @ P`` with ``P = Z[:, :k] / sqrt(k)`` (D x k), ``Z`` i.i.d. N(0, 1).
  ``Z`` is generated on the CPU in tiles of ``BLOCK_ROWS`` rows x ``COL_CHUNK`` columns, tile
  ``(j, c)`` from its own seed ``(seed, j, c)``: no seed involves ``k``, so ``Z`` is
  **column-nested** (its first ``k`` columns are the same for every ``k``) and the ``k``-dim
  projection equals the first ``k`` columns of the ``K``-dim one times ``sqrt(K / k)``
  (:func:`nested_gaussian`); the robustness grid (Fig. S2) extracts once at its largest dimension.
  The matrix is generated ONCE per job, never per batch, and stored either

  - ``device``: whole on the compute device, ``4 * D * k`` bytes (paper, DINOv3-S ``mlp.fc2``:
    384 x 1536 x 800 x 4 B = 1,887,436,800 B = 1.9 GB per layer, 22.6 GB (22,649,241,600 B) for
    12 layers; fits an H100/H200), one matrix product per batch; or
  - ``memmap``: written once into a scratch ``.npy`` (same ``4 * D * k`` bytes on disk), then
    streamed ``BLOCK_ROWS`` rows at a time (``4 * 8192 * k`` B = 26 MB of memory at k = 800);
    the file is deleted by :meth:`GaussianProjection.close`.

  The stored numbers are identical whatever the storage and device.
* ``KroneckerProjection``: ``A^T G B`` with ``A`` (out x a), ``B`` (in x b) Gaussian,
  giving ``k = a * b`` dimensions; equivalent to ``vec(G) @ (A kron B)`` without ever
  forming it. Memory ``4 * (out * a + in * b)`` bytes (paper: 384*16 + 1536*50 floats,
  0.3 MB), and applied to per-token factors it never forms ``G`` at all. It does not nest
  as generated (``A``, ``B`` are drawn row-major at their own widths, and ``k`` changes both
  factors); column-nested factors would nest only for dims whose factors are both no larger.

PCA (scikit-learn, exact SVD) reduces features to the configured dimensions; the first
``m`` components of an ``n``-component fit are the ``m``-component fit, so one fit per
(layer, signal) serves both the 300-dim single-signal and the 150+150 residual analyses.
"""
from __future__ import annotations

import os
import tempfile
import weakref

import numpy as np
import torch

from brainprop.utils import get_logger, stable_seed

log = get_logger(__name__)

BLOCK_ROWS = 8192
COL_CHUNK = 32
STORAGES = ("device", "memmap")


def _generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(stable_seed("projection", seed, *keys))


def layer_seed(seed: int, name: str) -> int:
    """Projection seed of the layer called ``name``, independent of the layer's position in any list."""
    return stable_seed("projection-layer", seed, name)


def gaussian_tile(seed: int, j: int, rows: int, k: int) -> torch.Tensor:
    """Rows ``j * BLOCK_ROWS`` .. of the unscaled N(0, 1) matrix ``Z``: (rows, k) float32 on the CPU.

    Columns ``c * COL_CHUNK`` .. are drawn from seed ``(seed, j, c)`` at full chunk width and cut
    at ``k``, so column ``i`` of ``Z`` does not depend on ``k``.
    """
    tiles = [torch.randn(rows, COL_CHUNK, generator=_generator(seed, j, c)) for c in range(-(-k // COL_CHUNK))]
    return torch.cat(tiles, dim=1)[:, :k]


def gaussian_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """The whole (in_dim, out_dim) projection ``Z / sqrt(out_dim)`` materialised on the CPU (reference)."""
    blocks = [gaussian_tile(seed, j, min(BLOCK_ROWS, in_dim - start), out_dim)
              for j, start in enumerate(range(0, in_dim, BLOCK_ROWS))]
    return torch.cat(blocks) / np.sqrt(out_dim)


def nested_gaussian(features: np.ndarray, k: int) -> np.ndarray:
    """The ``k``-dim Gaussian projection from the ``K``-dim one, ``features`` (n, K) with K >= k:
    its first ``k`` columns times ``sqrt(K / k)`` (equal to a direct ``k``-dim projection up to rounding)."""
    big = features.shape[1]
    if not 0 < k <= big:
        raise ValueError(f"cannot derive a {k}-dim projection from a {big}-dim one")
    return (np.asarray(features[:, :k], dtype=np.float64) * np.sqrt(big / k)).astype(np.float32)


def storage_plan(nbytes: list[int], budget_mb: float) -> list[str]:
    """``device`` for each matrix that still fits the budget (in order, cumulative), else ``memmap``."""
    plan, used = [], 0
    for n in nbytes:
        fits = used + n <= budget_mb * 2**20
        used += n if fits else 0
        plan.append("device" if fits else "memmap")
    return plan


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


class GaussianProjection:
    """Seeded, column-nested Gaussian projection R^D -> R^k, generated once at first use.

    Parameters
    ----------
    in_dim : int
        D, the flattened dimension (``out * in`` for a weight gradient).
    out_dim : int
        k, the projected dimension.
    seed : int
        Seed of the tiles (see :func:`gaussian_tile`); use :func:`layer_seed` for a layer.
    storage : ``device`` | ``memmap``
        Keep the (D, k) matrix on the device of the first input (``4 * D * k`` bytes there), or write it
        once to a scratch ``.npy`` in ``scratch_dir`` and stream ``BLOCK_ROWS`` rows per product.
    scratch_dir : path or None
        Folder of the memmap file (None: ``$TMPDIR``); the file is removed by :meth:`close`, at garbage
        collection or at exit.
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int, storage: str = "device",
                 scratch_dir: str | os.PathLike | None = None):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.in_dim, self.out_dim, self.seed = int(in_dim), int(out_dim), int(seed)
        self.storage, self.scratch_dir = storage, scratch_dir
        self.path: str | None = None
        self._z = None  # unscaled Z: a tensor (device) or a read-only np.memmap (memmap)
        self._finalizer = None

    @property
    def dim(self) -> int:
        return self.out_dim

    @property
    def nbytes(self) -> int:
        """Bytes of the stored matrix (float32)."""
        return 4 * self.in_dim * self.out_dim

    def _tiles(self):
        for j, start in enumerate(range(0, self.in_dim, BLOCK_ROWS)):
            stop = min(start + BLOCK_ROWS, self.in_dim)
            yield start, stop, gaussian_tile(self.seed, j, stop - start, self.out_dim)

    def _generate(self, device: torch.device) -> None:
        if self.storage == "device":
            self._z = torch.empty(self.in_dim, self.out_dim, dtype=torch.float32, device=device)
            for start, stop, tile in self._tiles():
                self._z[start:stop] = tile
        else:
            fd, self.path = tempfile.mkstemp(prefix=f"projection-{self.in_dim}x{self.out_dim}-", suffix=".npy",
                                             dir=self.scratch_dir)
            os.close(fd)
            self._finalizer = weakref.finalize(self, _remove, self.path)
            z = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(self.in_dim, self.out_dim))
            for start, stop, tile in self._tiles():
                z[start:stop] = tile.numpy()
            z.flush()
            del z
            self._z = np.load(self.path, mmap_mode="r")
        log.info("Gaussian projection %d x %d (%.1f MB) generated, stored: %s%s", self.in_dim, self.out_dim,
                 self.nbytes / 1e6, self.storage, f" ({self.path})" if self.path else f" ({device})")

    def matrix(self) -> torch.Tensor:
        """The stored D x k matrix ``Z / sqrt(k)`` as a CPU tensor (generated on the CPU if not yet)."""
        if self._z is None:
            self._generate(torch.device("cpu"))
        z = self._z.cpu() if self.storage == "device" else torch.from_numpy(np.array(self._z))
        return z / np.sqrt(self.out_dim)

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """Project ``flat`` (B, D) to (B, k) in float32."""
        if flat.shape[-1] != self.in_dim:
            raise ValueError(f"projection expects {self.in_dim} input dims, got {flat.shape[-1]}")
        if self._z is None:
            self._generate(flat.device)
        x = flat.float()
        if self.storage == "device":
            if self._z.device != x.device:
                self._z = self._z.to(x.device)
            out = x @ self._z
        else:
            out = torch.zeros(x.shape[0], self.out_dim, dtype=torch.float32, device=x.device)
            for start in range(0, self.in_dim, BLOCK_ROWS):
                block = torch.from_numpy(np.array(self._z[start:start + BLOCK_ROWS])).to(x.device)
                out += x[:, start:start + BLOCK_ROWS] @ block
        return out / np.sqrt(self.out_dim)

    def close(self) -> None:
        """Free the stored matrix and delete its scratch file, if any."""
        self._z = None
        if self._finalizer is not None:
            self._finalizer()


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
