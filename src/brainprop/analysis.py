"""Analyses of the encoding score tables: best layer, ROIs, distance from V1, peak time, training dynamics.

Pure functions on tidy tables (no I/O, no plotting):

* fMRI per-subject table (:func:`brainprop.fmri_arrays.read_fmri` of a subject folder): subject, model,
  checkpoint, modality, layer, layer_depth, signal, vertex, score, pvalue, pvalue_fdr, significant;
* fMRI group table (``read_fmri`` of a group folder): model, checkpoint, layer, layer_depth, signal,
  vertex, mean, n_significant, n_subjects;
* MEG group table ``group.parquet``: model, checkpoint, layer, layer_depth, signal, time, mean, sem,
  n_subjects, t, pvalue, pvalue_fdr, significant;
* ROI table ``rois.parquet`` (hemi, roi, name, n_vertices, ..., dist_geodesic) and per-vertex labels
  ``vertex_rois.npy`` of shape (2V,) (0 = unknown; vertex ``j`` is in lh if ``j < V`` else rh); the
  analyses use it per area with the hemispheres merged (``hemi = "both"``,
  :func:`brainprop.brain.atlas.analysis_rois`) unless ``figures.roi_hemispheres: separate``.

Paper quantities (Raugel et al. 2026, Fig. 2, 3, 5; Raugel et al. 2025 for the Spatial/Temporal
scores and half-times): best layer (normalised depth ``k`` of the argmax layer), best-encoded ROIs
(top tercile of mean forward score), Spatial score (correlation between an ROI's distance from V1
and its best layer), peak time and Temporal score (correlation between layer depth and peak time),
summary encoding scores (MEG: max over time of the mean time course; fMRI: mean over significant
vertices), and the half-time of a metric across training checkpoints.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from brainprop.utils import get_logger

log = get_logger(__name__)

SIGNALS = ("forward", "backprop", "forward+backprop", "residual")
#: Signal whose significance selects the vertices of another (overrides; default: the signal itself).
#: Empty: every signal, the residual included, is selected by its own test. The residual has one
#: (:func:`brainprop.stats.residual_permutation_test`); selecting it by forward+backprop significance
#: would keep vertices that forward alone explains and bias the difference upward.
DEFAULT_MASK_SIGNAL: dict[str, str] = {}
_KEYS = ("subject", "model", "checkpoint")
#: ``figures.roi_best_layer``: argmax of the ROI's mean score profile (sister paper) or mean of its
#: vertices' best layers.
ROI_BEST_LAYER = ("profile", "vertex_mean")
#: MEG peaks are searched from image onset on (s): the baseline holds no stimulus response.
ONSET = 0.0


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _require(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; has {list(table.columns)}")


def _check_signal(table: pd.DataFrame, signal: str, what: str) -> pd.DataFrame:
    sub = table[table["signal"] == signal]
    if sub.empty:
        raise ValueError(f"{what}: no rows with signal={signal!r}; signals present: "
                         f"{sorted(table['signal'].unique())}")
    return sub


def _keys(table: pd.DataFrame, extra: Sequence[str] = ()) -> list[str]:
    """Grouping columns present in ``table`` among subject/model/checkpoint (+ ``extra``)."""
    return [k for k in (*_KEYS, *extra) if k in table.columns]


def _groups(table: pd.DataFrame, keys: list[str]):
    """Iterate (dict of key values, sub-table); one group with no keys."""
    if not keys:
        yield {}, table
        return
    for key, g in table.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        yield dict(zip(keys, key)), g


def stars(p: float) -> str:
    """Significance stars of a p-value: ``***`` p < .001, ``**`` p < .01, ``*`` p < .05, else ``""``.

    NaN (no test) gives ``""``.
    """
    if p is None or not np.isfinite(p):
        return ""
    return "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else ""


def vertex_array(vertices, values, n_vertices: int) -> np.ndarray:
    """Scatter per-vertex ``values`` into a full (n_vertices,) float64 array, NaN elsewhere.

    Parameters
    ----------
    vertices : array-like of int, shape (n,)
        Vertex indices among the 2V fsaverage vertices (unique).
    values : array-like of float, shape (n,)
    n_vertices : int
        Length 2V of the output (``len(vertex_rois)``).
    """
    vertices = np.asarray(vertices, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if vertices.shape != values.shape or vertices.ndim != 1:
        raise ValueError(f"vertices {vertices.shape} and values {values.shape} must be equal-length 1-D arrays")
    if len(vertices) and (vertices.min() < 0 or vertices.max() >= n_vertices):
        raise ValueError(f"vertex indices must lie in [0, {n_vertices}), got [{vertices.min()}, {vertices.max()}]")
    if len(np.unique(vertices)) != len(vertices):
        raise ValueError("duplicate vertex indices")
    out = np.full(n_vertices, np.nan)
    out[vertices] = values
    return out


def subject_threshold(min_significant: int | str, n_subjects: int) -> int:
    """Least number of subjects in which a vertex must be significant (``figures.min_significant``).

    Parameters
    ----------
    min_significant : int >= 1 or ``"majority"``
        ``"majority"``: more than half of the subjects, ``n_subjects // 2 + 1`` (1 of 1, 2 of 2, 2 of 3,
        5 of 8); a null vertex then needs independent false positives in most subjects, so the group
        map's false-positive share does not grow with the number of subjects. ``1``: the union over
        subjects (false positives add up: about ``n_subjects * q`` of a map at FDR ``q``).
    n_subjects : int
        Subjects of the group table.

    Returns
    -------
    int
    """
    if isinstance(min_significant, str):
        if min_significant != "majority":
            raise ValueError(f"min_significant must be an integer >= 1 or 'majority', got {min_significant!r}")
        if n_subjects < 1:
            raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
        return n_subjects // 2 + 1
    if isinstance(min_significant, bool) or int(min_significant) != min_significant or min_significant < 1:
        raise ValueError(f"min_significant must be an integer >= 1 or 'majority', got {min_significant!r}")
    return int(min_significant)


def _table_threshold(min_significant: int | str, table: pd.DataFrame) -> int:
    """:func:`subject_threshold` for a group fMRI table, whose subjects are its largest ``n_subjects``."""
    if isinstance(min_significant, str):
        _require(table, ["n_subjects"], "fMRI group table (min_significant='majority')")
        return subject_threshold(min_significant, int(table["n_subjects"].max()))
    return subject_threshold(min_significant, 1)


# --------------------------------------------------------------------------------------------
# 1. best layer
# --------------------------------------------------------------------------------------------

def best_layer(scores, depths, significant=None) -> np.ndarray:
    """Normalised depth ``k`` of the best-encoding layer of each target.

    Parameters
    ----------
    scores : array-like, shape (n_layers, n_targets)
        Encoding score (Pearson r) of each layer for each target (vertex, ROI...). NaN entries
        are ignored (a layer not scored for that target).
    depths : array-like, shape (n_layers,)
        Normalised layer depth ``k`` in [0, 1] of each row of ``scores``.
    significant : array-like of bool, shape (n_layers, n_targets), optional
        Significance of each (layer, target). A target with no significant layer gets NaN; the
        argmax is still taken over all its scored layers (the best layer of a significant target).

    Returns
    -------
    best : ndarray, shape (n_targets,), float64
        ``depths[argmax_l scores[l, t]]``; the shallowest layer wins ties (``np.argmax``); NaN
        where every score is NaN or (with ``significant``) no layer is significant.
    """
    scores = np.asarray(scores, dtype=np.float64)
    depths = np.asarray(depths, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_layers, n_targets), got shape {scores.shape}")
    if depths.shape != (scores.shape[0],):
        raise ValueError(f"depths must have shape ({scores.shape[0]},) to match scores, got {depths.shape}")
    valid = np.isfinite(scores)
    filled = np.where(valid, scores, -np.inf)
    best = depths[np.argmax(filled, axis=0)]
    keep = valid.any(axis=0)
    if significant is not None:
        significant = np.asarray(significant, dtype=bool)
        if significant.shape != scores.shape:
            raise ValueError(f"significant must have shape {scores.shape}, got {significant.shape}")
        keep &= (significant & valid).any(axis=0)
    return np.where(keep, best, np.nan)


def _score_columns(table: pd.DataFrame) -> tuple[str, str]:
    """(score column, significance column) of a per-subject (score/significant) or group
    (mean/n_significant) fMRI table."""
    if {"score", "significant"} <= set(table.columns):
        return "score", "significant"
    if {"mean", "n_significant"} <= set(table.columns):
        return "mean", "n_significant"
    raise ValueError("fMRI table must have columns score+significant (per subject) or mean+n_significant "
                     f"(group); has {list(table.columns)}")


def _layer_matrix(g: pd.DataFrame, value: str) -> pd.DataFrame:
    """(layers sorted by depth) x vertex matrix of ``value``; NaN where a pair is absent."""
    if g.duplicated(["layer_depth", "vertex"]).any():
        raise ValueError("several rows per (layer_depth, vertex) within one subject/model/checkpoint/signal; "
                         "filter the table first")
    return g.pivot(index="layer_depth", columns="vertex", values=value).sort_index()


def best_layer_per_vertex(table: pd.DataFrame, signal: str, min_significant: int | str = "majority",
                          mask_signal: str | None = None) -> pd.DataFrame:
    """Best layer of each significant vertex, from a per-subject or group fMRI table.

    A vertex is kept when it is significant for ``mask_signal`` at any layer: ``significant`` is True
    (per-subject table) or ``n_significant >=`` :func:`subject_threshold` (group table). Its best layer is the
    argmax over all layers of ``score`` (per subject) or ``mean`` (group) for ``signal``
    (see :func:`best_layer`).

    Parameters
    ----------
    table : DataFrame
        Tidy fMRI table; may hold several subjects/models/checkpoints (each handled separately).
    signal : str
        One of ``forward``, ``backprop``, ``forward+backprop``, ``residual``.
    min_significant : int >= 1 or "majority"
        Group table only: least number of subjects in which a (layer, vertex) must be significant
        (:func:`subject_threshold`; ``"majority"`` of the group's ``n_subjects``, 1 = union).
    mask_signal : str, optional
        Signal whose significance selects vertices; default ``signal`` itself, the residual by its own
        test (overrides in :data:`DEFAULT_MASK_SIGNAL`, empty).

    Returns
    -------
    DataFrame
        One row per significant vertex and present subject/model/checkpoint: the key columns,
        ``vertex``, ``layer`` (name of the best layer), ``layer_depth`` (its depth k) and ``score``
        (its score). Vertices with no significant layer are dropped (count logged).
    """
    _require(table, ["signal", "vertex", "layer", "layer_depth"], "fMRI table")
    value, sig = _score_columns(table)
    mask_signal = mask_signal or DEFAULT_MASK_SIGNAL.get(signal, signal)
    sub = _check_signal(table, signal, "fMRI table")
    msub = _check_signal(table, mask_signal, "fMRI table")
    keys = _keys(table)
    mgroups = dict((tuple(k.values()), g) for k, g in _groups(msub, keys))
    frames = []
    for key, g in _groups(sub, keys):
        scores = _layer_matrix(g, value)
        m = _layer_matrix(mgroups.get(tuple(key.values()), msub.iloc[:0]), sig)
        m = m.reindex(index=scores.index, columns=scores.columns)
        # bool (per subject) or counts (group) -> float; an absent (layer, vertex) is not significant
        counts = np.nan_to_num(m.astype(np.float64).to_numpy(), nan=0.0)
        need = _table_threshold(min_significant, g) if sig == "n_significant" else 1
        significant = counts >= need
        depths = scores.index.to_numpy(dtype=np.float64)
        best = best_layer(scores.to_numpy(), depths, significant)
        keep = np.isfinite(best)
        log.info("%s signal=%s: %d of %d vertices significant (mask %s)", key, signal, keep.sum(), len(keep),
                 mask_signal)
        names = g.drop_duplicates("layer_depth").set_index("layer_depth")["layer"]
        arr = np.nan_to_num(scores.to_numpy(), nan=-np.inf)
        frame = pd.DataFrame({"vertex": scores.columns.to_numpy()[keep], "layer": names.loc[best[keep]].to_numpy(),
                              "layer_depth": best[keep], "score": arr.max(axis=0)[keep]})
        for k, v in reversed(list(key.items())):
            frame.insert(0, k, v)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# 2-3. ROIs
# --------------------------------------------------------------------------------------------

def roi_means(values_per_vertex, vertex_rois, rois_table: pd.DataFrame) -> pd.DataFrame:
    """Mean of a per-vertex value within each ROI (one hemisphere's area, or both), ignoring NaN.

    Parameters
    ----------
    values_per_vertex : array-like, shape (2V,)
        One value per fsaverage vertex (lh then rh), NaN where undefined (e.g. not significant).
    vertex_rois : array-like of int, shape (2V,)
        ROI label of each vertex, 0 = unknown; vertex ``j`` is in lh if ``j < V`` else rh.
    rois_table : DataFrame
        One row per (hemi, roi) with at least ``hemi`` and ``roi`` (int label): ``hemi`` "lh"/"rh" (one
        hemisphere's area) or, in a table of merged areas (:func:`brainprop.brain.atlas.merge_hemispheres`),
        "both" (the area's vertices of both hemispheres); all its columns (name, distances...) are
        carried to the output.

    Returns
    -------
    DataFrame
        ``rois_table`` (same rows and order) plus ``mean`` (NaN when no vertex contributes) and
        ``n`` (number of non-NaN vertices averaged).
    """
    values = np.asarray(values_per_vertex, dtype=np.float64)
    labels = np.asarray(vertex_rois)
    if values.ndim != 1 or values.shape != labels.shape:
        raise ValueError(f"values_per_vertex {values.shape} and vertex_rois {labels.shape} must be equal 1-D (2V,)")
    if len(labels) % 2:
        raise ValueError(f"vertex_rois has odd length {len(labels)}; expected 2V (lh then rh)")
    if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise ValueError("vertex_rois must hold non-negative integer labels")
    _require(rois_table, ["hemi", "roi"], "ROI table")
    if rois_table.duplicated(["hemi", "roi"]).any():
        raise ValueError("ROI table has duplicate (hemi, roi) rows")
    hemis = set(rois_table["hemi"])
    if hemis - {"lh", "rh", "both"}:
        raise ValueError(f"ROI table hemi must be 'lh', 'rh' or 'both', got {sorted(hemis - {'lh', 'rh', 'both'})}")
    if "both" in hemis and len(hemis) > 1:
        raise ValueError("ROI table mixes merged ('both') and per-hemisphere rows: vertices would count twice")
    n_labels = int(max(labels.max(initial=0), rois_table["roi"].max()) + 1)
    hemi = (np.arange(len(labels)) >= len(labels) // 2).astype(np.int64)
    code = hemi * n_labels + labels
    ok = np.isfinite(values)
    sums = np.bincount(code[ok], weights=values[ok], minlength=2 * n_labels)
    counts = np.bincount(code[ok], minlength=2 * n_labels)
    row_hemi, roi = rois_table["hemi"].to_numpy(), rois_table["roi"].to_numpy(np.int64)
    use_lh, use_rh = row_hemi != "rh", row_hemi != "lh"  # "both" sums the two hemispheres' codes
    table_codes = np.concatenate([roi[use_lh], n_labels + roi[use_rh]])
    unlisted = ok & (labels > 0) & ~np.isin(code, table_codes)
    if unlisted.any():
        log.warning("%d vertices with a value carry ROI labels absent from the ROI table; ignored", unlisted.sum())
    out = rois_table.reset_index(drop=True).copy()
    total = np.where(use_lh, sums[roi], 0.0) + np.where(use_rh, sums[n_labels + roi], 0.0)
    n = np.where(use_lh, counts[roi], 0) + np.where(use_rh, counts[n_labels + roi], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mean"] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    out["n"] = n.astype(np.int64)
    return out


def best_encoded_rois(roi_forward_scores: pd.DataFrame, fraction: float = 1 / 3,
                      column: str = "mean") -> pd.DataFrame:
    """ROIs whose mean forward score falls within the top ``fraction`` (paper: tercile) of all ROI means.

    Selected: ``score >= np.quantile(scores, 1 - fraction)`` (linear interpolation) over the ROIs with
    a finite score; e.g. the 3 largest of 9, 27 of 80. ROIs with a NaN score (no significant vertex)
    are never selected (count logged).

    Parameters
    ----------
    roi_forward_scores : DataFrame
        One row per ROI, e.g. the output of :func:`roi_means` applied to forward scores.
    fraction : float in (0, 1]
    column : str
        Column holding the ROI's mean forward score.

    Returns
    -------
    DataFrame
        The selected rows, in their original order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    _require(roi_forward_scores, [column], "ROI score table")
    s = roi_forward_scores[column].to_numpy(dtype=np.float64)
    finite = np.isfinite(s)
    if not finite.any():
        raise ValueError(f"ROI score table: no finite value in column {column!r}")
    if (~finite).any():
        log.info("%d of %d ROIs have no score and are not eligible", (~finite).sum(), len(s))
    threshold = np.quantile(s[finite], 1 - fraction)
    return roi_forward_scores[finite & (s >= threshold)]


# --------------------------------------------------------------------------------------------
# 4. correlations (Spatial score)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman correlations of two paired samples (NaN pairs dropped).

    ``r``/``p``: Pearson r and its two-sided p-value; ``rho``/``p_spearman``: Spearman; ``n``: pairs
    used. All NaN when fewer than 3 pairs remain or an input is constant.
    """

    r: float
    p: float
    rho: float
    p_spearman: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def correlation(x, y) -> Correlation:
    """Pearson r and Spearman rho (with two-sided p-values, scipy.stats) of paired ``x``, ``y``.

    Parameters
    ----------
    x, y : array-like, shape (n,)
        Pairs with a NaN in either member are dropped.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, n = x[ok], y[ok], int(ok.sum())
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        log.warning("correlation undefined: %d finite pairs (constant input or fewer than 3)", n)
        return Correlation(np.nan, np.nan, np.nan, np.nan, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sps.ConstantInputWarning)
        pr = sps.pearsonr(x, y)
        sr = sps.spearmanr(x, y)
    return Correlation(float(pr.statistic), float(pr.pvalue), float(sr.statistic), float(sr.pvalue), n)


def distance_layer_correlation(distance, best_layer) -> Correlation:
    """Spatial score: correlation between ROIs' distance from V1 and their best layer depth.

    Parameters
    ----------
    distance : array-like, shape (n_rois,)
        Distance from V1 (mm; figures use ``dist_geodesic``).
    best_layer : array-like, shape (n_rois,)
        Best layer depth k of each ROI; NaN pairs are dropped.

    Returns
    -------
    Correlation
        Paper, DINOv3-S final checkpoint: forward r = 0.35, backprop r = -0.27.
    """
    return correlation(distance, best_layer)


@dataclass(frozen=True)
class SpatialResult:
    """Output of :func:`spatial_score`: the correlation and the per-ROI table it was computed from
    (columns of the ROI table + ``best_layer``, ``n`` vertices with a best layer, ``forward_score``,
    ``n_forward``, ``selected``)."""

    correlation: Correlation
    rois: pd.DataFrame

    @property
    def n_ranked(self) -> int:
        """ROIs ranked for the tercile (those with a forward score): 180 merged HCP-MMP1 areas."""
        return int(np.isfinite(self.rois["forward_score"].to_numpy(np.float64)).sum())


def spatial_score(fmri: pd.DataFrame, vertex_rois, rois_table: pd.DataFrame, signal: str,
                  min_significant: int | str = "majority", fraction: float = 1 / 3,
                  distance: str = "dist_geodesic", method: str = "profile") -> SpatialResult:
    """Fig. 2C/D: correlation between distance from V1 and best layer over the best-encoded ROIs.

    Steps, for one model and checkpoint: (1) the significant vertices of ``signal``
    (:func:`best_layer_per_vertex`); (2) per ROI its best layer, either the argmax layer of the ROI's
    mean score profile over its significant vertices (``method="profile"``, the sister paper's
    best-predicting layer of a region; default) or the mean of its vertices' best-layer depths
    (``"vertex_mean"``, the Fig. 2A map averaged); (3) ROI selection: top ``fraction`` of the ROI mean
    forward score, where a vertex's forward score is its score at its forward best layer (max over
    layers) and only significant vertices count; the same ROIs serve every ``signal``; (4)
    :func:`distance_layer_correlation` with column ``distance``. The ROIs are the rows of
    ``rois_table``: merged areas (paper, 180) or per-hemisphere areas (360), see
    :func:`brainprop.brain.atlas.analysis_rois`.

    Parameters
    ----------
    fmri : DataFrame
        fMRI table (group or one subject) of ONE model and checkpoint (and subject).
    vertex_rois : array-like of int, shape (2V,)
    rois_table : DataFrame
        Must hold ``hemi``, ``roi`` and ``distance`` (see :func:`roi_means`).
    signal : str
    min_significant, fraction : see :func:`best_layer_per_vertex`, :func:`best_encoded_rois`.
    distance : str
        Distance column of ``rois_table`` (:data:`brainprop.brain.atlas.DISTANCES`).
    method : {"profile", "vertex_mean"}
        ``figures.roi_best_layer``.

    Returns
    -------
    SpatialResult
    """
    _require(rois_table, [distance], "ROI table")
    if method not in ROI_BEST_LAYER:
        raise ValueError(f"method must be one of {ROI_BEST_LAYER}, got {method!r}")
    keys = _keys(fmri)
    if len(fmri.drop_duplicates(keys)) > 1:
        raise ValueError(f"spatial_score needs one {'/'.join(keys)}; got {len(fmri.drop_duplicates(keys))}")
    vertex_rois = np.asarray(vertex_rois)
    n_v = len(vertex_rois)
    fwd = best_layer_per_vertex(fmri, "forward", min_significant)
    forward = roi_means(vertex_array(fwd.vertex, fwd.score, n_v), vertex_rois, rois_table)
    best = best_layer_per_vertex(fmri, signal, min_significant)
    if method == "vertex_mean":
        per_roi = roi_means(vertex_array(best.vertex, best.layer_depth, n_v), vertex_rois, rois_table)
        best_roi, n_roi = per_roi["mean"].to_numpy(), per_roi["n"].to_numpy()
    else:
        value, _ = _score_columns(fmri)
        scores = _layer_matrix(_check_signal(fmri, signal, "fMRI table"), value)
        scores = scores.loc[:, scores.columns.isin(best.vertex)]
        profiles = [roi_means(vertex_array(scores.columns, row, n_v), vertex_rois, rois_table)
                    for row in scores.to_numpy()]
        means = np.stack([p["mean"].to_numpy() for p in profiles])
        best_roi = best_layer(means, scores.index.to_numpy(dtype=np.float64))
        n_roi = profiles[0]["n"].to_numpy() if profiles else np.zeros(len(rois_table), np.int64)
    out = rois_table.reset_index(drop=True).copy()
    out["best_layer"], out["n"] = best_roi, n_roi
    out["forward_score"], out["n_forward"] = forward["mean"].to_numpy(), forward["n"].to_numpy()
    selected = best_encoded_rois(out, fraction, column="forward_score")
    out["selected"] = out.index.isin(selected.index)
    sel = out[out["selected"]]
    return SpatialResult(distance_layer_correlation(sel[distance], sel["best_layer"]), out)


# --------------------------------------------------------------------------------------------
# 5. MEG peak times (Temporal score)
# --------------------------------------------------------------------------------------------

def peak_times(group_meg: pd.DataFrame, signal: str, tmin: float | None = ONSET,
               tmax: float | None = None) -> pd.DataFrame:
    """Peak time and peak score of each layer's across-subject mean MEG time course.

    Parameters
    ----------
    group_meg : DataFrame
        MEG group table (``time`` in s, ``mean``); may hold several models/checkpoints.
    signal : str
    tmin, tmax : float, optional
        Search window in seconds (inclusive); default from image onset (:data:`ONSET`, 0 s: the
        baseline's fluctuations are no response to the image) to the end of the epoch; None = no bound.

    Returns
    -------
    DataFrame
        One row per (model, checkpoint, layer): key columns, ``layer``, ``layer_depth``,
        ``peak_time`` (s, first time of the maximum), ``peak_score`` (the maximum mean r), and
        ``pvalue_fdr`` at the peak when the table has it. Sorted by depth.
    """
    _require(group_meg, ["layer", "layer_depth", "signal", "time", "mean"], "MEG group table")
    sub = _check_signal(group_meg, signal, "MEG group table")
    if tmin is not None:
        sub = sub[sub["time"] >= tmin]
    if tmax is not None:
        sub = sub[sub["time"] <= tmax]
    if sub.empty:
        raise ValueError(f"MEG group table: no time point in [{tmin}, {tmax}] s")
    keys = _keys(sub, ("layer", "layer_depth"))
    if sub.duplicated([*keys, "time"]).any():
        raise ValueError("MEG group table: several rows per (model, checkpoint, layer, signal, time)")
    sub = sub[np.isfinite(sub["mean"].to_numpy(dtype=np.float64))].sort_values([*keys, "time"])
    idx = sub.groupby(keys, sort=True)["mean"].idxmax()
    peaks = sub.loc[idx.to_numpy()]
    cols = [*keys, "time", "mean"] + (["pvalue_fdr"] if "pvalue_fdr" in sub.columns else [])
    peaks = peaks[cols].rename(columns={"time": "peak_time", "mean": "peak_score"})
    return peaks.sort_values([*_keys(sub), "layer_depth"]).reset_index(drop=True)


def temporal_score(peaks: pd.DataFrame) -> Correlation:
    """Temporal score: correlation between layer depth and peak time (one model and checkpoint).

    Parameters
    ----------
    peaks : DataFrame
        Output of :func:`peak_times` for one model/checkpoint (columns ``layer_depth``, ``peak_time``).
    """
    _require(peaks, ["layer_depth", "peak_time"], "peak table")
    keys = _keys(peaks)
    if keys and len(peaks.drop_duplicates(keys)) > 1:
        raise ValueError(f"temporal_score needs one {'/'.join(keys)}; filter the peak table first")
    return correlation(peaks["layer_depth"], peaks["peak_time"])


# --------------------------------------------------------------------------------------------
# 6. training dynamics
# --------------------------------------------------------------------------------------------

_CKPT = re.compile(r"^it(\d+)$")


def checkpoint_iteration(checkpoint: str) -> int:
    """Training iteration of a checkpoint name: ``"it300" -> 300``."""
    m = _CKPT.match(str(checkpoint))
    if not m:
        raise ValueError(f"checkpoint name {checkpoint!r} is not of the form 'it<iteration>' (e.g. 'it300')")
    return int(m.group(1))


def half_time(iterations, values, fraction: float = 0.5, from_initial: bool = False) -> float:
    """Training step at which a metric first reaches ``fraction`` (50%) of its final value.

    Target: ``fraction * v_final`` (``v_final`` = value at the last iteration), or with
    ``from_initial`` ``v_0 + fraction * (v_final - v_0)`` (for metrics that start negative, e.g. the
    Spatial score). The first checkpoint at or above the target is found and the crossing is
    linearly interpolated with its predecessor in ``x = log10(iteration + 1)`` (checkpoints are
    log-spaced and metrics grow roughly logarithmically; the +1 keeps iteration 0), then mapped back
    with ``10**x - 1``.

    Parameters
    ----------
    iterations : array-like of int, shape (n_checkpoints,)
        Training iterations (any order, unique).
    values : array-like of float, shape (n_checkpoints,)
        Metric at each checkpoint; NaN checkpoints are dropped.
    fraction : float in (0, 1)
    from_initial : bool

    Returns
    -------
    float
        The half-time in iterations; ``iterations[0]`` if already reached at the first checkpoint;
        NaN if the target is undefined (``v_final <= 0``; or ``v_final <= v_0`` with ``from_initial``)
        or fewer than 2 finite checkpoints.
    """
    it = np.asarray(iterations, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if it.shape != v.shape or it.ndim != 1:
        raise ValueError(f"iterations {it.shape} and values {v.shape} must be equal-length 1-D arrays")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if (it < 0).any() or len(np.unique(it)) != len(it):
        raise ValueError(f"iterations must be unique and >= 0, got {it.tolist()}")
    ok = np.isfinite(v)
    order = np.argsort(it[ok])
    it, v = it[ok][order], v[ok][order]
    if len(v) < 2:
        return np.nan
    base = v[0] if from_initial else 0.0
    if v[-1] <= base:
        return np.nan
    target = base + fraction * (v[-1] - base)
    i = int(np.argmax(v >= target))
    if i == 0:
        return float(it[0])
    x0, x1 = np.log10(it[i - 1] + 1), np.log10(it[i] + 1)
    x = x0 + (target - v[i - 1]) / (v[i] - v[i - 1]) * (x1 - x0)
    return float(10 ** x - 1)


def half_times(table: pd.DataFrame, value: str, by: Sequence[str], fraction: float = 0.5,
               from_initial: bool = False) -> pd.DataFrame:
    """:func:`half_time` of column ``value`` across checkpoints, for each group of ``by`` columns.

    Parameters
    ----------
    table : DataFrame
        One row per (``by``..., checkpoint) with a ``checkpoint`` column ("it<N>") and ``value``
        (e.g. the output of :func:`summary_scores`, or per-ROI means with ``by=["hemi", "roi"]``).

    Returns
    -------
    DataFrame
        ``by`` columns, ``half_time`` (iterations), ``final`` (value at the last checkpoint).
    """
    _require(table, [*by, "checkpoint", value], "table")
    it = table["checkpoint"].map(checkpoint_iteration)
    rows = []
    for key, g in table.assign(_it=it).groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values("_it")
        rows.append({**dict(zip(by, key)), "half_time": half_time(g["_it"], g[value], fraction, from_initial),
                     "final": float(g[value].iloc[-1])})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# 7. summary encoding scores (Fig. 3, Fig. 5)
# --------------------------------------------------------------------------------------------

def _pick_layer(table: pd.DataFrame, layer: str | None) -> pd.DataFrame:
    """Rows of ``layer`` (name) or, with None, of each model's deepest layer."""
    if layer is not None:
        out = table[table["layer"] == layer]
        if out.empty:
            raise ValueError(f"no rows for layer {layer!r}; layers present: {sorted(table['layer'].unique())}")
        return out
    deepest = table.groupby("model")["layer_depth"].transform("max")
    return table[table["layer_depth"] == deepest]


def meg_summary(group_meg: pd.DataFrame, layer: str | None = None) -> pd.DataFrame:
    """Fig. 3 top: per (model, checkpoint, signal) the maximum over time of the mean MEG time course.

    Parameters
    ----------
    group_meg : DataFrame
        MEG group table.
    layer : str, optional
        Layer name; default each model's last (deepest) layer.

    Returns
    -------
    DataFrame
        model, checkpoint, signal, layer, layer_depth, ``modality="meg"``, ``score`` (max mean r),
        ``sem`` and ``pvalue`` (FDR-corrected t-test) at the peak time ``peak_time``, ``n_subjects``,
        ``stars``.
    """
    _require(group_meg, ["model", "checkpoint", "layer", "layer_depth", "signal", "time", "mean", "sem",
                         "n_subjects", "pvalue_fdr"], "MEG group table")
    sub = _pick_layer(group_meg, layer)
    rows = []
    for signal in [s for s in SIGNALS if s in set(sub["signal"])]:
        peaks = peak_times(sub, signal)
        at = sub[sub["signal"] == signal].set_index(["model", "checkpoint", "layer", "time"])
        idx = list(zip(peaks.model, peaks.checkpoint, peaks.layer, peaks.peak_time))
        rows.append(pd.DataFrame({
            "model": peaks.model, "checkpoint": peaks.checkpoint, "signal": signal, "layer": peaks.layer,
            "layer_depth": peaks.layer_depth, "modality": "meg", "score": peaks.peak_score,
            "sem": at.loc[idx, "sem"].to_numpy(), "pvalue": at.loc[idx, "pvalue_fdr"].to_numpy(),
            "peak_time": peaks.peak_time, "n_subjects": at.loc[idx, "n_subjects"].to_numpy()}))
    out = pd.concat(rows, ignore_index=True)
    out["stars"] = out["pvalue"].map(stars)
    return out


def fmri_summary(group_fmri: pd.DataFrame, subjects: pd.DataFrame | None = None, layer: str | None = None,
                 min_significant: int = 1, mask_signals: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Fig. 3 bottom / Fig. 5: per (model, checkpoint, signal) the mean score over significant vertices.

    Vertices: those of the chosen layer with ``n_significant >= min_significant`` for the signal's mask
    signal (itself, the residual by its own test; overrides in ``mask_signals``). Score:
    mean over them of the across-subject mean score. With per-subject tables, each subject's mean
    over the same vertices gives ``sem`` across subjects and ``pvalue``, a one-sample one-tailed
    t-test (mean > 0, scipy); note the vertices were selected as significant, so this p-value only
    says the selected effect is consistent across subjects.

    Parameters
    ----------
    group_fmri : DataFrame
        fMRI group table.
    subjects : DataFrame, optional
        Concatenated per-subject fMRI tables (column ``subject``, ``score``).
    layer : str, optional
        Layer name; default each model's last (deepest) layer.
    min_significant : int
    mask_signals : mapping, optional
        Overrides of :data:`DEFAULT_MASK_SIGNAL`.

    Returns
    -------
    DataFrame
        model, checkpoint, signal, layer, layer_depth, ``modality="fmri"``, ``score``, ``n_vertices``,
        ``sem``, ``pvalue`` (NaN without ``subjects``), ``n_subjects``, ``stars``.
    """
    _require(group_fmri, ["model", "checkpoint", "layer", "layer_depth", "signal", "vertex", "mean",
                          "n_significant"], "fMRI group table")
    masks = {**DEFAULT_MASK_SIGNAL, **(mask_signals or {})}
    sub = _pick_layer(group_fmri, layer)
    keys = ["model", "checkpoint", "layer", "layer_depth"]
    if subjects is not None:
        _require(subjects, [*keys, "subject", "signal", "vertex", "score"], "per-subject fMRI table")
        subj = subjects.set_index(["model", "checkpoint", "layer", "signal"]).sort_index()
    rows = []
    for key, g in sub.groupby(keys, sort=True):
        for signal in [s for s in SIGNALS if s in set(g["signal"])]:
            mask = g[(g["signal"] == masks.get(signal, signal)) & (g["n_significant"] >= min_significant)]
            vertices = mask["vertex"].to_numpy()
            vals = g[(g["signal"] == signal) & g["vertex"].isin(vertices)]["mean"]
            row = {**dict(zip(keys, key)), "signal": signal, "modality": "fmri",
                   "score": float(vals.mean()) if len(vals) else np.nan, "n_vertices": int(len(vals)),
                   "sem": np.nan, "pvalue": np.nan, "n_subjects": np.nan}
            sel = (key[0], key[1], key[2], signal)
            if subjects is not None and len(vertices) and sel in subj.index:
                s = subj.loc[[sel]]
                per = s[s["vertex"].isin(vertices)].groupby("subject")["score"].mean().to_numpy(np.float64)
                row["n_subjects"] = len(per)
                if len(per) > 1:
                    row["sem"] = float(per.std(ddof=1) / np.sqrt(len(per)))
                    row["pvalue"] = float(sps.ttest_1samp(per, 0.0, alternative="greater").pvalue)
            rows.append(row)
    out = pd.DataFrame(rows)
    out["stars"] = out["pvalue"].map(stars)
    return out


def summary_scores(meg_group: pd.DataFrame | None = None, fmri_group: pd.DataFrame | None = None,
                   fmri_subjects: pd.DataFrame | None = None, layer: str | None = None,
                   min_significant: int | str = "majority") -> pd.DataFrame:
    """Fig. 3 / Fig. 5 Encoding scores of both modalities in one tidy table (:func:`meg_summary` rows
    then :func:`fmri_summary` rows; columns absent in one modality are NaN). ``min_significant``:
    see :func:`subject_threshold` (``"majority"`` of the fMRI group table's subjects)."""
    parts = []
    if meg_group is not None:
        parts.append(meg_summary(meg_group, layer))
    if fmri_group is not None:
        parts.append(fmri_summary(fmri_group, fmri_subjects, layer, _table_threshold(min_significant, fmri_group)))
    if not parts:
        raise ValueError("summary_scores needs meg_group and/or fmri_group")
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------------------------
# 8. several models (Fig. 4, Fig. S1) and maps
# --------------------------------------------------------------------------------------------

def min_models(n_models: int) -> int:
    """Least number of models in which a vertex must be significant to enter a map averaged across
    models: a majority, ``ceil(n / 2)`` (1 of 1, 1 of 2, 2 of 3, 4 of 8)."""
    if n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    return (n_models + 1) // 2


def mean_vertex_map(maps: Sequence[tuple], n_vertices: int, min_count: int = 1) -> np.ndarray:
    """Average per-vertex values over several sources (models), where at least ``min_count`` have one.

    Parameters
    ----------
    maps : sequence of (vertices, values)
        One pair per source; a vertex absent from a source (e.g. not significant) does not count.
    n_vertices : int
        Length 2V of the output.
    min_count : int

    Returns
    -------
    ndarray, shape (n_vertices,)
        Mean over the sources holding the vertex, NaN where fewer than ``min_count`` do.
    """
    if not maps:
        raise ValueError("mean_vertex_map needs at least one map")
    stack = np.stack([vertex_array(v, x, n_vertices) for v, x in maps])
    count = np.isfinite(stack).sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stack, axis=0)
    return np.where(count >= min_count, mean, np.nan)


def significant_map(group_fmri: pd.DataFrame, signal: str, layer: str | None = None,
                    min_significant: int | str = "majority") -> pd.DataFrame:
    """Across-subject mean score of each vertex significant for the signal (the residual: by its own
    test) in ``min_significant`` subjects (``"majority"`` or a count; Fig. 4, 6).

    Parameters
    ----------
    group_fmri : DataFrame
        fMRI group table of one model and checkpoint.
    signal : str
    layer : str, optional
        Default: the deepest layer.
    min_significant : int >= 1 or "majority"
        Least number of subjects in which the vertex is significant (:func:`subject_threshold`:
        ``"majority"`` of the table's subjects; 1 = the union).

    Returns
    -------
    DataFrame
        ``vertex``, ``score`` (across-subject mean r), for the kept vertices.
    """
    _require(group_fmri, ["layer", "layer_depth", "signal", "vertex", "mean", "n_significant"], "fMRI group table")
    keys = _keys(group_fmri)
    if keys and len(group_fmri.drop_duplicates(keys)) > 1:
        raise ValueError(f"significant_map needs one {'/'.join(keys)}; filter the table first")
    sub = _pick_layer(group_fmri, layer)
    mask = _check_signal(sub, DEFAULT_MASK_SIGNAL.get(signal, signal), "fMRI group table")
    keep = mask.loc[mask["n_significant"] >= _table_threshold(min_significant, group_fmri), "vertex"]
    values = _check_signal(sub, signal, "fMRI group table")
    values = values[values["vertex"].isin(keep)]
    return pd.DataFrame({"vertex": values["vertex"].to_numpy(), "score": values["mean"].to_numpy(np.float64)})


def combined_spatial(results: Sequence[SpatialResult], fraction: float = 1 / 3,
                     distance: str = "dist_geodesic") -> SpatialResult:
    """Spatial score of several models together (Fig. S1C/D): per ROI, the mean over models of the best
    layer and of the forward score (NaN-aware), then the top ``fraction`` of ROIs and the correlation.

    With one model this is that model's :func:`spatial_score`.
    """
    if not results:
        raise ValueError("combined_spatial needs at least one SpatialResult")
    first = results[0].rois
    for r in results[1:]:
        if not r.rois[["hemi", "roi"]].equals(first[["hemi", "roi"]]):
            raise ValueError("the SpatialResults were computed on different ROI tables")
    out = first.drop(columns=["selected"]).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for col in ("best_layer", "forward_score"):
            out[col] = np.nanmean(np.stack([r.rois[col].to_numpy(np.float64) for r in results]), axis=0)
    out["n_models"] = np.stack([np.isfinite(r.rois["best_layer"].to_numpy(np.float64)) for r in results]).sum(0)
    selected = best_encoded_rois(out, fraction, column="forward_score")
    out["selected"] = out.index.isin(selected.index)
    sel = out[out["selected"]]
    return SpatialResult(distance_layer_correlation(sel[distance], sel["best_layer"]), out)


def depth_bins(depths, n_bins: int) -> np.ndarray:
    """Index of the nearest of ``n_bins`` evenly spaced depths in [0, 1] for each layer depth, so that
    models with different layer counts can be averaged layer-wise (Fig. S1E/F)."""
    d = np.asarray(depths, dtype=np.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if ((d < 0) | (d > 1)).any():
        raise ValueError("layer depths must lie in [0, 1]")
    return np.rint(d * (n_bins - 1)).astype(np.int64)


def course_statistics(courses: pd.DataFrame, by: Sequence[str], units: Sequence[str], q: float = 0.05) -> pd.DataFrame:
    """Mean, SEM and one-tailed t-test (BH-FDR over time) of MEG time courses across units.

    Parameters
    ----------
    courses : DataFrame
        Channel-averaged courses: ``time``, ``score``, the ``by`` columns and the ``units`` columns
        (e.g. units = subject, or subject and model for Fig. 4: each (subject, model) one sample).
    by : columns defining one curve (e.g. ``["signal"]``)
    units : columns whose combinations are the samples of the test

    Returns
    -------
    DataFrame
        ``by`` columns, ``time``, ``mean``, ``sem``, ``n``, ``t``, ``pvalue``, ``pvalue_fdr``,
        ``significant`` (see :func:`brainprop.stats.ttest_across_subjects`).
    """
    from brainprop.stats import ttest_across_subjects

    _require(courses, [*by, *units, "time", "score"], "MEG course table")
    rows = []
    for key, g in courses.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        wide = g.pivot_table(index=list(units), columns="time", values="score", aggfunc="mean")
        x = wide.to_numpy(np.float64)
        test = ttest_across_subjects(x, q=q)
        rows.append(pd.DataFrame({**dict(zip(by, key)), "time": wide.columns.to_numpy(np.float64),
                                  "mean": x.mean(0), "sem": x.std(0, ddof=1) / np.sqrt(len(x)), "n": len(x),
                                  "t": test.t, "pvalue": test.pvalues, "pvalue_fdr": test.pvalues_fdr,
                                  "significant": test.significant}))
    return pd.concat(rows, ignore_index=True)
