"""Miniature Natural Scenes Dataset in the real on-disk layout, with planted effects.

:func:`simulate_nsd` writes, under ``root``, at fsaverage5 resolution (10242
vertices per hemisphere; fsaverage is nested, so these are the first 10242
vertices of fsaverage):

- ``nsddata_betas/ppdata/subjAA/fsaverage/betas_fithrf_GLMdenoise_RR/{lh,rh}.betas_sessionNN.mgh``
  float32 (nibabel writes MGH big-endian), shape (10242, 1, 1, T);
- ``nsddata/experiments/nsd/nsd_expdesign.mat`` (``masterordering`` 1 x (S_max T),
  ``subjectim`` n_subjects x n_per_subject, ``sharedix``; all 1-based, stored as
  MATLAB doubles like the real file);
- ``nsddata/experiments/nsd/nsd_stim_info_merged.csv`` (``cocoId, cocoSplit, nsdId,
  shared1000, subjectS, subjectS_rep{0,1,2}``; rep columns are 1-based global trial
  numbers from the full design, 0 = not shown);
- ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5`` (copied from the demo stimuli);
- ``nsddata/freesurfer/fsaverage/label/{lh,rh}.HCP_MMP1.mgz`` + ``HCP_MMP1.mgz.ctab``
  (synthetic parcellation carrying real HCP-MMP1 names and indices);
- ``nsddata/freesurfer/fsaverage/surf/{lh,rh}.{white,pial,inflated,sphere}``
  (nilearn's bundled fsaverage5 meshes);
- outside the NSD tree: ``simulation_params.json`` (parameters, seed) and
  ``simulation_truth.parquet`` (per-vertex planted tuning), for calibration.

Quirks reproduced: 1-based indices everywhere in the design, one masterordering
shared by all subjects, images repeated 1 to ``max_repetitions`` times (repeats
also within a session), subjects with fewer sessions than the design (``n_sessions``
as a list), vertices NaN in every trial (in all sessions, and a few in a single
session), per-session offsets and gains per vertex (so z-scoring within session
matters), percent-signal-change-like scale.

Planted effects (these, and only these, are what the demo figures recover)
--------------------------------------------------------------------------
Let ``p_v`` in [0, 1] be vertex v's geodesic distance from V1 (white surface,
same hemisphere) divided by the hemisphere's maximum, ``L`` the number of layers
and ``k_l = l / (L - 1)`` the layer depth. For each image n and vertex v::

    signal[n, v] = forward_weight * sum_l Tf[v, l] * Yf_l[n, v]
                 + backprop_weight * ((1 - g) + g * p_v) * sum_l Tb[v, l] * Yb_l[n, v]

- ``Tf = layer_tuning(p, L, forward_slope, forward_width)``: with the default
  slope +1, vertices near V1 are driven by shallow forward layers and vertices far
  from V1 by deep ones (bottom-up hierarchy; paper Fig. 2A/C).
- ``Tb = layer_tuning(p, L, backprop_slope, backprop_width)``: default slope -1,
  the reverse: early visual cortex driven by deep gradient layers (paper Fig. 2B/D).
- ``g = backprop_distance_gain``: backprop signal grows with distance from V1, so
  backprop (and residual backprop) variance is strongest in late regions (Fig. 4E).
- ``Y*_l[:, v] = sqrt(1 - c) * readout_v + sqrt(c) * readout_roi(v)``: standardized
  Gaussian read-outs of layer l's features (:func:`brainprop.simulate.effects.readout`),
  one per vertex and one shared by the vertex's ROI, ``c = roi_coherence``.
  Read-out weights differ between subjects; tuning does not.

Each trial i (image n_i, session k) then gets, in percent signal change::

    beta[i, v] = beta_scale * (offset_k[v] + gain_k[v] * (signal[n_i, v] + noise_i[v]))

with ``noise ~ N(0, 1 / snr)`` independent across trials and vertices,
``offset_k ~ N(0, session_offset_sd)``, ``log gain_k ~ N(0, session_scale_sd)``.
A weight of 0 removes that component exactly: the betas are then bit-for-bit
independent of the corresponding features (every random stream is separate).

All parameters, with defaults and one-line docs, are in :data:`DEFAULT_PARAMS`
(also given as a YAML fragment in ``docs/brain_data.md``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io
from tqdm.auto import tqdm

from brainprop.brain import atlas as atlas_mod
from brainprop.brain.align import reorder_rows
from brainprop.brain.nsd import (
    betas_path,
    expdesign_path,
    image_id_from_nsd_id,
    stim_info_path,
    stimuli_path,
    subject_name,
)
from brainprop.simulate.effects import add_noise, layer_rngs, layer_tuning, readout
from brainprop.utils import get_logger, merge_params

log = get_logger(__name__)

#: Simulation parameters and their defaults (documented in docs/brain_data.md).
DEFAULT_PARAMS: dict = {
    "n_subjects": 2,  # simulated subjects (subj01..)
    "n_sessions": 3,  # sessions per subject: int, or list with one count per subject (<= design's max)
    "trials_per_session": None,  # None -> floor(images_per_subject * max_repetitions / max(n_sessions))
    "images_per_subject": None,  # None -> every stimulus image (then all images are shared)
    "n_shared": None,  # images seen by all subjects; None -> images_per_subject
    "max_repetitions": 3,  # presentations per image (1..3, like NSD); extra trials are spread at random
    "n_areas": 40,  # HCP-MMP1 areas in the synthetic parcellation (<= 75), plus one unknown region
    "forward_weight": 1.0,  # amplitude of the forward component (0 = none)
    "forward_slope": 1.0,  # preferred forward layer depth vs distance from V1 (+1 bottom-up)
    "forward_width": 0.2,  # Gaussian tuning width over normalized layer depth
    "backprop_weight": 0.7,  # amplitude of the backprop component (0 = none)
    "backprop_slope": -1.0,  # preferred backprop layer depth vs distance from V1 (-1 reversed)
    "backprop_width": 0.2,  # Gaussian tuning width over normalized layer depth
    "backprop_distance_gain": 0.8,  # g: backprop amplitude factor (1 - g) + g * distance (0 = uniform)
    "roi_coherence": 0.5,  # share of read-out variance common to all vertices of an ROI (0..1)
    "snr": 0.5,  # per-trial variance ratio of a unit-variance read-out to noise
    "beta_scale": 2.0,  # overall scale in percent signal change
    "session_offset_sd": 1.0,  # SD of per-session, per-vertex offsets (before beta_scale)
    "session_scale_sd": 0.3,  # SD of log per-session, per-vertex gains
    "nan_vertex_fraction": 0.01,  # fraction of vertices NaN in every trial of every session
    "session_nan_vertices": 5,  # extra vertices NaN in all trials of one session only, per session
}

#: Order in which synthetic areas are placed by distance from V1 (plausible visual hierarchy first).
HIERARCHY_ORDER: tuple[str, ...] = (
    "V1", "V2", "V3", "V4", "V3A", "V3B", "V6", "V7", "V8", "LO1", "LO2", "PIT", "FFC", "MT", "MST",
    "IPS1", "POS2", "RSC", "PCV", "7Pm", "POS1", "7m", "7PL", "7Am", "7AL", "7PC", "LIPv", "VIP", "MIP",
    "STV", "PSL", "A1", "SFL", "23d", "v23ab", "d23ab", "31pv", "5m", "5mv", "23c", "5L", "24dd", "24dv",
    "SCEF", "6ma", "1", "2", "3a", "3b", "4", "6d", "6mp", "6v", "FEF", "PEF", "55b", "p24pr", "33pr",
    "a24pr", "p32pr", "a24", "d32", "8BM", "p32", "10r", "47m", "8Av", "8Ad", "9m", "8BL", "9p", "10d",
    "8C", "44", "45",
)  # fmt: skip

_SURFACE_KEYS = {"white": "white_matter", "pial": "pial", "inflated": "inflated", "sphere": "sphere"}
_N_FSAVERAGE5 = 10242


def resolve_params(params: dict | None) -> dict:
    """Merge ``params`` over :data:`DEFAULT_PARAMS`; unknown keys are an error."""
    out = merge_params(DEFAULT_PARAMS, params, "NSD simulation")
    if not 1 <= int(out["max_repetitions"]) <= 3:
        raise ValueError(f"max_repetitions must be 1..3 (NSD's csv has rep0..rep2), got {out['max_repetitions']}")
    if not 0 <= float(out["roi_coherence"]) <= 1:
        raise ValueError(f"roi_coherence must be in [0, 1], got {out['roi_coherence']}")
    if not 0 <= float(out["backprop_distance_gain"]) <= 1:
        raise ValueError(f"backprop_distance_gain must be in [0, 1], got {out['backprop_distance_gain']}")
    if not 0 <= float(out["nan_vertex_fraction"]) < 1:
        raise ValueError(f"nan_vertex_fraction must be in [0, 1), got {out['nan_vertex_fraction']}")
    if not 1 <= int(out["n_areas"]) <= len(HIERARCHY_ORDER):
        raise ValueError(f"n_areas must be 1..{len(HIERARCHY_ORDER)}, got {out['n_areas']}")
    return out


# ----------------------------------------------------------------------------- anatomy


def fsaverage5_meshes() -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """nilearn's bundled fsaverage5 meshes (offline).

    Returns
    -------
    meshes : dict surface -> hemi -> (coords (10242, 3) float64, faces (20480, 3) int64)
        Surfaces ``white``, ``pial``, ``inflated``, ``sphere``; hemis ``lh``, ``rh``.
    """
    from nilearn import datasets

    fs = datasets.load_fsaverage("fsaverage5")
    out: dict = {}
    for surface, key in _SURFACE_KEYS.items():
        mesh = fs[key] if key in fs else fs["pial"]  # white = pial if a nilearn version lacks it
        out[surface] = {
            hemi: (np.asarray(mesh.parts[part].coordinates, dtype=np.float64), np.asarray(mesh.parts[part].faces, dtype=np.int64))
            for hemi, part in (("lh", "left"), ("rh", "right"))
        }
    return out


def synthetic_parcellation(
    pial: np.ndarray, sphere: np.ndarray, n_areas: int
) -> np.ndarray:
    """Contiguous HCP-MMP1-style labels by nearest seed on the sphere.

    Seeds: V1 at the occipital pole (most posterior pial vertex), then farthest-point
    sampling on the sphere. Seeds are named by increasing distance from the V1 seed
    following :data:`HIERARCHY_ORDER`; the seed closest to the midline (smallest
    ``|x|`` on the pial surface, V1 excepted) becomes label 0 (unknown, "medial wall").

    Parameters
    ----------
    pial, sphere : ndarray, shape (V, 3)
    n_areas : int

    Returns
    -------
    labels : ndarray, shape (V,), int32
        Real HCP-MMP1 indices (``HCP_MMP1_NAMES.index(name) + 1``), 0 = unknown.
    """
    unit = sphere / np.linalg.norm(sphere, axis=1, keepdims=True)
    seeds = [int(np.argmin(pial[:, 1]))]
    dmin = np.linalg.norm(unit - unit[seeds[0]], axis=1)
    for _ in range(n_areas):  # n_areas - 1 named areas + 1 unknown
        nxt = int(np.argmax(dmin))
        seeds.append(nxt)
        dmin = np.minimum(dmin, np.linalg.norm(unit - unit[nxt], axis=1))
    seeds_arr = np.array(seeds)
    nearest = np.argmin(
        np.stack([np.linalg.norm(unit - unit[s], axis=1) for s in seeds_arr], axis=1), axis=1
    )
    unknown = 1 + int(np.argmin(np.abs(pial[seeds_arr[1:], 0])))
    named = [i for i in range(len(seeds_arr)) if i != unknown]  # seed 0 (V1) first
    order = sorted(named, key=lambda i: np.linalg.norm(unit[seeds_arr[i]] - unit[seeds_arr[0]]))
    seed_label = np.zeros(len(seeds_arr), dtype=np.int32)
    for rank, i in enumerate(order):
        seed_label[i] = atlas_mod.HCP_MMP1_NAMES.index(HIERARCHY_ORDER[rank]) + 1
    return seed_label[nearest]


def write_anatomy(root: str | os.PathLike, n_areas: int) -> None:
    """Write fsaverage5 surfaces, HCP_MMP1 labels and colour table into ``root``."""
    meshes = fsaverage5_meshes()
    surf_dir = atlas_mod.fsaverage_dir(root) / "surf"
    label_dir = atlas_mod.fsaverage_dir(root) / "label"
    surf_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for surface, hemis in meshes.items():
        for hemi, (coords, faces) in hemis.items():
            nib.freesurfer.write_geometry(str(surf_dir / f"{hemi}.{surface}"), coords, faces)
    for hemi in atlas_mod.HEMIS:
        labels = synthetic_parcellation(meshes["pial"][hemi][0], meshes["sphere"][hemi][0], n_areas)
        img = nib.MGHImage(labels.reshape(-1, 1, 1).astype(np.int32), np.eye(4))
        nib.save(img, str(atlas_mod.label_path(root, hemi)))
    lines = ["0 Unknown"] + [f"{i + 1} {name}" for i, name in enumerate(atlas_mod.HCP_MMP1_NAMES)]
    atlas_mod.ctab_path(root).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- design


def make_design(n_per_subject: int, n_trials: int, max_reps: int, rng: np.random.Generator) -> np.ndarray:
    """Trial order of an NSD-like design: every image 1..max_reps times, in random order.

    Returns
    -------
    trial_image : ndarray, shape (n_trials,), int64
        0-based index into a subject's images of each design trial (``masterordering - 1``).
    """
    if not n_per_subject <= n_trials <= max_reps * n_per_subject:
        raise ValueError(
            f"{n_trials} design trials cannot show {n_per_subject} images between 1 and {max_reps} times each"
        )
    extra = rng.choice(n_per_subject * (max_reps - 1), size=n_trials - n_per_subject, replace=False)
    seq = np.concatenate([np.arange(n_per_subject), extra // max(1, max_reps - 1)])
    return rng.permutation(seq)


def write_betas_session(path: str | os.PathLike, betas: np.ndarray) -> None:
    """Write one hemisphere-session (T, V) float32 as an NSD-style (V, 1, 1, T) .mgh."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, v = betas.shape
    data = np.asarray(betas, dtype=np.float32).T.reshape(v, 1, 1, t)
    nib.save(nib.MGHImage(data, np.eye(4)), str(path))


# ----------------------------------------------------------------------------- main


def _component(
    features: Sequence[np.ndarray],
    tuning: np.ndarray,
    amplitude: np.ndarray,
    roi_of_vertex: np.ndarray,
    coherence: float,
    seed_vertex: np.random.SeedSequence,
    seed_roi: np.random.SeedSequence,
) -> np.ndarray:
    """Tuned layer mixture for one signal (forward or backprop), shape (n_images, n_vertices)."""
    n_images, n_vertices = features[0].shape[0], tuning.shape[0]
    n_rois = int(roi_of_vertex.max()) + 1
    out = np.zeros((n_images, n_vertices), dtype=np.float32)
    rv = layer_rngs(seed_vertex, len(features))
    rr = layer_rngs(seed_roi, len(features))
    a, b = np.float32(np.sqrt(1 - coherence)), np.float32(np.sqrt(coherence))
    for l, f in enumerate(features):
        y = a * readout(f, n_vertices, rv[l]) + b * readout(f, n_rois, rr[l])[:, roi_of_vertex]
        out += tuning[:, l].astype(np.float32) * y
    return out * amplitude.astype(np.float32)


def simulate_nsd(
    root: str | os.PathLike,
    stimulus_table: pd.DataFrame,
    hdf5_path: str | os.PathLike,
    forward: Sequence[np.ndarray],
    backprop: Sequence[np.ndarray],
    feature_image_ids: Sequence[str],
    params: dict | None = None,
    seed: int = 0,
) -> dict:
    """Write a miniature NSD (fsaverage5) with planted forward/backprop effects.

    Parameters
    ----------
    root : path
        Output NSD root (created).
    stimulus_table : DataFrame
        One row per image with ``image_id`` (``nsd{nsdId:05d}``) and ``hdf5_row``
        (= nsdId); optional ``dataset`` (rows other than ``"nsd"`` are ignored),
        ``cocoId``, ``cocoSplit``.
    hdf5_path : path
        Demo ``nsd_stimuli.hdf5`` (dataset ``imgBrick``, row = nsdId); copied into root.
    forward, backprop : sequence of ndarray, each (n_feature_images, d_l)
        Per-layer features ordered by depth, rows aligned to ``feature_image_ids``.
    feature_image_ids : sequence of str
        Image id of each feature row (matched by id, never by position).
    params : dict, optional
        Overrides of :data:`DEFAULT_PARAMS` (see module docstring).
    seed : int
        Seed of every random choice (design, read-outs, noise, NaNs, session effects).

    Returns
    -------
    summary : dict
        ``root``, ``subjects``, ``n_sessions`` (per subject), ``trials_per_session``,
        ``images_per_subject``, ``n_shared``, ``n_vertices_per_hemi``, ``n_layers_forward``,
        ``n_layers_backprop``.
    """
    p = resolve_params(params)
    root = Path(root)
    table = stimulus_table
    if "dataset" in table.columns:
        table = table[table["dataset"] == "nsd"]
        if len(table) < len(stimulus_table):
            log.info("%d stimulus rows of other datasets ignored", len(stimulus_table) - len(table))
    for col in ("image_id", "hdf5_row"):
        if col not in table.columns:
            raise ValueError(f"stimulus table has no {col!r} column (columns: {list(stimulus_table.columns)})")
    table = table.reset_index(drop=True)
    nsd_ids = table["hdf5_row"].to_numpy().astype(np.int64)
    expected = np.array(image_id_from_nsd_id(nsd_ids), dtype=object)
    bad = table["image_id"].to_numpy() != expected
    if bad.any():
        ex = table.loc[bad, ["image_id", "hdf5_row"]].head(5).to_dict("records")
        raise ValueError(f"stimulus table: image_id must be nsd{{hdf5_row:05d}} for NSD images; {int(bad.sum())} rows differ, e.g. {ex}")
    if len(np.unique(nsd_ids)) != len(nsd_ids):
        raise ValueError("stimulus table: hdf5_row (nsdId) must be unique")
    n_images = len(table)
    image_ids = table["image_id"].tolist()
    if len(forward) == 0 or len(backprop) == 0:
        raise ValueError("forward and backprop need at least one layer each")
    fwd = [reorder_rows(f, feature_image_ids, image_ids, what=f"forward layer {l}") for l, f in enumerate(forward)]
    bwd = [reorder_rows(f, feature_image_ids, image_ids, what=f"backprop layer {l}") for l, f in enumerate(backprop)]
    n_unused = len(set(map(str, feature_image_ids)) - set(image_ids))
    if n_unused:
        log.info("%d feature rows belong to images outside the NSD stimulus table; not used", n_unused)

    hdf5_path = Path(hdf5_path)
    if not hdf5_path.is_file():
        raise FileNotFoundError(f"stimulus file not found: {hdf5_path}")
    with h5py.File(hdf5_path, "r") as fh:
        if "imgBrick" not in fh:
            raise ValueError(f"{hdf5_path}: no 'imgBrick' dataset (found {list(fh)})")
        n_rows = int(fh["imgBrick"].shape[0])
    if nsd_ids.max() >= n_rows or nsd_ids.min() < 0:
        raise ValueError(f"{hdf5_path}: imgBrick has {n_rows} rows but the stimulus table uses hdf5_row up to {nsd_ids.max()}")

    # --- design
    n_subjects = int(p["n_subjects"])
    n_sess = p["n_sessions"]
    n_sess = [int(n_sess)] * n_subjects if np.ndim(n_sess) == 0 else [int(k) for k in n_sess]
    if len(n_sess) != n_subjects or min(n_sess) < 1:
        raise ValueError(f"n_sessions must be a positive int or a list of {n_subjects} positive ints, got {p['n_sessions']}")
    s_max = max(n_sess)
    per_subject = n_images if p["images_per_subject"] is None else int(p["images_per_subject"])
    n_shared = per_subject if p["n_shared"] is None else int(p["n_shared"])
    if not 0 <= n_shared <= per_subject:
        raise ValueError(f"n_shared ({n_shared}) must be within 0..images_per_subject ({per_subject})")
    if n_shared + n_subjects * (per_subject - n_shared) > n_images:
        raise ValueError(
            f"{n_subjects} subjects x {per_subject} images with {n_shared} shared need "
            f"{n_shared + n_subjects * (per_subject - n_shared)} distinct images; the stimulus table has {n_images}"
        )
    max_reps = int(p["max_repetitions"])
    t_per = p["trials_per_session"]
    t_per = (per_subject * max_reps) // s_max if t_per is None else int(t_per)

    ss = np.random.SeedSequence(seed)
    ss_design, ss_subjects = ss.spawn(2)
    rng_design = np.random.default_rng(ss_design)
    order = rng_design.permutation(n_images)
    shared = np.sort(order[:n_shared])
    subj_images = []
    for s in range(n_subjects):
        start = n_shared + s * (per_subject - n_shared)
        own = np.sort(order[start : start + per_subject - n_shared])
        subj_images.append(np.concatenate([shared, own]))  # positions in `table`
    trial_image = make_design(per_subject, s_max * t_per, max_reps, rng_design)  # 0-based
    masterordering = trial_image + 1
    subjectim = np.stack([nsd_ids[idx] + 1 for idx in subj_images])  # 1-based 73k ids

    # --- anatomy and planted tuning
    write_anatomy(root, int(p["n_areas"]))
    labels = atlas_mod.vertex_rois(root)
    n_v = labels.size // 2
    distance = atlas_mod.vertex_distance_from_v1(root, surface="white")
    position = np.concatenate([distance[:n_v] / distance[:n_v].max(), distance[n_v:] / distance[n_v:].max()])
    hemi_of_vertex = np.repeat([0, 1], n_v)
    roi_of_vertex = np.unique(labels + 1000 * hemi_of_vertex, return_inverse=True)[1].reshape(-1)
    tune_f = layer_tuning(position, len(fwd), float(p["forward_slope"]), float(p["forward_width"]))
    tune_b = layer_tuning(position, len(bwd), float(p["backprop_slope"]), float(p["backprop_width"]))
    amp_f = np.full(2 * n_v, float(p["forward_weight"]))
    g = float(p["backprop_distance_gain"])
    amp_b = float(p["backprop_weight"]) * ((1 - g) + g * position)

    # --- experiment files
    exp_dir = expdesign_path(root).parent
    exp_dir.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        str(expdesign_path(root)),
        {
            "masterordering": masterordering.reshape(1, -1).astype(np.float64),
            "subjectim": subjectim.astype(np.float64),
            "sharedix": (nsd_ids[shared] + 1).reshape(1, -1).astype(np.float64),
        },
    )
    _write_stim_info(root, table, n_rows, nsd_ids[shared], subjectim, masterordering, n_subjects)
    stimuli_path(root).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hdf5_path, stimuli_path(root))

    # --- betas
    coherence = float(p["roi_coherence"])
    for s, ss_s in enumerate(ss_subjects.spawn(n_subjects)):
        ss_fv, ss_fr, ss_bv, ss_br, ss_noise, ss_sess, ss_nan = ss_s.spawn(7)
        idx = subj_images[s]
        signal = np.zeros((per_subject, 2 * n_v), dtype=np.float32)
        if p["forward_weight"] != 0:
            signal += _component([f[idx] for f in fwd], tune_f, amp_f, roi_of_vertex, coherence, ss_fv, ss_fr)
        if p["backprop_weight"] != 0:
            signal += _component([f[idx] for f in bwd], tune_b, amp_b, roi_of_vertex, coherence, ss_bv, ss_br)
        rng_noise = np.random.default_rng(ss_noise)
        rng_sess = np.random.default_rng(ss_sess)
        rng_nan = np.random.default_rng(ss_nan)
        n_nan = int(round(float(p["nan_vertex_fraction"]) * 2 * n_v))
        nan_always = rng_nan.choice(2 * n_v, size=n_nan, replace=False)
        for k in tqdm(range(1, n_sess[s] + 1), desc=f"simulate {subject_name(s + 1)}", unit="session"):
            rows = trial_image[(k - 1) * t_per : k * t_per]
            noisy = add_noise(signal[rows], float(p["snr"]), rng_noise, reference_variance=1.0)
            offset = rng_sess.normal(0.0, float(p["session_offset_sd"]), 2 * n_v).astype(np.float32)
            gain = np.exp(rng_sess.normal(0.0, float(p["session_scale_sd"]), 2 * n_v)).astype(np.float32)
            betas = np.float32(p["beta_scale"]) * (offset + gain * noisy)
            nan_session = rng_nan.choice(2 * n_v, size=int(p["session_nan_vertices"]), replace=False)
            betas[:, nan_always] = np.nan
            betas[:, nan_session] = np.nan
            for h, hemi in enumerate(atlas_mod.HEMIS):
                write_betas_session(betas_path(root, s + 1, hemi, k), betas[:, h * n_v : (h + 1) * n_v])

    truth = pd.DataFrame(
        {
            "hemi": np.where(hemi_of_vertex == 0, "lh", "rh"),
            "vertex": np.tile(np.arange(n_v), 2),
            "roi": labels,
            "distance_from_v1": distance,
            "position": position,
            "forward_preferred_depth": np.clip(0.5 + float(p["forward_slope"]) * (position - 0.5), 0, 1),
            "backprop_preferred_depth": np.clip(0.5 + float(p["backprop_slope"]) * (position - 0.5), 0, 1),
            "forward_amplitude": amp_f,
            "backprop_amplitude": amp_b,
        }
    )
    truth.to_parquet(root / "simulation_truth.parquet", index=False)
    summary = {
        "root": str(root),
        "subjects": [subject_name(s + 1) for s in range(n_subjects)],
        "n_sessions": n_sess,
        "trials_per_session": t_per,
        "images_per_subject": per_subject,
        "n_shared": n_shared,
        "n_vertices_per_hemi": n_v,
        "n_layers_forward": len(fwd),
        "n_layers_backprop": len(bwd),
    }
    (root / "simulation_params.json").write_text(json.dumps({"seed": seed, "params": p, "summary": summary}, indent=2))
    log.info("simulated NSD at %s: %s", root, summary)
    return summary


def _write_stim_info(
    root: Path,
    table: pd.DataFrame,
    n_rows: int,
    shared_nsd_ids: np.ndarray,
    subjectim: np.ndarray,
    masterordering: np.ndarray,
    n_subjects: int,
) -> None:
    """Write ``nsd_stim_info_merged.csv`` (one row per hdf5 row, like the real 73k-row file)."""
    info = pd.DataFrame({"nsdId": np.arange(n_rows)})
    coco = pd.Series(-1, index=info.index, dtype=np.int64)  # -1: image not in the stimulus table
    if "cocoId" in table.columns:
        coco.iloc[table["hdf5_row"].to_numpy()] = table["cocoId"].to_numpy().astype(np.int64)
    split = pd.Series("train2017", index=info.index)
    if "cocoSplit" in table.columns:
        split.iloc[table["hdf5_row"].to_numpy()] = table["cocoSplit"].astype(str).to_numpy()
    info.insert(0, "cocoId", coco.to_numpy())
    info.insert(1, "cocoSplit", split.to_numpy())
    info["shared1000"] = np.isin(info["nsdId"].to_numpy(), shared_nsd_ids)
    for s in range(n_subjects):
        shown = np.zeros(n_rows, dtype=np.int64)
        reps = np.zeros((n_rows, 3), dtype=np.int64)
        count = np.zeros(n_rows, dtype=np.int64)
        for t, m in enumerate(masterordering):  # 1-based trial numbers over the full design
            nsd = subjectim[s, m - 1] - 1
            reps[nsd, count[nsd]] = t + 1
            count[nsd] += 1
        shown[subjectim[s] - 1] = 1
        info[f"subject{s + 1}"] = shown
        for r in range(3):
            info[f"subject{s + 1}_rep{r}"] = reps[:, r]
    info.to_csv(stim_info_path(root))  # leading unnamed index column, like the real file


def make_toy_inputs(
    directory: str | os.PathLike,
    n_images: int = 120,
    n_layers: int = 4,
    dim: int = 6,
    image_size: int = 8,
    seed: int = 0,
) -> tuple[pd.DataFrame, Path, list[np.ndarray], list[np.ndarray], list[str]]:
    """Small stand-ins for the model-side inputs of :func:`simulate_nsd` (tests, examples).

    Writes ``directory/nsd_stimuli.hdf5`` (random uint8 ``imgBrick``) and returns a
    stimulus table in the lead's format, plus independent Gaussian forward and
    backprop features per layer whose rows are in a *shuffled* image order (so
    code that aligns by position instead of by id fails).

    Returns
    -------
    table : DataFrame
        ``image_id, dataset, source, hdf5_row, concept, caption, split, cocoId``.
    hdf5_path : Path
    forward, backprop : list of L ndarrays, each (n_images, dim) float32
    feature_image_ids : list of str, the row order of the features
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = np.arange(n_images)
    table = pd.DataFrame(
        {
            "image_id": image_id_from_nsd_id(rows),
            "dataset": "nsd",
            "source": "nsd_stimuli.hdf5",
            "hdf5_row": rows,
            "concept": [f"concept{i % 7}" for i in rows],
            "caption": [f"a toy image number {i}" for i in rows],
            "split": np.where(rows % 5 == 0, "test", "train"),
            "cocoId": 100000 + rows,
        }
    )
    hdf5_path = directory / "nsd_stimuli.hdf5"
    with h5py.File(hdf5_path, "w") as fh:
        fh.create_dataset("imgBrick", data=rng.integers(0, 256, (n_images, image_size, image_size, 3), dtype=np.uint8))
    perm = rng.permutation(n_images)
    forward = [rng.standard_normal((n_images, dim)).astype(np.float32) for _ in range(n_layers)]
    backprop = [rng.standard_normal((n_images, dim)).astype(np.float32) for _ in range(n_layers)]
    ids = [table["image_id"][i] for i in perm]
    return table, hdf5_path, forward, backprop, ids


def simulate_nsd_from_files(
    root: str | os.PathLike,
    stimulus_table: str | os.PathLike,
    hdf5_path: str | os.PathLike,
    forward: Sequence[str | os.PathLike],
    backprop: Sequence[str | os.PathLike],
    feature_table: str | os.PathLike,
    params: dict | None = None,
    seed: int = 0,
) -> dict:
    """File-based entry point of :func:`simulate_nsd` for a rule's thin script.

    Parameters
    ----------
    root : path
        Output NSD root.
    stimulus_table : path
        Parquet stimulus table (``image_id``, ``hdf5_row``, ...).
    hdf5_path : path
        Demo ``nsd_stimuli.hdf5``.
    forward, backprop : sequence of paths
        One ``.npy`` (n_feature_images, d) per layer, ordered by depth.
    feature_table : path
        Parquet with an ``image_id`` column giving the row order of the feature files.
    params : dict, optional
        Simulation parameters (see :data:`DEFAULT_PARAMS`).
    seed : int
    """
    ids = pd.read_parquet(feature_table)
    if "image_id" not in ids.columns:
        raise ValueError(f"{feature_table}: no 'image_id' column (columns: {list(ids.columns)})")
    return simulate_nsd(
        root,
        pd.read_parquet(stimulus_table),
        hdf5_path,
        [np.load(p) for p in forward],
        [np.load(p) for p in backprop],
        ids["image_id"].astype(str).tolist(),
        params=params,
        seed=seed,
    )
