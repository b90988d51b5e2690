"""fsaverage cortical surface maps for the paper figures.

The paper's fMRI maps (Raugel et al. 2026) are drawn on the fsaverage surface,
"surface-smoothed (3 iterations, geodesic neighbor averaging, weight = 0.3). Only
significant voxels are plotted". This module provides:

* :func:`read_surfaces`: both hemispheres of one FreeSurfer surface (``surf/{lh,rh}.<surface>``);
* :func:`mesh_neighbors`: the one-ring (triangle edge) adjacency of a mesh;
* :func:`smooth_on_surface`: the paper's iterated neighbour averaging, NaN-aware (non-significant
  vertices, set to NaN by the caller, stay NaN and never leak into their neighbours);
* :func:`mean_curvature_sign`, :func:`curvature_background`: a cheap convex / concave proxy
  used as the grey background;
* :func:`plot_surface_panel`: one figure panel (both hemispheres, a few views, one labelled
  horizontal colour bar) drawn with nilearn's matplotlib engine, so it works offline and
  under the ``Agg`` backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.sparse import coo_matrix, csr_matrix

from brainprop.utils import get_logger

log = get_logger(__name__)

HEMIS = ("lh", "rh")
NILEARN_HEMI = {"lh": "left", "rh": "right"}
VIEWS = ("lateral", "medial", "dorsal", "ventral", "anterior", "posterior")
# background grey levels (nilearn's matplotlib engine maps [0, 1] through ``gray_r``)
BG_CONVEX, BG_CONCAVE = 0.25, 0.55
TITLE_IN, CBAR_IN = 0.28, 0.55  # panel title and colour-bar rows (inches)


def read_surfaces(
    fsaverage_dir: str | os.PathLike, surface: str = "inflated"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read both hemispheres of one FreeSurfer surface.

    Parameters
    ----------
    fsaverage_dir : path
        A FreeSurfer subject folder (e.g. ``nsddata/freesurfer/fsaverage``) holding
        ``surf/lh.<surface>`` and ``surf/rh.<surface>``.
    surface : str
        Surface name: ``inflated``, ``white``, ``pial``, ``sphere``, ...

    Returns
    -------
    surfaces : dict
        ``{"lh": (coords, faces), "rh": (coords, faces)}`` with coords of shape (V, 3)
        float64 and faces of shape (F, 3) int64 (0-based vertex indices).

    Raises
    ------
    FileNotFoundError
        Naming the missing hemisphere file.
    ValueError
        If the two hemispheres have different vertex counts.
    """
    surf_dir = Path(fsaverage_dir) / "surf"
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for hemi in HEMIS:
        path = surf_dir / f"{hemi}.{surface}"
        if not path.is_file():
            raise FileNotFoundError(f"{hemi} {surface} surface not found: {path}")
        coords, faces = nib.freesurfer.read_geometry(str(path))
        out[hemi] = (np.asarray(coords, dtype=np.float64), np.asarray(faces, dtype=np.int64))
    n_lh, n_rh = len(out["lh"][0]), len(out["rh"][0])
    if n_lh != n_rh:
        raise ValueError(
            f"{surf_dir}: expected the same number of vertices in both hemispheres of the "
            f"{surface!r} surface, got lh {n_lh} and rh {n_rh}"
        )
    log.info("read %s surfaces from %s (%d vertices per hemisphere)", surface, surf_dir, n_lh)
    return out


def _check_faces(faces, n_vertices: int) -> np.ndarray:
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {faces.shape}")
    if faces.size and not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must hold integer vertex indices, got dtype {faces.dtype}")
    faces = faces.astype(np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
        raise ValueError(
            f"faces index vertices outside 0..{n_vertices - 1} "
            f"(found {faces.min()}..{faces.max()} for {n_vertices} vertices)"
        )
    return faces


def mesh_neighbors(faces: np.ndarray, n_vertices: int) -> csr_matrix:
    """One-ring adjacency of a triangle mesh.

    Parameters
    ----------
    faces : ndarray, shape (F, 3)
        0-based vertex indices.
    n_vertices : int
        Number of vertices V (vertices in no face have no neighbour).

    Returns
    -------
    adjacency : scipy.sparse.csr_matrix, shape (V, V), float64
        Symmetric, 1 where two vertices share a triangle edge, 0 elsewhere (no self loops).
    """
    n_vertices = int(n_vertices)
    if n_vertices < 0:
        raise ValueError(f"n_vertices must be >= 0, got {n_vertices}")
    faces = _check_faces(faces, n_vertices)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = edges[edges[:, 0] != edges[:, 1]]  # degenerate triangles: no self loops
    edges = np.unique(np.sort(edges, axis=1), axis=0)
    rows = np.concatenate([edges[:, 0], edges[:, 1]])
    cols = np.concatenate([edges[:, 1], edges[:, 0]])
    adj = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_vertices, n_vertices)).tocsr()
    adj.sort_indices()
    return adj


def smooth_on_surface(
    values: np.ndarray, faces: np.ndarray, iterations: int = 3, weight: float = 0.3
) -> np.ndarray:
    """Iterated one-ring neighbour averaging (the paper's surface smoothing), NaN-aware.

    At each iteration, simultaneously for every vertex ``i`` whose value is finite and which
    has at least one finite neighbour::

        v[i] <- (1 - weight) * v[i] + weight * mean(v[j] for finite neighbours j of i)

    Non-finite vertices (NaN: not significant / no data) stay as they are and do not
    contribute to their neighbours; a finite vertex without finite neighbours is unchanged.

    Parameters
    ----------
    values : array-like, shape (V,)
        One hemisphere's map.
    faces : ndarray, shape (F, 3)
        That hemisphere's triangles (0-based).
    iterations : int
        Number of iterations (paper: 3); 0 returns a copy.
    weight : float
        Weight of the neighbour mean, in [0, 1] (paper: 0.3).

    Returns
    -------
    smoothed : ndarray, shape (V,), float64
    """
    v = np.array(values, dtype=np.float64)  # copy
    if v.ndim != 1:
        raise ValueError(f"values must have shape (V,) for one hemisphere, got {v.shape}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    if not 0.0 <= float(weight) <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    adj = mesh_neighbors(faces, len(v))
    if iterations == 0 or weight == 0:
        return v
    finite = np.isfinite(v)
    n_finite_nb = adj @ finite.astype(np.float64)  # constant: the finite set never changes
    update = finite & (n_finite_nb > 0)
    for _ in range(int(iterations)):
        total = adj @ np.where(finite, v, 0.0)
        v[update] = (1.0 - weight) * v[update] + weight * total[update] / n_finite_nb[update]
    return v


def mean_curvature_sign(coords: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Cheap convexity proxy: +1 on convex vertices (gyral crowns), -1 on concave ones (sulci).

    The sign of the dot product between the (area-weighted) vertex normal and the
    displacement of the vertex from the mean of its one-ring neighbours (the umbrella
    Laplacian, which points along the mean-curvature normal). Normals are oriented
    outwards whatever the triangle winding (flipped if they point inwards on average).

    Parameters
    ----------
    coords : ndarray, shape (V, 3)
    faces : ndarray, shape (F, 3)

    Returns
    -------
    sign : ndarray, shape (V,), float64
        +1 convex, -1 concave, 0 flat or isolated vertex.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape (V, 3), got {coords.shape}")
    faces = _check_faces(faces, len(coords))
    tri = coords[faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 area
    normals = np.zeros_like(coords)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    if np.sum(normals * (coords - coords.mean(axis=0))) < 0:
        normals = -normals  # inward winding
    adj = mesh_neighbors(faces, len(coords))
    degree = np.asarray(adj.sum(axis=1)).ravel()
    mean_nb = (adj @ coords) / np.maximum(degree, 1)[:, None]
    displacement = np.where(degree[:, None] > 0, coords - mean_nb, 0.0)
    return np.sign(np.sum(normals * displacement, axis=1))


def curvature_background(surfaces: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Two-grey background map from :func:`mean_curvature_sign` (convex light, concave darker).

    Pass the ``white`` (or ``pial``) surfaces for the detailed folding pattern, or the
    ``inflated`` ones (the default of :func:`plot_surface_panel`) for the main sulci only.

    Parameters
    ----------
    surfaces : dict
        ``{"lh": (coords, faces), "rh": (coords, faces)}`` as from :func:`read_surfaces`.

    Returns
    -------
    bg_map : ndarray, shape (2V,), float64
        Grey levels in [0, 1] (lh then rh), for ``plot_surface_panel(..., bg_map=...)``.
    """
    _split_hemis(surfaces, None)
    return np.concatenate(
        [np.where(mean_curvature_sign(*surfaces[h]) > 0, BG_CONVEX, BG_CONCAVE) for h in HEMIS]
    )


def _split_hemis(surfaces: dict, values) -> tuple[int, np.ndarray]:
    missing = [h for h in HEMIS if h not in surfaces]
    if missing:
        raise ValueError(f"surfaces must hold 'lh' and 'rh' (coords, faces), missing {missing}")
    n = len(surfaces["lh"][0])
    if len(surfaces["rh"][0]) != n:
        raise ValueError(
            f"expected the same number of vertices in both hemispheres, got lh {n} and rh {len(surfaces['rh'][0])}"
        )
    if values is None:
        return n, None
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (2 * n,):
        raise ValueError(f"values must have shape (2V,) = ({2 * n},) (lh then rh), got {values.shape}")
    return n, values


def plot_surface_panel(
    fig,
    subplotspec,
    surfaces: dict[str, tuple[np.ndarray, np.ndarray]],
    values: np.ndarray,
    *,
    cmap="viridis",
    vmin: float,
    vmax: float,
    title: str | None = None,
    views: tuple[str, ...] = ("lateral", "medial", "ventral"),
    smooth: tuple[int, float] | None = (3, 0.3),
    colorbar_label: str,
    bg_map: np.ndarray | None = None,
    rasterized: bool = True,
) -> list:
    """Draw one figure panel: both hemispheres of a surface map and one colour bar.

    Layout inside ``subplotspec``: the title, then one row per view with the left
    hemisphere in the left column and the right hemisphere in the right column, then
    one labelled horizontal colour bar shared by all views. NaN vertices (e.g. not
    significant) show only the grey background; a face is coloured only if its three
    vertices are finite.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    subplotspec : matplotlib.gridspec.SubplotSpec
        Where the panel goes, e.g. ``GridSpec(1, 3, figure=fig)[0, 1]``.
    surfaces : dict
        ``{"lh": (coords, faces), "rh": (coords, faces)}`` as from :func:`read_surfaces`
        (usually the ``inflated`` surface).
    values : array-like, shape (2V,)
        Left hemisphere then right hemisphere; NaN = not shown.
    cmap : str or matplotlib colormap
    vmin, vmax : float
        Colour range (values outside take the end colours).
    title : str or None
        Title above the panel.
    views : tuple of str
        Rows, among ``lateral, medial, dorsal, ventral, anterior, posterior``.
    smooth : (iterations, weight) or None
        :func:`smooth_on_surface` applied per hemisphere before plotting; None disables it.
    colorbar_label : str
        Label of the colour bar.
    bg_map : array-like, shape (2V,), or None
        Background grey levels in [0, 1] (0 white, 1 black). Default:
        :func:`curvature_background` of the plotted meshes (on ``inflated``: the main sulci);
        ``curvature_background(read_surfaces(d, "white"))`` shows the full folding pattern.
    rasterized : bool
        Rasterize the surface polygons (small, fast vector outputs; no effect on PNG).

    Returns
    -------
    axes : list of matplotlib axes
        The 3D axes (row-major: view by hemisphere, lh first), then the colour-bar axes.
    """
    import matplotlib as mpl
    from matplotlib.gridspec import GridSpecFromSubplotSpec
    from nilearn.plotting import plot_surf

    n, values = _split_hemis(surfaces, values)
    views = tuple(views)
    bad = [v for v in views if v not in VIEWS]
    if not views or bad:
        raise ValueError(f"views must be a non-empty tuple among {VIEWS}, got {views}")
    if not (np.isfinite(vmin) and np.isfinite(vmax) and vmin < vmax):
        raise ValueError(f"expected finite vmin < vmax, got vmin={vmin}, vmax={vmax}")
    if smooth is not None and len(smooth) != 2:
        raise ValueError(f"smooth must be (iterations, weight) or None, got {smooth!r}")
    if bg_map is not None:
        bg_map = np.asarray(bg_map, dtype=np.float64)
        if bg_map.shape != (2 * n,):
            raise ValueError(f"bg_map must have shape (2V,) = ({2 * n},), got {bg_map.shape}")
    else:
        bg_map = curvature_background(surfaces)
    cmap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    norm = mpl.colors.Normalize(vmin=vmin, vmax=vmax)

    per_hemi = {}
    for k, hemi in enumerate(HEMIS):
        coords, faces = surfaces[hemi]
        coords = np.array(coords, dtype=np.float64)  # copy: nilearn centres the mesh in place
        faces = np.asarray(faces, dtype=np.int64)
        hemi_values = values[k * n:(k + 1) * n]
        if smooth is not None:
            hemi_values = smooth_on_surface(hemi_values, faces, iterations=smooth[0], weight=smooth[1])
        hemi_bg = bg_map[k * n:(k + 1) * n]
        # nilearn hides faces whose mean is NaN; inf would be coloured, so make it NaN too
        hemi_values = np.where(np.isfinite(hemi_values), hemi_values, np.nan)
        per_hemi[hemi] = (coords, faces, hemi_values, hemi_bg)

    # row heights in inches, so the title and the colour bar (ticks + label) never get squeezed
    box = subplotspec.get_position(fig)
    height_in, width_in = box.height * fig.get_figheight(), box.width * fig.get_figwidth()
    title_in = TITLE_IN if title else 0.0
    view_in = max(0.2, (height_in - title_in - CBAR_IN) / len(views))
    grid = GridSpecFromSubplotSpec(
        len(views) + 2, 2, subplot_spec=subplotspec,
        height_ratios=[title_in] + [view_in] * len(views) + [CBAR_IN], hspace=0.0, wspace=0.0,
    )
    if title:
        title_ax = fig.add_subplot(grid[0, :])
        title_ax.set_axis_off()
        title_ax.text(0.5, 0.1, title, ha="center", va="bottom", fontsize="medium",
                      fontweight="bold", transform=title_ax.transAxes)

    axes = []
    for row, view in enumerate(views):
        for col, hemi in enumerate(HEMIS):
            coords, faces, hemi_values, hemi_bg = per_hemi[hemi]
            ax = fig.add_subplot(grid[row + 1, col], projection="3d")
            plot_surf(
                (coords.copy(), faces), surf_map=hemi_values, bg_map=hemi_bg,
                hemi=NILEARN_HEMI[hemi], view=view, engine="matplotlib", cmap=cmap,
                colorbar=False, threshold=None, vmin=vmin, vmax=vmax, axes=ax, figure=fig,
            )
            ax.set_box_aspect(None, zoom=1.45)
            for coll in ax.collections:
                coll.set_rasterized(rasterized)
            if row == 0:
                ax.text2D(0.5, 0.98, "L" if hemi == "lh" else "R",
                          transform=ax.transAxes, ha="center", va="top", fontsize="small", color="0.3")
            if col == 0:
                ax.text2D(0.0, 0.5, view, transform=ax.transAxes, rotation=90,
                          ha="left", va="center", fontsize="x-small", color="0.4")
            axes.append(ax)

    cbar_grid = GridSpecFromSubplotSpec(
        2, 3, subplot_spec=grid[-1, :], width_ratios=[0.15, 0.7, 0.15], height_ratios=[0.12, CBAR_IN - 0.12],
        hspace=0.0,
    )
    cax = fig.add_subplot(cbar_grid[0, 1])
    cbar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    cbar.set_label(colorbar_label, fontsize="small", labelpad=2)
    cbar.ax.tick_params(labelsize="x-small", length=2, pad=1)
    # about one tick label per half inch of colour bar
    cbar.ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(nbins=max(2, int(0.7 * width_in / 0.5))))
    axes.append(cax)
    n_shown = int(np.isfinite(np.concatenate([per_hemi[h][2] for h in HEMIS])).sum())
    log.info("surface panel %r: %d of %d vertices shown, %d views", title, n_shown, 2 * n, len(views))
    return axes
