"""Encoding scores of every (layer, signal) for one subject and checkpoint, and their group statistics.

Signals, per layer (PCA components sorted by variance, so the first k columns are the
k-component projection):

* ``forward``: R(forward[:, :dim])
* ``backprop``: R(backprop[:, :dim])
* ``forward+backprop``: R(forward[:, :residual_dim] ++ backprop[:, :residual_dim])
* ``residual``: R(forward+backprop) - R(forward), the paper's residual backprop.

R is the split-averaged Pearson r of :func:`brainprop.encoding.cross_validated_ridge`.
fMRI targets are vertices (their index among the 2 x V fsaverage vertices, lh then rh);
MEG targets are (channel, time) pairs, channel-averaged for the time courses.

Statistics: fMRI, a per-vertex permutation null (``encoding.permutation``, per target or pooled
over ``encoding.pooled_targets``; sequential stopping with ``permutation.sequential_block``) with BH-FDR
across vertices for the fitted signals of ``permutation.signals`` (forward+backprop's significance is used
by no figure and is not tested by default; its p-values are then NaN), and the
residual's own test (``encoding.residual``: backprop's part unexplained by forward permuted, at the
last layer by default); MEG, the paper's one-sample one-tailed t-test across subjects per time point
with BH-FDR across time points (:func:`group_meg`), for all four signals including the residual.
See docs/statistics.md, sections 7 and 8.

Outputs: fMRI, arrays on the full fsaverage vertex axis (:mod:`brainprop.fmri_arrays`, grouped by
:func:`brainprop.fmri_arrays.group_fmri`: tidy rows would be 126 million per model and checkpoint at
the real size); MEG, the arrays and a tidy ``scores.parquet`` (channels x times are few).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from brainprop.analysis import course_statistics
from brainprop.brain.align import reorder_rows
from brainprop.encoding import ResidualResult, cross_validated_ridge, residual_inputs, residual_scores
from brainprop.fmri_arrays import write_subject
from brainprop.simulate.effects import layer_depths
from brainprop.stats import fdr_bh, permutation_test, pooled_null_pvalues, residual_permutation_test
from brainprop.utils import get_logger, save_npy_atomic, save_parquet_atomic

log = get_logger(__name__)

FITTED = ("forward", "backprop", "forward+backprop")
SIGNALS = (*FITTED, "residual")


def alphas_from_config(encoding: dict) -> np.ndarray:
    a = encoding["alphas"]
    return np.logspace(a["log10_min"], a["log10_max"], a["n"])


def load_features(feature_dir: str | os.PathLike, layers: Sequence[str], image_ids: Sequence[str]) -> dict:
    """{(layer, signal): (n_images, dims)} for ``signal`` in forward/backprop, rows in the order of ``image_ids``."""
    index = pd.read_parquet(os.path.join(feature_dir, "index.parquet")).image_id.to_numpy()
    return {(layer, sig): reorder_rows(np.load(os.path.join(feature_dir, f"{layer}.{sig}.npy")), index, image_ids,
                                       what=f"{feature_dir}/{layer}.{sig}.npy")
            for layer in layers for sig in ("forward", "backprop")}


def engine_kwargs(encoding: dict, seed: int) -> dict:
    """Keyword arguments of :func:`brainprop.encoding.cross_validated_ridge` from the ``encoding`` config."""
    return dict(n_splits=encoding["n_splits"], seed=seed, inner_cv=encoding["inner_cv"],
                standardize=encoding["standardize"], dtype=encoding["dtype"],
                memory_budget=int(encoding["memory_budget_mb"] * 2**20), progress=False)


def signal_pvalues(X, Y, observed, encoding: dict, seed: int, permutation_seed: int) -> np.ndarray:
    """Permutation p-values (n_targets,) of one fitted signal, as the ``encoding`` config asks:
    ``permutation.null_distribution`` per_target (``permutation.n`` shuffles of every target) or pooled
    (``permutation.n`` shuffles of ``pooled_targets`` targets, :func:`brainprop.stats.pooled_null_pvalues`)."""
    perm = encoding["permutation"]
    alphas, kw = alphas_from_config(encoding), engine_kwargs(encoding, seed)
    if perm["null_distribution"] == "pooled":
        return pooled_null_pvalues(X, Y, alphas, observed, perm["n"], encoding["pooled_targets"],
                                   permutation_seed, **kw)
    return permutation_test(X, Y, alphas, n_permutations=perm["n"], method=perm["method"],
                            permutation_seed=permutation_seed, observed=observed,
                            sequential_block=perm["sequential_block"] if perm["method"] == "refit" else 0,
                            fdr_q=encoding["fdr_q"], **kw).pvalues


def residual_pvalues(fwd, bwd, Y, observed: ResidualResult, encoding: dict, dim: int, residual_dim: int, seed: int,
                     permutation_seed: int) -> np.ndarray:
    """p-values (n_targets,) of the residual backprop (:func:`brainprop.stats.residual_permutation_test`,
    ``residual.n`` permutations; ``residual.pvalues`` empirical, with ``residual.sequential_block``
    stopping, or gaussian)."""
    res = encoding["residual"]
    gaussian = res["pvalues"] == "gaussian"
    test = residual_permutation_test(fwd, bwd, Y, alphas_from_config(encoding), residual_dim, residual_dim, dim,
                                     res["n"], permutation_seed, observed,
                                     sequential_block=0 if gaussian else res["sequential_block"],
                                     fdr_q=encoding["fdr_q"], **engine_kwargs(encoding, seed))
    return test.pvalues_gaussian if gaussian else test.pvalues


def residual_layers(layers: Sequence[str], which: str) -> list[str]:
    """Layers whose residual is tested: ``last`` (the deepest, all that the figures show) or ``all``."""
    if which not in ("last", "all"):
        raise ValueError(f"encoding.residual.layers must be 'last' or 'all', got {which!r}")
    return list(layers) if which == "all" else list(layers[-1:])


def layer_dims(forward_dim: int, backprop_dim: int, dim: int, residual_dim: int, layer: str = "") -> tuple[int, int]:
    """(dim, residual_dim) of a layer whose PCA features have ``forward_dim`` / ``backprop_dim`` columns.

    With enough columns, the configured ``features.pca.dim`` and ``residual_dim``. A narrower layer (a
    ResNet-50 block of 256 channels at the paper's 300, a tiny demo model) gets ``residual_dim = min(
    residual_dim, forward_dim // 2, backprop_dim // 2)`` and ``dim = 2 * residual_dim``, so that forward,
    backprop and forward+backprop are still fitted at one dimension and the residual stays a comparison
    of equal-sized models.
    """
    if min(forward_dim, backprop_dim) >= dim:
        return dim, residual_dim
    rd = min(residual_dim, forward_dim // 2, backprop_dim // 2)
    log.warning("%s: %d forward / %d backprop components < features.pca.dim %d: encoding at %d (%d + %d for the "
                "residual)", layer, forward_dim, backprop_dim, dim, 2 * rd, rd, rd)
    return 2 * rd, rd


def score_subject(features: dict, layers: Sequence[str], Y: np.ndarray, encoding: dict, dim: int,
                  residual_dim: int, seed: int, permutations: bool = False) -> dict[str, np.ndarray]:
    """Encode ``Y`` (n_images, n_targets) from every layer and signal.

    Returns arrays ``scores`` (L, 4, T) split-averaged r (residual included), ``split_scores``
    (L, 3, S, T), ``alphas`` (L, 3, S, T) and ``pvalues`` (L, 4, T): with ``permutations``, the
    permutation p-values (:func:`signal_pvalues`) of the fitted signals in ``permutation.signals`` and the
    residual's own test
    (:func:`residual_pvalues`) at the layers of ``encoding.residual.layers`` (``residual.n > 0``);
    NaN elsewhere.
    """
    alphas, kw = alphas_from_config(encoding), engine_kwargs(encoding, seed)
    n_layers, n_targets, n_splits = len(layers), Y.shape[1], encoding["n_splits"]
    out = {"scores": np.full((n_layers, 4, n_targets), np.nan, np.float32),
           "split_scores": np.full((n_layers, 3, n_splits, n_targets), np.nan, np.float32),
           "alphas": np.full((n_layers, 3, n_splits, n_targets), np.nan, np.float32),
           "pvalues": np.full((n_layers, 4, n_targets), np.nan, np.float32)}
    tested = residual_layers(layers, encoding["residual"]["layers"]) if encoding["residual"]["n"] else []
    for li, layer in enumerate(tqdm(layers, desc="encoding", unit="layer")):
        fwd, bwd = features[(layer, "forward")], features[(layer, "backprop")]
        d, rd = layer_dims(fwd.shape[1], bwd.shape[1], dim, residual_dim, layer)
        res = residual_scores(fwd, bwd, Y, alphas, rd, rd, d, **kw)
        fits = {"forward": (fwd[:, :d], res.forward),
                "backprop": (bwd[:, :d], cross_validated_ridge(bwd[:, :d], Y, alphas, **kw)),
                "forward+backprop": (residual_inputs(fwd, bwd, rd, rd, d)[0], res.joint)}
        for si, signal in enumerate(FITTED):
            X, fit = fits[signal]
            out["split_scores"][li, si], out["alphas"][li, si] = fit.scores, fit.alphas
            out["scores"][li, si] = fit.mean_scores
            if permutations and signal in encoding["permutation"]["signals"]:
                out["pvalues"][li, si] = signal_pvalues(X, Y, fit.mean_scores, encoding, seed,
                                                        seed + 1 + li * 4 + si)
        out["scores"][li, 3] = res.residual
        if permutations and layer in tested:
            out["pvalues"][li, 3] = residual_pvalues(fwd, bwd, Y, res, encoding, d, rd, seed,
                                                     seed + 4 + li * 4)
    return out


def fdr_arrays(pvalues: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """BH-FDR over the targets of each (layer, signal) of ``pvalues`` (L, 4, T): adjusted p-values (NaN where
    untested) and rejections at ``q`` (False where untested)."""
    p_fdr = np.full(pvalues.shape, np.nan, np.float32)
    reject = np.zeros(pvalues.shape, bool)
    for li in range(pvalues.shape[0]):
        for si in range(pvalues.shape[1]):
            p = pvalues[li, si].astype(np.float64)
            if np.isfinite(p).any():
                reject[li, si], p_fdr[li, si] = fdr_bh(p, q)
    return p_fdr, reject


def _tidy(arrays: dict, layers: Sequence[str], targets: pd.DataFrame, keys: dict, q: float) -> pd.DataFrame:
    """Long table: one row per (layer, signal, target) with score, alpha (median over splits), p, FDR."""
    frames = []
    depths = layer_depths(len(layers))
    p_fdr, reject = fdr_arrays(arrays["pvalues"], q)
    for li, layer in enumerate(layers):
        for si, signal in enumerate(SIGNALS):
            df = targets.copy()
            df["layer"], df["layer_depth"], df["signal"] = layer, depths[li], signal
            df["score"] = arrays["scores"][li, si]
            fitted = si < 3
            alpha = arrays["alphas"][li, si] if fitted else None
            df["alpha"] = np.nanmedian(alpha, axis=0) if fitted and np.isfinite(alpha).any() else np.nan
            df["pvalue"] = arrays["pvalues"][li, si].astype(np.float64)
            df["pvalue_fdr"], df["significant"] = p_fdr[li, si].astype(np.float64), reject[li, si]
            frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    for k, v in reversed(list(keys.items())):
        table.insert(0, k, v)
    return table


def encode_nsd_subject(feature_dir, layers, betas, images, mask, out_dir, encoding: dict, dim: int,
                       residual_dim: int, seed: int, keys: dict) -> Path:
    """Rule entry point (fMRI): score one NSD subject's kept vertices and write its folder of arrays on the
    full vertex axis (:mod:`brainprop.fmri_arrays`: scores, p-values, FDR, significance, per-split scores and
    alphas, then ``meta.json``); returns the ``meta.json`` path."""
    image_ids = pd.read_parquet(images).image_id.to_numpy()
    Y = np.load(betas, mmap_mode="r")
    kept = np.load(mask)
    vertices = np.flatnonzero(kept)
    if Y.shape != (len(image_ids), len(vertices)):
        raise ValueError(f"{betas}: shape {Y.shape}, expected ({len(image_ids)} images, {len(vertices)} kept vertices)")
    features = load_features(feature_dir, layers, image_ids)
    perm = encoding["permutation"]
    tested = perm["n"] > 0 and "nsd" in perm["modalities"]
    arrays = score_subject(features, layers, Y, encoding, dim, residual_dim, seed, tested)
    arrays["pvalues_fdr"], arrays["significant"] = fdr_arrays(arrays["pvalues"], encoding["fdr_q"])
    meta = {**keys, "layers": list(layers), "layer_depths": layer_depths(len(layers)).tolist(),
            "signals": list(SIGNALS), "n_vertices": int(len(kept)), "n_splits": int(encoding["n_splits"]),
            "fdr_q": float(encoding["fdr_q"])}
    path = write_subject(out_dir, arrays, vertices, meta)
    log.info("wrote %d layers x %d signals x %d vertices (%d analysed) to %s", len(layers), len(SIGNALS),
             len(kept), len(vertices), out_dir)
    return path


def encode_meg_subject(feature_dir, layers, data, images, times, out_dir, encoding: dict, dim: int,
                       residual_dim: int, seed: int, keys: dict) -> pd.DataFrame:
    """Rule entry point (MEG): score one THINGS-MEG subject, each (channel, time) a target; writes the arrays
    (targets = channels x times, channel-major) and ``scores.parquet`` with ``channel`` and ``time`` columns."""
    from brainprop.brain.meg import read_meg_table

    table, meta = read_meg_table(images)
    X = np.load(data, mmap_mode="r")
    t = np.load(times)
    n_img, n_ch, n_t = X.shape
    if n_img != len(table) or n_t != len(t):
        raise ValueError(f"{data}: shape {X.shape} does not match {len(table)} images in {images} and {len(t)} times")
    features = load_features(feature_dir, layers, table.image_id.to_numpy())
    perm = encoding["permutation"]
    tested = perm["n"] > 0 and "meg" in perm["modalities"]
    arrays = score_subject(features, layers, np.asarray(X).reshape(n_img, n_ch * n_t), encoding, dim,
                           residual_dim, seed, tested)
    channels = meta.get("channels", [str(c) for c in range(n_ch)])
    targets = pd.DataFrame({"channel": np.repeat(channels, n_t), "time": np.tile(t, n_ch)})
    return _write(arrays, layers, targets, keys | {"modality": "meg"}, out_dir, encoding["fdr_q"])


def _write(arrays, layers, targets, keys, out_dir, q) -> pd.DataFrame:
    for name, arr in arrays.items():
        save_npy_atomic(os.path.join(out_dir, f"{name}.npy"), arr)
    table = _tidy(arrays, layers, targets, keys, q)
    save_parquet_atomic(table, os.path.join(out_dir, "scores.parquet"))
    log.info("wrote %d rows of scores to %s", len(table), out_dir)
    return table


def meg_subject_courses(score_tables: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Channel-averaged MEG time course of each subject: model, checkpoint, layer, layer_depth, signal,
    time, subject, score (mean r over channels), from per-subject ``scores.parquet`` files."""
    per_subject = pd.concat([pd.read_parquet(p, columns=["subject", "model", "checkpoint", "layer", "layer_depth",
                                                          "signal", "time", "score"]) for p in score_tables])
    return per_subject.groupby(["model", "checkpoint", "layer", "layer_depth", "signal", "time", "subject"],
                               sort=True).score.mean().rename("score").reset_index()


def group_meg(score_tables: Sequence[str | os.PathLike], out: str | os.PathLike, q: float) -> pd.DataFrame:
    """Rule entry point: channel-average each subject's MEG scores, then per (layer, signal) and time the
    across-subject mean, SEM, one-sample one-tailed t-test and BH-FDR over time points."""
    group = course_statistics(meg_subject_courses(score_tables), ["model", "checkpoint", "layer", "layer_depth",
                                                                   "signal"], ["subject"], q=q)
    group = group.rename(columns={"n": "n_subjects"})
    save_parquet_atomic(group, out)
    return group
