"""Planted-effect primitives and the miniature NSD simulator (layout, quirks, planted effects, null)."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io
from scipy.sparse.csgraph import connected_components

from brainprop.brain import atlas
from brainprop.brain.align import reorder_rows
from brainprop.brain.nsd import betas_path, expdesign_path, prepare_nsd_subject, stim_info_path, stimuli_path
from brainprop.simulate import effects
from brainprop.simulate.nsd import make_toy_inputs, resolve_params, simulate_nsd

SMALL = dict(n_subjects=2, n_sessions=[3, 2], trials_per_session=100, n_areas=30)


# ----------------------------------------------------------------------------- effects


def test_layer_readouts_standardized_seeded_and_layerwise():
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((60, d)) * 5 + 3 for d in (4, 7, 5)]
    r = effects.layer_readouts(feats, 11, seed=3)
    assert r.shape == (3, 60, 11) and r.dtype == np.float32
    np.testing.assert_allclose(r.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(r.std(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(r, effects.layer_readouts(feats, 11, seed=3))
    assert not np.allclose(r, effects.layer_readouts(feats, 11, seed=4))
    # layer l is an explicit function of the l-th spawned generator (adding a layer keeps earlier ones)
    np.testing.assert_array_equal(r[:2], effects.layer_readouts(feats[:2], 11, seed=3))
    # a read-out is a linear function of its own layer's features: regression recovers it exactly
    x = np.c_[np.ones(60), feats[1]]
    beta, *_ = np.linalg.lstsq(x, r[1], rcond=None)
    np.testing.assert_allclose(x @ beta, r[1], atol=1e-4)
    # constant features give an all-zero read-out, not NaN
    assert np.all(effects.layer_readouts([np.ones((10, 3))], 4, seed=0) == 0)


def test_layer_tuning_shape_direction_and_formula():
    pos = np.linspace(0, 1, 21)
    up = effects.layer_tuning(pos, 6, slope=1.0, width=0.15)
    down = effects.layer_tuning(pos, 6, slope=-1.0, width=0.15)
    assert up.shape == (21, 6)
    np.testing.assert_allclose(up.sum(axis=1), 1)
    assert np.all(np.diff(up.argmax(axis=1)) >= 0) and up.argmax(axis=1)[[0, -1]].tolist() == [0, 5]
    assert np.all(np.diff(down.argmax(axis=1)) <= 0) and down.argmax(axis=1)[[0, -1]].tolist() == [5, 0]
    # explicit formula for one target
    k = np.arange(6) / 5
    c = np.clip(0.5 + 0.5 * (0.8 - 0.5), 0, 1)
    w = np.exp(-((k - c) ** 2) / (2 * 0.3**2))
    np.testing.assert_allclose(effects.layer_tuning(np.array([0.8]), 6, 0.5, 0.3)[0], w / w.sum())
    flat = effects.layer_tuning(pos, 5, slope=0.0, width=0.2)
    assert np.all(flat.argmax(axis=1) == 2)
    with pytest.raises(ValueError, match="width"):
        effects.layer_tuning(pos, 3, 1.0, 0.0)


def test_mix_layers_matches_loop():
    rng = np.random.default_rng(1)
    r = rng.standard_normal((3, 8, 5)).astype(np.float32)
    t = effects.layer_tuning(np.linspace(0, 1, 5), 3, 1.0, 0.3)
    amp = np.linspace(0, 2, 5)
    expected = np.stack([amp[j] * sum(t[j, l] * r[l, :, j] for l in range(3)) for j in range(5)], axis=1)
    np.testing.assert_allclose(effects.mix_layers(r, t, amp), expected, rtol=1e-5, atol=1e-6)


def test_add_noise_ratio_inf_and_pure_noise():
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((40000, 3)).astype(np.float32) * np.array([1.0, 2.0, 0.5], dtype=np.float32)
    noisy = effects.add_noise(signal, 4.0, np.random.default_rng(1))
    noise = noisy - signal
    np.testing.assert_allclose(signal.var(0) / noise.var(0), 4.0, rtol=0.03)
    np.testing.assert_array_equal(effects.add_noise(signal, np.inf, rng), signal)
    ref = effects.add_noise(signal, 2.0, np.random.default_rng(1), reference_variance=1.0) - signal
    np.testing.assert_allclose(ref.var(0), 0.5, rtol=0.03)
    pure = effects.add_noise(np.zeros((40000, 2)), 2.0, np.random.default_rng(2))
    np.testing.assert_allclose(pure.var(0), 1.0, rtol=0.03)
    with pytest.raises(ValueError, match="snr"):
        effects.add_noise(signal, 0.0, rng)


# ----------------------------------------------------------------------------- simulator


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    base = tmp_path_factory.mktemp("simnsd")
    table, h5, fwd, bwd, ids = make_toy_inputs(base / "inputs", n_images=120, n_layers=4, dim=6, seed=0)
    root = base / "nsd"
    summary = simulate_nsd(root, table, h5, fwd, bwd, ids, params=SMALL, seed=1)
    return dict(root=root, table=table, h5=h5, fwd=fwd, bwd=bwd, ids=ids, summary=summary)


def test_layout_shapes_dtypes_and_one_based_design(sim):
    root, t = sim["root"], sim["summary"]["trials_per_session"]
    assert sim["summary"]["n_vertices_per_hemi"] == 10242
    for subj, n_sess in ((1, 3), (2, 2)):
        for k in range(1, 5):
            for hemi in ("lh", "rh"):
                p = betas_path(root, subj, hemi, k)
                assert p.is_file() == (k <= n_sess)
    img = nib.load(str(betas_path(root, 1, "lh", 1)))
    assert tuple(int(s) for s in img.shape) == (10242, 1, 1, t)
    assert img.header.get_data_dtype() == np.dtype(">f4")
    mat = scipy.io.loadmat(str(expdesign_path(root)))
    master, subjectim = mat["masterordering"], mat["subjectim"]
    assert master.shape == (1, 3 * t) and subjectim.shape == (2, 120) and mat["sharedix"].shape == (1, 120)
    assert master.min() == 1 and master.max() == 120  # 1-based into the subject's 120 images
    assert subjectim.min() == 1 and subjectim.max() == 120  # 1-based nsd ids
    counts = np.bincount(master.ravel().astype(int))[1:]
    assert counts.min() >= 1 and counts.max() == 3 and (counts < 3).any()  # 1..3 repetitions
    info = pd.read_csv(stim_info_path(root), index_col=0)
    expected = {"cocoId", "cocoSplit", "nsdId", "shared1000"} | {
        f"subject{s}{suf}" for s in (1, 2) for suf in ("", "_rep0", "_rep1", "_rep2")
    }
    assert expected <= set(info.columns) and len(info) == 120
    assert (info["cocoId"] == 100000 + info["nsdId"]).all()
    with h5py.File(stimuli_path(root)) as a, h5py.File(sim["h5"]) as b:
        np.testing.assert_array_equal(a["imgBrick"][:], b["imgBrick"][:])
    labels = nib.load(str(atlas.label_path(root, "lh")))
    assert tuple(int(s) for s in labels.shape) == (10242, 1, 1)
    assert atlas.read_ctab(atlas.ctab_path(root))[1] == "V1"
    for surf in atlas.SURFACES:
        coords, faces = atlas.read_surface(root, "rh", surf)
        assert coords.shape == (10242, 3) and faces.shape == (20480, 3)


def test_csv_reps_agree_with_expdesign(sim):
    """The csv rep columns (1-based trial numbers) reproduce masterordering/subjectim trial by trial."""
    root = sim["root"]
    mat = scipy.io.loadmat(str(expdesign_path(root)))
    master = mat["masterordering"].ravel().astype(int)
    info = pd.read_csv(stim_info_path(root), index_col=0)
    for s in (1, 2):
        from_design = mat["subjectim"][s - 1, master - 1].astype(int) - 1  # nsdId per trial
        from_csv = np.full(master.size, -1)
        for r in range(3):
            shown = info[f"subject{s}_rep{r}"] > 0
            from_csv[info.loc[shown, f"subject{s}_rep{r}"].to_numpy() - 1] = info.loc[shown, "nsdId"].to_numpy()
        np.testing.assert_array_equal(from_csv, from_design)


def test_nan_vertices_planted(sim):
    root = sim["root"]
    nan_cols = []
    for k in (1, 2, 3):
        x = np.concatenate([nib.load(str(betas_path(root, 1, h, k))).get_fdata()[:, 0, 0, :] for h in ("lh", "rh")])
        all_nan = np.isnan(x).all(axis=1)
        assert np.array_equal(all_nan, np.isnan(x).any(axis=1))  # NaN vertices are NaN for every trial
        nan_cols.append(all_nan)
    always = np.logical_and.reduce(nan_cols)
    assert always.sum() == round(0.01 * 20484)
    assert (np.logical_or.reduce(nan_cols) & ~always).sum() >= 5  # plus some session-specific NaNs


def test_parcellation_contiguous_with_v1_at_occipital_pole(sim):
    root = sim["root"]
    labels = atlas.vertex_rois(root)
    n = labels.size // 2
    for h, hemi in enumerate(("lh", "rh")):
        coords, faces = atlas.read_surface(root, hemi, "white")
        graph = atlas.mesh_edge_graph(coords, faces)
        lab = labels[h * n : (h + 1) * n]
        assert len(np.unique(lab)) == 31  # 30 areas + unknown
        for roi in np.unique(lab):
            idx = np.flatnonzero(lab == roi)
            n_comp, _ = connected_components(graph[idx][:, idx], directed=False)
            assert n_comp == 1, f"{hemi} ROI {roi} is split in {n_comp} pieces"
        pial, _ = atlas.read_surface(root, hemi, "pial")
        assert lab[np.argmin(pial[:, 1])] == 1  # V1 holds the most posterior vertex
    table = atlas.roi_geometry(root)
    v2 = table[table["name"] == "V2"]["dist_geodesic"].to_numpy()
    assert np.all(v2 < table["dist_geodesic"].median())  # V2 placed next to V1


def _best_layers(root, subject, feats, ids, roi_table):
    """Best layer per ROI by in-sample OLS R^2 of the ROI-mean response (no ridge)."""
    out = root.parent / f"prep{subject}"
    prepare_nsd_subject(root, subject, out / "b.npy", out / "t.parquet", out / "m.npy")
    betas, mask = np.load(out / "b.npy"), np.load(out / "m.npy")
    image_ids = pd.read_parquet(out / "t.parquet")["image_id"].tolist()
    labels = atlas.vertex_rois(root)
    key = (labels + 1000 * np.repeat([0, 1], labels.size // 2))[mask]
    x_layers = [np.c_[np.ones(len(image_ids)), reorder_rows(f, ids, image_ids)] for f in feats]
    best = []
    for hemi, roi in zip(roi_table["hemi"], roi_table["roi"]):
        y = betas[:, key == roi + 1000 * (hemi == "rh")].mean(axis=1)
        r2 = [1 - np.var(y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) / np.var(y) for x in x_layers]
        best.append(int(np.argmax(r2)))
    return np.array(best)


def test_planted_effects_recovered_and_null(sim, tmp_path):
    roi_table = atlas.roi_geometry(sim["root"])
    dist = roi_table["dist_geodesic"].to_numpy()
    r_fwd = np.corrcoef(_best_layers(sim["root"], 1, sim["fwd"], sim["ids"], roi_table), dist)[0, 1]
    r_bwd = np.corrcoef(_best_layers(sim["root"], 1, sim["bwd"], sim["ids"], roi_table), dist)[0, 1]
    assert r_fwd > 0.6, r_fwd  # bottom-up forward hierarchy
    assert r_bwd < -0.4, r_bwd  # reversed backprop hierarchy
    # null: forward weight 0 -> no relation between forward best layer and distance from V1.
    # With 60 ROIs and no effect, |r| > 0.33 has probability < 1% (sd of r ~ 0.13).
    root0 = tmp_path / "null"
    simulate_nsd(root0, sim["table"], sim["h5"], sim["fwd"], sim["bwd"], sim["ids"],
                 params={**SMALL, "n_subjects": 1, "n_sessions": 3, "forward_weight": 0.0}, seed=1)
    roi_table0 = atlas.roi_geometry(root0)
    best0 = _best_layers(root0, 1, sim["fwd"], sim["ids"], roi_table0)
    r_null = np.corrcoef(best0, roi_table0["dist_geodesic"])[0, 1]
    assert abs(r_null) < 0.33, r_null


def test_zero_weight_betas_independent_of_that_signal(sim, tmp_path):
    """With backprop_weight = 0, changing the backprop features changes no beta (bit for bit)."""
    params = dict(n_subjects=1, n_sessions=1, images_per_subject=40, trials_per_session=60, n_areas=10,
                  backprop_weight=0.0)
    other = [np.random.default_rng(9).standard_normal(f.shape).astype(np.float32) for f in sim["bwd"]]
    files = {}
    for name, bwd, p in (("a", sim["bwd"], params), ("b", other, params), ("c", other, {**params, "backprop_weight": 0.7})):
        simulate_nsd(tmp_path / name, sim["table"], sim["h5"], sim["fwd"], bwd, sim["ids"], params=p, seed=5)
        files[name] = betas_path(tmp_path / name, 1, "lh", 1).read_bytes()
    assert files["a"] == files["b"]  # also shows the simulator is deterministic given the seed
    assert files["b"] != files["c"]  # the same features do change the betas once their weight is non-zero


def test_simulator_bad_inputs(sim, tmp_path):
    with pytest.raises(ValueError, match="unknown NSD simulation parameter"):
        resolve_params({"snr_typo": 1})
    ids = list(sim["ids"])
    with pytest.raises(ValueError, match=r"forward layer 0: missing rows for 1 image id\(s\): nsd00007"):
        keep = [i for i, x in enumerate(ids) if x != "nsd00007"]
        simulate_nsd(tmp_path / "x", sim["table"], sim["h5"], [f[keep] for f in sim["fwd"]], sim["bwd"],
                     [ids[i] for i in keep], params=SMALL)
    bad = sim["table"].copy()
    bad.loc[3, "image_id"] = "nsd99999"
    with pytest.raises(ValueError, match="image_id must be nsd"):
        simulate_nsd(tmp_path / "y", bad, sim["h5"], sim["fwd"], sim["bwd"], ids, params=SMALL)


def test_simulate_from_files_equals_in_memory(sim, tmp_path):
    params = dict(n_subjects=1, n_sessions=1, images_per_subject=40, trials_per_session=60, n_areas=10)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    sim["table"].to_parquet(inputs / "stimuli.parquet")
    pd.DataFrame({"image_id": sim["ids"]}).to_parquet(inputs / "features.parquet")
    paths = {}
    for kind in ("fwd", "bwd"):
        paths[kind] = [inputs / f"{kind}{l}.npy" for l in range(len(sim[kind]))]
        for p, f in zip(paths[kind], sim[kind]):
            np.save(p, f)
    from brainprop.simulate.nsd import simulate_nsd_from_files

    simulate_nsd_from_files(tmp_path / "a", inputs / "stimuli.parquet", sim["h5"], paths["fwd"], paths["bwd"],
                            inputs / "features.parquet", params=params, seed=4)
    simulate_nsd(tmp_path / "b", sim["table"], sim["h5"], sim["fwd"], sim["bwd"], sim["ids"], params=params, seed=4)
    for hemi in ("lh", "rh"):
        assert betas_path(tmp_path / "a", 1, hemi, 1).read_bytes() == betas_path(tmp_path / "b", 1, hemi, 1).read_bytes()
