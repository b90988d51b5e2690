"""HCP-MMP1 atlas reading, mesh geodesics and ROI distances from V1."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from brainprop.brain import atlas
from brainprop.simulate.nsd import write_anatomy


@pytest.fixture(scope="module")
def anat(tmp_path_factory):
    root = tmp_path_factory.mktemp("anat")
    write_anatomy(root, n_areas=12)
    return root


def _grid_mesh(z_scale=0.0):
    """3 x 3 vertex grid (unit spacing), squares split by the (i, j)-(i+1, j+1) diagonal.

    Vertex id = 3 * i + j at (i, j, z_scale * i).
    """
    coords = np.array([[i, j, z_scale * i] for i in range(3) for j in range(3)], dtype=float)
    faces = []
    for i in range(2):
        for j in range(2):
            a, b, c, d = 3 * i + j, 3 * i + j + 1, 3 * (i + 1) + j, 3 * (i + 1) + j + 1
            faces += [[a, c, d], [a, d, b]]
    return coords, np.array(faces)


def test_geodesic_distance_hand_computed():
    coords, faces = _grid_mesh()
    r2 = np.sqrt(2)
    # from corner (0, 0): edges of length 1 and diagonals of length sqrt(2)
    expected = [0, 1, 2, 1, r2, 1 + r2, 2, 1 + r2, 2 * r2]
    np.testing.assert_allclose(atlas.geodesic_distance(coords, faces, [0]), expected)
    # two sources: the nearest one counts
    expected2 = [0, 1, 2, 1, r2, 1, 2, 1, 0]
    np.testing.assert_allclose(atlas.geodesic_distance(coords, faces, [0, 8]), expected2)
    # 3-D edge lengths: tilting the grid along i stretches i-steps to sqrt(1 + s^2)
    coords_t, _ = _grid_mesh(z_scale=1.0)
    e = np.sqrt(2)  # i-step length
    d = np.sqrt(3)  # diagonal length
    expected3 = [0, 1, 2, e, d, 1 + d, 2 * e, e + d, 2 * d]
    np.testing.assert_allclose(atlas.geodesic_distance(coords_t, faces, [0]), expected3)


def test_geodesic_disconnected_and_edge_graph():
    coords, faces = _grid_mesh()
    coords = np.vstack([coords, [[10, 10, 0]]])  # isolated vertex 9
    d = atlas.geodesic_distance(coords, faces, [0])
    assert np.isinf(d[9]) and np.isfinite(d[:9]).all()
    g = atlas.mesh_edge_graph(coords[:9], faces)
    assert g.nnz == 2 * 16  # 12 grid edges + 4 diagonals, both directions
    with pytest.raises(ValueError, match="faces index vertices"):
        atlas.mesh_edge_graph(coords[:4], faces)


def test_read_ctab_formats(tmp_path):
    p = tmp_path / "x.ctab"
    p.write_text("# comment\n0  Unknown 0 0 0 0\n\n1 L_V1_ROI 255 0 0 0\n2 MST\n")
    names = atlas.read_ctab(p)
    assert names == {0: "Unknown", 1: "L_V1_ROI", 2: "MST"}
    assert atlas.v1_index(names) == 1
    p.write_text("0 Unknown\nV1 1\n")
    with pytest.raises(ValueError, match=r"x\.ctab:2: expected an 'idx name' line"):
        atlas.read_ctab(p)
    with pytest.raises(FileNotFoundError, match="colour table not found"):
        atlas.read_ctab(tmp_path / "missing.ctab")


def test_roi_geometry_against_direct_computation(anat):
    table = atlas.roi_geometry(anat, surface="white")
    assert list(table.columns) == ["hemi", "roi", "name", "n_vertices", "x", "y", "z",
                                   "dist_euclidean", "dist_geodesic", "dist_geodesic_centroid"]
    assert len(table) == 2 * 12 and set(table["hemi"]) == {"lh", "rh"}
    labels = atlas.vertex_rois(anat)
    assert labels.shape == (2 * 10242,) and set(np.unique(labels)) <= set(atlas.read_ctab(atlas.ctab_path(anat)))
    n = 10242
    for h, hemi in enumerate(("lh", "rh")):
        coords, _ = atlas.read_surface(anat, hemi, "white")
        lab = labels[h * n : (h + 1) * n]
        v1c = coords[lab == 1].mean(axis=0)
        sub = table[table["hemi"] == hemi].set_index("name")
        assert sub.loc["V1", ["dist_euclidean", "dist_geodesic", "dist_geodesic_centroid"]].tolist() == [0, 0, 0]
        for name, row in sub.iterrows():
            idx = lab == row["roi"]
            assert row["n_vertices"] == idx.sum()
            np.testing.assert_allclose(row[["x", "y", "z"]].to_numpy(float), coords[idx].mean(axis=0))
            np.testing.assert_allclose(row["dist_euclidean"], np.linalg.norm(coords[idx].mean(axis=0) - v1c))
    # per-vertex path lengths can never be shorter than the straight line to the nearest V1 vertex
    dist = atlas.vertex_distance_from_v1(anat)
    for h, hemi in enumerate(("lh", "rh")):
        coords, _ = atlas.read_surface(anat, hemi, "white")
        lab = labels[h * n : (h + 1) * n]
        v1 = coords[lab == 1]
        sample = np.arange(0, n, 97)
        straight = np.min(np.linalg.norm(coords[sample, None, :] - v1[None], axis=2), axis=1)
        assert np.all(dist[h * n + sample] >= straight - 1e-9)
        # on the sphere the true geodesic is the great circle: the edge-graph path is a little longer
        sph, faces = atlas.read_surface(anat, hemi, "sphere")
        radius = np.linalg.norm(sph, axis=1).mean()
        unit = sph / np.linalg.norm(sph, axis=1, keepdims=True)
        great = radius * np.arccos(np.clip(unit @ unit[lab == 1].T, -1, 1)).min(axis=1)
        path = atlas.geodesic_distance(sph, faces, np.flatnonzero(lab == 1))
        assert np.all(path >= great * (1 - 1e-3) - 1e-3 * radius)  # chords are ~1e-4 shorter than arcs
        far = great > 0.2 * radius
        ratio = path[far] / great[far]  # edge-graph paths zig-zag: a few percent longer on average
        assert ratio.max() < 1.3 and ratio.mean() < 1.1, (ratio.max(), ratio.mean())
    # ROI mean geodesic distance is the mean of the per-vertex distances
    lh = table[table["hemi"] == "lh"].set_index("name")
    np.testing.assert_allclose(lh.loc["V2", "dist_geodesic"], dist[:n][labels[:n] == lh.loc["V2", "roi"]].mean())
    # distances from V1 correlate between the two definitions
    assert np.corrcoef(table["dist_euclidean"], table["dist_geodesic"])[0, 1] > 0.8


def test_prepare_roi_table_writes_parquet(anat, tmp_path):
    out, labels = tmp_path / "rois.parquet", tmp_path / "vertex_rois.npy"
    table = atlas.prepare_roi_table(anat, out, labels, surface="sphere")
    pd.testing.assert_frame_equal(pd.read_parquet(out), table)
    np.testing.assert_array_equal(np.load(labels), atlas.vertex_rois(anat))
    assert not list(tmp_path.glob("*.tmp"))


def test_ctab_without_v1_is_an_error(anat, tmp_path):
    root = tmp_path / "nov1"
    shutil.copytree(anat, root)
    ctab = atlas.ctab_path(root)
    ctab.write_text(ctab.read_text().replace(" V1\n", " V1x\n"))
    with pytest.raises(ValueError, match=r"HCP_MMP1\.mgz\.ctab: expected exactly one area named 'V1'"):
        atlas.roi_geometry(root)
    out = tmp_path / "rois.parquet"
    with pytest.raises(ValueError, match="V1"):
        atlas.prepare_roi_table(root, out)
    assert not out.exists()


def test_label_and_surface_mismatches_are_errors(anat, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(anat, root)
    lab = atlas.label_path(root, "rh")
    nib.save(nib.MGHImage(np.ones((2562, 1, 1), np.int32), np.eye(4)), str(lab))
    with pytest.raises(ValueError, match="different vertex counts"):
        atlas.vertex_rois(root)
    nib.save(nib.MGHImage(np.full((10242, 1, 1), 999, np.int32), np.eye(4)), str(lab))
    with pytest.raises(ValueError, match=r"rh\.HCP_MMP1\.mgz: labels \[999\] are not in"):
        atlas.vertex_rois(root)
    (atlas.surface_path(root, "lh", "white")).unlink()
    with pytest.raises(FileNotFoundError, match=r"lh white surface not found: .*lh\.white"):
        atlas.read_surface(root, "lh", "white")
    assert atlas.n_vertices_per_hemi(root, "lh") == 10242  # falls back to another surface


def test_merge_hemispheres_one_row_per_area(anat):
    table = atlas.roi_geometry(anat, surface="white")
    merged = atlas.merge_hemispheres(table)
    assert len(merged) == 12 and (merged["hemi"] == atlas.BOTH).all() and (merged["n_hemispheres"] == 2).all()
    assert {"x", "y", "z"}.isdisjoint(merged.columns) and set(atlas.DISTANCES) <= set(merged.columns)
    labels, dist = atlas.vertex_rois(anat), atlas.vertex_distance_from_v1(anat)
    for row in merged.itertuples():
        idx = labels == row.roi  # the area's vertices of both hemispheres
        assert row.n_vertices == idx.sum()
        # geodesic: the mean over all its vertices of the distance from their own hemisphere's V1
        np.testing.assert_allclose(row.dist_geodesic, dist[idx].mean())
        per = table[table["roi"] == row.roi]
        np.testing.assert_allclose(row.dist_euclidean, np.average(per["dist_euclidean"], weights=per["n_vertices"]))
    assert merged.set_index("name").loc["V1", list(atlas.DISTANCES)].tolist() == [0, 0, 0]
    pd.testing.assert_frame_equal(atlas.analysis_rois(table, "merged"), merged)
    pd.testing.assert_frame_equal(atlas.analysis_rois(table, "separate"), table)
    renamed = table.copy()
    renamed.loc[(renamed["hemi"] == "rh") & (renamed["roi"] == 4), "name"] = "other"
    with pytest.raises(ValueError, match=r"ROI labels \[4\] have different names"):
        atlas.merge_hemispheres(renamed)


def test_distance_names_are_one_set_from_table_to_config(anat):
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    figures = schema["properties"]["figures"]["properties"]
    assert tuple(figures["distance"]["enum"]) == atlas.DISTANCES  # every figures.distance is a table column
    assert tuple(figures["roi_hemispheres"]["enum"]) == atlas.ROI_HEMISPHERES
    assert set(atlas.DISTANCES) <= set(atlas.roi_geometry(anat, surface="sphere").columns)
