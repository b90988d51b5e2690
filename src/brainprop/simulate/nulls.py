"""Null data for calibration checks of the encoding statistics (tests, bench/bench_null_calibration.py).

* :func:`correlated_null`: targets that share a few latent factors independent of the features, as
  neighbouring vertices share physiological and spatially smooth noise: every target is null, but the
  targets are strongly dependent, so one shuffle of all targets is one draw of a correlated field.
* :func:`forward_encoded_null`: forward and backprop features correlated as real ones are (backprop
  partly a linear function of forward), targets strongly encoded by forward, and backprop carrying
  nothing beyond forward: the null of the residual test (optionally with a planted backprop-only
  signal, to check power).
"""

from __future__ import annotations

import numpy as np


def _factor_noise(rng, n_images: int, n_targets: int, n_factors: int, shared: float) -> np.ndarray:
    """(n_images, n_targets): a share ``shared`` of each target's variance from ``n_factors`` latent factors."""
    z = rng.standard_normal((n_images, n_factors))
    w = rng.standard_normal((n_factors, n_targets))
    common = z @ (w / np.linalg.norm(w, axis=0))
    return np.sqrt(shared) * common + np.sqrt(1.0 - shared) * rng.standard_normal((n_images, n_targets))


def correlated_null(seed: int, n_images: int = 240, n_features: int = 48, n_targets: int = 2000,
                    n_factors: int = 2, shared: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Features ``X`` (n_images, n_features) and targets ``Y`` (n_images, n_targets), independent of each
    other; ``Y`` has ``n_factors`` latent factors carrying a share ``shared`` of every target's variance.

    Returns
    -------
    X : ndarray float64 (n_images, n_features); Y : ndarray float32 (n_images, n_targets)
    """
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_images, n_features))
    return X, _factor_noise(rng, n_images, n_targets, n_factors, shared).astype(np.float32)


def forward_encoded_null(seed: int, n_images: int = 240, dim: int = 48, n_targets: int = 400,
                         forward_r2: float = 0.5, backprop_from_forward: float = 0.7, n_factors: int = 3,
                         shared: float = 0.5, backprop_signal: np.ndarray | None = None,
                         backprop_r2: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forward ``F`` and backprop ``B`` features (n_images, dim), columns sorted by decreasing variance
    (as PCA scores), and targets ``Y`` encoded by forward through all ``dim`` components.

    ``B = a F M + sqrt(1 - a^2) E`` (``a = backprop_from_forward``): backprop is largely a linear
    function of forward, including forward's components beyond the first ``dim / 2`` that the residual's
    joint model lacks. ``Y = sqrt(forward_r2) F w + sqrt(1 - forward_r2) noise`` with correlated
    (latent-factor) noise, so backprop carries nothing about ``Y`` beyond forward. Targets flagged in
    ``backprop_signal`` (bool, (n_targets,)) get instead a share ``backprop_r2`` of their variance from
    the part of the first ``dim / 2`` backprop components that is not a function of forward.

    Returns
    -------
    F, B : ndarray float64 (n_images, dim); Y : ndarray float32 (n_images, n_targets)
    """
    rng = np.random.default_rng(seed)
    scale = np.linspace(2.0, 0.5, dim)  # decreasing component variances, as PCA scores
    F = rng.standard_normal((n_images, dim)) * scale
    E = rng.standard_normal((n_images, dim)) * scale
    M = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    a = backprop_from_forward
    B = a * F @ M + np.sqrt(1 - a * a) * E
    order = np.argsort(-B.var(0))
    B, E = B[:, order], E[:, order]
    w = rng.standard_normal((dim, n_targets))
    fwd = F @ w
    fwd /= fwd.std(0)
    Y = np.sqrt(forward_r2) * fwd + np.sqrt(1 - forward_r2) * _factor_noise(rng, n_images, n_targets, n_factors,
                                                                               shared)
    if backprop_signal is not None:
        sig = np.asarray(backprop_signal, dtype=bool)
        own = E[:, : dim // 2] @ rng.standard_normal((dim // 2, int(sig.sum())))
        own /= own.std(0)
        Y[:, sig] = np.sqrt(1 - backprop_r2) * Y[:, sig] / Y[:, sig].std(0) + np.sqrt(backprop_r2) * own
    return F, B, Y.astype(np.float32)
