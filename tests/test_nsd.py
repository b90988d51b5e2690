"""NSD loaders: trial -> image mapping, z-scoring, repeat averaging, NaN masking, bad inputs, alignment."""

from __future__ import annotations

import shutil
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.stats

from brainprop.brain import nsd
from brainprop.brain.align import align_to_stimuli, reorder_rows
from brainprop.simulate.nsd import make_toy_inputs, simulate_nsd, write_betas_session

PARAMS = dict(n_subjects=2, n_sessions=[3, 2], images_per_subject=70, n_shared=30, trials_per_session=60, n_areas=12)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("nsd")
    table, h5, fwd, bwd, ids = make_toy_inputs(base / "inputs", n_images=120, n_layers=3, dim=5, seed=2)
    simulate_nsd(base / "nsd", table, h5, fwd, bwd, ids, params=PARAMS, seed=3)
    return base / "nsd"


def _outputs(d):
    return d / "betas.npy", d / "images.parquet", d / "mask.npy"


def _csv_trials(root, subject, max_trial):
    """Independent trial lists per nsdId from the csv rep columns (1-based trial numbers, 0 = not shown)."""
    info = pd.read_csv(nsd.stim_info_path(root), index_col=0)
    trials = {}
    for _, row in info.iterrows():
        t = [int(row[f"subject{subject}_rep{r}"]) for r in range(3)]
        t = [x - 1 for x in t if 0 < x <= max_trial]
        if t:
            trials[int(row["nsdId"])] = t
    return trials


def _direct(root, subject, sessions):
    """Reference computation with nibabel + scipy.stats.zscore on whole arrays."""
    sess = []
    for k in sessions:
        x = np.concatenate([nib.load(str(nsd.betas_path(root, subject, h, k))).get_fdata()[:, 0, 0, :] for h in ("lh", "rh")])
        with np.errstate(invalid="ignore", divide="ignore"):
            sess.append(scipy.stats.zscore(x, axis=1))  # (2V, T) per session
    return sess


@pytest.mark.parametrize("subject,sessions", [(1, None), (2, None), (1, [1, 3])])
def test_prepare_matches_direct_computation(root, tmp_path, subject, sessions):
    out = _outputs(tmp_path)
    summary = nsd.prepare_nsd_subject(root, f"subj0{subject}", *out, sessions=sessions)
    used = sessions or list(range(1, PARAMS["n_sessions"][subject - 1] + 1))
    assert summary["sessions"] == used
    betas, table, mask = np.load(out[0]), pd.read_parquet(out[1]), np.load(out[2])
    t_per = PARAMS["trials_per_session"]

    # trial -> image mapping against the csv rep columns (only trials in the sessions used)
    trials = {
        i: [t for t in ts if (t // t_per) + 1 in used]
        for i, ts in _csv_trials(root, subject, max(used) * t_per).items()
    }
    trials = {i: ts for i, ts in trials.items() if ts}
    assert table["nsdId"].tolist() == sorted(trials)
    assert table["n_repetitions"].tolist() == [len(trials[i]) for i in sorted(trials)]
    assert table["image_id"].tolist() == [f"nsd{i:05d}" for i in sorted(trials)]
    assert (table["nsd73k"] == table["nsdId"] + 1).all() and (table["subject"] == f"subj0{subject}").all()
    assert set(table["n_repetitions"]) <= {1, 2, 3}

    # z-score within session, then average repetitions, from the raw .mgh files
    z = _direct(root, subject, used)
    col = {k: j for j, k in enumerate(used)}
    expected = np.stack(
        [np.mean([z[col[t // t_per + 1]][:, t % t_per] for t in trials[i]], axis=0) for i in sorted(trials)]
    )
    bad = np.zeros(expected.shape[1], dtype=bool)
    for zs in z:
        bad |= ~np.isfinite(zs).all(axis=1)
    assert mask.dtype == bool and mask.shape == (2 * 10242,)
    np.testing.assert_array_equal(mask, ~bad)  # NaN in any session used -> excluded
    assert summary["n_excluded"] == bad.sum() > 0 and summary["n_kept"] == (~bad).sum()
    assert summary["n_excluded_lh"] == bad[:10242].sum()
    assert betas.dtype == np.float32 and betas.shape == (len(trials), (~bad).sum())
    np.testing.assert_allclose(betas, expected[:, ~bad], rtol=1e-4, atol=2e-5)
    assert np.isfinite(betas).all()


def test_shared_images_and_unshown_images(root, tmp_path):
    design = nsd.load_expdesign(nsd.expdesign_path(root))
    assert design["sharedix"].size == 30
    out = _outputs(tmp_path)
    summary = nsd.prepare_nsd_subject(root, 2, *out)  # subject 2 has 2 of 3 design sessions
    table = pd.read_parquet(out[1])
    shared = set(design["sharedix"] - 1)
    assert table["shared1000"].tolist() == [i in shared for i in table["nsdId"]]
    shown = set(nsd.trial_nsd_ids(design, 2)[: 2 * PARAMS["trials_per_session"]])
    assert summary["n_images_not_shown"] == 70 - len(shown) == 70 - len(table)


def test_trial_nsd_ids_formula():
    design = {"masterordering": np.array([2, 1, 3, 2]), "subjectim": np.array([[10, 20, 30], [7, 8, 9]]), "sharedix": np.array([])}
    np.testing.assert_array_equal(nsd.trial_nsd_ids(design, "subj01"), [19, 9, 29, 19])
    np.testing.assert_array_equal(nsd.trial_nsd_ids(design, 2), [7, 6, 8, 7])
    with pytest.raises(ValueError, match="subj03 not in the design"):
        nsd.trial_nsd_ids(design, 3)


def test_read_betas_session_matches_nibabel(root):
    p = nsd.betas_path(root, 1, "rh", 2)
    fast = nsd.read_betas_session(p, 10242)
    ref = nib.load(str(p)).get_fdata(dtype=np.float32)[:, 0, 0, :].T
    assert fast.dtype == np.float32 and fast.dtype.isnative and fast.shape == (60, 10242)
    np.testing.assert_array_equal(fast, ref)


def test_zscore_session_inplace_against_scipy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 40)) * 3 + 7).astype(np.float32)
    x[:, 5] = np.nan
    x[:, 9] = 2.0
    x[3, 11] = np.nan
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns about the constant column
        ref = scipy.stats.zscore(x.astype(np.float64), axis=0)
    bad = nsd.zscore_session_inplace(x, block=16)
    assert np.flatnonzero(bad).tolist() == [5, 9, 11]
    np.testing.assert_allclose(x[:, ~bad], ref[:, ~bad], rtol=1e-5, atol=1e-5)
    assert np.isnan(x[:, bad]).all()


def _copy(root, tmp_path):
    dst = tmp_path / "nsdcopy"
    shutil.copytree(root, dst)
    return dst


def _assert_no_outputs(d):
    assert not any(p.exists() for p in _outputs(d))
    assert not list(d.glob("*.tmp")) if d.exists() else True


def test_missing_session_file_is_named(root, tmp_path):
    r = _copy(root, tmp_path)
    missing = nsd.betas_path(r, 1, "lh", 2)
    missing.unlink()
    out_dir = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"lh\.betas_session02\.mgh"):
        nsd.prepare_nsd_subject(r, 1, *_outputs(out_dir))
    _assert_no_outputs(out_dir)
    with pytest.raises(FileNotFoundError, match=r"betas_session04"):  # n_sessions expects more than exist
        nsd.prepare_nsd_subject(root, 1, *_outputs(out_dir), n_sessions=4)
    _assert_no_outputs(out_dir)
    # explicitly limiting the sessions is allowed
    summary = nsd.prepare_nsd_subject(r, 1, *_outputs(out_dir), sessions=[1, 3])
    assert summary["sessions"] == [1, 3]


def test_wrong_vertex_count_is_named_and_leaves_nothing(root, tmp_path):
    r = _copy(root, tmp_path)
    bad = nsd.betas_path(r, 1, "rh", 3)
    write_betas_session(bad, np.zeros((60, 2562), dtype=np.float32))
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=r"rh\.betas_session03\.mgh.*2562 vertices.*expected 10242"):
        nsd.prepare_nsd_subject(r, 1, *_outputs(out_dir))
    _assert_no_outputs(out_dir)
    with pytest.raises(ValueError, match=r"rh\.betas_session03\.mgh.*2562 vertices.*expected 10242"):
        nsd.read_betas_session(bad, 10242)


def test_failure_midway_leaves_no_outputs(root, tmp_path):
    """A corrupt (truncated) file discovered while reading removes temporaries and outputs."""
    r = _copy(root, tmp_path)
    p = nsd.betas_path(r, 1, "lh", 3)
    p.write_bytes(p.read_bytes()[:-4000])
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="truncated"):
        nsd.prepare_nsd_subject(r, 1, *_outputs(out_dir))
    _assert_no_outputs(out_dir)


def test_inconsistent_trials_and_design_errors(root, tmp_path):
    r = _copy(root, tmp_path)
    write_betas_session(nsd.betas_path(r, 1, "lh", 2), np.zeros((50, 10242), dtype=np.float32))
    with pytest.raises(ValueError, match="disagree on the number of trials"):
        nsd.prepare_nsd_subject(r, 1, *_outputs(tmp_path / "o"))
    mat = scipy.io.loadmat(str(nsd.expdesign_path(r)))
    scipy.io.savemat(str(nsd.expdesign_path(r)), {**{k: mat[k] for k in ("subjectim", "sharedix")},
                                                 "masterordering": mat["masterordering"] - 1})
    with pytest.raises(ValueError, match="1-based"):
        nsd.load_expdesign(nsd.expdesign_path(r))
    nsd.expdesign_path(r).unlink()
    with pytest.raises(FileNotFoundError, match="nsd_expdesign.mat"):
        nsd.prepare_nsd_subject(r, 1, *_outputs(tmp_path / "o"))


def test_subject_names():
    assert nsd.subject_name(3) == nsd.subject_name("subj03") == nsd.subject_name("03") == "subj03"
    with pytest.raises(ValueError):
        nsd.subject_name("sub-01")


# ----------------------------------------------------------------------------- alignment


def test_align_to_stimuli_by_id_not_position():
    stim = pd.DataFrame({"image_id": [f"nsd{i:05d}" for i in range(20)], "concept": [f"c{i}" for i in range(20)]})
    stim = stim.sample(frac=1.0, random_state=0).reset_index(drop=True)  # shuffled rows
    brain = pd.DataFrame({"image_id": ["nsd00004", "nsd00017", "nsd00004", "nsd00000"], "n_repetitions": [3, 1, 3, 2]})
    out = align_to_stimuli(brain, stim)
    assert out["concept"].tolist() == ["c4", "c17", "c4", "c0"]
    assert stim.loc[out["stimulus_row"], "image_id"].tolist() == brain["image_id"].tolist()
    assert out["n_repetitions"].tolist() == [3, 1, 3, 2]


def test_align_missing_ids_named_first_ten_and_count():
    stim = pd.DataFrame({"image_id": [f"nsd{i:05d}" for i in range(5)]})
    brain = pd.DataFrame({"image_id": [f"nsd{i:05d}" for i in range(20)]})
    with pytest.raises(ValueError, match=r"absent from the stimulus table: 15 image id\(s\): nsd00005, .*nsd00014 \(and 5 more\)") as e:
        align_to_stimuli(brain, stim)
    assert "nsd00015" not in str(e.value)
    with pytest.raises(ValueError, match="must be unique"):
        align_to_stimuli(brain, pd.concat([stim, stim]))
    with pytest.raises(ValueError, match="no 'image_id' column"):
        align_to_stimuli(brain.rename(columns={"image_id": "img"}), stim)


def test_reorder_rows():
    a = np.arange(12).reshape(4, 3)
    np.testing.assert_array_equal(reorder_rows(a, ["d", "b", "a", "c"], ["a", "c", "a"]), a[[2, 3, 2]])
    with pytest.raises(ValueError, match=r"feats: missing rows for 1 image id\(s\): z"):
        reorder_rows(a, ["d", "b", "a", "c"], ["a", "z"], what="feats")
    with pytest.raises(ValueError, match="row ids must be unique"):
        reorder_rows(a, ["d", "d", "a", "c"], ["a"])
