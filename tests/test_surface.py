"""fsaverage surface maps: reading, mesh adjacency, NaN-aware smoothing, panel plotting."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.gridspec import GridSpec  # noqa: E402
from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # noqa: E402

from brainprop import surface  # noqa: E402

# strip of three triangles: 0-1-2, 1-2-3, 2-3-4
STRIP = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4]])
STRIP_EDGES = {(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4)}


def _edge_set(adj):
    coo = adj.tocoo()
    return {(int(i), int(j)) for i, j in zip(coo.row, coo.col)}


def _symmetric(edges):
    return edges | {(j, i) for i, j in edges}


# ----------------------------------------------------------------------------- adjacency


def test_mesh_neighbors_strip_and_isolated_vertex():
    adj = surface.mesh_neighbors(STRIP, 6)  # vertex 5 is in no face
    assert adj.shape == (6, 6)
    assert _edge_set(adj) == _symmetric(STRIP_EDGES)
    assert set(np.unique(adj.data)) == {1.0}  # binary, shared edges not counted twice
    assert adj.diagonal().sum() == 0
    assert adj[5].nnz == 0


def test_mesh_neighbors_tetrahedron_and_square():
    tet = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])
    all_pairs = {(i, j) for i in range(4) for j in range(4) if i != j}
    assert _edge_set(surface.mesh_neighbors(tet, 4)) == all_pairs
    square = np.array([[0, 1, 2], [0, 2, 3]])  # diagonal 0-2 only, no 1-3
    assert _edge_set(surface.mesh_neighbors(square, 4)) == _symmetric({(0, 1), (1, 2), (0, 2), (2, 3), (0, 3)})


def test_mesh_neighbors_rejects_bad_faces():
    with pytest.raises(ValueError, match=r"\(F, 3\)"):
        surface.mesh_neighbors(np.array([[0, 1]]), 3)
    with pytest.raises(ValueError, match="outside 0..2"):
        surface.mesh_neighbors(np.array([[0, 1, 3]]), 3)


# ----------------------------------------------------------------------------- smoothing


def test_smoothing_hand_computed_with_nan_vertex():
    # neighbours: 0:{1,2} 1:{0,2,3} 2:{0,1,3,4} 3:{1,2,4} 4:{2,3}; vertex 2 is NaN
    v = np.array([0.0, 10.0, np.nan, 4.0, 2.0])
    # weight 0.5, finite-neighbour means: 0 <- {1}, 1 <- {0, 3}, 3 <- {1, 4}, 4 <- {3}
    one = surface.smooth_on_surface(v, STRIP, iterations=1, weight=0.5)
    np.testing.assert_allclose(one, [5.0, 6.0, np.nan, 5.0, 3.0])
    two = surface.smooth_on_surface(v, STRIP, iterations=2, weight=0.5)
    np.testing.assert_allclose(two, [5.5, 5.5, np.nan, 4.75, 4.0])
    # the paper's weight 0.3, one iteration
    np.testing.assert_allclose(
        surface.smooth_on_surface(v, STRIP, iterations=1, weight=0.3), [3.0, 7.6, np.nan, 4.6, 2.6]
    )
    assert np.isnan(v[2]) and v[0] == 0.0  # input untouched


def test_smoothing_vertex_without_finite_neighbour_is_unchanged():
    faces = np.array([[0, 1, 2], [2, 3, 4]])
    v = np.array([7.0, np.nan, np.nan, 1.0, 3.0])
    out = surface.smooth_on_surface(v, faces, iterations=3, weight=0.3)
    assert out[0] == 7.0
    assert np.isnan(out[1]) and np.isnan(out[2])
    assert out[3] != 1.0 and out[4] != 3.0  # these two see each other


def test_constant_map_unchanged_and_weight_zero_identity():
    v = np.array([2.5, 2.5, np.nan, 2.5, 2.5])
    np.testing.assert_allclose(surface.smooth_on_surface(v, STRIP, iterations=5, weight=0.3), v)
    rng = np.random.default_rng(0)
    w = rng.normal(size=5)
    np.testing.assert_array_equal(surface.smooth_on_surface(w, STRIP, iterations=3, weight=0.0), w)
    out = surface.smooth_on_surface(w, STRIP, iterations=0)
    np.testing.assert_array_equal(out, w)
    assert out is not w
    assert not np.allclose(surface.smooth_on_surface(w, STRIP, iterations=3, weight=0.3), w)


def test_smoothing_validates_inputs():
    with pytest.raises(ValueError, match=r"shape \(V,\)"):
        surface.smooth_on_surface(np.zeros((5, 2)), STRIP)
    with pytest.raises(ValueError, match="outside 0..3"):
        surface.smooth_on_surface(np.zeros(4), STRIP)
    with pytest.raises(ValueError, match="weight"):
        surface.smooth_on_surface(np.zeros(5), STRIP, weight=1.5)
    with pytest.raises(ValueError, match="iterations"):
        surface.smooth_on_surface(np.zeros(5), STRIP, iterations=-1)


# ----------------------------------------------------------------------------- convexity


def _octahedron(flip=False):
    coords = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
    faces = []
    for a in (0, 1):
        for b in (2, 3):
            for c in (4, 5):
                f = [a, b, c]
                normal = np.cross(coords[b] - coords[a], coords[c] - coords[a])
                if normal @ coords[f].mean(axis=0) < 0:  # outward winding
                    f = [a, c, b]
                faces.append(f[::-1] if flip else f)
    return coords, np.array(faces)


@pytest.mark.parametrize("flip", [False, True])
def test_mean_curvature_sign_convex_and_dent(flip):
    coords, faces = _octahedron(flip)
    np.testing.assert_array_equal(surface.mean_curvature_sign(coords, faces), np.ones(6))
    dented = coords.copy()
    dented[4] = [0, 0, -0.3]  # push the top vertex through the plane of its four neighbours
    sign = surface.mean_curvature_sign(dented, faces)
    assert sign[4] == -1
    assert np.all(sign[[0, 1, 2, 3, 5]] == 1)


# ----------------------------------------------------------------------------- reading


def _write_tet(path, shift=0.0):
    coords = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float) + shift
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], dtype=np.int32)
    nib.freesurfer.write_geometry(str(path), coords, faces)
    return coords, faces


def test_read_surfaces_round_trip(tmp_path):
    (tmp_path / "surf").mkdir()
    lh = _write_tet(tmp_path / "surf" / "lh.inflated")
    rh = _write_tet(tmp_path / "surf" / "rh.inflated", shift=5.0)
    out = surface.read_surfaces(tmp_path, "inflated")
    assert set(out) == {"lh", "rh"}
    for hemi, (coords, faces) in (("lh", lh), ("rh", rh)):
        got_coords, got_faces = out[hemi]
        assert got_coords.dtype == np.float64 and got_faces.dtype == np.int64
        np.testing.assert_allclose(got_coords, coords, atol=1e-6)  # stored as float32
        np.testing.assert_array_equal(got_faces, faces)


def test_read_surfaces_missing_hemisphere(tmp_path):
    (tmp_path / "surf").mkdir()
    _write_tet(tmp_path / "surf" / "lh.white")
    with pytest.raises(FileNotFoundError, match=r"rh\.white"):
        surface.read_surfaces(tmp_path, "white")
    with pytest.raises(FileNotFoundError, match=r"lh\.inflated"):
        surface.read_surfaces(tmp_path)


def test_read_surfaces_vertex_count_mismatch(tmp_path):
    (tmp_path / "surf").mkdir()
    _write_tet(tmp_path / "surf" / "lh.inflated")
    coords = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=float)
    nib.freesurfer.write_geometry(str(tmp_path / "surf" / "rh.inflated"), coords, np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="lh 4 and rh 3"):
        surface.read_surfaces(tmp_path)


# ----------------------------------------------------------------------------- plotting


@pytest.fixture(scope="module")
def fsaverage5(tmp_path_factory):
    """nilearn's bundled fsaverage5 inflated meshes, written and read back like the workflow does."""
    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")["inflated"]
    root = tmp_path_factory.mktemp("fsaverage5")
    (root / "surf").mkdir()
    for hemi, part in (("lh", "left"), ("rh", "right")):
        nib.freesurfer.write_geometry(
            str(root / "surf" / f"{hemi}.inflated"), mesh.parts[part].coordinates, mesh.parts[part].faces
        )
    return surface.read_surfaces(root, "inflated")


def _face_colours(ax):
    (coll,) = [c for c in ax.collections if isinstance(c, Poly3DCollection)]
    return np.asarray(coll.get_facecolor())


def test_plot_surface_panel(fsaverage5, tmp_path):
    n = len(fsaverage5["lh"][0])
    assert n == 10242
    values = np.concatenate([np.full(n, np.nan), np.full(n, 0.5)])  # lh not significant
    fig = plt.figure(figsize=(6, 3.5))
    gs = GridSpec(1, 2, figure=fig)
    axes = surface.plot_surface_panel(
        fig, gs[0, 0], fsaverage5, values, cmap="viridis", vmin=0.0, vmax=1.0, title="demo",
        views=("lateral", "medial"), colorbar_label="Pearson r",
    )
    assert len(axes) == 5
    cax = axes[-1]
    assert cax.get_xlabel() == "Pearson r"
    assert [a.name for a in axes[:4]] == ["3d"] * 4
    # one colour bar for the panel: nilearn added none of its own
    assert len(fig.axes) == 6  # title + 4 views + colour bar
    # lh (NaN): background greys only; rh (constant, unchanged by smoothing): the colour of 0.5
    lh_colours = _face_colours(axes[0])
    assert np.allclose(lh_colours[:, 0], lh_colours[:, 1]) and np.allclose(lh_colours[:, 1], lh_colours[:, 2])
    rh_colours = _face_colours(axes[1])
    np.testing.assert_allclose(rh_colours, np.broadcast_to(plt.get_cmap("viridis")(0.5), rh_colours.shape), atol=1e-6)
    out = tmp_path / "panel.png"
    fig.savefig(out, dpi=60)
    plt.close(fig)
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_surface_panel_validates(fsaverage5):
    fig = plt.figure()
    spec = GridSpec(1, 1, figure=fig)[0, 0]
    kw = dict(cmap="viridis", vmin=0.0, vmax=1.0, title="t", colorbar_label="r")
    with pytest.raises(ValueError, match=r"\(2V,\) = \(20484,\)"):
        surface.plot_surface_panel(fig, spec, fsaverage5, np.zeros(10242), **kw)
    with pytest.raises(ValueError, match="views"):
        surface.plot_surface_panel(fig, spec, fsaverage5, np.zeros(20484), views=("sideways",), **kw)
    with pytest.raises(ValueError, match="missing"):
        surface.plot_surface_panel(fig, spec, {"lh": fsaverage5["lh"]}, np.zeros(20484), **kw)
    plt.close(fig)
