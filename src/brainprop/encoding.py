"""Cross-validated ridge encoding (paper section 2.1), batched over targets in PyTorch.

For each of ``n_splits`` outer splits (``KFold(shuffle=True, random_state=seed)``) a ridge
regression from model features ``X`` (n_images x n_features) to brain data ``Y``
(n_images x n_targets) is fitted on the training part, with one regularisation ``alpha`` per
target chosen on the training part only, and scored on the held-out part by Pearson r.

Two alpha-selection procedures are implemented:

* ``inner_cv="loo"`` (the paper's): the result of scikit-learn's
  ``make_pipeline(StandardScaler(), RidgeCV(alphas, alpha_per_target=True))``, i.e. efficient
  leave-one-out (the "GCV" formula of ``sklearn.linear_model._ridge._RidgeGCV``, with the
  intercept correction ``d_i = 1 - h_ii - 1/n``), mean squared LOO error, first minimum wins.
* ``inner_cv=k`` (an int): the result of ``make_pipeline(StandardScaler(),
  himalaya.ridge.RidgeCV(alphas, fit_intercept=True, cv=k,
  solver_params={"score_func": correlation_score}))``: unshuffled inner ``KFold(k)`` of the
  training part, alpha maximising the mean inner Pearson r (ties go to the larger alpha, as
  in himalaya), refit on the whole training part.

Where the speed comes from: the eigendecomposition of ``X_train^T X_train`` (n_features x
n_features, float64) is computed ONCE per split, together with every quantity that depends on
``X`` and ``alpha`` but not on ``Y`` (leave-one-out leverages, their weights, ...). The
per-target work is then a handful of large matrix products per target batch, reused for all
alphas; see ``docs/statistics.md`` and ``bench/bench_encoding.py`` for measured figures.
Targets that contain NaN/inf or are constant are reported (logged count) and get NaN scores.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
from sklearn.model_selection import KFold
from threadpoolctl import ThreadpoolController
from tqdm.auto import tqdm

from brainprop.utils import get_logger, resolve_device

log = get_logger(__name__)

#: Default memory budget (bytes) for the per-batch working set of the engine.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3

_EPS64 = float(np.finfo(np.float64).eps)


# ----------------------------------------------------------------------------- results


@dataclass
class EncodingResult:
    """Cross-validated encoding scores.

    Attributes
    ----------
    scores : ndarray, shape (n_splits, n_targets), float32 (float64 with ``dtype=float64``)
        Pearson r between held-out predictions and held-out data, per split. NaN for invalid
        targets (and for a target whose prediction or held-out data is constant in a split).
    alphas : ndarray, shape (n_splits, n_targets), float64
        Ridge penalty chosen per target on the training part of each split (NaN if invalid).
    invalid : ndarray, shape (n_targets,), bool
        Targets that contain a non-finite value or are constant over all images.
    test_indices : list of ndarray
        Held-out row indices of each split (``KFold(n_splits, shuffle=True, random_state=seed)``).
    predictions : ndarray, shape (n_images, n_targets), or None
        Held-out predictions (each row predicted by the split that holds it out), only when
        ``return_predictions=True``.
    """

    scores: np.ndarray
    alphas: np.ndarray
    invalid: np.ndarray
    test_indices: list = field(repr=False)
    predictions: np.ndarray | None = field(default=None, repr=False)

    @property
    def mean_scores(self) -> np.ndarray:
        """Split-averaged Pearson r, shape (n_targets,) (the paper's encoding score)."""
        return self.scores.mean(axis=0)


@dataclass
class ResidualResult:
    """Residual backprop: ``R(forward[:, :n_forward] ++ backprop[:, :n_backprop]) - R(forward[:, :n_total])``.

    Attributes
    ----------
    residual : ndarray, shape (n_targets,)
        Split-averaged joint score minus split-averaged forward score.
    joint, forward : EncodingResult
        The two encodings (same splits).
    """

    residual: np.ndarray
    joint: EncodingResult
    forward: EncodingResult


# ----------------------------------------------------------------------------- helpers


def _even_batch(n_targets: int, capacity: int) -> int:
    """Largest batch <= capacity that splits n_targets into equal-sized batches (up to rounding)."""
    n_batches = max(1, math.ceil(n_targets / max(1, capacity)))
    return max(1, math.ceil(n_targets / n_batches))


def kfold_splits(n_samples: int, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outer splits: ``sklearn.model_selection.KFold(n_splits, shuffle=True, random_state=seed)``.

    Returns a list of ``(train_indices, test_indices)`` (int64 arrays, sorted).
    """
    if not 2 <= n_splits <= n_samples:
        raise ValueError(f"n_splits must be in [2, n_samples={n_samples}], got {n_splits}")
    return list(KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(n_samples)))


def _as_dtype(dtype) -> torch.dtype:
    """torch.float32 / torch.float64 from a torch dtype, a numpy dtype or its name."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return torch.float32 if name == "float32" else torch.float64


def _check_inputs(X, Y, alphas):
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_images x n_features), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X (model features) contains NaN or inf")
    if not isinstance(Y, np.ndarray):  # keep memmaps as they are (read in column batches)
        Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D (n_images x n_targets), got shape {Y.shape}")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows (images): {X.shape[0]} != {Y.shape[0]}")
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    if alphas.size == 0 or not np.all(alphas > 0) or not np.isfinite(alphas).all():
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas}")
    return X, Y, alphas


def _standardize(X_train: torch.Tensor, X_test: torch.Tensor, standardize: bool):
    """Apply sklearn's StandardScaler (fit on train; near-constant features keep scale 1)."""
    if not standardize:
        return X_train, X_test
    n = X_train.shape[0]
    mean = X_train.mean(0)
    var = ((X_train - mean) ** 2).mean(0)
    constant = var <= n * _EPS64 * var + (n * mean * _EPS64) ** 2  # sklearn _is_constant_feature
    scale = torch.sqrt(var)
    scale[constant | (scale < 10 * _EPS64)] = 1.0
    return (X_train - mean) / scale, (X_test - mean) / scale


@functools.lru_cache(maxsize=1)
def _threadpools() -> ThreadpoolController:
    """The process's thread pools, scanned once (a fresh ``threadpool_limits`` rescans the loaded
    libraries, about 20 ms: more than a small fit, e.g. one permutation of the residual test)."""
    return ThreadpoolController()


def _eigh(C: torch.Tensor):
    """Symmetric eigendecomposition (ascending). On CPU, LAPACK's divide-and-conquer driver via
    scipy is several times faster than ``torch.linalg.eigh`` for the 300 x 300 matrices here."""
    if C.device.type == "cpu":
        # one BLAS thread: OpenBLAS threads competing with torch's spinning OpenMP workers are
        # several times slower than a single thread on a small matrix
        with _threadpools().limit(limits=1, user_api="blas"):
            L, V = scipy.linalg.eigh(C.numpy(), driver="evd", check_finite=False)
        return torch.from_numpy(L), torch.from_numpy(V)
    return torch.linalg.eigh(C)


def _colsum(A: torch.Tensor) -> torch.Tensor:
    """Column sums of a 2-D tensor as a matrix-vector product (several times faster than
    ``A.sum(0)`` on CPU for the tall blocks here)."""
    return torch.mv(A.T, torch.ones(A.shape[0], dtype=A.dtype, device=A.device))


def invalid_targets(Y: torch.Tensor) -> torch.Tensor:
    """Columns of ``Y`` (n, k) that contain NaN/inf or are constant -> bool (k,)."""
    low, high = torch.aminmax(Y, dim=0)  # NaN propagates; inf makes the column non-finite
    return ~(torch.isfinite(low) & torch.isfinite(high)) | (low == high)


def invalid_columns(Y, dtype=torch.float32, batch: int = 8192) -> np.ndarray:
    """:func:`invalid_targets` of every column of ``Y`` (numpy or memmap, read in column batches) in the
    working ``dtype``, as :meth:`RidgeEncoder.load` flags them -> bool (n_targets,)."""
    np_dtype = np.float64 if _as_dtype(dtype) == torch.float64 else np.float32
    out = np.zeros(Y.shape[1], dtype=bool)
    for c in range(0, Y.shape[1], batch):
        out[c:c + batch] = invalid_targets(torch.from_numpy(np.array(Y[:, c:c + batch], dtype=np_dtype))).numpy()
    return out


def loo_flops_per_target(n_train: int, rank: int, n_alphas: int, n_basis: int, n_special: int, n_test: int) -> int:
    """Floating-point operations of the matrix products for one target in one split of
    :meth:`_LooSplit.run` (``loo_sse`` and the held-out prediction; the per-split precomputation excluded):
    ``Z = U^T y`` and ``y_perp = y - U Z`` (2 x 2 n r), term 3 ``T Z`` (2 A r^2), term 2 ``PhiU^T y_perp``
    (2 J r n) and ``m E`` (2 J A r), the exact rows ``Um_S Z`` (2 A |S| r), term 1 ``w^T y_perp^2`` (2 A n)
    and the predictions ``B_test coef`` (2 n_test r); n = n_train, r = rank, A = n_alphas, J = n_basis."""
    n, r, A, J = n_train, rank, n_alphas, n_basis
    return 4 * n * r + 2 * A * r * r + 2 * J * r * n + 2 * J * A * r + 2 * A * n_special * r + 2 * A * n + 2 * n_test * r


# ----------------------------------------------------------------------------- split states


class _LooSplit:
    """Everything about one outer split that does not depend on Y, for LOO alpha selection.

    With ``Xc`` the centred (standardised) training features, ``Xc^T Xc = V diag(L) V^T`` and
    ``U = Xc V / sqrt(L)`` (orthonormal, n x r), the ridge fit for penalty ``a`` is
    ``U diag(g) U^T y`` with ``g = L / (L + a)``, the leverages are ``h = (U**2) g`` and
    scikit-learn's leave-one-out error is ``e = r / d`` with ``r = y - fitted`` and
    ``d = 1 - h - 1/n`` (intercept correction). Writing ``r = y_perp + U (m * z)``, with
    ``z = U^T y``, ``y_perp = y - U z`` and ``m = a / (L + a)``, the weighted sum of squares
    ``sum_i r_i**2 / d_i**2`` splits into three terms that need only one product with ``U``
    per target batch plus a few small ones, whatever the number of alphas (see ``run``).
    The centred part of the weights ``w = 1/d**2`` is a smooth function of alpha: it is
    expanded on its leading singular vectors, with an error below ``sqrt(n) * eps * min(w)``
    (the rounding error of the float sums) except on a few high-leverage rows, whose
    contribution is computed exactly.
    """

    def __init__(self, X: torch.Tensor, train: np.ndarray, test: np.ndarray, alphas: np.ndarray,
                 standardize: bool, dtype: torch.dtype, max_basis: int | None = None):
        dev = X.device
        self.train = torch.as_tensor(train, device=dev)
        self.test = torch.as_tensor(test, device=dev)
        Xtr, Xte = _standardize(X[self.train], X[self.test], standardize)
        n, p = Xtr.shape
        x_mean = Xtr.mean(0)
        Xc, Xte_c = Xtr - x_mean, Xte - x_mean
        L, V = _eigh(Xc.T @ Xc)
        L_max = float(L.max()) if L.numel() else 0.0
        keep = L > max(L_max, 0.0) * max(n, p) * _EPS64
        if L_max <= 0 or not bool(keep.any()):
            raise ValueError("X has no variance on the training part of a split (all features constant)")
        L, V = L[keep], V[:, keep]
        U = (Xc @ V) / torch.sqrt(L)
        a = torch.as_tensor(alphas, dtype=torch.float64, device=dev)[:, None]  # (A, 1)
        g = L / (L + a)  # (A, r) shrinkage of each component
        d = 1.0 - (U * U) @ g.T - 1.0 / n  # (n, A)
        w = 1.0 / d**2  # LOO weights
        delta = w - w.mean(0)
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        # expansion error at most the typical rounding error of an n-term sum in the working
        # precision (sqrt(n) eps) times the smallest weight: it then adds at most that relative
        # error to every LOO sum of squares (|2 sum e y_perp F| <= max|e| sum r^2)
        tol = float(torch.finfo(dtype).eps) * math.sqrt(n) * float(w.min())
        # the few rows (highest leverages) where a short expansion is not accurate enough are
        # corrected exactly instead: pick the basis size J minimising J*n + A*|S| products
        # (max_basis, for tests, forces a short basis and as many exact rows as needed)
        A = delta.shape[1]
        residual, choice = delta.clone(), None
        for j in range(min(A, A if max_basis is None else max_basis) + 1):
            # all A singular vectors reproduce delta exactly (up to rounding)
            special = residual.abs().amax(1) > tol if j < A else torch.zeros(n, dtype=torch.bool, device=dev)
            n_special = int(special.sum())
            allowed = A * n_special <= n or max_basis is not None
            if allowed and (choice is None or j * n + A * n_special < choice[1]):
                choice = (j, j * n + A * n_special, special)
            if j < A:
                residual -= (u[:, j : j + 1] * s[j]) * vt[j]
        n_basis, _, special = choice
        phi = u[:, :n_basis] * s[:n_basis]  # (n, J)
        c = vt[:n_basis].T  # (A, J): w[:, a] ~= w_mean[a] + phi @ c[a] (+ e[:, a] on special rows)
        m = a / (L + a)  # (A, r) share of each component left in the residual
        # U^T W_a U with the same expansion of W_a as above
        N = torch.stack([U.T @ (phi[:, j : j + 1] * U) for j in range(n_basis)]) if n_basis else None
        M = w.mean(0)[:, None, None] * (U.T @ U)[None]
        if n_basis:
            M = M + torch.einsum("aj,jkl->akl", c, N)
        T = m[:, :, None] * M * m[:, None, :]  # (A, r, r): term 3 is z^T T_a z
        self.n_basis = n_basis
        self.n_train, self.rank = n, U.shape[1]
        self.U = U.to(dtype)
        self.PhiU = (phi[:, :, None] * U[:, None, :]).reshape(n, -1).to(dtype)  # (n, J*r)
        self.basis_coefT = c.T.contiguous().to(dtype)  # (J, A)
        self.wT = w.T.contiguous().to(dtype)  # (A, n)
        self.T = T.reshape(-1, T.shape[-1]).to(dtype)  # (A*r, r)
        self.m = m.to(dtype)  # (A, r)
        self.coef_scale = (torch.sqrt(L) / (L + a)).to(dtype)  # (A, r): coefficient of U^T y in the V basis
        self.B_test = (Xte_c @ V).to(dtype)  # (n_test, r)
        # exact correction on the special rows S: e (A, |S|) and U_S diag(m_a) stacked (A*|S|, r)
        self.special = torch.nonzero(special).ravel()
        e = delta - phi @ c.T
        self.e_special = e[self.special].T.contiguous().to(dtype)  # (A, |S|)
        self.Um_special = (m[:, None, :] * U[self.special][None]).reshape(-1, U.shape[1]).to(dtype)

    def fixed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.PhiU, self.wT, self.T, self.B_test,
                                                          self.Um_special))

    def flops_per_column(self) -> int:
        """Matrix-product flops per target of :meth:`run` (:func:`loo_flops_per_target`)."""
        return loo_flops_per_target(self.n_train, self.rank, self.m.shape[0], self.n_basis, len(self.special),
                                    self.B_test.shape[0])

    def floats_per_column(self) -> int:
        A = self.m.shape[0]
        J, S = self.n_basis, len(self.special)
        return self.n_train + 3 * self.B_test.shape[0] + (2 + max(A, J)) * self.rank + J * A + 6 * A + 2 * A * S

    def loo_sse(self, Yb: torch.Tensor, ws: "_Workspace"):
        """Sums of squared leave-one-out errors (A, b) of a batch Yb (n_images, b), with z = U^T y
        (r, b, a workspace view) and the training mean (b,)."""
        b, r, A, J = Yb.shape[1], self.rank, self.m.shape[0], self.n_basis
        Yc = torch.index_select(Yb, 0, self.train, out=ws.get("ytr", (self.n_train, b)))
        y_mean = _colsum(Yc) / self.n_train
        Yc.sub_(y_mean)
        Z = torch.mm(self.U.T, Yc, out=ws.get("z", (r, b)))
        Yperp = Yc.addmm_(self.U, Z, alpha=-1.0)  # residual outside the span of U (in place)
        # term 3: (m*z)^T U^T W U (m*z) = z^T T_a z
        sse = torch.mm(self.T, Z, out=ws.get("big", (A * r, b))).view(A, r, b).mul_(Z).sum(1)  # (A, b)
        # term 2: 2 (m*z)^T U^T W y_perp, with W expanded on the basis phi (its constant part
        # vanishes because U^T y_perp = 0): 2 sum_j c[a, j] m_a^T (z * (U^T diag(phi_j) y_perp))
        if J:
            E = torch.mm(self.PhiU.T, Yperp, out=ws.get("big", (J * r, b))).view(J, r, b).mul_(Z)
            F = torch.matmul(self.m, E)  # (J, A, b)
            sse.add_((self.basis_coefT[:, :, None] * F).sum(0), alpha=2.0)
            del E, F
        # exact terms 2 and 3 on the special rows: sum_i e_ia F_ia (2 y_perp_i + F_ia), F_a = U (m_a*z)
        if len(self.special):
            F = torch.mm(self.Um_special, Z).view(A, -1, b)
            G = (F + 2.0 * Yperp[self.special]).mul_(F).mul_(self.e_special[:, :, None])
            sse += G.sum(1)
            del F, G
        # term 1: y_perp^T W y_perp
        sse.addmm_(self.wT, Yperp.square_())
        return sse, Z, y_mean

    def run(self, Yb: torch.Tensor, ws: "_Workspace"):
        """Alpha choice and held-out predictions for a batch of valid targets Yb (n_images, b).

        Returns (alpha index (b,), centred test predictions (n_test, b), test data (n_test, b),
        training mean (b,)); the two matrices are workspace views, overwritten by the next call.
        """
        b, r = Yb.shape[1], self.rank
        sse, Z, y_mean = self.loo_sse(Yb, ws)
        best = torch.argmin(sse, dim=0)  # first minimum, as RidgeCV's strict ">" update
        coef = torch.index_select(self.coef_scale, 0, best, out=ws.get("coef", (b, r))).mul_(Z.T)
        # predictions without the intercept: adding y_mean in float32 would round away the tiny
        # prediction variance of heavily penalised targets, and r does not depend on it
        pred = torch.mm(self.B_test, coef.T, out=ws.get("pred", (self.B_test.shape[0], b)))
        y_test = torch.index_select(Yb, 0, self.test, out=ws.get("ytest", (self.B_test.shape[0], b)))
        return best, pred, y_test, y_mean


class _KFoldSplit:
    """One outer split for inner k-fold alpha selection by Pearson r (himalaya's procedure).

    Per inner fold f the eigendecomposition ``Xt_c^T Xt_c = Vf diag(Lf) Vf^T`` of its training
    part is precomputed, with ``K = Pv^T Pv`` where ``Pv = Xv_c Vf`` is the (validation-mean
    centred) validation design in that basis. For targets y, with ``z = Vf^T Xt_c^T yt_c`` and
    ``q = Vf^T Xv_c^T yv_c``, the validation prediction for penalty ``a`` has coefficients
    ``c = z / (Lf + a)`` and its Pearson r with yv is ``c.q / sqrt(c^T K c * |yv_c|^2)``.
    ``Xt^T yt`` is obtained as ``X^T y - Xv^T yv``, so each fold costs only its validation rows.
    """

    def __init__(self, X: torch.Tensor, train: np.ndarray, test: np.ndarray, alphas: np.ndarray,
                 standardize: bool, dtype: torch.dtype, n_inner: int):
        dev = X.device
        self.train = torch.as_tensor(train, device=dev)
        self.test = torch.as_tensor(test, device=dev)
        Xtr, Xte = _standardize(X[self.train], X[self.test], standardize)
        n, p = Xtr.shape
        if not 2 <= n_inner <= n:
            raise ValueError(f"inner_cv must be in [2, n_train={n}], got {n_inner}")
        x_mean = Xtr.mean(0)
        Xs, Xte_c = Xtr - x_mean, Xte - x_mean
        a = torch.as_tensor(alphas, dtype=torch.float64, device=dev)
        L, V = _eigh(Xs.T @ Xs)
        L = L.clamp_min(0.0)
        self.inv_full = (1.0 / (L[None] + a[:, None])).to(dtype)  # (A, p)
        self.V = V.to(dtype)
        self.B_test = (Xte_c @ V).to(dtype)
        self.Xs = Xs.to(dtype)
        # float32: prediction variances for all alphas from one float64 product per fold (partial
        # fractions); float64: one product per alpha, exact to rounding
        self.partial_fractions = dtype == torch.float32
        self.folds = []
        for t_idx, v_idx in KFold(n_splits=n_inner).split(np.zeros(n)):
            t_idx = torch.as_tensor(t_idx, device=dev)
            v_idx = torch.as_tensor(v_idx, device=dev)
            m_t, m_v = Xs[t_idx].mean(0), Xs[v_idx].mean(0)
            Xt_c = Xs[t_idx] - m_t
            Lf, Vf = _eigh(Xt_c.T @ Xt_c)
            Lf = Lf.clamp_min(0.0)
            Pv = (Xs[v_idx] - m_v) @ Vf
            K = Pv.T @ Pv
            inv = 1.0 / (Lf[None] + a[:, None])  # (A, p)
            if not bool((v_idx[1:] - v_idx[:-1] == 1).all()):  # unshuffled KFold gives contiguous blocks
                raise RuntimeError("inner validation fold is not a contiguous block of rows")
            fold = dict(v_rows=slice(int(v_idx[0]), int(v_idx[-1]) + 1), n_t=len(t_idx), n_v=len(v_idx),
                        m_t=m_t.to(dtype), m_v=m_v.to(dtype), Xv=Xs[v_idx].to(dtype),
                        VfT=Vf.T.contiguous().to(dtype), inv=inv.to(dtype))
            if self.partial_fractions:
                fold.update(_partial_fraction_terms(Lf, K, inv))
            else:  # (A*p, p): variance of the validation prediction = z^T T_a z
                fold["T"] = (inv[:, :, None] * K[None] * inv[:, None, :]).reshape(-1, p).to(dtype)
            self.folds.append(fold)
        self.n_train, self.n_features, self.n_inner = n, p, n_inner
        # himalaya adds a 1e-10 * log(alpha) slope so that (near-)ties go to the larger alpha
        self.slope = (1e-10 * torch.log(a))[:, None]

    def fixed_bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.Xs, self.V, self.B_test))
        for f in self.folds:
            total += sum(f[k].numel() * f[k].element_size() for k in ("Xv", "VfT", "T", "M") if k in f)
        return total

    def floats_per_column(self) -> int:
        A = self.inv_full.shape[0]
        return 2 * self.n_train + 3 * self.B_test.shape[0] + (11 + A) * self.n_features + 8 * A

    def run(self, Yb: torch.Tensor, ws: "_Workspace"):
        """As :meth:`_LooSplit.run`, with inner k-fold alpha selection."""
        A, p, b = self.inv_full.shape[0], self.n_features, Yb.shape[1]
        Yc = torch.index_select(Yb, 0, self.train, out=ws.get("ytr", (self.n_train, b)))
        y_mean = _colsum(Yc) / self.n_train
        Yc.sub_(y_mean)
        XtY = torch.mm(self.Xs.T, Yc, out=ws.get("xty", (p, b)))  # (p, b), over all training rows
        sum_y = _colsum(Yc)
        Ysq = torch.mul(Yc, Yc, out=ws.get("ysq", (self.n_train, b)))
        XvY, C = ws.get("xvy", (p, b)), ws.get("c", (p, b))
        Z, Q = ws.get("zf", (p, b)), ws.get("qf", (p, b))
        scores = torch.zeros((A, b), dtype=torch.float64, device=Yb.device)
        for f in self.folds:
            Yv = Yc[f["v_rows"]]  # contiguous block (unshuffled KFold): a view, not a copy
            torch.mm(f["Xv"].T, Yv, out=XvY)
            sy_v = _colsum(Yv)
            yb_v = sy_v / f["n_v"]
            yb_t = (sum_y - sy_v) / f["n_t"]
            torch.sub(XtY, XvY, out=C).addr_(f["m_t"], yb_t, alpha=-f["n_t"])  # Xt_c^T yt_c
            torch.mm(f["VfT"], C, out=Z)
            torch.addr(XvY, f["m_v"], yb_v, alpha=-f["n_v"], out=C)  # Xv_c^T yv_c
            torch.mm(f["VfT"], C, out=Q)
            var_y = _colsum(Ysq[f["v_rows"]]) - f["n_v"] * yb_v * yb_v
            num = f["inv"] @ Q.mul_(Z)  # (A, b) covariance of prediction and data
            if self.partial_fractions:
                var_p = _variance_partial_fractions(f, Z, ws)  # (A, b) float64
            else:
                TZ = torch.mm(f["T"], Z, out=ws.get("big", (A * p, b)))
                var_p = TZ.view(A, p, b).mul_(Z).sum(1)  # (A, b) variance of the prediction
            den2 = var_p * var_y
            # himalaya z-scores with std := 1 when std == 0, i.e. r = 0 for a constant column
            scores += torch.where(den2 > 0, num * torch.rsqrt(den2), 0.0).to(torch.float64)
        best = torch.argmax(scores / self.n_inner + self.slope, dim=0)
        torch.mm(self.V.T, XtY, out=Z)
        coef = torch.index_select(self.inv_full, 0, best, out=ws.get("coef", (b, p))).mul_(Z.T)
        pred = torch.mm(self.B_test, coef.T, out=ws.get("pred", (self.B_test.shape[0], b)))  # no intercept
        y_test = torch.index_select(Yb, 0, self.test, out=ws.get("ytest", (self.B_test.shape[0], b)))
        return best, pred, y_test, y_mean


def _partial_fraction_terms(L: torch.Tensor, K: torch.Tensor, inv: torch.Tensor) -> dict:
    """Precompute ``var_a = sum_kl z_k z_l K_kl / ((L_k + a)(L_l + a))`` for all alphas at once.

    For well separated eigenvalues, ``1/((L_k+a)(L_l+a)) = (1/(L_k+a) - 1/(L_l+a)) / (L_l - L_k)``
    turns the sum into ``2 sum_k z_k (M z)_k / (L_k + a)`` with ``M_kl = K_kl / (L_l - L_k)``: one
    float64 product ``M z`` per fold instead of one product per alpha. Pairs closer than
    ``1e-4 * max(L)`` (where the subtraction would lose digits) and the diagonal are summed
    directly; with eigenvalues sorted, they lie on the first few off-diagonals.
    """
    p = L.shape[0]
    delta = 1e-4 * max(float(L.max()), float(np.finfo(np.float64).tiny))
    dL = L[None, :] - L[:, None]  # dL[k, l] = L_l - L_k
    close = dL.abs() <= delta
    M = torch.where(close, torch.zeros_like(K), K / torch.where(close, torch.ones_like(dL), dL))
    offsets = []
    for o in range(1, p):  # sorted L: no close pair at offset o means none at larger offsets
        near = (L[o:] - L[:-o]) <= delta
        if not bool(near.any()):
            break
        offsets.append((o, (torch.diagonal(K, o) * near)[:, None], inv[:, :-o] * inv[:, o:]))
    return dict(M=M, diagK=torch.diagonal(K).clone()[:, None], inv64=inv, inv2=inv * inv, offsets=offsets)


def _variance_partial_fractions(f: dict, Z: torch.Tensor, ws: "_Workspace") -> torch.Tensor:
    """Validation-prediction variance (A, b) in float64 from the terms of _partial_fraction_terms."""
    p, b = Z.shape
    Z64 = ws.get("z64", (p, b), torch.float64).copy_(Z)
    W = torch.mm(f["M"], Z64, out=ws.get("w64", (p, b), torch.float64))
    var = 2.0 * (f["inv64"] @ W.mul_(Z64))
    var += f["inv2"] @ torch.mul(Z64, Z64, out=W).mul_(f["diagK"])
    for o, K_o, inv_o in f["offsets"]:
        var += 2.0 * (inv_o @ torch.mul(Z64[:-o], Z64[o:], out=W[:-o]).mul_(K_o))
    return var


class _Workspace:
    """Reusable scratch tensors: fresh multi-megabyte allocations are returned to the OS on free
    and page-faulted in again on reuse, which costs as much as the arithmetic here."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.buffers = device, dtype, {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
        n, dtype = math.prod(shape), dtype or self.dtype
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            self.buffers.pop(name, None)
            buf = self.buffers[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)


def _pearson_ws(pred: torch.Tensor, y: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """Pearson r of matching columns (n, b) -> (b,); NaN for a constant column. Centres both in place."""
    n = pred.shape[0]
    pred.sub_(_colsum(pred) / n)
    y.sub_(_colsum(y) / n)
    prod = ws.get("prod", tuple(pred.shape))
    den = torch.sqrt(_colsum(torch.mul(pred, pred, out=prod)) * _colsum(torch.mul(y, y, out=prod)))
    num = _colsum(torch.mul(pred, y, out=prod))
    return torch.where(den > 0, num / den, torch.nan)


class RidgeEncoder:
    """Per-split precomputation shared by every target batch (and every permutation of Y rows).

    Parameters
    ----------
    X : ndarray, shape (n_images, n_features)
        Model features (float; standardised per split when ``standardize``).
    alphas : array-like, shape (n_alphas,)
        Ridge penalties to choose from (positive), in the order used to break ties.
    n_splits, seed : int
        Outer ``KFold(n_splits, shuffle=True, random_state=seed)``.
    inner_cv : "loo" or int
        Alpha selection: scikit-learn's efficient leave-one-out, or himalaya's inner k-fold
        with Pearson r.
    standardize : bool
        Fit sklearn's ``StandardScaler`` on the training part of each split.
    device : str or None
        Torch device (None/"auto": CUDA if available).
    dtype : torch.float32 or torch.float64
        Working precision of the per-target products (the decomposition is always float64).
    """

    def __init__(self, X, alphas, n_splits: int = 5, seed: int = 0, inner_cv="loo",
                 standardize: bool = True, device=None, dtype=torch.float32):
        X = np.asarray(X)
        if X.ndim != 2 or not np.isfinite(X).all():
            raise ValueError(f"X must be a finite 2-D array (n_images x n_features), got shape {X.shape}")
        self.alphas = np.asarray(alphas, dtype=np.float64).ravel()
        self.dtype = _as_dtype(dtype)
        self.device = resolve_device(device)
        self.n_samples = X.shape[0]
        self.splits = kfold_splits(self.n_samples, n_splits, seed)
        Xt = torch.as_tensor(np.asarray(X, dtype=np.float64), device=self.device)
        if inner_cv == "loo":
            self.states = [_LooSplit(Xt, tr, te, self.alphas, standardize, self.dtype) for tr, te in self.splits]
        elif isinstance(inner_cv, (int, np.integer)) and not isinstance(inner_cv, bool):
            self.states = [_KFoldSplit(Xt, tr, te, self.alphas, standardize, self.dtype, int(inner_cv))
                           for tr, te in self.splits]
        else:
            raise ValueError(f"inner_cv must be 'loo' or an int >= 2, got {inner_cv!r}")
        self.inner_cv = inner_cv
        self.ws = _Workspace(self.device, self.dtype)

    def batch_size(self, memory_budget: int) -> int:
        """Number of target columns per batch so that the working set fits ``memory_budget`` bytes."""
        item = torch.finfo(self.dtype).bits // 8
        fixed = sum(s.fixed_bytes() for s in self.states)
        # the batch itself, its staging copy on the host (or the held-out predictions, or the
        # unpermuted batch of a permutation null), and the largest per-split working set
        per_col = item * (3 * self.n_samples + max(s.floats_per_column() for s in self.states))
        avail = int(memory_budget) - fixed
        if avail < per_col:
            log.warning("memory_budget=%d bytes is below the fixed precomputation (%d bytes) plus one "
                        "target column; processing one target at a time", memory_budget, fixed)
            return 1
        return max(1, avail // per_col)

    def score_batch(self, Yb: torch.Tensor, return_predictions: bool = False, intercept: bool = True):
        """Score a batch of valid target columns.

        Parameters
        ----------
        Yb : Tensor, shape (n_images, b), on ``self.device`` in ``self.dtype``
            Finite, non-constant target columns.
        return_predictions : bool
            Also return the held-out predictions.
        intercept : bool
            Add the fitted intercept to the predictions (False: predictions centred on the
            training mean, which is all a Pearson r needs and is exact in float32).

        Returns
        -------
        scores : Tensor (n_splits, b); alpha_index : Tensor (n_splits, b) long;
        predictions : Tensor (n_images, b) or None (held-out predictions).
        """
        scores = torch.empty((len(self.states), Yb.shape[1]), dtype=Yb.dtype, device=Yb.device)
        best = torch.empty((len(self.states), Yb.shape[1]), dtype=torch.long, device=Yb.device)
        preds = torch.empty_like(Yb) if return_predictions else None
        for s, state in enumerate(self.states):
            best[s], pred, y_test, y_mean = state.run(Yb, self.ws)
            if return_predictions:
                preds[state.test] = pred + y_mean if intercept else pred
            scores[s] = _pearson_ws(pred, y_test, self.ws)
        return scores, best, preds

    def load(self, Y, columns) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of columns of Y (numpy or memmap) on device; invalid columns are zeroed and flagged."""
        # always a copy (invalid columns are zeroed below; Y may be a read-only memmap)
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        Yb = torch.from_numpy(np.array(Y[:, columns], dtype=np_dtype, order="C", copy=True)).to(self.device)
        bad = invalid_targets(Yb)
        if bool(bad.any()):
            Yb[:, bad] = 0.0
        return Yb, bad


# ----------------------------------------------------------------------------- public API


def cross_validated_ridge(X, Y, alphas, n_splits: int = 5, seed: int = 0, inner_cv="loo",
                          standardize: bool = True, device=None, dtype=torch.float32,
                          memory_budget: int = DEFAULT_MEMORY_BUDGET, return_predictions: bool = False,
                          progress: bool = True) -> EncodingResult:
    """Cross-validated ridge encoding scores (Pearson r per split and target).

    Parameters
    ----------
    X : ndarray, shape (n_images, n_features)
        Model features (e.g. 300 PCA components).
    Y : ndarray or memmap, shape (n_images, n_targets)
        Brain data (fMRI vertices, or MEG channels x time points flattened). Read in column
        batches, so a memory-mapped .npy larger than RAM is fine.
    alphas : array-like, shape (n_alphas,)
        Ridge penalties (paper: ``np.logspace(0, 8, 10)``), positive; ties go to the first
        (LOO) or to the largest (inner k-fold, as himalaya).
    n_splits : int
        Number of outer ``KFold`` splits (paper: 5).
    seed : int
        ``random_state`` of the shuffled outer ``KFold``.
    inner_cv : "loo" or int
        "loo": scikit-learn ``RidgeCV(alpha_per_target=True)`` efficient leave-one-out;
        int k: himalaya ``RidgeCV(cv=k)`` with a correlation score.
    standardize : bool
        StandardScaler fitted on each training part (as ``make_pipeline(StandardScaler(), ...)``).
    device : str or None
        "cpu", "cuda", ... (None: CUDA if available).
    dtype : torch.float32 or torch.float64 (or "float32"/"float64")
        Working precision of the per-target products.
    memory_budget : int
        Bytes allowed for the engine's working set; sets the target batch size.
    return_predictions : bool
        Also return the held-out predictions (n_images x n_targets, in the working dtype).
    progress : bool
        Show a progress bar over target batches.

    Returns
    -------
    EncodingResult
        ``scores`` and ``alphas`` (n_splits x n_targets), ``invalid`` (n_targets,), ...
    """
    X, Y, alphas = _check_inputs(X, Y, alphas)
    enc = RidgeEncoder(X, alphas, n_splits, seed, inner_cv, standardize, device, dtype)
    n_targets = Y.shape[1]
    batch = _even_batch(n_targets, enc.batch_size(memory_budget))
    np_dtype = np.float64 if enc.dtype == torch.float64 else np.float32
    scores = np.full((n_splits, n_targets), np.nan, dtype=np_dtype)
    chosen = np.full((n_splits, n_targets), np.nan, dtype=np.float64)
    invalid = np.zeros(n_targets, dtype=bool)
    preds = np.full(Y.shape, np.nan, dtype=np_dtype) if return_predictions else None
    starts = range(0, n_targets, batch)
    for start in tqdm(starts, desc="ridge encoding (target batches)", disable=not progress or len(starts) == 1):
        cols = slice(start, min(start + batch, n_targets))
        Yb, bad = enc.load(Y, cols)
        s, best, p = enc.score_batch(Yb, return_predictions)
        bad = bad.cpu().numpy()
        s = s.cpu().numpy()
        s[:, bad] = np.nan
        a = enc.alphas[best.cpu().numpy()]
        a[:, bad] = np.nan
        scores[:, cols], chosen[:, cols], invalid[cols] = s, a, bad
        if return_predictions:
            p = p.cpu().numpy()
            p[:, bad] = np.nan
            preds[:, cols] = p
        del Yb, s, best, p
    if invalid.any():
        log.warning("%d of %d targets are constant or contain NaN/inf: their scores are NaN",
                    int(invalid.sum()), n_targets)
    n_nan = int(np.isnan(scores[:, ~invalid]).any(0).sum())
    if n_nan:
        log.warning("%d valid targets have a NaN score in at least one split (constant held-out data "
                    "or prediction)", n_nan)
    return EncodingResult(scores=scores, alphas=chosen, invalid=invalid,
                          test_indices=[te for _, te in enc.splits], predictions=preds)


def residual_inputs(X_forward, X_backprop, n_forward: int = 150, n_backprop: int = 150,
                    n_total: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """The two designs the residual compares: ``forward[:, :n_forward] ++ backprop[:, :n_backprop]`` and
    ``forward[:, :n_total]`` (columns are PCA components sorted by decreasing variance, so the first k
    columns are the k-component projection).

    Parameters
    ----------
    X_forward : ndarray, shape (n_images, >= max(n_forward, n_total))
    X_backprop : ndarray, shape (n_images, >= n_backprop)
    n_forward, n_backprop, n_total : int
        Dimensions of the two blocks and of the forward-only comparison (paper: 150, 150, 300).

    Returns
    -------
    joint : ndarray (n_images, n_forward + n_backprop); forward : ndarray (n_images, n_total)
    """
    X_forward, X_backprop = np.asarray(X_forward), np.asarray(X_backprop)
    for name, arr, need in (("X_forward", X_forward, max(n_forward, n_total)), ("X_backprop", X_backprop, n_backprop)):
        if arr.ndim != 2 or arr.shape[1] < need:
            raise ValueError(f"{name} must be 2-D with at least {need} columns, got shape {arr.shape}")
    if X_forward.shape[0] != X_backprop.shape[0]:
        raise ValueError(f"X_forward and X_backprop must have the same rows: "
                         f"{X_forward.shape[0]} != {X_backprop.shape[0]}")
    return np.concatenate([X_forward[:, :n_forward], X_backprop[:, :n_backprop]], axis=1), X_forward[:, :n_total]


def residual_scores(X_forward, X_backprop, Y, alphas, n_forward: int = 150, n_backprop: int = 150,
                    n_total: int = 300, **kwargs) -> ResidualResult:
    """Residual backprop score per target (paper section 2.2, "Encoding of residual Backpropagation").

    ``R(forward[:, :n_forward] ++ backprop[:, :n_backprop]) - R(forward[:, :n_total])`` (designs of
    :func:`residual_inputs`), R the split-averaged encoding score, both encodings with the same splits.
    The one implementation of the residual (:mod:`brainprop.scoring` and the residual test of
    :func:`brainprop.stats.residual_permutation_test` use it).

    Parameters
    ----------
    X_forward, X_backprop, n_forward, n_backprop, n_total
        As in :func:`residual_inputs`.
    Y : ndarray, shape (n_images, n_targets)
    alphas : array-like
    **kwargs
        Passed to :func:`cross_validated_ridge` (n_splits, seed, inner_cv, device, ...).

    Returns
    -------
    ResidualResult
    """
    joint_X, forward_X = residual_inputs(X_forward, X_backprop, n_forward, n_backprop, n_total)
    joint = cross_validated_ridge(joint_X, Y, alphas, **kwargs)
    forward = cross_validated_ridge(forward_X, Y, alphas, **kwargs)
    return ResidualResult(residual=joint.mean_scores - forward.mean_scores, joint=joint, forward=forward)


def row_permutations(n_samples: int, n_permutations: int, seed: int) -> np.ndarray:
    """Seeded permutations of the image rows, shape (n_permutations, n_samples)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_samples) for _ in range(n_permutations)]) if n_permutations else \
        np.zeros((0, n_samples), dtype=np.int64)


def refit_null_scores(X, Y, alphas, permutations, n_splits: int = 5, seed: int = 0, inner_cv="loo",
                      standardize: bool = True, device=None, dtype=torch.float32,
                      memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: bool = True,
                      observed: bool = True):
    """Observed and permutation-null split-averaged scores, refitting the full procedure per shuffle.

    For each permutation ``perm`` of the image rows, ``Y[perm]`` is encoded from ``X`` with the
    same outer splits and alpha selection as the observed data. The per-split decompositions of
    ``X`` are computed once; permuted copies of a target batch are stacked as extra columns.

    Parameters
    ----------
    X, Y, alphas, n_splits, seed, inner_cv, standardize, device, dtype, memory_budget
        As in :func:`cross_validated_ridge`.
    permutations : ndarray, shape (n_permutations, n_images)
        Row permutations (see :func:`row_permutations`).
    observed : bool
        Also score the unshuffled data; False when the caller already has those scores (e.g.
        from :func:`cross_validated_ridge`, same splits and alphas), which saves one fit.

    Returns
    -------
    observed : ndarray (n_targets,) float64
        Split-averaged r of the unshuffled data (NaN for invalid targets; all NaN with
        ``observed=False``).
    null : ndarray (n_permutations, n_targets)
        Split-averaged r of each shuffle (float32, or float64 when ``dtype`` is float64).
    invalid : ndarray (n_targets,) bool
    """
    X, Y, alphas = _check_inputs(X, Y, alphas)
    permutations = np.asarray(permutations)
    if permutations.ndim != 2 or permutations.shape[1] != X.shape[0]:
        raise ValueError(f"permutations must have shape (n_permutations, {X.shape[0]}), got {permutations.shape}")
    enc = RidgeEncoder(X, alphas, n_splits, seed, inner_cv, standardize, device, dtype)
    n_targets, n_perm = Y.shape[1], permutations.shape[0]
    capacity = enc.batch_size(memory_budget)
    b_t = _even_batch(n_targets, capacity)
    chunk = max(1, capacity // b_t)
    np_dtype = np.float64 if enc.dtype == torch.float64 else np.float32
    obs = np.full(n_targets, np.nan, dtype=np.float64)
    null = np.full((n_perm, n_targets), np.nan, dtype=np_dtype)
    invalid = np.zeros(n_targets, dtype=bool)
    perms = torch.as_tensor(permutations, device=enc.device)
    first = [-1] if observed else []
    jobs = [(t0, k0) for t0 in range(0, n_targets, b_t) for k0 in [*first, *range(0, n_perm, chunk)]]
    Yb, bad, cur = None, None, None
    for t0, k0 in tqdm(jobs, desc="refit permutation null", disable=not progress):
        cols = slice(t0, min(t0 + b_t, n_targets))
        if cur != t0:
            Yb, bad = enc.load(Y, cols)
            cur = t0
            invalid[cols] = bad.cpu().numpy()
        if k0 == -1:  # observed scores
            s, _, _ = enc.score_batch(Yb)
            obs[cols] = s.double().mean(0).cpu().numpy()
            continue
        ks = range(k0, min(k0 + chunk, n_perm))
        Yp = torch.cat([Yb[perms[k]] for k in ks], dim=1)
        s, _, _ = enc.score_batch(Yp)
        null[ks.start:ks.stop, cols] = s.double().mean(0).view(len(ks), -1).cpu().numpy()
        del Yp, s
    obs[invalid] = np.nan
    null[:, invalid] = np.nan
    return obs, null, invalid


def split_permutations(test_indices, n_permutations: int, seed: int) -> list[np.ndarray]:
    """Seeded within-split permutations of held-out rows: one (n_permutations, n_test_s) array per split."""
    rng = np.random.default_rng(seed)
    out = [np.empty((n_permutations, len(te)), dtype=np.int64) for te in test_indices]
    for k in range(n_permutations):
        for s, te in enumerate(test_indices):
            out[s][k] = rng.permutation(len(te))
    return out


def shuffled_prediction_null_scores(X, Y, alphas, permutations, n_splits: int = 5, seed: int = 0,
                                    inner_cv="loo", standardize: bool = True, device=None,
                                    dtype=torch.float32, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                                    progress: bool = True):
    """Observed and null scores from shuffling held-out predictions within each split (cheap null).

    The encoding is fitted once; for shuffle k, the held-out predictions of split s are
    reordered by ``permutations[s][k]`` against the unshuffled held-out data, Pearson r is
    computed per split and averaged over splits.

    Parameters
    ----------
    X, Y, alphas, n_splits, seed, inner_cv, standardize, device, dtype, memory_budget
        As in :func:`cross_validated_ridge`.
    permutations : list of ndarray
        One (n_permutations, n_test_s) array per split (see :func:`split_permutations`).

    Returns
    -------
    observed : ndarray (n_targets,); null : ndarray (n_permutations, n_targets);
    invalid : ndarray (n_targets,) bool
    """
    X, Y, alphas = _check_inputs(X, Y, alphas)
    enc = RidgeEncoder(X, alphas, n_splits, seed, inner_cv, standardize, device, dtype)
    tests = [te for _, te in enc.splits]
    if len(permutations) != len(tests):
        raise ValueError(f"permutations must hold one array per split ({len(tests)}), got {len(permutations)}")
    n_perm = int(np.shape(permutations[0])[0])
    for pm, te in zip(permutations, tests):
        if np.shape(pm) != (n_perm, len(te)):
            raise ValueError(f"each split's permutations must have shape (n_permutations, n_test), "
                             f"expected {(n_perm, len(te))}, got {np.shape(pm)}")
    n_targets = Y.shape[1]
    item = torch.finfo(enc.dtype).bits // 8
    b_t = _even_batch(n_targets, enc.batch_size(memory_budget))
    n_test_max = max(len(te) for te in tests)
    # working set of one chunk: gathered predictions and their product with the data
    chunk = max(1, int(memory_budget) // (item * 2 * n_test_max * b_t))
    observed = np.full(n_targets, np.nan, dtype=np.float64)
    null = np.zeros((n_perm, n_targets), dtype=np.float64)
    invalid = np.zeros(n_targets, dtype=bool)
    perms = [torch.as_tensor(pm, device=enc.device) for pm in permutations]
    jobs = range(0, n_targets, b_t)
    for t0 in tqdm(jobs, desc="shuffle-predictions null", disable=not progress):
        cols = slice(t0, min(t0 + b_t, n_targets))
        Yb, bad = enc.load(Y, cols)
        invalid[cols] = bad.cpu().numpy()
        s, _, P = enc.score_batch(Yb, return_predictions=True, intercept=False)
        observed[cols] = s.double().mean(0).cpu().numpy()
        del s
        for state, pm in zip(enc.states, perms):
            Pz = P[state.test]
            Pz = (Pz - Pz.mean(0)) / torch.linalg.vector_norm(Pz - Pz.mean(0), dim=0)
            Yz = Yb[state.test]
            Yz = (Yz - Yz.mean(0)) / torch.linalg.vector_norm(Yz - Yz.mean(0), dim=0)
            for k0 in range(0, n_perm, chunk):
                idx = pm[k0:k0 + chunk]  # (c, n_test)
                r = (Pz[idx] * Yz[None]).sum(1)  # (c, b)
                null[k0:k0 + idx.shape[0], cols] += r.double().cpu().numpy()
                del r
        del Yb, P
    null /= len(tests)
    scores = observed  # the bool flag is not needed any more
    scores[invalid] = np.nan
    null[:, invalid] = np.nan
    return scores, null, invalid
