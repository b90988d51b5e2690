"""Natural Scenes Dataset (NSD) fsaverage betas: trial -> image mapping and per-subject preparation.

Layout (relative to the NSD root; see ``shared/DATA_FORMATS.md``):

- ``nsddata_betas/ppdata/subjAA/fsaverage/betas_fithrf_GLMdenoise_RR/{lh,rh}.betas_sessionNN.mgh``:
  float32 (big-endian) percent signal change, shape (V, 1, 1, T) with V vertices per
  hemisphere (163842 for fsaverage; read from the root's surface so that simulated
  fsaverage5 roots with 10242 work) and T = 750 trials per session.
- ``nsddata/experiments/nsd/nsd_expdesign.mat``: ``masterordering`` (1 x n_trials,
  1-based into the subject's images), ``subjectim`` (n_subjects x n_images, 1-based
  73k ids), ``sharedix`` (1-based 73k ids of the shared images). Global trial ``t``
  (0-based) of subject ``s`` (0-based) shows
  ``nsdId = subjectim[s, masterordering[t] - 1] - 1``; session ``k`` (1-based) holds
  global trials ``T (k - 1) .. T k - 1`` in the order of the beta columns.

Preparation (:func:`prepare_nsd_subject`), per subject:

1. For each session, each hemisphere: z-score every vertex across that session's
   T trials (mean and population std, ddof=0; sums accumulated in float64).
2. Accumulate the z-scored trial responses per image (running sums), then divide by
   the image's number of repetitions among the sessions used.
3. A vertex is excluded if, in any session used, it has a non-finite value in any
   trial (NSD marks vertices outside the brain mask NaN for all trials) or zero
   variance across the session's trials. Excluded vertices are counted, logged and
   returned as a mask; they are dropped from the output matrix.

Outputs: betas ``.npy`` float32 of shape (n_images, n_kept_vertices) with columns
= kept vertices of lh then rh (``mask`` of length 2 V says which), rows = images in
increasing ``nsdId``; an image Parquet table with one row per output row; the mask
``.npy`` (bool, 2 V).

Memory: sessions are read one hemisphere at a time (T x V float32, 0.46 GiB for
fsaverage), z-scored in place by blocks of vertices, and added to per-image sums
kept in a disk-backed ``.npy`` next to the output (re-mapped per session). Measured
peak for a full-resolution subject: ~0.6 GiB anonymous memory plus up to ~0.8 GiB of
mapped file pages, independent of the number of sessions (loading every session at
once would need ~111 GiB for 40 sessions). The per-image sums take n_images x 2 V x 4
bytes of disk (12.2 GiB for 10,000 images), deleted at the end. See
``bench/bench_nsd_prepare.py`` and ``docs/brain_data.md``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io
from tqdm.auto import tqdm

from brainprop.brain.atlas import HEMIS, n_vertices_per_hemi
from brainprop.utils import get_logger, save_npy_atomic, save_parquet_atomic

log = get_logger(__name__)

#: Sessions acquired per subject in the published NSD (subj01..subj08).
NSD_SESSIONS_PER_SUBJECT = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
#: Beta version used by the workflow.
BETAS_VERSION = "betas_fithrf_GLMdenoise_RR"
_SESSION_RE = re.compile(r"^(lh|rh)\.betas_session(\d{2})\.mgh$")


# ----------------------------------------------------------------------------- paths


def subject_number(subject: int | str) -> int:
    """Subject number from ``1``, ``'1'``, ``'01'`` or ``'subj01'``."""
    m = re.fullmatch(r"(?:subj)?0*(\d+)", str(subject))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"subject must be a positive integer or 'subjAA', got {subject!r}")
    return int(m.group(1))


def subject_name(subject: int | str) -> str:
    """``'subjAA'`` form of a subject."""
    return f"subj{subject_number(subject):02d}"


def betas_dir(nsd_root: str | os.PathLike, subject: int | str) -> Path:
    """Directory of a subject's fsaverage betas."""
    return Path(nsd_root) / "nsddata_betas" / "ppdata" / subject_name(subject) / "fsaverage" / BETAS_VERSION


def betas_path(nsd_root: str | os.PathLike, subject: int | str, hemi: str, session: int) -> Path:
    """Path of ``{hemi}.betas_session{NN}.mgh``."""
    if hemi not in HEMIS:
        raise ValueError(f"hemi must be one of {HEMIS}, got {hemi!r}")
    return betas_dir(nsd_root, subject) / f"{hemi}.betas_session{int(session):02d}.mgh"


def expdesign_path(nsd_root: str | os.PathLike) -> Path:
    """``nsddata/experiments/nsd/nsd_expdesign.mat``."""
    return Path(nsd_root) / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"


def stim_info_path(nsd_root: str | os.PathLike) -> Path:
    """``nsddata/experiments/nsd/nsd_stim_info_merged.csv``."""
    return Path(nsd_root) / "nsddata" / "experiments" / "nsd" / "nsd_stim_info_merged.csv"


def stimuli_path(nsd_root: str | os.PathLike) -> Path:
    """``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5``."""
    return Path(nsd_root) / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"


def image_id_from_nsd_id(nsd_id: int | np.ndarray) -> str | list[str]:
    """Workflow image id of a 0-based nsdId: ``42 -> 'nsd00042'``."""
    if np.ndim(nsd_id) == 0:
        return f"nsd{int(nsd_id):05d}"
    return [f"nsd{int(i):05d}" for i in np.asarray(nsd_id)]


# ----------------------------------------------------------------------------- design


def load_expdesign(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``nsd_expdesign.mat``.

    Returns
    -------
    design : dict
        ``masterordering`` (n_trials,) int64, 1-based indices into a subject's images;
        ``subjectim`` (n_subjects, n_images) int64, 1-based 73k ids;
        ``sharedix`` (n_shared,) int64, 1-based 73k ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NSD experimental design not found: {path}")
    mat = scipy.io.loadmat(str(path))
    for key in ("masterordering", "subjectim"):
        if key not in mat:
            raise ValueError(f"{path}: missing variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
    master = np.asarray(mat["masterordering"]).astype(np.int64).reshape(-1)
    subjectim = np.atleast_2d(np.asarray(mat["subjectim"]).astype(np.int64))
    shared = np.asarray(mat.get("sharedix", np.zeros(0))).astype(np.int64).reshape(-1)
    if master.size == 0 or master.min() < 1 or master.max() > subjectim.shape[1]:
        raise ValueError(
            f"{path}: masterordering must hold 1-based indices in 1..{subjectim.shape[1]} "
            f"(got range {master.min() if master.size else None}..{master.max() if master.size else None})"
        )
    if subjectim.min() < 1:
        raise ValueError(f"{path}: subjectim must hold 1-based 73k ids (found {subjectim.min()})")
    return {"masterordering": master, "subjectim": subjectim, "sharedix": shared}


def trial_nsd_ids(design: dict[str, np.ndarray], subject: int | str) -> np.ndarray:
    """0-based nsdId shown at each global trial of a subject.

    ``nsdId[t] = subjectim[s, masterordering[t] - 1] - 1`` with ``s = subject - 1``.

    Returns
    -------
    nsd_ids : ndarray, shape (n_trials,), int64
    """
    s = subject_number(subject) - 1
    subjectim = design["subjectim"]
    if s >= subjectim.shape[0]:
        raise ValueError(f"subject {subject_name(subject)} not in the design (subjectim has {subjectim.shape[0]} rows)")
    return subjectim[s, design["masterordering"] - 1] - 1


# ----------------------------------------------------------------------------- betas I/O


def find_sessions(nsd_root: str | os.PathLike, subject: int | str) -> list[int]:
    """Session numbers with a beta file for either hemisphere (sorted)."""
    d = betas_dir(nsd_root, subject)
    if not d.is_dir():
        raise FileNotFoundError(f"no betas directory for {subject_name(subject)}: {d}")
    found = {int(m.group(2)) for p in d.iterdir() if (m := _SESSION_RE.match(p.name))}
    return sorted(found)


def resolve_sessions(
    nsd_root: str | os.PathLike,
    subject: int | str,
    sessions: Sequence[int] | None = None,
    n_sessions: int | None = None,
) -> list[int]:
    """Sessions to use, checking that every needed file exists.

    Parameters
    ----------
    sessions : sequence of int, optional
        Explicit 1-based sessions (limits the analysis; other files are ignored).
    n_sessions : int, optional
        Expected number of sessions (1..n_sessions), e.g. the published count
        (:data:`NSD_SESSIONS_PER_SUBJECT`). When both are None, sessions
        1..max(found) are expected: a gap is an error.

    Raises
    ------
    FileNotFoundError
        Naming every expected lh/rh beta file that is missing.
    """
    if sessions is not None:
        wanted = sorted({int(k) for k in sessions})
        if not wanted or wanted[0] < 1:
            raise ValueError(f"sessions must be positive 1-based session numbers, got {sessions}")
    elif n_sessions is not None:
        wanted = list(range(1, int(n_sessions) + 1))
    else:
        found = find_sessions(nsd_root, subject)
        if not found:
            raise FileNotFoundError(f"no {{lh,rh}}.betas_sessionNN.mgh files in {betas_dir(nsd_root, subject)}")
        wanted = list(range(1, found[-1] + 1))
    missing = [
        betas_path(nsd_root, subject, hemi, k)
        for k in wanted
        for hemi in HEMIS
        if not betas_path(nsd_root, subject, hemi, k).is_file()
    ]
    if missing:
        listed = ", ".join(str(p) for p in missing[:10])
        raise FileNotFoundError(
            f"{len(missing)} beta file(s) missing for sessions {wanted[0]}..{wanted[-1]} of "
            f"{subject_name(subject)} (limit the sessions in the config if this is intended): {listed}"
        )
    return wanted


def mgh_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(V, T) of a betas .mgh file from its header (no data read)."""
    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 4 or shape[1] != 1 or shape[2] != 1:
        raise ValueError(f"{path}: expected betas of shape (n_vertices, 1, 1, n_trials), got {shape}")
    return shape[0], shape[3]


def read_betas_session(path: str | os.PathLike, n_vertices: int) -> np.ndarray:
    """Read one hemisphere-session of betas as a native float32 (T, V) array.

    MGH stores frames contiguously (vertex index fastest), so the file is read
    straight into a (T, V) array and byte-swapped in place: one copy in memory.

    Parameters
    ----------
    path : path
        ``{lh,rh}.betas_sessionNN.mgh``.
    n_vertices : int
        Expected vertices per hemisphere (from the root's surface).

    Returns
    -------
    betas : ndarray, shape (T, V), float32, percent signal change
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"beta file not found: {path}")
    img = nib.load(str(path))
    v, t = mgh_shape(path)
    if v != n_vertices:
        raise ValueError(
            f"{path}: {v} vertices per hemisphere, expected {n_vertices} (the vertex count of this root's "
            f"fsaverage surface); betas and surface must share a resolution"
        )
    dtype = img.header.get_data_dtype()
    if dtype.kind == "f" and dtype.itemsize == 4 and not path.name.endswith(".mgz"):
        data = np.fromfile(path, dtype=dtype, count=v * t, offset=img.header.get_data_offset())
        if data.size != v * t:
            raise ValueError(f"{path}: truncated file ({data.size} of {v * t} values)")
        if dtype.byteorder not in ("=", "|") and dtype.byteorder != np.dtype(np.float32).byteorder:
            data.byteswap(inplace=True)
            data = data.view(dtype.newbyteorder())
        return data.astype(np.float32, copy=False).reshape(t, v)
    # other types: let nibabel decode (e.g. int16 with scaling)
    return np.asarray(img.get_fdata(dtype=np.float32)).reshape(v, t).T.copy()


def zscore_session_inplace(betas: np.ndarray, block: int = 16384) -> np.ndarray:
    """Z-score each vertex across trials in place (mean and std with ddof=0).

    Sums are accumulated in float64 and the centring/scaling is done in float32
    in place, so no float64 copy of the session is ever made.

    Parameters
    ----------
    betas : ndarray, shape (T, V), float32
        One session of one hemisphere; overwritten with z-scores.
    block : int
        Vertices processed at once (bounds the float32 temporary to T x block).

    Returns
    -------
    invalid : ndarray, shape (V,), bool
        True where a vertex has a non-finite value in some trial or zero variance;
        its column is set to NaN.
    """
    if betas.dtype != np.float32 or betas.ndim != 2:
        raise ValueError(f"expected a float32 (T, V) array, got {betas.dtype} {betas.shape}")
    n_t, n_v = betas.shape
    invalid = np.zeros(n_v, dtype=bool)
    for c0 in range(0, n_v, block):
        sub = betas[:, c0 : c0 + block]  # view: edited in place
        mean = sub.mean(axis=0, dtype=np.float64)
        sub -= mean.astype(np.float32)
        var = np.square(sub).sum(axis=0, dtype=np.float64) / n_t
        bad = ~np.isfinite(mean) | ~np.isfinite(var) | (var <= 0)
        scale = np.where(bad, np.nan, 1.0 / np.sqrt(np.where(bad, 1.0, var)))
        sub *= scale.astype(np.float32)
        invalid[c0 : c0 + block] = bad
    return invalid


# ----------------------------------------------------------------------------- preparation


def _new_temp(directory: Path, suffix: str) -> Path:
    """Empty temporary file next to the final output (same filesystem, so os.replace is atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix)
    os.close(fd)
    return Path(tmp)


def prepare_nsd_subject(
    nsd_root: str | os.PathLike,
    subject: int | str,
    out_betas: str | os.PathLike,
    out_table: str | os.PathLike,
    out_mask: str | os.PathLike,
    sessions: Sequence[int] | None = None,
    n_sessions: int | None = None,
    block_vertices: int = 16384,
) -> dict:
    """Z-score per session, average repetitions per image, mask invalid vertices, write outputs.

    Parameters
    ----------
    nsd_root : path
        NSD root (real or simulated).
    subject : int or str
        ``1`` or ``'subj01'``.
    out_betas : path
        Output ``.npy``, float32, shape (n_images, n_kept_vertices): mean z-scored
        beta (unitless) per image; columns = kept vertices, lh then rh.
    out_table : path
        Output Parquet, one row per output row: ``subject``, ``image_id``
        (``nsd{nsdId:05d}``), ``nsdId`` (0-based), ``nsd73k`` (1-based), ``n_repetitions``,
        ``shared1000`` (bool).
    out_mask : path
        Output ``.npy`` bool, shape (2 V,): True for kept vertices (lh then rh).
    sessions : sequence of int, optional
        Explicit 1-based sessions to use (e.g. ``[1, 2]`` to limit a run).
    n_sessions : int, optional
        Expected number of sessions (files 1..n_sessions must all exist). With both
        ``sessions`` and ``n_sessions`` None, sessions 1..max(found) are used and a gap
        is an error. Sessions beyond the last file cannot be detected without
        ``n_sessions`` (real subjects completed 30-40 of the 40 designed sessions).
    block_vertices : int
        Vertices per z-scoring block (memory/speed trade-off only).

    Returns
    -------
    summary : dict
        ``n_images``, ``n_trials``, ``sessions``, ``n_vertices`` (2 V), ``n_kept``,
        ``n_excluded`` and per-hemisphere ``n_excluded_lh``/``n_excluded_rh``,
        ``n_images_not_shown`` (images of the subject's design never shown in the
        sessions used).

    Raises
    ------
    FileNotFoundError
        Missing design file or beta file (named).
    ValueError
        Beta file with a vertex count that does not match the surface, inconsistent
        trial counts, or more sessions than the design allows.

    Notes
    -----
    Outputs are written through temporary files and renamed at the end: a failure
    leaves none of the three outputs behind as if complete.
    """
    nsd_root = Path(nsd_root)
    subj = subject_name(subject)
    design = load_expdesign(expdesign_path(nsd_root))
    nsd_ids = trial_nsd_ids(design, subject)
    n_vertices = n_vertices_per_hemi(nsd_root, "lh")
    n_vertices_rh = n_vertices_per_hemi(nsd_root, "rh")
    if n_vertices_rh != n_vertices:
        raise ValueError(f"{nsd_root}: lh and rh fsaverage surfaces differ in vertex count ({n_vertices} vs {n_vertices_rh})")
    used = resolve_sessions(nsd_root, subject, sessions, n_sessions)

    # trials per session from the headers: all files must agree
    shapes = {(hemi, k): mgh_shape(betas_path(nsd_root, subject, hemi, k)) for k in used for hemi in HEMIS}
    for (hemi, k), (v, _) in shapes.items():
        if v != n_vertices:
            raise ValueError(
                f"{betas_path(nsd_root, subject, hemi, k)}: {v} vertices per hemisphere, expected {n_vertices} "
                f"(the vertex count of {nsd_root}'s fsaverage surface)"
            )
    n_trials_per_session = {t for _, t in shapes.values()}
    if len(n_trials_per_session) != 1:
        detail = ", ".join(f"{h} session {k}: {t}" for (h, k), (_, t) in sorted(shapes.items()))
        raise ValueError(f"{subj}: beta files disagree on the number of trials per session ({detail})")
    n_t = n_trials_per_session.pop()
    if used[-1] * n_t > nsd_ids.size:
        raise ValueError(
            f"{subj}: session {used[-1]} with {n_t} trials per session needs {used[-1] * n_t} trials, but "
            f"masterordering in {expdesign_path(nsd_root)} has {nsd_ids.size}"
        )

    trial_ids = np.concatenate([nsd_ids[(k - 1) * n_t : k * n_t] for k in used])
    images, counts = np.unique(trial_ids, return_counts=True)
    row_of = {int(i): r for r, i in enumerate(images)}
    subject_images = np.unique(design["subjectim"][subject_number(subject) - 1] - 1)
    n_not_shown = int(np.setdiff1d(subject_images, images).size)
    log.info(
        "%s: %d sessions (%s), %d trials/session, %d images (%d of the design's images not shown in these sessions), "
        "%d vertices per hemisphere",
        subj, len(used), ",".join(map(str, used)), n_t, images.size, n_not_shown, n_vertices,
    )

    out_betas, out_table, out_mask = Path(out_betas), Path(out_table), Path(out_mask)
    invalid = np.zeros(2 * n_vertices, dtype=bool)
    acc_path = _new_temp(out_betas.parent, ".sums.npy.tmp")
    final_tmp: Path | None = None
    writing = False
    try:
        # per-image sums live on disk; the memmap is re-opened per session so that its
        # resident pages are released (unmapped) after each session
        np.lib.format.open_memmap(acc_path, mode="w+", dtype=np.float32, shape=(images.size, 2 * n_vertices)).flush()
        pbar = tqdm(total=len(used) * 2, desc=f"{subj} sessions x hemis", unit="file")
        for k in used:
            rows = np.array([row_of[int(i)] for i in nsd_ids[(k - 1) * n_t : k * n_t]])
            acc = np.load(acc_path, mmap_mode="r+")
            for h, hemi in enumerate(HEMIS):
                data = read_betas_session(betas_path(nsd_root, subject, hemi, k), n_vertices)
                bad = zscore_session_inplace(data, block=block_vertices)
                invalid[h * n_vertices : (h + 1) * n_vertices] |= bad
                cols = slice(h * n_vertices, (h + 1) * n_vertices)
                for j, r in enumerate(rows):
                    acc[r, cols] += data[j]
                del data
                pbar.update(1)
            acc.flush()
            del acc
        pbar.close()

        keep = ~invalid
        n_kept = int(keep.sum())
        final_tmp = _new_temp(out_betas.parent, ".npy.tmp")
        inv_counts = (1.0 / counts).astype(np.float32)
        chunk = max(1, int(2**28 // max(1, 8 * 2 * n_vertices)))  # ~256 MB of rows at a time
        with open(final_tmp, "wb") as fh:  # plain writes: output pages are not mapped into this process
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                     "shape": (int(images.size), n_kept)}
            )
            for r0 in range(0, images.size, chunk):
                acc = np.load(acc_path, mmap_mode="r")
                block = np.asarray(acc[r0 : r0 + chunk])[:, keep] * inv_counts[r0 : r0 + chunk, None]
                del acc
                fh.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())

        sharedix = set((design["sharedix"] - 1).tolist())
        table = pd.DataFrame(
            {
                "subject": subj,
                "image_id": image_id_from_nsd_id(images),
                "nsdId": images.astype(np.int64),
                "nsd73k": images.astype(np.int64) + 1,
                "n_repetitions": counts.astype(np.int64),
                "shared1000": np.array([int(i) in sharedix for i in images], dtype=bool),
            }
        )
        writing = True
        save_npy_atomic(out_mask, keep)
        save_parquet_atomic(table, out_table)
        os.replace(final_tmp, out_betas)
        final_tmp = None
    except BaseException:
        for p in (final_tmp, acc_path):
            if p is not None:
                Path(p).unlink(missing_ok=True)
        if writing:  # never leave a mix of new and stale outputs
            for p in (out_betas, out_table, out_mask):
                p.unlink(missing_ok=True)
        raise
    finally:
        acc_path.unlink(missing_ok=True)

    n_ex = [int(invalid[:n_vertices].sum()), int(invalid[n_vertices:].sum())]
    log.info(
        "%s: excluded %d of %d vertices (lh %d, rh %d) with NaN or zero variance in some session; wrote %s (%d x %d)",
        subj, sum(n_ex), 2 * n_vertices, n_ex[0], n_ex[1], out_betas, images.size, n_kept,
    )
    return {
        "subject": subj,
        "sessions": used,
        "n_trials": int(trial_ids.size),
        "n_images": int(images.size),
        "n_images_not_shown": n_not_shown,
        "n_vertices": 2 * n_vertices,
        "n_kept": n_kept,
        "n_excluded": sum(n_ex),
        "n_excluded_lh": n_ex[0],
        "n_excluded_rh": n_ex[1],
    }
