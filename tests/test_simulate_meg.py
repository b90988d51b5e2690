"""The miniature THINGS-MEG simulator: real layouts, every quirk, planted effects and their null."""

from __future__ import annotations

import json

import mne
import numpy as np
import pandas as pd
import pytest

from brainprop.brain.meg import load_meg_subject
from brainprop.simulate.meg import (
    SIGNAL_UNIT_T,
    meg_channel_names,
    planted_latencies,
    planted_readouts,
    planted_responses,
    response_times,
    run_simulate_things_meg,
    simulate_things_meg,
    toy_features,
    toy_stimulus_table,
)

# simulated runs are shorter than MNE's 33 s FIR for a 0.1 Hz high-pass (real runs are ~6 min)
pytestmark = pytest.mark.filterwarnings("ignore:filter_length")

SEED = 3
N_LAYERS = 4


def _inputs(n_concepts=8, per=4, n_test=4):
    stim = toy_stimulus_table(n_concepts, per, n_test)
    ids = list(stim.image_id.sample(frac=1.0, random_state=0))  # features in another order than the table
    fwd, bwd = toy_features(len(ids), N_LAYERS, 12, SEED)
    return stim, ids, fwd, bwd


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    stim, ids, fwd, bwd = _inputs()
    root = tmp_path_factory.mktemp("meg") / "things-meg"
    params = {"subjects": [1, 2, 3], "n_catch_trials": 5, "n_catch_images": 3}
    trials = simulate_things_meg(root, stim, fwd, bwd, ids, params, seed=SEED)
    return root, stim, trials, params


def test_bids_layout_and_sidecars(small):
    root, stim, trials, params = small
    channels = meg_channel_names(24)
    assert "MRO11-1609" in channels and channels == sorted(channels) and len(channels) == 24
    for sub in (1, 2, 3):
        for ses in (1, 2):
            meg = root / f"sub-BIGMEG{sub}" / f"ses-{ses:02d}" / "meg"
            ses_dir = root / f"sub-BIGMEG{sub}" / f"ses-{ses:02d}"
            scans = pd.read_csv(ses_dir / f"sub-BIGMEG{sub}_ses-{ses:02d}_scans.tsv", sep="\t")
            assert sorted(scans.filename) == [f"meg/sub-BIGMEG{sub}_ses-{ses:02d}_task-main_run-{r:02d}_meg.fif"
                                              for r in (1, 2)]
            for run in (1, 2):
                stem = meg / f"sub-BIGMEG{sub}_ses-{ses:02d}_task-main_run-{run:02d}"
                ch = pd.read_csv(f"{stem}_channels.tsv", sep="\t")
                assert list(ch.name) == channels + ["UPPT001"]
                assert set(ch.type[:-1]) == {"MEGMAG"}
                assert json.loads(open(f"{stem}_meg.json").read())["SamplingFrequency"] == 240.0
                ev = pd.read_csv(f"{stem}_events.tsv", sep="\t", keep_default_na=False)
                assert list(ev.columns) == ["onset", "duration", "trial_type", "things_category_nr", "value", "sample"]
                catch = ev.trial_type == "catch"
                assert (ev.things_category_nr[catch] == "n/a").all() and (ev.value[catch] == "n/a").all()
                assert (ev.value[~catch] != "n/a").all()
                np.testing.assert_allclose(ev.onset * 240.0, ev["sample"], atol=1e-3)
                raw = mne.io.read_raw_fif(f"{stem}_meg.fif", verbose="error")
                assert raw.info["sfreq"] == 240.0 and raw.ch_names == channels + ["UPPT001"]
                assert raw.times[-1] > ev.onset.max() + 3.5  # the longest epoch fits
    # every training image once, every test image test_repeats times, catch trials per subject
    for sub, t in trials.groupby("subject"):
        counts = t[t.trial_type != "catch"].image_id.value_counts()
        split = stim.set_index("image_id").split
        assert set(counts.index) == set(stim.image_id)
        assert (counts[split[counts.index] == "train"] == 1).all()
        assert (counts[split[counts.index] == "test"] == 3).all()
        assert (t.trial_type == "catch").sum() == 5


def test_sample_attributes_and_numbers_are_one_based(small):
    root, stim, trials, _ = small
    attrs = pd.read_csv(root / "sourcedata" / "sample_attributes_P2.csv", keep_default_na=False)
    t = trials[trials.subject == 2].reset_index(drop=True)
    assert list(attrs[["session_nr", "run_nr", "trial_nr"]].itertuples(index=False)) == \
        list(t[["session_nr", "run_nr", "trial_nr"]].itertuples(index=False))
    assert attrs.session_nr.min() == 1 and attrs.run_nr.min() == 1 and attrs.trial_nr.min() == 1
    shown = attrs[attrs.trial_type != "catch"]
    nr = shown.things_image_nr.astype(int)
    assert nr.min() == 1 and nr.max() == len(stim)
    # image numbers are 1-based ranks of the image path; categories 1-based ranks of the concept
    by_path = {p: i + 1 for i, p in enumerate(sorted(stim.source))}
    assert (nr == shown.image_path.map(by_path)).all()
    concepts = sorted(stim.concept.unique())
    cat = shown.things_category_nr.astype(int)
    assert (shown.image_path.map(dict(zip(stim.source, stim.concept))) == [concepts[c - 1] for c in cat]).all()
    catch = attrs[attrs.trial_type == "catch"]
    assert catch.image_path.str.fullmatch(r"images_catch_meg/catch00[1-3]\.jpg").all()
    assert (catch.things_image_nr == "n/a").all()


def test_derivative_conventions(small):
    root, _, trials, _ = small
    base = root / "derivatives" / "preprocessed" / "preprocessed_P1-epo.fif"
    assert len(list(base.parent.glob("preprocessed_P1-epo-*.fif"))) >= 1  # split files, read via the base file
    ep = mne.read_epochs(base, preload=False, verbose="error")
    assert len(ep) == (trials.subject == 1).sum()
    assert ep.info["sfreq"] == 200.0 and ep.tmin == pytest.approx(-0.1) and ep.tmax == pytest.approx(1.3)
    assert "MRO11-1609" not in ep.ch_names and len(ep.ch_names) == 23
    assert ep.info["highpass"] == pytest.approx(0.1) and ep.info["lowpass"] == pytest.approx(40.0)
    x = ep.get_data(item=slice(0, 5))
    base_win = ep.times <= 0
    np.testing.assert_allclose(x[..., base_win].mean(-1), 0, atol=1e-6)  # per-epoch z-score baseline
    np.testing.assert_allclose(x[..., base_win].std(-1), 1, atol=1e-5)


def test_trigger_leads_events_onsets_by_the_photodiode_delay(small):
    root, _, trials, _ = small
    stem = root / "sub-BIGMEG3" / "ses-02" / "meg" / "sub-BIGMEG3_ses-02_task-main_run-01"
    raw = mne.io.read_raw_fif(f"{stem}_meg.fif", verbose="error")
    trig = mne.find_events(raw, stim_channel="UPPT001", verbose="error")
    ev = pd.read_csv(f"{stem}_events.tsv", sep="\t")
    delay = round(0.03 * 240)
    # THINGS-MEG's codes: 64 at every trial (catch included), one final 32 after the last image
    assert list(trig[:, 2]) == [64] * len(ev) + [32]
    assert trig[-1, 0] == ev["sample"].iloc[-1] + round(0.5 * 240)
    np.testing.assert_array_equal(trig[:-1, 0] + delay, ev["sample"])
    t = trials[(trials.subject == 3) & (trials.session_nr == 2) & (trials.run_nr == 1)]
    np.testing.assert_array_equal(t.trigger_sample, trig[:-1, 0])


def test_planted_value_mismatches(small, tmp_path):
    root, stim, trials, _ = small
    numbers = set(range(1, len(stim) + 1))
    for sub in (1, 2, 3):
        attrs = pd.read_csv(root / "sourcedata" / f"sample_attributes_P{sub}.csv", keep_default_na=False)
        for (ses, run), a in attrs.groupby(["session_nr", "run_nr"], sort=True):
            ev = pd.read_csv(root / f"sub-BIGMEG{sub}" / f"ses-{ses:02d}" / "meg" /
                             f"sub-BIGMEG{sub}_ses-{ses:02d}_task-main_run-{run:02d}_events.tsv", sep="\t",
                             keep_default_na=False)
            assert list(ev.trial_type) == list(a.trial_type)
            value = pd.to_numeric(ev.value, errors="coerce").fillna(-1).to_numpy()
            wrong = value != pd.to_numeric(a.things_image_nr, errors="coerce").fillna(-1).to_numpy()
            # exactly n_value_mismatches (default 2) exp/test trials per run name another, existing image
            assert wrong.sum() == 2 and (ev.trial_type[wrong] != "catch").all()
            assert set(value[wrong].astype(int)) <= numbers
    # the sample attributes hold the truth; the returned trials say what events.tsv holds
    t = trials.dropna(subset=["image_id"])
    by_path = {p: i + 1 for i, p in enumerate(sorted(stim.source))}
    assert (t.things_image_nr.astype(int) == t.image_path.map(by_path)).all()
    assert (t.value != t.things_image_nr).sum() == 2 * 4 * 3
    stim6, ids, fwd, bwd = _inputs(6, 3, 2)
    none = simulate_things_meg(tmp_path / "none", stim6, fwd, bwd, ids,
                               {"subjects": [1], "n_sessions": 1, "n_runs": 1, "n_value_mismatches": 0}, seed=SEED)
    assert (none.value.astype("Float64").fillna(-1) == none.things_image_nr.astype("Float64").fillna(-1)).all()


def test_simulation_is_deterministic_and_weights_only_add_their_signal(tmp_path):
    stim, ids, fwd, bwd = _inputs(6, 3, 2)
    base = {"subjects": [1], "n_sessions": 1, "n_runs": 1, "n_catch_trials": 2, "n_catch_images": 2}
    runs = {}
    for name, w in (("a", 1.0), ("b", 1.0), ("null", 0.0)):
        root = tmp_path / name
        trials = simulate_things_meg(root, stim, fwd, bwd, ids, {**base, "forward_weight": w}, seed=SEED)
        fif = root / "sub-BIGMEG1" / "ses-01" / "meg" / "sub-BIGMEG1_ses-01_task-main_run-01_meg.fif"
        runs[name] = mne.io.read_raw_fif(fif, verbose="error").get_data(picks="mag") / SIGNAL_UNIT_T
    np.testing.assert_array_equal(runs["a"], runs["b"])
    # the difference between forward weight 1 and 0 is exactly the forward responses at the onsets
    readouts = planted_readouts(
        [f[pd.Index(ids).get_indexer(stim.image_id)] for f in fwd],
        [b[pd.Index(ids).get_indexer(stim.image_id)] for b in bwd], base, SEED)
    resp = planted_responses(readouts, response_times(N_LAYERS, base), 24, 1, base, SEED)["forward"]
    expected = np.zeros_like(runs["a"])
    row = pd.Index(stim.image_id).get_indexer(trials.image_id.fillna(""))
    for r, s in zip(row, trials["sample"]):
        if r >= 0:
            expected[:, s:s + resp.shape[-1]] += resp[r][:, :expected.shape[1] - s]
    np.testing.assert_allclose(runs["a"] - runs["null"], expected, atol=2e-5 * np.abs(runs["a"]).max())
    assert np.abs(expected).max() > 0.5


def test_planted_responses_scale_and_null():
    n = 2000
    params = {"n_components": 3}
    rng = np.random.default_rng(0)
    fwd = [rng.standard_normal((n, 20)) for _ in range(3)]
    bwd = [rng.standard_normal((n, 20)) for _ in range(3)]
    readouts = planted_readouts(fwd, bwd, params, seed=1)
    # backprop read-outs are orthogonalized against every forward read-out
    f = readouts["forward"].transpose(1, 0, 2).reshape(n, -1)
    b = readouts["backprop"].transpose(1, 0, 2).reshape(n, -1)
    assert np.abs(f.T @ b / n).max() < 1e-10
    times = np.arange(0, 1.5, 1 / 50)
    for w in (0.5, 2.0):
        resp = planted_responses(readouts, times, 30, 1, {**params, "forward_weight": w, "backprop_weight": w}, 1)
        for s in ("forward", "backprop"):
            peak_var = resp[s].var(axis=0).mean(axis=0).max()  # across images, mean over sensors, max over time
            assert peak_var == pytest.approx(w**2, rel=0.15)
    null = planted_responses(readouts, times, 30, 1, {**params, "backprop_weight": 0.0}, 1)
    assert not null["backprop"].any() and null["forward"].any()


def test_noise_variance_matches_snr(tmp_path):
    stim, ids, fwd, bwd = _inputs(6, 3, 2)
    params = {"subjects": [1], "n_sessions": 1, "n_runs": 1, "forward_weight": 0.0, "backprop_weight": 0.0,
              "evoked_amplitude": 0.0, "drift_amplitude": 0.0, "snr": 4.0}
    simulate_things_meg(tmp_path / "m", stim, fwd, bwd, ids, params, seed=SEED)
    raw = mne.io.read_raw_fif(tmp_path / "m" / "sub-BIGMEG1" / "ses-01" / "meg" /
                              "sub-BIGMEG1_ses-01_task-main_run-01_meg.fif", verbose="error")
    x = raw.get_data(picks="mag") / SIGNAL_UNIT_T
    assert x.var() == pytest.approx(1 / 4.0, rel=0.03)


def test_bad_simulation_inputs(tmp_path):
    stim, ids, fwd, bwd = _inputs(6, 3, 2)
    with pytest.raises(ValueError, match="unknown MEG simulation parameter"):
        simulate_things_meg(tmp_path / "x", stim, fwd, bwd, ids, {"snrr": 1}, seed=0)
    with pytest.raises(ValueError, match="missing rows for 1 image"):
        simulate_things_meg(tmp_path / "x", stim, [f[1:] for f in fwd], bwd, ids[1:], {}, seed=0)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))
    (tmp_path / "y").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        simulate_things_meg(tmp_path / "y", stim, fwd, bwd, ids, {}, seed=0)


def _effect_curves(subject, stim, readouts):
    """Mean over sensors and components of corr(read-out, data)^2 at each time: (L, n_times)."""
    pos = pd.Index(stim.image_id).get_indexer(subject.table.image_id)
    r = readouts[:, pos, :]
    r = (r - r.mean(1, keepdims=True)) / r.std(1, keepdims=True)
    y = subject.data.astype(np.float64)  # already z-scored across images
    corr = np.einsum("lnk,nct->lkct", r, y) / len(pos)
    return (corr**2).mean(axis=(1, 2))


def test_planted_effects_recovered_from_prepared_data_and_null(tmp_path):
    stim, ids, fwd, bwd = _inputs(16, 6, 4)
    base = {"subjects": [1], "n_catch_trials": 4, "n_catch_images": 2, "snr": 2.0}
    order = pd.Index(ids).get_indexer(stim.image_id)
    readouts = planted_readouts([f[order] for f in fwd], [b[order] for b in bwd], base, SEED)
    lat = planted_latencies(N_LAYERS, base)
    results = {}
    for name, extra in (("planted", {}), ("null", {"forward_weight": 0.0})):
        root = tmp_path / name
        simulate_things_meg(root, stim, fwd, bwd, ids, {**base, **extra}, seed=SEED)
        # locked to the photodiode onsets the responses were planted at (the trigger adds its delay)
        subj = load_meg_subject(root, 1, "raw", {"onset": "sample"}, stimulus_table=stim)
        results[name] = {s: _effect_curves(subj, stim, readouts[s]) for s in ("forward", "backprop")}
    times = subj.times
    # chance level: the largest curve value with read-outs shuffled across images (99th percentile)
    rng = np.random.default_rng(0)
    chance = np.quantile([_effect_curves(subj, stim, readouts["forward"][:, rng.permutation(len(stim))]).max()
                          for _ in range(100)], 0.99)
    fwd_curve, bwd_curve = results["planted"]["forward"], results["planted"]["backprop"]
    # forward: each layer peaks at its planted latency (within one 33 ms sample), later for deeper layers
    peaks = times[fwd_curve.argmax(axis=1)]
    assert np.all(np.diff(peaks) > 0)
    np.testing.assert_allclose(peaks, lat["forward"]["latency"], atol=0.05)
    assert fwd_curve.max(axis=1).min() > 3 * chance
    # backprop: every gradient layer peaks late (around 0.9 s), deeper layers higher, nothing early
    bpeaks = times[bwd_curve.argmax(axis=1)]
    assert np.all((bpeaks > 0.75) & (bpeaks < 1.05))
    assert np.all(np.diff(bwd_curve.max(axis=1)) > 0)
    assert bwd_curve.max() > 2 * chance
    assert bwd_curve[:, times < 0.5].max() < chance
    # null: forward weight 0 leaves no forward signal above chance, backprop untouched
    assert results["null"]["forward"].max() < chance
    np.testing.assert_allclose(results["null"]["backprop"].max(axis=1), bwd_curve.max(axis=1), rtol=0.35)


def test_rule_entry_point_reads_a_feature_folder(tmp_path):
    stim, ids, fwd, bwd = _inputs(6, 3, 2)
    feats = tmp_path / "features"
    feats.mkdir()
    layers = [f"blocks.{i}.mlp.fc2" for i in range(N_LAYERS)]
    for name, f, b in zip(layers, fwd, bwd):
        np.save(feats / f"{name}.forward.npy", f)
        np.save(feats / f"{name}.backprop.npy", b)
    pd.DataFrame({"image_id": ids}).to_parquet(feats / "index.parquet")
    stim_path = tmp_path / "stimuli.parquet"
    stim.to_parquet(stim_path)
    params = {"subjects": [1], "n_sessions": 1, "n_runs": 1}
    run_simulate_things_meg(tmp_path / "sim", stim_path, feats, layers, params, seed=SEED)
    direct = tmp_path / "direct"
    simulate_things_meg(direct, stim, fwd, bwd, ids, params, seed=SEED)
    run = "sub-BIGMEG1/ses-01/meg/sub-BIGMEG1_ses-01_task-main_run-01_meg.fif"
    a = mne.io.read_raw_fif(tmp_path / "sim" / run, verbose="error").get_data()
    np.testing.assert_array_equal(a, mne.io.read_raw_fif(direct / run, verbose="error").get_data())
    assert json.loads((tmp_path / "sim" / "simulation.json").read_text())["n_layers"] == N_LAYERS
    (feats / f"{layers[2]}.backprop.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"blocks\.2\.mlp\.fc2\.backprop\.npy"):
        run_simulate_things_meg(tmp_path / "sim", stim_path, feats, layers, params, seed=SEED)


def test_every_simulation_parameter_is_documented():
    from pathlib import Path

    from brainprop.simulate.meg import DEFAULT_PARAMS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "meg.md").read_text()
    undocumented = [k for k in DEFAULT_PARAMS if f"\n    {k}: " not in doc]
    assert not undocumented, f"MEG simulation parameters missing from docs/meg.md: {undocumented}"
