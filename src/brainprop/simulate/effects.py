"""Planted effects shared by the NSD and MEG simulators.

The simulators build brain responses as layer-wise linear read-outs of model
features (forward activations, backpropagated gradients), weighted across layer
depth by a Gaussian tuning curve whose preferred depth depends on a target's
position (distance from V1 for fMRI vertices, time for MEG samples), plus noise
at a chosen signal-to-noise ratio. Every function here is deterministic given
its ``seed``/``rng`` argument.

Conventions
-----------
- ``L``: number of layers, ordered by depth (index 0 = shallowest).
- Layer depth ``k_l = l / (L - 1)`` in [0, 1] (``k_0 = 0`` when ``L == 1``).
- "Targets" are whatever receives a signal: vertices, ROIs, (sensor, time) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "layer_depths",
    "zscore_columns",
    "layer_rngs",
    "readout",
    "layer_readouts",
    "preferred_depth",
    "layer_tuning",
    "mix_layers",
    "add_noise",
]


def layer_depths(n_layers: int) -> np.ndarray:
    """Normalized layer depth ``k_l = l / (L - 1)``.

    Parameters
    ----------
    n_layers : int
        Number of layers ``L`` (>= 1).

    Returns
    -------
    depths : ndarray, shape (L,), float64
        Values in [0, 1]; ``[0.0]`` for a single layer.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if n_layers == 1:
        return np.zeros(1)
    return np.arange(n_layers) / (n_layers - 1)


def zscore_columns(x: np.ndarray) -> np.ndarray:
    """Standardize each column to zero mean and unit variance (ddof=0) across rows.

    Constant columns (variance 0) become all zeros rather than NaN, so a silent
    feature contributes nothing instead of poisoning the read-out.

    Parameters
    ----------
    x : ndarray, shape (n_rows, n_columns)

    Returns
    -------
    z : ndarray, shape (n_rows, n_columns), float64
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array (n_rows, n_columns), got shape {x.shape}")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    safe = np.where(std > 0, std, 1.0)
    return np.where(std > 0, (x - mean) / safe, 0.0)


def layer_rngs(seed: int | np.random.SeedSequence, n_layers: int) -> list[np.random.Generator]:
    """One independent generator per layer: ``default_rng(SeedSequence(seed).spawn(L)[l])``.

    ``seed`` may be an int or a :class:`numpy.random.SeedSequence` (used as is).
    """
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return [np.random.default_rng(s) for s in ss.spawn(n_layers)]


def readout(features: np.ndarray, n_targets: int, rng: np.random.Generator) -> np.ndarray:
    """Standardized Gaussian read-out of one feature matrix.

    ``zscore_columns(zscore_columns(features) @ W)`` with ``W ~ N(0, 1)`` of shape
    (d, n_targets) drawn from ``rng``.

    Parameters
    ----------
    features : ndarray, shape (n_images, d)
    n_targets : int
    rng : numpy.random.Generator

    Returns
    -------
    y : ndarray, shape (n_images, n_targets), float32
        Columns have zero mean and unit variance (or are all zero if constant).
    """
    z = zscore_columns(features)
    w = rng.standard_normal((z.shape[1], n_targets))
    return zscore_columns(z @ w).astype(np.float32)


def layer_readouts(features: Sequence[np.ndarray], n_targets: int, seed: int) -> np.ndarray:
    """Seeded Gaussian linear read-outs of each layer's features.

    For layer ``l``: ``Z_l`` = features z-scored per column (constant columns -> 0),
    ``W_l ~ N(0, 1)`` of shape (d_l, n_targets) drawn from the ``l``-th child of
    ``np.random.SeedSequence(seed)``, ``Y_l = Z_l @ W_l``, and each column of
    ``Y_l`` standardized to zero mean and unit variance across images (ddof=0).
    A column that is constant (e.g. all features constant) is returned as zeros.

    Parameters
    ----------
    features : sequence of L ndarrays, each shape (n_images, d_l)
        Feature matrices ordered by layer depth, rows aligned to the same images.
    n_targets : int
        Number of read-out targets (vertices, ROIs, sensors...).
    seed : int
        Seed; layer ``l`` uses ``SeedSequence(seed).spawn(L)[l]``, so adding a
        layer at the end does not change the read-outs of earlier layers.

    Returns
    -------
    readouts : ndarray, shape (L, n_images, n_targets), float32
        Standardized read-outs (unitless).
    """
    if len(features) == 0:
        raise ValueError("features must contain at least one layer")
    n_images = np.asarray(features[0]).shape[0]
    for l, f in enumerate(features):
        if np.asarray(f).ndim != 2 or np.asarray(f).shape[0] != n_images:
            raise ValueError(
                f"layer {l}: expected shape (n_images={n_images}, d), got {np.asarray(f).shape}"
            )
    if n_targets < 1:
        raise ValueError(f"n_targets must be >= 1, got {n_targets}")
    out = np.empty((len(features), n_images, n_targets), dtype=np.float32)
    for l, (f, rng) in enumerate(zip(features, layer_rngs(seed, len(features)))):
        out[l] = readout(f, n_targets, rng)
    return out


def preferred_depth(position: np.ndarray, slope: float) -> np.ndarray:
    """Preferred layer depth of each target: ``c = clip(0.5 + slope * (position - 0.5), 0, 1)``.

    ``slope = 1``: c = position (bottom-up: targets far from V1 / late in time
    prefer deep layers). ``slope = -1``: c = 1 - position (reversed hierarchy).
    ``slope = 0``: every target prefers the middle layer. ``|slope| < 1``
    compresses the range of preferred depths around 0.5.

    Parameters
    ----------
    position : ndarray, shape (n_targets,)
        Normalized position in [0, 1] (distance from V1 / max, or normalized time).
    slope : float

    Returns
    -------
    c : ndarray, shape (n_targets,), float64, values in [0, 1]
    """
    position = np.asarray(position, dtype=np.float64)
    if position.ndim != 1:
        raise ValueError(f"position must be 1-D (n_targets,), got shape {position.shape}")
    if not np.all(np.isfinite(position)):
        raise ValueError("position contains NaN or inf")
    return np.clip(0.5 + slope * (position - 0.5), 0.0, 1.0)


def layer_tuning(position: np.ndarray, n_layers: int, slope: float, width: float) -> np.ndarray:
    """Gaussian tuning over layer depth, preferred depth set by position.

    ``weight[i, l] = exp(-(k_l - c_i)^2 / (2 width^2))`` with ``k_l = l/(L-1)`` and
    ``c_i = clip(0.5 + slope * (position_i - 0.5), 0, 1)`` (see
    :func:`preferred_depth`); each row is then divided by its sum, so the weights
    of a target sum to 1. With ``slope > 0`` the preferred layer increases with
    position (bottom-up), with ``slope < 0`` it decreases (reversed).

    Parameters
    ----------
    position : ndarray, shape (n_targets,)
        Normalized position in [0, 1].
    n_layers : int
        Number of layers L.
    slope : float
        Signed slope of preferred depth vs position (1 = identity, -1 = reversed).
    width : float
        Tuning width in units of normalized depth (> 0).

    Returns
    -------
    tuning : ndarray, shape (n_targets, L), float64
        Non-negative, rows sum to 1.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    c = preferred_depth(position, slope)
    k = layer_depths(n_layers)
    w = np.exp(-((k[None, :] - c[:, None]) ** 2) / (2.0 * width**2))
    return w / w.sum(axis=1, keepdims=True)


def mix_layers(readouts: np.ndarray, tuning: np.ndarray, amplitude: np.ndarray | float = 1.0) -> np.ndarray:
    """Combine layer read-outs with per-target tuning weights.

    ``signal[n, t] = amplitude[t] * sum_l tuning[t, l] * readouts[l, n, t]``.

    Parameters
    ----------
    readouts : ndarray, shape (L, n_images, n_targets)
    tuning : ndarray, shape (n_targets, L)
    amplitude : float or ndarray, shape (n_targets,)
        Per-target gain (0 removes the signal exactly).

    Returns
    -------
    signal : ndarray, shape (n_images, n_targets), float32
    """
    readouts = np.asarray(readouts)
    n_layers, _, n_targets = readouts.shape
    if tuning.shape != (n_targets, n_layers):
        raise ValueError(f"tuning must have shape (n_targets={n_targets}, L={n_layers}), got {tuning.shape}")
    signal = np.einsum("lnt,tl->nt", readouts, tuning.astype(np.float32), optimize=True)
    amplitude = np.broadcast_to(np.asarray(amplitude, dtype=np.float32), (n_targets,))
    return (signal * amplitude[None, :]).astype(np.float32)


def add_noise(
    signal: np.ndarray,
    snr: float,
    rng: np.random.Generator,
    reference_variance: float | np.ndarray | None = None,
) -> np.ndarray:
    """Add Gaussian noise at a given signal-to-noise variance ratio, per target.

    Noise variance is ``v / snr`` where ``v`` is ``var(signal[:, t])`` (ddof=0)
    by default, or ``reference_variance`` when given (use 1.0 to fix the noise
    level relative to a unit-variance read-out, so that a signal weight of 0
    yields pure noise of variance ``1/snr`` and nothing else). With the default,
    a target whose signal is constant (variance 0, e.g. weight 0) receives
    unit-variance noise, i.e. pure noise. ``snr = inf`` returns the signal
    unchanged (no noise is drawn).

    Parameters
    ----------
    signal : ndarray, shape (n_samples, n_targets)
    snr : float
        Variance ratio var(signal) / var(noise), > 0 (``np.inf`` allowed).
    rng : numpy.random.Generator
        Source of the noise (the caller owns the seed).
    reference_variance : float or ndarray, shape (n_targets,), optional

    Returns
    -------
    noisy : ndarray, shape (n_samples, n_targets), float32
    """
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 2:
        raise ValueError(f"signal must be 2-D (n_samples, n_targets), got shape {signal.shape}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0 (use np.inf for no noise), got {snr}")
    if np.isinf(snr):
        return signal.copy()
    if reference_variance is None:
        v = signal.var(axis=0, dtype=np.float64)
        v = np.where(v > 0, v, float(snr))  # constant signal -> unit-variance noise
    else:
        v = np.broadcast_to(np.asarray(reference_variance, dtype=np.float64), (signal.shape[1],))
    sd = np.sqrt(v / snr).astype(np.float32)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    return signal + noise * sd[None, :]
