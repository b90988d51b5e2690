"""fMRI encoding results as arrays on the fsaverage vertex space: one subject, the group, and tidy views.

At the real size (327,684 vertices x 12 layers x 4 signals x 8 subjects) one (model, checkpoint) is
about 126 million (subject, layer, signal, vertex) values: tens of GB as tidy rows in pandas, 63 MB
per subject and quantity as float32 arrays. So the arrays are the primary output, group statistics
are computed from memory-mapped subject arrays one layer at a time, and tables are built only for
what a figure reads (:func:`read_fmri`: chosen layers and signals, analysed vertices only).

Subject folder ``encoding/fmri/{model}/{checkpoint}/subj{NN}/`` (written by
:func:`brainprop.scoring.encode_nsd_subject`); ``V`` is the number of fsaverage vertices of both
hemispheres (lh then rh), ``L`` layers, signals in the order of :data:`brainprop.scoring.SIGNALS`:

* ``meta.json``: ``kind: subject``, model, checkpoint, subject, layers, layer_depths, signals,
  n_vertices, n_splits, fdr_q;
* ``scores.npy`` (L, 4, V) float32: split-averaged r, NaN at vertices not analysed (vertex mask);
* ``pvalues.npy``, ``pvalues_fdr.npy`` (L, 4, V) float32: permutation p-values (the residual by its
  own test) and BH-adjusted over the analysed vertices of each (layer, signal); NaN where untested;
* ``significant.npy`` (L, 4, V) bool: BH rejection at ``fdr_q``;
* ``split_scores.npy``, ``alphas.npy`` (L, 3, n_splits, V) float32: per split, the fitted signals.

Group folder ``encoding/fmri/{model}/{checkpoint}/group/`` (:func:`group_fmri`):

* ``meta.json``: ``kind: group``, the subjects' common fields, ``subjects``;
* ``mean.npy`` (L, 4, V) float32: mean score over the subjects in which the vertex was analysed;
* ``n_significant.npy``, ``n_subjects.npy`` (L, 4, V) uint8: in how many subjects it is
  significant, and analysed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from brainprop.utils import atomic_output, get_logger, save_npy_atomic

log = get_logger(__name__)

SUBJECT_ARRAYS = ("scores", "pvalues", "pvalues_fdr", "significant", "split_scores", "alphas")
GROUP_ARRAYS = ("mean", "n_significant", "n_subjects")
COMMON_META = ("model", "checkpoint", "layers", "layer_depths", "signals", "n_vertices")


def write_meta(path: str | os.PathLike, meta: dict) -> None:
    """Write a folder's ``meta.json`` atomically (last, after its arrays: its presence means complete)."""
    with atomic_output(path, ".json.tmp") as tmp, open(tmp, "w") as fh:
        json.dump(meta, fh, indent=1)


def read_meta(path: str | os.PathLike, kind: str | None = None) -> dict:
    """``meta.json`` of a subject or group folder; ``kind`` checks which."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fMRI encoding meta.json (run the encode_nsd/group_fmri rule)")
    meta = json.loads(path.read_text())
    missing = [k for k in ("kind", *COMMON_META) if k not in meta]
    if missing:
        raise ValueError(f"{path}: meta.json lacks {missing}")
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{path}: expected a {kind} folder, found kind {meta['kind']!r}")
    return meta


def on_vertices(values: np.ndarray, vertices: np.ndarray, n_vertices: int, fill=np.nan) -> np.ndarray:
    """``values`` (..., T) of the analysed vertices placed on the full vertex axis (..., n_vertices)."""
    out = np.full((*values.shape[:-1], n_vertices), fill, dtype=values.dtype)
    out[..., vertices] = values
    return out


def write_subject(out_dir: str | os.PathLike, arrays: dict[str, np.ndarray], vertices: np.ndarray, meta: dict) -> Path:
    """Write one subject's arrays (last axis over the analysed ``vertices``) on the full vertex axis, then
    ``meta.json``; returns its path. ``arrays`` holds every name of :data:`SUBJECT_ARRAYS`."""
    out_dir = Path(out_dir)
    missing = sorted(set(SUBJECT_ARRAYS) - set(arrays))
    if missing:
        raise ValueError(f"write_subject: missing arrays {missing}")
    for name in SUBJECT_ARRAYS:
        arr = arrays[name]
        full = on_vertices(arr, vertices, meta["n_vertices"], fill=False if arr.dtype == bool else np.nan)
        save_npy_atomic(out_dir / f"{name}.npy", full)
    write_meta(out_dir / "meta.json", {"kind": "subject", **meta})
    return out_dir / "meta.json"


def _load(folder: Path, name: str, shape: tuple) -> np.ndarray:
    arr = np.load(folder / f"{name}.npy", mmap_mode="r")
    if arr.shape != shape:
        raise ValueError(f"{folder / name}.npy: shape {arr.shape}, expected {shape} (from meta.json)")
    return arr


def group_fmri(subject_metas: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Rule entry point: group arrays of one (model, checkpoint) from its subjects' folders.

    Per (layer, signal, vertex): ``mean`` of the score over the subjects in which the vertex was analysed,
    ``n_subjects`` analysed and ``n_significant`` significant (permutation + FDR; the residual by its own
    test, never significant at untested layers). Reads memory-mapped subject arrays one layer at a time:
    memory is the three outputs plus one layer of every subject (real size: about 140 MB).
    """
    metas = [read_meta(p, "subject") for p in subject_metas]
    if not metas:
        raise ValueError("group_fmri needs at least one subject")
    first = metas[0]
    for path, m in zip(subject_metas, metas):
        diff = [k for k in COMMON_META if m[k] != first[k]]
        if diff:
            raise ValueError(f"{path}: {diff} differ from {subject_metas[0]}; a group needs one model, "
                             f"checkpoint and layout")
    subjects = [m["subject"] for m in metas]
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"group_fmri: duplicate subjects {subjects}")
    if len(metas) > np.iinfo(np.uint8).max:
        raise ValueError(f"group_fmri counts subjects in uint8: at most 255, got {len(metas)}")
    shape = (len(first["layers"]), len(first["signals"]), first["n_vertices"])
    folders = [Path(p).parent for p in subject_metas]
    scores = [_load(f, "scores", shape) for f in folders]
    signif = [_load(f, "significant", shape) for f in folders]
    mean = np.full(shape, np.nan, np.float32)
    n_sig = np.zeros(shape, np.uint8)
    n_sub = np.zeros(shape, np.uint8)
    for li in tqdm(range(shape[0]), desc="group fMRI", unit="layer"):
        total = np.zeros(shape[1:], np.float64)
        for s, sig in zip(scores, signif):
            layer = np.asarray(s[li], dtype=np.float64)
            ok = np.isfinite(layer)
            total += np.where(ok, layer, 0.0)
            n_sub[li] += ok
            n_sig[li] += np.asarray(sig[li]) & ok
        with np.errstate(invalid="ignore", divide="ignore"):
            mean[li] = np.where(n_sub[li] > 0, total / n_sub[li], np.nan)
    out_dir = Path(out_dir)
    for name, arr in (("mean", mean), ("n_significant", n_sig), ("n_subjects", n_sub)):
        save_npy_atomic(out_dir / f"{name}.npy", arr)
    meta = {"kind": "group", **{k: first[k] for k in COMMON_META}, "subjects": subjects}
    write_meta(out_dir / "meta.json", meta)
    log.info("group of %d subjects: %d layers x %d signals x %d vertices written to %s", len(metas), *shape, out_dir)
    return out_dir / "meta.json"


def _select(meta: dict, layers, last_layer: bool, signals) -> tuple[list[int], list[int]]:
    names = list(meta["layers"])
    if last_layer:
        if layers is not None:
            raise ValueError("give layers or last_layer, not both")
        layers = [names[int(np.argmax(meta["layer_depths"]))]]
    layers = names if layers is None else list(layers)
    unknown = [x for x in layers if x not in names]
    if unknown:
        raise ValueError(f"layers {unknown} not in {names}")
    signals = list(meta["signals"]) if signals is None else list(signals)
    bad = [s for s in signals if s not in meta["signals"]]
    if bad:
        raise ValueError(f"signals {bad} not in {meta['signals']}")
    return [names.index(x) for x in layers], [list(meta["signals"]).index(s) for s in signals]


def _view(path: str | os.PathLike, layers, last_layer: bool, signals) -> pd.DataFrame:
    meta = read_meta(path)
    folder = Path(path).parent
    shape = (len(meta["layers"]), len(meta["signals"]), meta["n_vertices"])
    li, si = _select(meta, layers, last_layer, signals)
    if meta["kind"] == "group":
        columns = {"mean": "mean", "n_significant": "n_significant", "n_subjects": "n_subjects"}
        keep_by = "n_subjects"
        keys = {"model": meta["model"], "checkpoint": meta["checkpoint"]}
    elif meta["kind"] == "subject":
        columns = {"score": "scores", "pvalue": "pvalues", "pvalue_fdr": "pvalues_fdr", "significant": "significant"}
        keep_by = "score"
        keys = {"subject": meta["subject"], "model": meta["model"], "checkpoint": meta["checkpoint"],
                "modality": "fmri"}
    else:
        raise ValueError(f"{path}: unknown kind {meta['kind']!r}")
    arrays = {col: _load(folder, name, shape) for col, name in columns.items()}
    frames = []
    for l in li:
        for s in si:
            values = {col: np.asarray(a[l, s]) for col, a in arrays.items()}
            kept = values[keep_by] > 0 if keep_by == "n_subjects" else np.isfinite(values[keep_by])
            frame = pd.DataFrame({"vertex": np.flatnonzero(kept).astype(np.int64),
                                  **{col: v[kept] for col, v in values.items()}})
            frame.insert(0, "signal", meta["signals"][s])
            frame.insert(0, "layer_depth", float(meta["layer_depths"][l]))
            frame.insert(0, "layer", meta["layers"][l])
            frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    for k, v in reversed(list(keys.items())):
        table.insert(0, k, v)
    return table


def read_fmri(paths, layers: Sequence[str] | None = None, last_layer: bool = False,
              signals: Sequence[str] | None = None) -> pd.DataFrame:
    """Tidy view of subject or group folders (their ``meta.json`` paths), as :mod:`brainprop.analysis` reads.

    Group: model, checkpoint, layer, layer_depth, signal, vertex, mean, n_significant, n_subjects (vertices
    analysed in at least one subject). Subject: subject, model, checkpoint, modality, layer, layer_depth,
    signal, vertex, score, pvalue, pvalue_fdr, significant (analysed vertices). Only the given ``layers``
    (or each folder's deepest with ``last_layer``) and ``signals`` are read.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("read_fmri needs at least one meta.json path")
    return pd.concat([_view(p, layers, last_layer, signals) for p in paths], ignore_index=True)
