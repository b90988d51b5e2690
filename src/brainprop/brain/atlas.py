"""HCP-MMP1 atlas on fsaverage and cortical geometry: ROI centroids and distance from V1.

Files read (NSD layout, relative to the NSD root):

- ``nsddata/freesurfer/fsaverage/label/{lh,rh}.HCP_MMP1.mgz``: one integer label
  per vertex (0 = unknown, 1..180 areas), shape (V, 1, 1).
- ``nsddata/freesurfer/fsaverage/label/HCP_MMP1.mgz.ctab``: "idx name" lines.
- ``nsddata/freesurfer/fsaverage/surf/{lh,rh}.{white,pial,inflated,sphere}``:
  FreeSurfer geometry (coordinates in mm, triangles).

Distances from V1 are computed within each hemisphere (from that hemisphere's V1):

- ``dist_euclidean``: Euclidean distance (mm) between the ROI centroid and the V1
  centroid; a centroid is the mean of the ROI's vertex coordinates on the chosen
  surface (default ``white``). The sister paper's distance (Raugel et al. 2025).
- ``dist_geodesic``: mean over the ROI's vertices of the shortest-path length (mm)
  along the mesh edges of the chosen surface from the nearest V1 vertex (Dijkstra,
  all V1 vertices as sources). The figures' default (``figures.distance``).
- ``dist_geodesic_centroid``: the same shortest-path distance at the ROI vertex
  nearest to the ROI centroid.

These names (:data:`DISTANCES`) are the values of ``figures.distance``.

The paper ranks the 180 HCP-MMP1 areas with the hemispheres merged (its p-values imply about
60 best-encoded ROIs, a tercile of 180): :func:`merge_hemispheres` turns the per-hemisphere
table into one row per area (``hemi = "both"``), which :func:`analysis_rois` selects by
``figures.roi_hemispheres``.

Edge-graph distances slightly overestimate true geodesics (paths zig-zag along
triangle edges, typically by a few percent); the ranking of ROIs, which is what
the distance-vs-best-layer correlation uses, is unaffected in practice.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import dijkstra

from brainprop.utils import get_logger, save_npy_atomic, save_parquet_atomic

log = get_logger(__name__)

HEMIS = ("lh", "rh")
SURFACES = ("white", "pial", "inflated", "sphere")
#: Distance-from-V1 columns of the ROI table (the values of ``figures.distance``).
DISTANCES = ("dist_geodesic", "dist_euclidean", "dist_geodesic_centroid")
#: ``hemi`` of a row of :func:`merge_hemispheres` (an area of both hemispheres).
BOTH = "both"
#: ``figures.roi_hemispheres``: one ROI per area (paper) or per (hemisphere, area).
ROI_HEMISPHERES = ("merged", "separate")

#: First 75 HCP-MMP1 (Glasser et al. 2016) area names; ``HCP_MMP1_NAMES[i]`` has label ``i + 1``.
HCP_MMP1_NAMES: tuple[str, ...] = (
    "V1", "MST", "V6", "V2", "V3", "V4", "V8", "4", "3b", "FEF",
    "PEF", "55b", "V3A", "RSC", "POS2", "V7", "IPS1", "FFC", "V3B", "LO1",
    "LO2", "PIT", "MT", "A1", "PSL", "SFL", "PCV", "STV", "7Pm", "7m",
    "POS1", "23d", "v23ab", "d23ab", "31pv", "5m", "5mv", "23c", "5L", "24dd",
    "24dv", "7AL", "SCEF", "6ma", "7Am", "7PL", "7PC", "LIPv", "VIP", "MIP",
    "1", "2", "3a", "6d", "6mp", "6v", "p24pr", "33pr", "a24pr", "p32pr",
    "a24", "d32", "8BM", "p32", "10r", "47m", "8Av", "8Ad", "9m", "8BL",
    "9p", "10d", "8C", "44", "45",
)  # fmt: skip


def fsaverage_dir(nsd_root: str | os.PathLike) -> Path:
    """``<nsd_root>/nsddata/freesurfer/fsaverage``."""
    return Path(nsd_root) / "nsddata" / "freesurfer" / "fsaverage"


def label_path(nsd_root: str | os.PathLike, hemi: str, atlas: str = "HCP_MMP1") -> Path:
    """Path of the per-vertex label file ``label/{hemi}.{atlas}.mgz``."""
    _check_hemi(hemi)
    return fsaverage_dir(nsd_root) / "label" / f"{hemi}.{atlas}.mgz"


def ctab_path(nsd_root: str | os.PathLike, atlas: str = "HCP_MMP1") -> Path:
    """Path of the colour table ``label/{atlas}.mgz.ctab``."""
    return fsaverage_dir(nsd_root) / "label" / f"{atlas}.mgz.ctab"


def surface_path(nsd_root: str | os.PathLike, hemi: str, surface: str = "white") -> Path:
    """Path of the FreeSurfer surface ``surf/{hemi}.{surface}``."""
    _check_hemi(hemi)
    if surface not in SURFACES:
        raise ValueError(f"surface must be one of {SURFACES}, got {surface!r}")
    return fsaverage_dir(nsd_root) / "surf" / f"{hemi}.{surface}"


def _check_hemi(hemi: str) -> None:
    if hemi not in HEMIS:
        raise ValueError(f"hemi must be one of {HEMIS}, got {hemi!r}")


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_ctab(path: str | os.PathLike) -> dict[int, str]:
    """Read an ``idx name`` colour table (extra columns such as RGBA are ignored).

    Blank lines and lines starting with ``#`` are skipped.

    Returns
    -------
    names : dict int -> str
        Label index to area name, e.g. ``{0: 'Unknown', 1: 'V1', ...}``.
    """
    path = _require(Path(path), "colour table")
    names: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not re.fullmatch(r"-?\d+", parts[0]):
            raise ValueError(f"{path}:{lineno}: expected an 'idx name' line, got {line!r}")
        idx = int(parts[0])
        if idx in names:
            raise ValueError(f"{path}:{lineno}: label index {idx} listed twice")
        names[idx] = parts[1]
    return names


def normalize_area_name(name: str) -> str:
    """Strip HCP-style decorations: ``'L_V1_ROI' -> 'V1'``."""
    name = re.sub(r"^[LR]_", "", name)
    return re.sub(r"(_ROI)+$", "", name)


def v1_index(names: dict[int, str], source: str | os.PathLike = "colour table") -> int:
    """Label index of V1 in a colour table; ValueError naming ``source`` if absent."""
    hits = [i for i, n in names.items() if normalize_area_name(n) == "V1"]
    if len(hits) != 1:
        raise ValueError(
            f"{source}: expected exactly one area named 'V1' (distance from V1 needs it), found {len(hits)}"
        )
    return hits[0]


def read_surface(nsd_root: str | os.PathLike, hemi: str, surface: str = "white") -> tuple[np.ndarray, np.ndarray]:
    """Read one fsaverage surface.

    Returns
    -------
    coords : ndarray, shape (V, 3), float64, mm
    faces : ndarray, shape (F, 3), int64, 0-based vertex indices
    """
    path = _require(surface_path(nsd_root, hemi, surface), f"{hemi} {surface} surface")
    coords, faces = nib.freesurfer.read_geometry(str(path))
    return coords.astype(np.float64), faces.astype(np.int64)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a per-vertex label volume (``.mgz``, shape (V, 1, 1)) as int64 (V,)."""
    path = _require(Path(path), "label file")
    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 1 or int(np.prod(shape[1:])) != 1:
        raise ValueError(f"{path}: expected a per-vertex label volume of shape (V, 1, 1), got {shape}")
    data = np.asarray(img.dataobj).reshape(-1)
    if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
        raise ValueError(f"{path}: labels must be finite integers")
    return data.astype(np.int64)


def n_vertices_per_hemi(nsd_root: str | os.PathLike, hemi: str = "lh") -> int:
    """Number of vertices of one fsaverage hemisphere of this root.

    Read from ``surf/{hemi}.white`` (or any other surface present), else from the
    HCP_MMP1 label file. This is how loaders know whether a root is fsaverage
    (163842) or a simulated fsaverage5 (10242) without hard-coding either.
    """
    for surface in SURFACES:
        p = surface_path(nsd_root, hemi, surface)
        if p.is_file():
            coords, _ = nib.freesurfer.read_geometry(str(p))
            return int(coords.shape[0])
    p = label_path(nsd_root, hemi)
    if p.is_file():
        return int(nib.load(str(p)).shape[0])
    raise FileNotFoundError(
        f"cannot determine the number of vertices: no surface {fsaverage_dir(nsd_root) / 'surf'}/{hemi}.*"
        f" and no label file {p}"
    )


def load_atlas(nsd_root: str | os.PathLike, atlas: str = "HCP_MMP1") -> tuple[np.ndarray, dict[int, str]]:
    """Per-vertex labels of both hemispheres and the colour table.

    Returns
    -------
    labels : ndarray, shape (2 V,), int64
        Labels of lh vertices then rh vertices (0 = unknown).
    names : dict int -> str
    """
    names = read_ctab(ctab_path(nsd_root, atlas))
    parts = []
    for hemi in HEMIS:
        lab = read_labels(label_path(nsd_root, hemi, atlas))
        unknown = sorted(set(np.unique(lab).tolist()) - set(names))
        if unknown:
            raise ValueError(
                f"{label_path(nsd_root, hemi, atlas)}: labels {unknown[:10]} are not in {ctab_path(nsd_root, atlas)}"
            )
        parts.append(lab)
    if parts[0].shape != parts[1].shape:
        raise ValueError(f"lh and rh {atlas} label files have different vertex counts: {parts[0].size} vs {parts[1].size}")
    return np.concatenate(parts), names


def vertex_rois(nsd_root: str | os.PathLike, atlas: str = "HCP_MMP1") -> np.ndarray:
    """Per-vertex ROI label (lh vertices then rh vertices), for ROI means.

    Combine with the vertex mask written by :func:`brainprop.brain.nsd.prepare_nsd_subject`
    (``labels[mask]`` matches the columns of the prepared betas). The hemisphere of
    column ``j`` of a full-length array is ``'lh'`` if ``j < V`` else ``'rh'``.

    Returns
    -------
    labels : ndarray, shape (2 V,), int64
    """
    return load_atlas(nsd_root, atlas)[0]


def mesh_edge_graph(coords: np.ndarray, faces: np.ndarray) -> csr_matrix:
    """Symmetric sparse graph of mesh edges weighted by Euclidean edge length.

    Parameters
    ----------
    coords : ndarray, shape (V, 3)
    faces : ndarray, shape (F, 3), 0-based

    Returns
    -------
    graph : scipy.sparse.csr_matrix, shape (V, V)
    """
    coords = np.asarray(coords, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(coords)):
        raise ValueError(f"faces index vertices outside 0..{len(coords) - 1}")
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = np.unique(np.sort(edges, axis=1), axis=0)
    length = np.linalg.norm(coords[edges[:, 0]] - coords[edges[:, 1]], axis=1)
    n = len(coords)
    g = coo_matrix((length, (edges[:, 0], edges[:, 1])), shape=(n, n))
    return (g + g.T).tocsr()


def geodesic_distance(coords: np.ndarray, faces: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Shortest-path distance along mesh edges from the nearest source vertex.

    Parameters
    ----------
    coords : ndarray, shape (V, 3), mm
    faces : ndarray, shape (F, 3), 0-based
    sources : ndarray of int, shape (n_sources,)
        0-based source vertices (e.g. all V1 vertices).

    Returns
    -------
    distance : ndarray, shape (V,), float64, mm
        0 at sources, ``inf`` for vertices not connected to any source.
    """
    sources = np.unique(np.asarray(sources, dtype=np.int64))
    if sources.size == 0:
        raise ValueError("geodesic_distance needs at least one source vertex")
    graph = mesh_edge_graph(coords, faces)
    return dijkstra(graph, directed=False, indices=sources, min_only=True)


def roi_geometry(
    nsd_root: str | os.PathLike,
    surface: str = "white",
    atlas: str = "HCP_MMP1",
) -> pd.DataFrame:
    """ROI table with centroids and distances from V1, one row per (hemi, ROI).

    Parameters
    ----------
    nsd_root : path
        NSD root (real or simulated).
    surface : {'white', 'pial', 'inflated', 'sphere'}
        Surface for centroids and geodesic paths.
    atlas : str
        Atlas file stem (``HCP_MMP1``).

    Returns
    -------
    table : DataFrame
        Columns ``hemi`` (lh/rh), ``roi`` (int label), ``name``, ``n_vertices``,
        ``x, y, z`` (centroid, mm), ``dist_euclidean``, ``dist_geodesic``,
        ``dist_geodesic_centroid`` (mm, see module docstring). ROIs of the colour
        table absent from a hemisphere are left out (logged); label 0 is excluded.
    """
    labels_all, names = load_atlas(nsd_root, atlas)
    v1 = v1_index(names, ctab_path(nsd_root, atlas))
    n_v = labels_all.size // 2
    rows = []
    for h, hemi in enumerate(HEMIS):
        labels = labels_all[h * n_v : (h + 1) * n_v]
        coords, faces = read_surface(nsd_root, hemi, surface)
        if len(coords) != n_v:
            raise ValueError(
                f"{surface_path(nsd_root, hemi, surface)} has {len(coords)} vertices but "
                f"{label_path(nsd_root, hemi, atlas)} has {n_v} labels"
            )
        v1_vertices = np.flatnonzero(labels == v1)
        if v1_vertices.size == 0:
            raise ValueError(f"{label_path(nsd_root, hemi, atlas)}: no vertex carries the V1 label {v1}")
        geo = geodesic_distance(coords, faces, v1_vertices)
        v1_centroid = coords[v1_vertices].mean(axis=0)
        present = set(np.unique(labels).tolist())
        absent = sorted(i for i in names if i != 0 and i not in present)
        if absent:
            log.info("%s: %d of %d %s areas have no vertex in this hemisphere", hemi, len(absent), len(names) - 1, atlas)
        for roi in sorted(i for i in present if i != 0):
            idx = np.flatnonzero(labels == roi)
            centroid = coords[idx].mean(axis=0)
            d = geo[idx]
            if not np.all(np.isfinite(d)):
                log.warning("%s %s: %d vertices not connected to V1 on the %s mesh; left out of the mean",
                            hemi, names[roi], int(np.sum(~np.isfinite(d))), surface)
            nearest = idx[np.argmin(np.linalg.norm(coords[idx] - centroid, axis=1))]
            rows.append(
                dict(
                    hemi=hemi, roi=int(roi), name=normalize_area_name(names[roi]), n_vertices=int(idx.size),
                    x=centroid[0], y=centroid[1], z=centroid[2],
                    dist_euclidean=float(np.linalg.norm(centroid - v1_centroid)),
                    dist_geodesic=float(np.mean(d[np.isfinite(d)])) if np.any(np.isfinite(d)) else np.inf,
                    dist_geodesic_centroid=float(geo[nearest]),
                )
            )
    return pd.DataFrame(rows)


def merge_hemispheres(table: pd.DataFrame) -> pd.DataFrame:
    """One row per area from the per-(hemi, ROI) table of :func:`roi_geometry`: the paper's ROIs.

    Parameters
    ----------
    table : DataFrame
        One row per (hemi, roi) with ``hemi`` in lh/rh, ``roi``, ``name``, ``n_vertices`` and the
        :data:`DISTANCES` columns it has.

    Returns
    -------
    DataFrame
        One row per ``roi`` (sorted): ``hemi = "both"``, ``roi``, ``name``, ``n_vertices`` (sum over
        hemispheres), ``n_hemispheres`` and each distance as the ``n_vertices``-weighted mean of the
        hemispheres' distances (for ``dist_geodesic``, the mean over all the area's vertices of the
        distance from V1 of their own hemisphere). Centroids (x, y, z) are dropped: the mean of two
        hemispheres' centroids lies near the midline and is no location of the area.
    """
    for col in ("hemi", "roi", "name", "n_vertices"):
        if col not in table.columns:
            raise ValueError(f"ROI table: missing column {col!r}; has {list(table.columns)}")
    bad = set(table["hemi"]) - set(HEMIS)
    if bad:
        raise ValueError(f"ROI table hemi must be lh or rh to merge hemispheres, got {sorted(bad)}")
    if table.duplicated(["hemi", "roi"]).any():
        raise ValueError("ROI table has duplicate (hemi, roi) rows")
    names = table.groupby("roi")["name"].nunique()
    if (names > 1).any():
        raise ValueError(f"ROI labels {names.index[names > 1].tolist()[:10]} have different names in lh and rh")
    distances = [c for c in DISTANCES if c in table.columns]
    w = table["n_vertices"].to_numpy(np.float64)
    weighted = table[["roi"]].assign(_w=w, **{c: table[c].to_numpy(np.float64) * w for c in distances})
    sums = weighted.groupby("roi", sort=True).sum()
    out = table.groupby("roi", sort=True).agg(name=("name", "first"), n_vertices=("n_vertices", "sum"),
                                               n_hemispheres=("hemi", "nunique")).reset_index()
    for c in distances:
        out[c] = (sums[c] / sums["_w"]).to_numpy()
    out.insert(0, "hemi", BOTH)
    return out


def analysis_rois(table: pd.DataFrame, hemispheres: str = "merged") -> pd.DataFrame:
    """The ROIs of the analyses (``figures.roi_hemispheres``): ``"merged"`` one per area
    (:func:`merge_hemispheres`, the paper: 180 HCP-MMP1 areas) or ``"separate"`` one per
    (hemisphere, area) (the table as written, 360 areas)."""
    if hemispheres == "merged":
        return merge_hemispheres(table)
    if hemispheres == "separate":
        return table.reset_index(drop=True)
    raise ValueError(f"hemispheres must be one of {ROI_HEMISPHERES}, got {hemispheres!r}")


def vertex_distance_from_v1(
    nsd_root: str | os.PathLike, surface: str = "white", atlas: str = "HCP_MMP1"
) -> np.ndarray:
    """Per-vertex geodesic distance (mm) from the same hemisphere's V1, lh then rh.

    Returns
    -------
    distance : ndarray, shape (2 V,), float64
    """
    labels_all, names = load_atlas(nsd_root, atlas)
    v1 = v1_index(names, ctab_path(nsd_root, atlas))
    n_v = labels_all.size // 2
    out = []
    for h, hemi in enumerate(HEMIS):
        coords, faces = read_surface(nsd_root, hemi, surface)
        out.append(geodesic_distance(coords, faces, np.flatnonzero(labels_all[h * n_v : (h + 1) * n_v] == v1)))
    return np.concatenate(out)


def prepare_roi_table(
    nsd_root: str | os.PathLike,
    out_table: str | os.PathLike,
    out_vertex_rois: str | os.PathLike | None = None,
    surface: str = "white",
    atlas: str = "HCP_MMP1",
) -> pd.DataFrame:
    """Compute :func:`roi_geometry` and write it as Parquet (atomically), and optionally the per-vertex
    labels of :func:`vertex_rois` as ``.npy`` (2 V,) int64. Returns the table."""
    table = roi_geometry(nsd_root, surface=surface, atlas=atlas)
    if out_vertex_rois is not None:
        save_npy_atomic(out_vertex_rois, vertex_rois(nsd_root, atlas))
    save_parquet_atomic(table, out_table)
    log.info("wrote %d ROIs (%s surface) to %s", len(table), surface, out_table)
    return table
