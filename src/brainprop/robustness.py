"""Fig. S2: robustness of the encoding scores to the projection and PCA dimensions.

For one model checkpoint and one layer, the per-image gradients are projected ONCE, by the
Gaussian projection at the largest ``K`` of ``robustness.projection_dims`` (one backward pass per
image); each smaller dimension ``k`` is derived as the first ``k`` columns times ``sqrt(K / k)``
(the Gaussian matrix is column-nested, :func:`brainprop.projection.nested_gaussian`), which is the
``k``-dim projection of the same layer seed up to float32 rounding. The grid always uses the
Gaussian projection (the Kronecker one does not nest). Both signals are then reduced by PCA to
each of ``robustness.pca_dims`` (components are nested: one PCA per signal and projection,
truncated). Every (signal, projection, PCA) cell is encoded like the main analysis
(:func:`brainprop.encoding.cross_validated_ridge`, same alphas and splits, no permutations) and
summarised like Fig. 3:

* MEG: the maximum over time of the across-subject mean of the channel-averaged score;
* fMRI: the mean, over the vertices significant for that signal in the main analysis (same layer,
  at least ``min_significant`` subjects), of the across-subject mean score.

Forward activations are not projected (``projection_dim`` 0 in the table). A cell whose PCA
dimension exceeds what the data allow (the projection dimension, the raw width or the number of
images) is left out and logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from brainprop.brain.align import reorder_rows
from brainprop.encoding import cross_validated_ridge
from brainprop.projection import fit_pca, nested_gaussian
from brainprop.utils import get_logger, save_parquet_atomic

log = get_logger(__name__)


def nested_pca(x: np.ndarray, dims: Sequence[int], seed: int) -> dict[int, np.ndarray]:
    """{k: the first k principal components of ``x``} for each feasible ``k`` in ``dims``
    (``k <= min(n_rows, n_columns)``); one PCA at the largest feasible ``k``."""
    limit = min(x.shape)
    feasible = sorted({k for k in dims if k <= limit})
    skipped = sorted(set(dims) - set(feasible))
    if skipped:
        log.info("PCA dims %s exceed min(n_images, width) = %d: left out", skipped, limit)
    if not feasible:
        return {}
    scores, _ = fit_pca(x, feasible[-1], seed)
    return {k: scores[:, :k] for k in feasible}


def _load(folder: Path, layer: str, signal: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.load(folder / f"{layer}.{signal}.npy")
    ids = pd.read_parquet(folder / "index.parquet").image_id.to_numpy()
    return x, ids


def grid_features(raw_dir: str | os.PathLike, layer: str, projection_dims: Sequence[int], pca_dims: Sequence[int],
                  seed: int) -> tuple[dict[tuple[str, int, int], np.ndarray], np.ndarray]:
    """PCA features of every grid cell for one stimulus set.

    Parameters
    ----------
    raw_dir : folder with ``{layer}.forward.npy`` (n_images, width), ``{layer}.backprop.npy``
        (n_images, max(projection_dims)), a Gaussian projection, and ``index.parquet``
    layer, projection_dims, pca_dims, seed

    Returns
    -------
    features : dict (signal, projection_dim, pca_dim) -> (n_images, pca_dim); forward has projection_dim 0
    image_ids : ndarray, the rows' image ids
    """
    dims = sorted(set(projection_dims))
    fwd, ids = _load(Path(raw_dir), layer, "forward")
    bwd, _ = _load(Path(raw_dir), layer, "backprop")
    if bwd.shape[1] != dims[-1]:
        raise ValueError(f"{raw_dir}/{layer}.backprop.npy has {bwd.shape[1]} columns, expected the largest "
                         f"projection dim {dims[-1]}")
    out = {("forward", 0, k): v for k, v in nested_pca(fwd, pca_dims, seed).items()}
    for d in dims:
        out.update({("backprop", d, k): v for k, v in nested_pca(nested_gaussian(bwd, d), pca_dims, seed).items()})
    return out, ids


def score_grid(features: Mapping[tuple[str, int, int], np.ndarray], image_ids, Y: np.ndarray,
               target_ids: Sequence[str], encoding: dict, seed: int, what: str) -> dict[tuple[str, int, int], np.ndarray]:
    """Split-averaged r per target (n_targets,) of every grid cell, rows aligned to ``target_ids``."""
    from brainprop.scoring import alphas_from_config

    kw = dict(n_splits=encoding["n_splits"], seed=seed, inner_cv=encoding["inner_cv"],
              standardize=encoding["standardize"], dtype=encoding["dtype"],
              memory_budget=int(encoding["memory_budget_mb"] * 2**20), progress=False)
    alphas = alphas_from_config(encoding)
    out = {}
    for cell, x in tqdm(features.items(), desc=f"robustness {what}", unit="cell"):
        X = reorder_rows(x, image_ids, target_ids, what=f"{what} features {cell}")
        out[cell] = cross_validated_ridge(X, Y, alphas, **kw).mean_scores
    return out


def _cells(scores: Mapping) -> pd.DataFrame:
    return pd.DataFrame([{"signal": s, "projection_dim": d, "pca_dim": k} for s, d, k in scores])


def summarise_fmri(per_subject: Sequence[tuple[np.ndarray, Mapping]], masks: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """fMRI summary of each cell: mean over the signal's mask vertices of the across-subject mean r.

    Parameters
    ----------
    per_subject : sequence of (vertices (T,), {cell: scores (T,)})
    masks : {signal: vertex indices significant in the main analysis}
    """
    rows = []
    for cell in per_subject[0][1]:
        maps = pd.concat([pd.Series(s[cell], index=v) for v, s in per_subject], axis=1).mean(axis=1)
        sel = maps.reindex(masks[cell[0]]).dropna()
        rows.append({"score": float(sel.mean()) if len(sel) else np.nan, "n_targets": int(len(sel))})
    return pd.concat([_cells(per_subject[0][1]), pd.DataFrame(rows)], axis=1).assign(modality="fmri")


def summarise_meg(per_subject: Sequence[tuple[np.ndarray, Mapping]], n_times: int) -> pd.DataFrame:
    """MEG summary of each cell: max over time of the across-subject mean channel-averaged r; also the
    peak time index ``peak``. Each subject's scores are channel-major (channels x times)."""
    rows = []
    for cell in per_subject[0][1]:
        course = np.mean([np.nanmean(s[cell].reshape(-1, n_times), axis=0) for _, s in per_subject], axis=0)
        rows.append({"score": float(np.nanmax(course)), "n_targets": n_times, "peak": int(np.nanargmax(course))})
    return pd.concat([_cells(per_subject[0][1]), pd.DataFrame(rows)], axis=1).assign(modality="meg")


def run_robustness(nsd_dir: str | os.PathLike, things_dir: str | os.PathLike, layer: str,
                   projection_dims: Sequence[int], nsd_subjects: Sequence[Mapping[str, str]],
                   meg_subjects: Sequence[Mapping[str, str]],
                   fmri_group: str | os.PathLike, pca_dims: Sequence[int], encoding: dict, seed: int,
                   min_significant: int, out: str | os.PathLike) -> pd.DataFrame:
    """Rule entry point: write the grid table (modality, signal, projection_dim, pca_dim, score,
    n_targets, ``peak_time`` for MEG) to ``out`` (Parquet).

    ``nsd_dir``, ``things_dir``: the grid's feature extraction at ``max(projection_dims)`` per stimulus set;
    ``nsd_subjects``: dicts with ``betas``, ``images``, ``mask`` (prepare_nsd outputs);
    ``meg_subjects``: dicts with ``data``, ``images``, ``times`` (prepare_meg outputs);
    ``fmri_group``: the main analysis' fMRI group ``meta.json`` of the same model and checkpoint.
    """
    from brainprop.analysis import significant_map
    from brainprop.fmri_arrays import read_fmri
    from brainprop.brain.meg import read_meg_table

    group = read_fmri(fmri_group, layers=[layer], signals=("forward", "backprop"))
    masks = {s: significant_map(group, s, layer, min_significant).vertex.to_numpy() for s in ("forward", "backprop")}
    frames = []
    feats, ids = grid_features(nsd_dir, layer, projection_dims, pca_dims, seed)
    fmri = []
    for subj in nsd_subjects:
        image_ids = pd.read_parquet(subj["images"]).image_id.to_numpy()
        Y = np.load(subj["betas"], mmap_mode="r")
        fmri.append((np.flatnonzero(np.load(subj["mask"])),
                     score_grid(feats, ids, Y, image_ids, encoding, seed, what=str(subj["betas"]))))
    frames.append(summarise_fmri(fmri, masks))
    feats, ids = grid_features(things_dir, layer, projection_dims, pca_dims, seed)
    meg, times = [], None
    for subj in meg_subjects:
        table, _ = read_meg_table(subj["images"])
        X = np.load(subj["data"], mmap_mode="r")
        times = np.load(subj["times"])
        Y = np.asarray(X).reshape(X.shape[0], -1)
        meg.append((None, score_grid(feats, ids, Y, table.image_id.to_numpy(), encoding, seed, what=str(subj["data"]))))
    summary = summarise_meg(meg, len(times))
    summary["peak_time"] = times[summary.pop("peak").to_numpy()]
    frames.append(summary)
    table = pd.concat(frames, ignore_index=True)[["modality", "signal", "projection_dim", "pca_dim", "score",
                                                  "n_targets", "peak_time"]]
    save_parquet_atomic(table, out)
    log.info("robustness grid: %d cells written to %s", len(table), out)
    return table
