"""THINGS-MEG loaders and preprocessing, checked against MNE run directly on the same simulated files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

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
    run_onsets,
    zscore_images,
)
from brainprop.simulate.meg import simulate_things_meg, toy_features, toy_stimulus_table
from brainprop.stimuli import build_stimulus_table, things_database_path, things_stimulus_table

# simulated runs are shorter than MNE's 33 s FIR for a 0.1 Hz high-pass (real runs are ~6 min)
pytestmark = pytest.mark.filterwarnings("ignore:filter_length")

SEED = 11
# trigger lead over the photodiode onsets (neuralset: ~150 ms): 32 samples at 240 Hz, 4 at 30 Hz (an even
# number, so the onsets' round-half-to-even onto the 30 Hz grid shifts every epoch by exactly 4)
DELAY = 32 / 240
MISMATCHES = 2  # planted events-value quirks per run
PARAMS = {"subjects": [1, 2], "n_catch_trials": 4, "n_catch_images": 2, "test_repeats": 3,
          "derivative_split_size": "1.2MB", "photodiode_delay": DELAY, "n_value_mismatches": MISMATCHES}


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


def _fif(root, subject, ses, run):
    return (root / f"sub-BIGMEG{subject}" / f"ses-{ses:02d}" / "meg" /
            f"sub-BIGMEG{subject}_ses-{ses:02d}_task-main_run-{run:02d}_meg.fif")


def _direct_mne_raw(root, trials, subject, onset="trigger"):
    """The paper's preprocessing written with plain MNE calls, one run at a time, images from the truth."""
    by_image = {}
    t = trials[(trials.subject == subject)]
    for (ses, run), rt in t.groupby(["session_nr", "run_nr"]):
        fif = _fif(root, subject, ses, run)
        raw = mne.io.read_raw_fif(fif, preload=True, verbose="error")
        ev = pd.read_csv(str(fif).replace("_meg.fif", "_events.tsv"), sep="\t")
        if onset == "trigger":
            trig = mne.find_events(raw, stim_channel="UPPT001", verbose="error")
            ev["sample"] = trig[trig[:, 2] == 64, 0]
        keep = (rt.trial_type != "catch").to_numpy()
        raw.pick("mag").drop_channels(["MRO11-1609"]).filter(0.1, 20.0, verbose="error")
        events = np.column_stack([ev["sample"][keep], np.zeros(keep.sum(), int), np.ones(keep.sum(), int)])
        raw, events = raw.resample(30.0, events=events, verbose="error")
        ep = mne.Epochs(raw, events, tmin=-0.5, tmax=3.0, baseline=None, preload=True, verbose="error")
        assert len(ep) == keep.sum()
        for img, x in zip(rt.image_id[keep], ep.get_data()):
            by_image.setdefault(img, []).append(x)
    return by_image, ep.times


def test_raw_source_equals_direct_mne_pipeline(meg, tmp_path):
    root, stim, trials = meg
    out_data, out_table, out_times = _outputs(tmp_path)
    out_runs = tmp_path / "out" / "mismatches.parquet"
    report = prepare_meg_subject(root, 1, "raw", out_data, out_table, out_times, {}, stimulus_table=stim,
                                 out_mismatches=out_runs)
    data, times = np.load(out_data), np.load(out_times)
    table, meta = read_meg_table(out_table)
    t1 = trials[trials.subject == 1]
    # MRO11-1609 dropped by default; continuous resampling puts 3.0 s on the grid: 106 samples
    assert data.dtype == np.float32 and data.shape == (len(stim), 23, 106)
    assert table.image_id.tolist() == sorted(stim.image_id)  # rows sorted by image id, one per image
    np.testing.assert_allclose(times, -0.5 + np.arange(106) / 30.0, atol=1e-9)
    np.testing.assert_allclose(meta["times"], times)
    assert meta["n_catch_dropped"] == (t1.trial_type == "catch").sum() == 4 == report["n_catch_dropped"]
    assert meta["channels"][0] == "MLC11-1609" and len(meta["channels"]) == 23
    assert "MRO11-1609" not in meta["channels"] and meta["params"]["onset"] == "trigger"
    merged = table.merge(stim, on="image_id", suffixes=("", "_stim"))
    assert (merged.source == merged.source_stim).all() and (merged.concept == merged.concept_stim).all()
    assert (merged.split == merged.split_stim).all()
    assert set(table.n_averaged[table.split == "test"]) == {3} and set(table.n_averaged[table.split == "train"]) == {1}
    # 1-based THINGS numbers carried through from the sample attributes
    nr = t1.dropna(subset=["image_id"]).drop_duplicates("image_id").set_index("image_id")
    assert (table.things_image_nr.to_numpy() == nr.things_image_nr[table.image_id].to_numpy()).all()
    assert (table.things_category_nr.to_numpy() == nr.things_category_nr[table.image_id].to_numpy()).all()
    # the per-run table: planted mismatches and the trigger's lead
    runs = pd.read_parquet(out_runs)
    assert runs[["session_nr", "run_nr"]].values.tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert runs.n_mismatches.tolist() == [MISMATCHES] * 4 == [int(m) for m in runs.n_mismatches]
    assert meta["n_mismatches"] == 4 * MISMATCHES
    assert runs.n_trials.sum() == len(t1)
    np.testing.assert_allclose(runs[["trigger_lead_median_s", "trigger_lead_min_s", "trigger_lead_max_s"]],
                               DELAY, atol=1e-12)

    by_image, mne_times = _direct_mne_raw(root, trials, 1)
    np.testing.assert_allclose(times, mne_times)
    expected = _average_and_zscore(by_image, table.image_id)
    np.testing.assert_allclose(data, expected, atol=2e-5)
    # z-scored across images for every channel and time point
    np.testing.assert_allclose(data.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(data.std(0), 1, atol=1e-5)


def test_sample_onsets_equal_mne_and_trigger_onsets_shift_latencies_by_the_delay(meg):
    root, stim, trials = meg
    by_sample, _ = _direct_mne_raw(root, trials, 1, onset="sample")
    subj = load_meg_subject(root, 1, "raw", {"onset": "sample"}, stimulus_table=stim)
    np.testing.assert_allclose(subj.data, _average_and_zscore(by_sample, subj.table.image_id), atol=2e-5)
    trig = load_meg_subject(root, 1, "raw", {"onset": "trigger"}, stimulus_table=stim)
    # locked DELAY earlier, every response appears exactly 4 samples (DELAY) later
    assert np.abs(trig.data - subj.data).max() > 0.5
    np.testing.assert_allclose(trig.data[..., 4:], subj.data[..., :-4], atol=1e-5)
    # the image-independent evoked response peaks DELAY later (z-scoring off to keep it)
    evoked = {o: load_meg_subject(root, 1, "raw", {"onset": o, "zscore": False}) for o in ("sample", "trigger")}
    peak = {o: s.times[np.abs(s.data.mean(0)).mean(0).argmax()] for o, s in evoked.items()}
    assert peak["trigger"] - peak["sample"] == pytest.approx(DELAY, abs=1e-9)


def test_preprocess_raw_run_equals_mne_calls(meg):
    root, _, trials = meg
    fif = _fif(root, 2, 2, 1)
    ev = read_events_tsv(str(fif).replace("_meg.fif", "_events.tsv"))
    raw = read_meg_run(fif)
    samples = ev["sample"].to_numpy().astype(int)
    data, times, channels, kept = preprocess_raw_run(raw, samples, {"h_freq": 12.0, "sfreq": 40.0})
    ref = mne.io.read_raw_fif(fif, preload=True, verbose="error").pick("mag").drop_channels(["MRO11-1609"])
    ref.filter(0.1, 12.0, verbose="error")
    events = np.column_stack([samples, 0 * samples, 1 + 0 * samples])
    ref, events = ref.resample(40.0, events=events, verbose="error")
    ep = mne.Epochs(ref, events, tmin=-0.5, tmax=3.0, baseline=None, preload=True, verbose="error")
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
    # (the derivative is locked to the events' sample column, as the dataset authors' preprocessing)
    raw = load_meg_subject(root, 2, "raw", {"onset": "sample"}, stimulus_table=stim)
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
    from brainprop.brain.meg import DEFAULT_PARAMS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "meg.md").read_text()
    undocumented = [k for k in DEFAULT_PARAMS if f"\n    {k}: " not in doc]
    assert not undocumented, f"MEG loader options missing from docs/meg.md: {undocumented}"


def test_session_run_selection(meg_copy, tmp_path):
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


def test_images_come_from_the_sample_attributes_despite_wrong_event_values(meg, caplog):
    root, stim, trials = meg
    truth = trials[trials.subject == 2].sort_values(["session_nr", "run_nr", "trial_nr"]).reset_index(drop=True)
    planted = truth.value.astype("Float64").fillna(-1) != truth.things_image_nr.astype("Float64").fillna(-1)
    assert planted.groupby([truth.session_nr, truth.run_nr]).sum().tolist() == [MISMATCHES] * 4
    with caplog.at_level(logging.INFO, logger="brainprop.brain.meg"):
        got = collect_trials(root, 2, "raw")
    # every trial gets its true image, the planted trials are the mismatches
    assert got.image_id.fillna("catch").tolist() == truth.image_id.fillna("catch").tolist()
    assert got.things_image_nr.astype("Float64").fillna(-1).tolist() == \
        truth.things_image_nr.astype("Float64").fillna(-1).tolist()
    assert got.mismatch.tolist() == planted.tolist()
    assert caplog.text.count(f"{MISMATCHES} of ") == 4 and "disagree with the sample attributes" in caplog.text
    # the events value would have named another image on exactly those trials
    by_nr = stim.assign(nr=trials.dropna(subset=["image_id"]).drop_duplicates("image_id")
                        .set_index("image_id").things_image_nr[stim.image_id].to_numpy())
    from_value = got.value.map(dict(zip(by_nr.nr, by_nr.image_id)))
    assert (from_value[planted] != got.image_id[planted]).all()
    assert (from_value[~planted & got.value.notna()] == got.image_id[~planted & got.value.notna()]).all()


def test_too_many_mismatches_or_rows_name_the_run(meg_copy, tmp_path):
    root, stim, _ = meg_copy
    with pytest.raises(ValueError, match=r"run-01_events\.tsv \(session 1, run 1.*2 events rows disagree.*"
                                         r"max_mismatches=1"):
        prepare_meg_subject(root, 1, "raw", *_outputs(tmp_path), {"max_mismatches": 1}, stimulus_table=stim)
    _assert_no_outputs(tmp_path)
    csv = root / "sourcedata" / "sample_attributes_P1.csv"
    attrs = pd.read_csv(csv, keep_default_na=False)
    drop = attrs.index[(attrs.session_nr == 2) & (attrs.run_nr == 1)][0]
    attrs.drop(index=drop).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"ses-02_task-main_run-01_events\.tsv \(session 2, run 1.*\d+ events rows "
                                         r"but \d+ sample-attributes rows"):
        prepare_meg_subject(root, 1, "raw", *_outputs(tmp_path), {}, stimulus_table=stim)
    _assert_no_outputs(tmp_path)


def test_onset_and_sample_must_agree(meg_copy, tmp_path):
    root, stim, _ = meg_copy
    events = root / "sub-BIGMEG1" / "ses-02" / "meg" / "sub-BIGMEG1_ses-02_task-main_run-02_events.tsv"
    ev = pd.read_csv(events, sep="\t", keep_default_na=False)
    ev.loc[3, "onset"] = float(ev.onset[3]) + 1.5 / 240  # 1.5 samples off
    ev.to_csv(events, sep="\t", index=False)
    for onset in ("trigger", "sample"):
        with pytest.raises(ValueError, match=r"run-02_events\.tsv \(session 2, run 2\).*1 events row\(s\) have a "
                                             r"'sample' that differs from onset"):
            prepare_meg_subject(root, 1, "raw", *_outputs(tmp_path), {"onset": onset}, stimulus_table=stim)
        _assert_no_outputs(tmp_path)
    ev.loc[3, "onset"] = float(ev.onset[3]) - 1.0 / 240  # half a sample off: tolerated
    ev.to_csv(events, sep="\t", index=False)
    assert len(load_meg_subject(root, 1, "raw", {}, stimulus_table=stim).table) == len(stim)


def test_trigger_channel_problems_name_the_run(meg):
    root, _, trials = meg
    fif = _fif(root, 1, 1, 2)
    rows = collect_trials(root, 1, "raw", {"sessions": [1], "runs": [2]})
    use = rows[rows.trial_type != "catch"]
    raw = read_meg_run(fif)
    samples, lead = run_onsets(raw, use, rows, "trigger")
    truth = trials[(trials.subject == 1) & (trials.session_nr == 1) & (trials.run_nr == 2)]
    np.testing.assert_array_equal(samples, truth.trigger_sample[truth.trial_type != "catch"])
    np.testing.assert_allclose(lead, DELAY)
    np.testing.assert_array_equal(run_onsets(raw, use, rows, "sample")[0], truth["sample"][truth.trial_type != "catch"])
    stim = raw.get_data(picks="UPPT001")[0]
    start = np.flatnonzero(stim == 64)[0]
    end = start + np.argmax(stim[start:] != 64)
    raw._data[raw.ch_names.index("UPPT001"), start:end] = 0  # the first image trigger lost
    with pytest.raises(ValueError, match=rf"{len(rows) - 1} image triggers \(value 64\) on UPPT001 but "
                                         rf"{len(rows)} events rows"):
        run_onsets(raw, use, rows, "trigger")
    raw.drop_channels(["UPPT001"])
    with pytest.raises(ValueError, match=r"run-02_events\.tsv \(session 1, run 2\): no UPPT001 trigger channel"):
        run_onsets(raw, use, rows, "trigger")
    np.testing.assert_array_equal(run_onsets(raw, use, rows, "sample")[0], truth["sample"][truth.trial_type != "catch"])


def test_things_database_path():
    assert things_database_path("images_meg/ice_cream/ice_cream_01b.jpg") == "ice_cream/ice_cream_01b.jpg"
    assert things_database_path("images_test_meg/ice_cream_13s.jpg") == "ice_cream/ice_cream_13s.jpg"
    assert things_database_path("/x/images_meg/a_b/a_b_02n.jpg") == "a_b/a_b_02n.jpg"
    assert things_database_path("images_catch_meg/catch001.jpg") == "images_catch_meg/catch001.jpg"


def _write_images(root, paths):
    for rel in paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"jpg")


@pytest.mark.parametrize("layout", ["meg", "database"])
def test_things_images_in_either_layout(meg, tmp_path, layout):
    root, stim, _ = meg
    images = tmp_path / "things"
    attributes = [root / "sourcedata" / f"sample_attributes_P{n}.csv" for n in (1, 2)]
    on_disk = list(stim.source) if layout == "meg" else [things_database_path(s) for s in stim.source]
    _write_images(images, on_disk + ["images_catch_meg/catch001.jpg"])
    out = tmp_path / "t" / "things.parquet"
    table = build_stimulus_table("things", images, out, sample_attributes=attributes)
    pd.testing.assert_frame_equal(pd.read_parquet(out), table)
    expected = stim.sort_values("source").reset_index(drop=True)
    assert table.image_id.tolist() == expected.image_id.tolist()  # exactly the MEG images, catch left out
    assert (table.split == expected.split).all() and (table.concept == expected.concept).all()
    assert sorted(table.source) == sorted(on_disk) and all((images / s).is_file() for s in table.source)
    # the MEG loader accepts the table of either layout, with the same result
    subj = load_meg_subject(root, 1, "raw", {}, stimulus_table=table)
    assert subj.table.image_id.tolist() == sorted(stim.image_id)
    if layout == "meg":  # globbing the MEG folders gives the same table
        pd.testing.assert_frame_equal(things_stimulus_table(images), table)
    else:
        with pytest.raises(FileNotFoundError, match="THINGS database layout.*sample attributes"):
            things_stimulus_table(images)
    gone = sorted(on_disk)[:3]
    for rel in gone:
        (images / rel).unlink()
    with pytest.raises(FileNotFoundError, match=rf"3 of the {len(stim)} images THINGS-MEG shows .*missing under "
                                                rf".*{Path(gone[0]).name}"):
        things_stimulus_table(images, sample_attributes=attributes)


def test_sample_onsets_need_the_sample_column(meg_copy, tmp_path):
    root, stim, _ = meg_copy
    events = root / "sub-BIGMEG1" / "ses-01" / "meg" / "sub-BIGMEG1_ses-01_task-main_run-01_events.tsv"
    pd.read_csv(events, sep="\t", keep_default_na=False).drop(columns="sample").to_csv(events, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"run-01_events\.tsv \(session 1, run 1\): onset: sample needs the events "
                                         r"'sample' column"):
        prepare_meg_subject(root, 1, "raw", *_outputs(tmp_path), {"onset": "sample"}, stimulus_table=stim)
    _assert_no_outputs(tmp_path)
    # the trigger needs no sample column; that run's trigger lead is then not measured
    subj = load_meg_subject(root, 1, "raw", {"onset": "trigger"}, stimulus_table=stim)
    assert np.isnan(subj.runs.trigger_lead_median_s[0]) and subj.runs.trigger_lead_median_s[1:].notna().all()
    with pytest.raises(ValueError, match="'onset' must be one of"):
        load_meg_subject(root, 1, "raw", {"onset": "photodiode"})
