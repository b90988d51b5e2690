"""THINGS-MEG loaders and preprocessing, checked against MNE run directly on the same simulated files."""

from __future__ import annotations

import shutil

import mne
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from brainprop.brain.meg import (
    collect_trials,
    find_meg_runs,
    load_meg_subject,
    prepare_meg_subject,
    preprocess_raw_run,
    read_events_tsv,
    read_meg_run,
    read_meg_table,
    zscore_images,
)
from brainprop.simulate.meg import simulate_things_meg, toy_features, toy_stimulus_table

# simulated runs are shorter than MNE's 33 s FIR for a 0.1 Hz high-pass (real runs are ~6 min)
pytestmark = pytest.mark.filterwarnings("ignore:filter_length")

SEED = 11
PARAMS = {"subjects": [1, 2], "n_catch_trials": 4, "n_catch_images": 2, "test_repeats": 3,
          "derivative_split_size": "1.2MB"}


@pytest.fixture(scope="module")
def meg(tmp_path_factory):
    stim = toy_stimulus_table(8, 4, 4)
    fwd, bwd = toy_features(len(stim), 3, 10, SEED)
    root = tmp_path_factory.mktemp("meg") / "things-meg"
    trials = simulate_things_meg(root, stim, fwd, bwd, list(stim.image_id), PARAMS, seed=SEED)
    return root, stim, trials


@pytest.fixture
def meg_copy(meg, tmp_path):
    """A private copy of subject 1 (raw runs, sample attributes, derivative) to damage."""
    root, stim, trials = meg
    dst = tmp_path / "things-meg"
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("sub-BIGMEG2", "*P2*"))
    return dst, stim, trials


def _outputs(tmp_path):
    return tmp_path / "out" / "meg.npy", tmp_path / "out" / "meg.parquet", tmp_path / "out" / "times.npy"


def _average_and_zscore(epochs_by_image: dict, image_ids, mode="average"):
    x = np.stack([np.mean(epochs_by_image[i], axis=0) if mode == "average" else epochs_by_image[i][0]
                  for i in image_ids])
    return (x - x.mean(0)) / x.std(0)


def _direct_mne_raw(root, trials, subject, use_trigger=False):
    """The paper's preprocessing written with plain MNE calls, one run at a time."""
    by_image = {}
    t = trials[(trials.subject == subject)]
    for (ses, run), rt in t.groupby(["session_nr", "run_nr"]):
        fif = (root / f"sub-BIGMEG{subject}" / f"ses-{ses:02d}" / "meg" /
               f"sub-BIGMEG{subject}_ses-{ses:02d}_task-main_run-{run:02d}_meg.fif")
        raw = mne.io.read_raw_fif(fif, preload=True, verbose="error")
        ev = pd.read_csv(str(fif).replace("_meg.fif", "_events.tsv"), sep="\t")
        if use_trigger:
            trig = mne.find_events(raw, stim_channel="UPPT001", verbose="error")
            ev["sample"] = trig[:, 0]
        keep = ev.trial_type != "catch"
        raw.pick("mag").filter(0.1, 20.0, verbose="error")
        events = np.column_stack([ev["sample"][keep], np.zeros(keep.sum(), int), np.ones(keep.sum(), int)])
        ep = mne.Epochs(raw, events, tmin=-0.5, tmax=3.0, baseline=None, preload=True, verbose="error")
        ep.resample(30.0, verbose="error")
        assert len(ep) == keep.sum()
        for img, x in zip(rt.image_id[keep.to_numpy()], ep.get_data()):
            by_image.setdefault(img, []).append(x)
    return by_image, ep.times


def test_raw_source_equals_direct_mne_pipeline(meg, tmp_path):
    root, stim, trials = meg
    out_data, out_table, out_times = _outputs(tmp_path)
    report = prepare_meg_subject(root, 1, "raw", out_data, out_table, out_times, {}, stimulus_table=stim)
    data, times = np.load(out_data), np.load(out_times)
    table, meta = read_meg_table(out_table)
    t1 = trials[trials.subject == 1]
    assert data.dtype == np.float32 and data.shape == (len(stim), 24, 105)
    assert table.image_id.tolist() == sorted(stim.image_id)  # rows sorted by image id, one per image
    np.testing.assert_allclose(times, -0.5 + np.arange(105) / 30.0, atol=1e-9)
    np.testing.assert_allclose(meta["times"], times)
    assert meta["n_catch_dropped"] == (t1.trial_type == "catch").sum() == 4 == report["n_catch_dropped"]
    assert meta["channels"][0] == "MLC11-1609" and len(meta["channels"]) == 24
    merged = table.merge(stim, on="image_id", suffixes=("", "_stim"))
    assert (merged.source == merged.source_stim).all() and (merged.concept == merged.concept_stim).all()
    assert (merged.split == merged.split_stim).all()
    assert set(table.n_averaged[table.split == "test"]) == {3} and set(table.n_averaged[table.split == "train"]) == {1}
    # 1-based THINGS numbers carried through from events.tsv / sample attributes
    nr = t1.dropna(subset=["image_id"]).drop_duplicates("image_id").set_index("image_id")
    assert (table.things_image_nr.to_numpy() == nr.things_image_nr[table.image_id].to_numpy()).all()
    assert (table.things_category_nr.to_numpy() == nr.things_category_nr[table.image_id].to_numpy()).all()

    by_image, mne_times = _direct_mne_raw(root, trials, 1)
    np.testing.assert_allclose(times, mne_times)
    expected = _average_and_zscore(by_image, table.image_id)
    np.testing.assert_allclose(data, expected, atol=2e-5)
    # z-scored across images for every channel and time point
    np.testing.assert_allclose(data.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(data.std(0), 1, atol=1e-5)
    # epoching on the trigger channel (photodiode delay not corrected) gives different data
    by_trigger, _ = _direct_mne_raw(root, trials, 1, use_trigger=True)
    wrong = _average_and_zscore(by_trigger, table.image_id)
    assert np.abs(wrong - data).max() > 0.5


@pytest.mark.parametrize("decim", [1, 2])
def test_preprocess_raw_run_equals_mne_calls(meg, decim):
    root, _, trials = meg
    fif = root / "sub-BIGMEG2" / "ses-02" / "meg" / "sub-BIGMEG2_ses-02_task-main_run-01_meg.fif"
    ev = read_events_tsv(str(fif).replace("_meg.fif", "_events.tsv"))
    raw = read_meg_run(fif)
    params = {"exclude_channels": ["MRO11-1609"], "epochs_decim": decim}
    data, times, channels, kept = preprocess_raw_run(raw, ev.onset.to_numpy(), params)
    ref = mne.io.read_raw_fif(fif, preload=True, verbose="error").pick("mag").drop_channels(["MRO11-1609"])
    ref.filter(0.1, 20.0, verbose="error")
    samples = np.round(ev.onset.to_numpy() * ref.info["sfreq"]).astype(int)
    ep = mne.Epochs(ref, np.column_stack([samples, 0 * samples, 1 + 0 * samples]), tmin=-0.5, tmax=3.0,
                    baseline=None, preload=True, decim=decim, verbose="error").resample(30.0, verbose="error")
    assert channels == ep.ch_names and "MRO11-1609" not in channels
    np.testing.assert_array_equal(kept, np.arange(len(ev)))
    np.testing.assert_allclose(times, ep.times)
    np.testing.assert_allclose(data, ep.get_data(), rtol=1e-10, atol=1e-25)


def test_derivative_source_equals_direct_mne_and_matches_raw_table(meg, tmp_path):
    root, stim, trials = meg
    out_data, out_table, out_times = _outputs(tmp_path)
    prepare_meg_subject(root, 2, "derivative", out_data, out_table, out_times, {}, stimulus_table=stim)
    data, times = np.load(out_data), np.load(out_times)
    table, meta = read_meg_table(out_table)
    assert data.shape == (len(stim), 23, 42) and data.dtype == np.float32
    np.testing.assert_allclose(times, -0.1 + np.arange(42) / 30.0, atol=1e-9)

    attrs = pd.read_csv(root / "sourcedata" / "sample_attributes_P2.csv")
    ep = mne.read_epochs(root / "derivatives" / "preprocessed" / "preprocessed_P2-epo.fif", verbose="error")
    keep = (attrs.trial_type != "catch").to_numpy()
    ep = ep[np.flatnonzero(keep)].filter(None, 20.0, verbose="error").resample(30.0, verbose="error")
    by_image = {}
    for path, x in zip(attrs.image_path[keep], ep.get_data()):
        by_image.setdefault(path.rsplit("/", 1)[1][:-4], []).append(x)
    np.testing.assert_allclose(data, _average_and_zscore(by_image, table.image_id), atol=2e-5)
    assert meta["n_catch_dropped"] == 4

    # the raw source of the same subject gives the same image table and, where both exist, similar data
    raw = load_meg_subject(root, 2, "raw", {"exclude_channels": ["MRO11-1609"]}, stimulus_table=stim)
    pd.testing.assert_frame_equal(raw.table, table)
    overlap = np.isin(np.round(raw.times, 6), np.round(times, 6))
    assert overlap.sum() == len(times) and raw.channels == meta["channels"]
    a, b = raw.data[:, :, overlap], data
    r = np.mean([np.corrcoef(a[:, c, t], b[:, c, t])[0, 1] for c in range(a.shape[1]) for t in range(10, 40)])
    assert r > 0.6


def test_first_presentation_mode_and_baseline(meg, tmp_path):
    root, stim, trials = meg
    subj = load_meg_subject(root, 1, "raw", {"repeats": "first"})
    by_image, _ = _direct_mne_raw(root, trials, 1)
    np.testing.assert_allclose(subj.data, _average_and_zscore(by_image, subj.table.image_id, "first"), atol=2e-5)
    assert set(subj.table.n_averaged) == {1}
    base = load_meg_subject(root, 1, "derivative", {"baseline": [-0.1, 0.0], "zscore": False})
    np.testing.assert_allclose(base.data[:, :, base.times <= 0].mean(-1), 0, atol=1e-6)


def test_zscore_images_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(40, 5, 7))
    expected = stats.zscore(x, axis=0)
    x[:, 2, 3] = 1.5  # constant across images -> 0, not NaN
    expected[:, 2, 3] = 0
    z = zscore_images(x.copy())
    np.testing.assert_allclose(z, expected, atol=1e-12)


def _assert_no_outputs(tmp_path):
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


def test_truncated_raw_fif_is_named(meg_copy, tmp_path):
    root, stim, _ = meg_copy
    fif = root / "sub-BIGMEG1" / "ses-02" / "meg" / "sub-BIGMEG1_ses-02_task-main_run-02_meg.fif"
    fif.write_bytes(fif.read_bytes()[: fif.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"sub-BIGMEG1_ses-02_task-main_run-02_meg\.fif.*truncated"):
        prepare_meg_subject(root, 1, "raw", *_outputs(tmp_path), {}, stimulus_table=stim)
    _assert_no_outputs(tmp_path)


@pytest.mark.parametrize("which", ["base", "split"])
def test_truncated_derivative_is_named(meg_copy, tmp_path, which):
    root, stim, _ = meg_copy
    folder = root / "derivatives" / "preprocessed"
    assert (folder / "preprocessed_P1-epo-1.fif").exists()
    damaged = folder / ("preprocessed_P1-epo.fif" if which == "base" else "preprocessed_P1-epo-1.fif")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"preprocessed_P1-epo\.fif.*truncated"):
        prepare_meg_subject(root, 1, "derivative", *_outputs(tmp_path), {}, stimulus_table=stim)
    _assert_no_outputs(tmp_path)
    damaged.unlink()
    missing = "does not exist" if which == "base" else r"missing.*preprocessed_P1-epo-1\.fif"
    with pytest.raises(FileNotFoundError, match=rf"preprocessed_P1-epo\.fif.*{missing}"):
        prepare_meg_subject(root, 1, "derivative", *_outputs(tmp_path), {}, stimulus_table=stim)
    _assert_no_outputs(tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("drop_onset", r"events\.tsv has no 'onset' column"),
    ("na_onset", r"exp/test trial\(s\) have n/a onsets"),
    ("drop_value", r"no 'value' \(things_image_nr\) column"),
])
def test_bad_events_tsv_is_named(meg_copy, tmp_path, damage, message):
    root, stim, _ = meg_copy
    events = root / "sub-BIGMEG1" / "ses-01" / "meg" / "sub-BIGMEG1_ses-01_task-main_run-02_events.tsv"
    ev = pd.read_csv(events, sep="\t", keep_default_na=False)
    if damage == "drop_onset":
        ev = ev.drop(columns="onset")
    elif damage == "drop_value":
        ev = ev.drop(columns="value")
    else:
        ev["onset"] = ev.onset.astype(object)
        ev.loc[ev.index[ev.trial_type == "exp"][0], "onset"] = "n/a"
    ev.to_csv(events, sep="\t", index=False)
    with pytest.raises(ValueError, match=rf"{events.name}.*{message}|{message}.*{events.name}") as err:
        prepare_meg_subject(root, 1, "raw", *_outputs(tmp_path), {}, stimulus_table=stim)
    assert str(events) in str(err.value)
    _assert_no_outputs(tmp_path)


@pytest.mark.parametrize("source", ["raw", "derivative"])
def test_image_absent_from_stimulus_table(meg_copy, tmp_path, source):
    root, stim, _ = meg_copy
    gone = stim.image_id[stim.split == "test"].iloc[0]
    smaller = stim[stim.image_id != gone]
    with pytest.raises(ValueError, match=rf"absent from the stimulus table.*{gone}") as err:
        prepare_meg_subject(root, 1, source, *_outputs(tmp_path), {}, stimulus_table=smaller)
    assert ("events.tsv" if source == "raw" else "sample_attributes_P1.csv") in str(err.value)
    _assert_no_outputs(tmp_path)
    # opting in to drop them works and says how many were dropped
    subj = load_meg_subject(root, 1, source, {"missing_images": "drop"}, stimulus_table=smaller)
    assert gone not in set(subj.table.image_id) and len(subj.table) == len(smaller)
    # a path that disagrees with the stimulus table is an error too
    moved = stim.assign(source=stim.source.where(stim.image_id != gone, "images_test_meg/elsewhere.jpg"))
    with pytest.raises(ValueError, match=rf"{gone}.*elsewhere\.jpg"):
        load_meg_subject(root, 1, source, {}, stimulus_table=moved)


def test_missing_runs_are_named(meg_copy, tmp_path):
    root, stim, _ = meg_copy
    with pytest.raises(FileNotFoundError, match=r"run\(s\) \[3\] of task 'main' expected by the configuration"):
        find_meg_runs(root, 1, runs=[1, 2, 3])
    with pytest.raises(FileNotFoundError, match=r"session\(s\) \[5\]"):
        find_meg_runs(root, 1, sessions=[1, 5])
    assert len(find_meg_runs(root, 1, sessions=[2], runs=[2])) == 1
    fif = root / "sub-BIGMEG1" / "ses-01" / "meg" / "sub-BIGMEG1_ses-01_task-main_run-01_meg.fif"
    fif.unlink()
    with pytest.raises(FileNotFoundError, match=r"listed in .*sub-BIGMEG1_ses-01_scans\.tsv are missing.*run-01_meg"):
        prepare_meg_subject(root, 1, "raw", *_outputs(tmp_path), {}, stimulus_table=stim)
    _assert_no_outputs(tmp_path)
    with pytest.raises(FileNotFoundError, match="sub-BIGMEG9"):
        collect_trials(root, 9, "raw")


def test_derivative_and_attributes_must_correspond(meg_copy, tmp_path):
    root, stim, _ = meg_copy
    with pytest.raises(ValueError, match="window .* does not overlap"):
        load_meg_subject(root, 1, "derivative", {"tmin": 2.0, "tmax": 3.0})
    with pytest.raises(ValueError, match="unknown MEG preprocessing parameter"):
        load_meg_subject(root, 1, "derivative", {"lfreq": 1.0})
    csv = root / "sourcedata" / "sample_attributes_P1.csv"
    attrs = pd.read_csv(csv, keep_default_na=False)
    attrs.iloc[:-1].to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"preprocessed_P1-epo\.fif holds \d+ epochs but .*sample_attributes_P1"):
        prepare_meg_subject(root, 1, "derivative", *_outputs(tmp_path), {}, stimulus_table=stim)
    attrs.loc[attrs.index[attrs.trial_type == "exp"][0], "image_path"] = "images_test_meg/x_01s.jpg"
    attrs.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"sample_attributes_P1\.csv: row \d+ has trial_type 'exp'"):
        collect_trials(root, 1, "derivative")


def test_every_option_is_documented():
    from pathlib import Path

    from brainprop.brain.meg import DEFAULT_PARAMS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "meg.md").read_text()
    undocumented = [k for k in DEFAULT_PARAMS if f"\n    {k}: " not in doc]
    assert not undocumented, f"MEG loader options missing from docs/meg.md: {undocumented}"


def test_session_run_selection_and_image_map(meg_copy, tmp_path):
    root, stim, trials = meg_copy
    t1 = trials[trials.subject == 1]
    in_ses2 = set(t1.image_id[(t1.session_nr == 2)].dropna())
    for source in ("raw", "derivative"):
        subj = load_meg_subject(root, 1, source, {"sessions": [2]})
        assert set(subj.table.image_id) == in_ses2
        counts = t1[t1.session_nr == 2].image_id.value_counts()
        assert (subj.table.n_averaged.to_numpy() == counts[subj.table.image_id].to_numpy()).all()
    with pytest.raises(ValueError, match=r"run_nr \[7\] expected by the configuration"):
        collect_trials(root, 1, "derivative", {"runs": [1, 7]})
    # an explicit image map replaces the sample attributes; unknown image numbers are named
    attrs = pd.read_csv(root / "sourcedata" / "sample_attributes_P1.csv", keep_default_na=False)
    shown = attrs[attrs.trial_type != "catch"]
    shown.to_csv(tmp_path / "map_P1.csv", index=False)
    (root / "sourcedata" / "sample_attributes_P1.csv").unlink()
    got = collect_trials(root, 1, "raw", {"image_map": str(tmp_path / "map_P{subject}.csv")})
    assert (got.image_id.dropna().to_numpy() == t1.sort_values(["session_nr", "run_nr", "trial_nr"])
            .image_id.dropna().to_numpy()).all()
    gone = int(shown.things_image_nr.iloc[0])
    shown[shown.things_image_nr.astype(int) != gone].to_csv(tmp_path / "map_P1.csv", index=False)
    with pytest.raises(ValueError, match=rf"image number\(s\) \[{gone}\] are not in the image map .*map_P1\.csv"):
        collect_trials(root, 1, "raw", {"image_map": str(tmp_path / "map_P{subject}.csv")})
