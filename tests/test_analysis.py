"""Analysis functions on hand-made inputs with known answers (best layer, ROIs, correlations,
peak times, half-times, summary scores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from brainprop.analysis import (
    best_encoded_rois,
    best_layer,
    best_layer_per_vertex,
    checkpoint_iteration,
    combined_spatial,
    correlation,
    course_statistics,
    depth_bins,
    distance_layer_correlation,
    fmri_summary,
    half_time,
    half_times,
    mean_vertex_map,
    meg_summary,
    min_models,
    peak_times,
    roi_means,
    significant_map,
    spatial_score,
    stars,
    subject_threshold,
    summary_scores,
    temporal_score,
    vertex_array,
)

L = 5
DEPTHS = np.arange(L) / (L - 1)
LAYERS = [f"blocks.{i}.mlp.fc2" for i in range(L)]


# ---------------------------------------------------------------- best layer

def test_best_layer_argmax_depth_and_masks():
    scores = np.array([[0.1, 0.5, np.nan, 0.2, 0.0],
                       [0.2, 0.4, np.nan, 0.2, 0.0],
                       [0.9, 0.3, np.nan, 0.1, 0.0],
                       [0.3, 0.2, np.nan, 0.0, 0.0],
                       [0.0, np.nan, np.nan, 0.6, 0.0]])
    best = best_layer(scores, DEPTHS)
    # target 0: layer 2 is max -> k = 2 / (L - 1); target 1: layer 0 (NaN ignored); target 2: all NaN;
    # target 3: layer 4; target 4: ties -> shallowest layer
    np.testing.assert_array_equal(best, [2 / (L - 1), 0.0, np.nan, 1.0, 0.0])
    sig = np.zeros_like(scores, dtype=bool)
    sig[0, 0] = True   # significant at a non-best layer: argmax still over all layers
    sig[1, 3] = True
    best = best_layer(scores, DEPTHS, sig)
    np.testing.assert_array_equal(best, [0.5, np.nan, np.nan, 1.0, np.nan])


def test_best_layer_bad_shapes():
    with pytest.raises(ValueError, match="depths"):
        best_layer(np.zeros((3, 4)), DEPTHS)
    with pytest.raises(ValueError, match="significant"):
        best_layer(np.zeros((L, 4)), DEPTHS, np.zeros((L, 3), bool))


def _subject_table(scores, significant, signal="forward", subject=1, checkpoint="it300", vertices=None):
    """Tidy per-subject table from (L, n_vertices) arrays."""
    n = scores.shape[1]
    vertices = np.arange(n) * 10 if vertices is None else vertices
    frames = [pd.DataFrame({"subject": subject, "model": "m", "checkpoint": checkpoint, "modality": "fmri",
                            "vertex": vertices, "layer": LAYERS[li], "layer_depth": DEPTHS[li], "signal": signal,
                            "score": scores[li].astype(np.float32), "significant": significant[li]})
              for li in range(L)]
    return pd.concat(frames, ignore_index=True)


def test_best_layer_per_vertex_subject_and_group_tables():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(L, 30))
    sig = rng.uniform(size=(L, 30)) < 0.15
    table = _subject_table(scores, sig).sample(frac=1.0, random_state=1)  # row order must not matter
    out = best_layer_per_vertex(table, "forward")
    expected = best_layer(scores, DEPTHS, sig)
    keep = np.isfinite(expected)
    assert keep.sum() < 30 and keep.sum() > 5
    np.testing.assert_array_equal(out.vertex.to_numpy(), np.arange(30)[keep] * 10)
    np.testing.assert_allclose(out.layer_depth.to_numpy(), expected[keep])
    np.testing.assert_array_equal(out.layer.to_numpy(), np.array(LAYERS)[np.argmax(scores, 0)[keep]])
    np.testing.assert_allclose(out.score.to_numpy(), scores.max(0)[keep].astype(np.float32))
    assert (out.subject == 1).all() and (out.checkpoint == "it300").all()

    # group table: vertex kept when n_significant >= threshold at some layer
    n_sig = rng.integers(0, 4, size=(L, 30))
    group = _subject_table(scores, sig).rename(columns={"score": "mean"}).drop(columns=["subject", "significant"])
    group["n_significant"] = n_sig.ravel()
    for thr in (1, 3):
        out = best_layer_per_vertex(group, "forward", min_significant=thr)
        exp = best_layer(scores, DEPTHS, n_sig >= thr)
        np.testing.assert_array_equal(out.vertex.to_numpy(), np.flatnonzero(np.isfinite(exp)) * 10)
        np.testing.assert_allclose(out.layer_depth.to_numpy(), exp[np.isfinite(exp)])


def test_best_layer_per_vertex_residual_uses_its_own_test():
    scores = np.zeros((L, 3))
    scores[3, 0], scores[1, 1], scores[4, 2] = 1.0, 1.0, 1.0
    fb_sig = np.zeros((L, 3), bool)
    fb_sig[0, [0, 2]] = True
    # forward+backprop significant everywhere: it no longer selects the residual's vertices
    table = pd.concat([_subject_table(scores, fb_sig, "residual"),
                       _subject_table(scores * 0, np.ones((L, 3), bool), "forward+backprop")])
    out = best_layer_per_vertex(table, "residual")
    np.testing.assert_array_equal(out.vertex.to_numpy(), [0, 20])
    np.testing.assert_allclose(out.layer_depth.to_numpy(), [DEPTHS[3], DEPTHS[4]])
    # separate subjects are separate groups
    two = pd.concat([_subject_table(scores, fb_sig, subject=1), _subject_table(-scores, fb_sig, subject=2)])
    out = best_layer_per_vertex(two, "forward")
    assert out.groupby("subject").size().to_dict() == {1: 2, 2: 2}
    with pytest.raises(ValueError, match="signal='backprop'"):
        best_layer_per_vertex(table, "backprop")


# ---------------------------------------------------------------- ROIs

ROIS = pd.DataFrame({"hemi": ["lh", "lh", "rh", "rh", "rh"], "roi": [1, 2, 1, 2, 3],
                     "name": ["V1", "V2", "V1", "V2", "V3"], "dist_geodesic": [0.0, 10.0, 0.0, 12.0, 30.0]})


def test_roi_means_by_hemisphere_ignoring_nan():
    # V = 6 vertices per hemisphere
    labels = np.array([1, 1, 2, 2, 0, 3, 1, 2, 2, 2, 3, 0])
    values = np.array([1.0, 3.0, 5.0, np.nan, 100.0, 7.0, 2.0, 4.0, 6.0, 8.0, np.nan, 50.0])
    out = roi_means(values, labels, ROIS)
    # lh V1 {1, 3}; lh V2 {5} (NaN ignored); rh V1 {2}; rh V2 {4, 6, 8}; rh V3 only NaN
    np.testing.assert_allclose(out["mean"].to_numpy(), [2.0, 5.0, 2.0, 6.0, np.nan])
    np.testing.assert_array_equal(out["n"].to_numpy(), [2, 1, 1, 3, 0])
    assert list(out.name) == list(ROIS.name) and "dist_geodesic" in out
    with pytest.raises(ValueError, match="equal"):
        roi_means(values[:-1], labels, ROIS)
    with pytest.raises(ValueError, match="odd"):
        roi_means(values[:-1], labels[:-1], ROIS)


def test_best_encoded_rois_top_tercile():
    rng = np.random.default_rng(3)
    scores = rng.permutation(np.arange(9) / 10.0)
    table = pd.DataFrame({"roi": np.arange(9), "mean": scores})
    top = best_encoded_rois(table)
    assert set(top["roi"]) == set(np.argsort(scores)[-3:])
    # NaN ROIs are not eligible; 80 ROIs -> 27
    table80 = pd.DataFrame({"roi": np.arange(82), "mean": np.r_[rng.normal(size=80), np.nan, np.nan]})
    top = best_encoded_rois(table80)
    assert len(top) == 27 and set(top.roi) == set(np.argsort(table80["mean"].to_numpy()[:80])[-27:])
    assert len(best_encoded_rois(table, fraction=1.0)) == 9


# ---------------------------------------------------------------- correlations

def test_correlation_known_values_and_nan_pairs():
    d = np.array([0.0, 10.0, 20.0, 30.0, 40.0, np.nan, 50.0])
    k = np.array([0.0, 0.1, 0.5, 0.6, 0.9, 0.3, np.nan])
    c = distance_layer_correlation(d, np.exp(k))  # monotone, not linear
    assert c.n == 5 and c.rho == pytest.approx(1.0) and 0.9 < c.r < 1.0
    ref = sps.pearsonr(d[:5], np.exp(k[:5]))
    assert c.r == pytest.approx(ref.statistic) and c.p == pytest.approx(ref.pvalue)
    c = correlation(d, -k)
    assert c.rho == pytest.approx(-1.0) and c.r < 0
    c = correlation([1.0, 2.0], [1.0, 2.0])
    assert c.n == 2 and np.isnan(c.r)
    assert set(c.as_dict()) == {"r", "p", "rho", "p_spearman", "n"}


DEPTHS9 = np.arange(9) / 8


def _synthetic_fmri(rng, n_per_hemi=40):
    """Group table + ROIs where forward best layer grows with distance and backprop's decreases."""
    n_rois = 9
    rois = pd.DataFrame({"hemi": "lh", "roi": np.arange(1, n_rois + 1), "name": [f"R{i}" for i in range(n_rois)],
                         "dist_geodesic": np.arange(n_rois) * 10.0})
    labels = np.zeros(2 * n_per_hemi, np.int64)
    labels[:36] = np.repeat(np.arange(1, n_rois + 1), 4)   # 4 lh vertices per ROI, rest unknown / rh
    forward_level = np.repeat(rng.permutation(n_rois) / 10 + 0.2, 4)  # ROI forward scores, random order
    frames = []
    for signal, sign in (("forward", 1), ("backprop", -1)):
        for li, depth in enumerate(DEPTHS9):  # 9 layers: ROI i is best encoded by layer i (forward)
            pref = np.repeat(DEPTHS9 if sign > 0 else DEPTHS9[::-1], 4)
            score = forward_level * (1 - (depth - pref) ** 2)
            frames.append(pd.DataFrame({"model": "m", "checkpoint": "it10", "layer": f"b{li}",
                                        "layer_depth": depth, "signal": signal, "vertex": np.arange(36),
                                        "mean": score, "n_significant": 2, "n_subjects": 2}))
    return pd.concat(frames, ignore_index=True), labels, rois, forward_level[::4]


@pytest.mark.parametrize("method", ["vertex_mean", "profile"])
def test_spatial_score_recovers_planted_gradients(method):
    group, labels, rois, level = _synthetic_fmri(np.random.default_rng(4))
    fwd = spatial_score(group, labels, rois, "forward", method=method)
    bwd = spatial_score(group, labels, rois, "backprop", method=method)
    top3 = set(rois.roi.to_numpy()[np.argsort(level)[-3:]])
    assert set(fwd.rois.roi[fwd.rois.selected]) == top3 == set(bwd.rois.roi[bwd.rois.selected])
    assert fwd.correlation.n == 3 and fwd.correlation.rho == pytest.approx(1.0)
    assert bwd.correlation.rho == pytest.approx(-1.0)
    np.testing.assert_allclose(fwd.rois.best_layer.to_numpy(), DEPTHS9)
    np.testing.assert_allclose(bwd.rois.best_layer.to_numpy(), DEPTHS9[::-1])
    np.testing.assert_allclose(fwd.rois.forward_score.to_numpy(), level)
    assert (fwd.rois.n == 4).all()


# ---------------------------------------------------------------- MEG peaks

def _meg_group(peaks, times, signal="forward", checkpoint="it300", amp=None):
    frames = []
    for li, tp in enumerate(peaks):
        a = 1.0 if amp is None else amp[li]
        mean = a * np.exp(-0.5 * ((times - tp) / 0.1) ** 2)
        frames.append(pd.DataFrame({"model": "m", "checkpoint": checkpoint, "layer": LAYERS[li],
                                    "layer_depth": DEPTHS[li], "signal": signal, "time": times, "mean": mean,
                                    "sem": 0.01 + 0 * times, "n_subjects": 4, "t": mean, "pvalue": 1 - mean,
                                    "pvalue_fdr": np.clip(1.1 - mean, 0, 1), "significant": mean > 0.5}))
    return pd.concat(frames, ignore_index=True)


def test_peak_times_gaussian_and_temporal_score():
    times = np.round(np.arange(-0.5, 3.0, 1 / 30), 6)  # 30 Hz, includes 0.3 s
    peaks_true = times[[21, 23, 25, 27, 29]]  # 0.2 .. 0.466 s
    group = _meg_group(peaks_true, times, amp=[0.1, 0.2, 0.3, 0.4, 0.5])
    group = pd.concat([group, _meg_group(peaks_true[::-1], times, signal="backprop")])
    peaks = peak_times(group, "forward")
    np.testing.assert_allclose(peaks.peak_time, peaks_true)
    np.testing.assert_allclose(peaks.peak_score, [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(peaks.layer_depth, DEPTHS)
    ts = temporal_score(peaks)
    assert ts.r == pytest.approx(1.0) and ts.n == L
    assert temporal_score(peak_times(group, "backprop")).r == pytest.approx(-1.0)
    # a single Gaussian at 0.3 s, plus a larger bump in the baseline: peaks are searched after onset
    one = _meg_group([0.3], times).iloc[:len(times)].copy()
    one["mean"] += 2 * np.exp(-0.5 * ((times + 0.4) / 0.05) ** 2)
    assert peak_times(one, "forward").peak_time.iloc[0] == pytest.approx(0.3)
    assert meg_summary(one).peak_time.iloc[0] == pytest.approx(0.3)  # Fig. 3 MEG score: same window
    assert peak_times(one, "forward", tmin=None).peak_time.iloc[0] == pytest.approx(-0.4, abs=1e-6)
    # onset itself is searched (inclusive window), the sample before it is not
    edge = one.assign(mean=np.where(np.isclose(times, 0.0), 5.0, np.where(times < 0, 9.0, 0.0)))
    assert peak_times(edge, "forward").peak_time.iloc[0] == pytest.approx(0.0)


# ---------------------------------------------------------------- training dynamics

def test_checkpoint_iteration():
    assert checkpoint_iteration("it300") == 300 and checkpoint_iteration("it0") == 0
    with pytest.raises(ValueError, match="it<iteration>"):
        checkpoint_iteration("final")


def test_half_time_exact_in_log_space():
    # linear in log10(it + 1): interpolation is exact, half of the final at it = sqrt(F + 1) - 1
    its = np.array([0, 9, 999, 4, 9999])
    v = np.log10(its + 1) / 4.0
    assert half_time(its, v) == pytest.approx(99.0)
    # from the initial value: baseline 1 added -> same answer; without, target moves to 10**3 - 1
    assert half_time(its, v + 1.0, from_initial=True) == pytest.approx(99.0)
    assert half_time(its, v + 1.0) == pytest.approx(0.0)  # 50% of 2 = 1 reached at the first checkpoint
    assert np.isnan(half_time(its, -v))
    assert np.isnan(half_time([0, 10], [0.2, np.nan]))


def test_half_time_saturating_exponential():
    tau, T = 2000.0, 50_000.0
    its = np.unique(np.round(np.geomspace(1, T, 4000)))
    v = 1 - np.exp(-its / tau)
    expected = -tau * np.log(1 - 0.5 * (1 - np.exp(-T / tau)))  # = tau * ln 2 up to e^-25
    assert half_time(its, v) == pytest.approx(expected, rel=1e-4)
    assert half_time(its, v, fraction=0.9) == pytest.approx(-tau * np.log(0.1), rel=1e-4)


def test_half_times_per_group():
    its = [0, 9, 99, 999, 9999]
    rows = [{"signal": s, "checkpoint": f"it{i}", "score": np.log10(i + 1) / 4 * (1 if s == "forward" else 2)}
            for s in ("forward", "backprop") for i in its]
    out = half_times(pd.DataFrame(rows), "score", by=["signal"])
    np.testing.assert_allclose(out.set_index("signal").half_time.loc[["forward", "backprop"]], [99.0, 99.0])
    np.testing.assert_allclose(out.set_index("signal")["final"].loc[["forward", "backprop"]], [1.0, 2.0])


# ---------------------------------------------------------------- summary scores

def test_stars():
    assert [stars(p) for p in (0.2, 0.05, 0.049, 0.0099, 0.0009, np.nan)] == ["", "", "*", "**", "***", ""]


def test_meg_summary_last_layer_max():
    times = np.round(np.arange(-0.5, 3.0, 1 / 30), 6)
    group = _meg_group(times[[21, 23, 25, 27, 29]], times, amp=[0.1, 0.2, 0.3, 0.4, 0.5])
    out = meg_summary(group)
    assert len(out) == 1 and out.layer.iloc[0] == LAYERS[-1]
    assert out.score.iloc[0] == pytest.approx(0.5) and out.peak_time.iloc[0] == pytest.approx(times[29])
    assert out.pvalue.iloc[0] == pytest.approx(0.6) and out.stars.iloc[0] == ""
    out = meg_summary(group, layer=LAYERS[1])
    assert out.score.iloc[0] == pytest.approx(0.2) and out.pvalue.iloc[0] == pytest.approx(0.9)


def test_fmri_summary_mean_over_significant_and_subject_ttest():
    rng = np.random.default_rng(5)
    n_sub, n_v = 4, 6
    per = rng.normal(0.2, 0.05, size=(n_sub, n_v))
    sig = np.array([True, True, False, True, False, False])
    res_sig = np.array([False, True, False, False, True, False])  # the residual's own test
    frames = []
    for s in range(n_sub):
        for signal, scale in (("forward", 1.0), ("forward+backprop", 1.5), ("residual", 0.5)):
            frames.append(pd.DataFrame({"subject": s + 1, "model": "m", "checkpoint": "it300", "layer": LAYERS[-1],
                                        "layer_depth": 1.0, "signal": signal, "vertex": np.arange(n_v),
                                        "score": per[s] * scale,
                                        "significant": res_sig if signal == "residual" else sig}))
    subjects = pd.concat(frames, ignore_index=True)
    group = (subjects.groupby(["model", "checkpoint", "layer", "layer_depth", "signal", "vertex"])
             .agg(mean=("score", "mean"), n_significant=("significant", "sum"), n_subjects=("score", "count"))
             .reset_index())
    out = fmri_summary(group, subjects).set_index("signal")
    for signal, scale in (("forward", 1.0), ("forward+backprop", 1.5), ("residual", 0.5)):
        # each signal's vertices come from its own test, the residual's included
        mask = res_sig if signal == "residual" else sig
        assert out.loc[signal, "score"] == pytest.approx(per[:, mask].mean() * scale)
        assert out.loc[signal, "n_vertices"] == mask.sum()
        subj_means = per[:, mask].mean(1) * scale
        ref = sps.ttest_1samp(subj_means, 0, alternative="greater")
        assert out.loc[signal, "pvalue"] == pytest.approx(ref.pvalue)
        assert out.loc[signal, "sem"] == pytest.approx(sps.sem(subj_means))
    assert out.loc["forward", "stars"] == "***"
    no_subj = fmri_summary(group, min_significant=n_sub + 1)
    assert no_subj.n_vertices.eq(0).all() and no_subj.score.isna().all() and no_subj.pvalue.isna().all()

    times = np.round(np.arange(0, 1, 0.1), 6)
    both = summary_scores(_meg_group([0.3] * L, times, checkpoint="it300"), group, subjects)
    assert both.modality.value_counts().to_dict() == {"fmri": 3, "meg": 1}


def test_vertex_array():
    np.testing.assert_array_equal(vertex_array([3, 0], [1.5, 2.0], 5), [2.0, np.nan, np.nan, 1.5, np.nan])
    with pytest.raises(ValueError, match="duplicate"):
        vertex_array([1, 1], [0.0, 1.0], 5)
    with pytest.raises(ValueError, match="lie in"):
        vertex_array([5], [0.0], 5)


# ---------------------------------------------------------------- several models

def test_min_models_is_a_majority():
    assert [min_models(n) for n in (1, 2, 3, 8)] == [1, 1, 2, 4]
    with pytest.raises(ValueError):
        min_models(0)


def test_mean_vertex_map_counts_only_present_vertices():
    maps = [([0, 1, 2], [1.0, 2.0, 3.0]), ([1, 2], [4.0, 5.0]), ([2], [9.0])]
    np.testing.assert_allclose(mean_vertex_map(maps, 4, 1), [1.0, 3.0, 17 / 3, np.nan])
    np.testing.assert_allclose(mean_vertex_map(maps, 4, 2), [np.nan, 3.0, 17 / 3, np.nan])
    np.testing.assert_allclose(mean_vertex_map(maps, 4, 3), [np.nan, np.nan, 17 / 3, np.nan])


def test_significant_map_uses_each_signals_own_test_and_last_layer():
    rows = []
    for depth, layer in ((0.0, "a"), (1.0, "b")):
        for signal, sig in (("forward", [2, 0, 1]), ("forward+backprop", [0, 2, 2]), ("residual", [0, 1, 0])):
            rows.append(pd.DataFrame({"model": "m", "checkpoint": "it1", "layer": layer, "layer_depth": depth,
                                      "signal": signal, "vertex": [5, 6, 7], "mean": [0.1, 0.2, 0.3 + depth],
                                      "n_significant": sig, "n_subjects": 2}))
    group = pd.concat(rows, ignore_index=True)
    fwd = significant_map(group, "forward", min_significant=2)
    assert fwd.vertex.tolist() == [5] and fwd.score.tolist() == [0.1]
    res = significant_map(group, "residual", min_significant=1)  # its own test, not forward+backprop's
    assert res.vertex.tolist() == [6] and res.score.tolist() == pytest.approx([0.2])
    assert significant_map(group, "forward", layer="a", min_significant=1).vertex.tolist() == [5, 7]  # union
    assert significant_map(group, "forward", layer="a").vertex.tolist() == [5]  # default: majority, 2 of 2
    with pytest.raises(ValueError, match="one model/checkpoint"):
        significant_map(pd.concat([group, group.assign(model="n")]), "forward")


def test_combined_spatial_equals_spatial_score_for_one_model_and_averages_several():
    group, labels, rois, level = _synthetic_fmri(np.random.default_rng(4))
    one = spatial_score(group, labels, rois, "backprop")
    same = combined_spatial([one])
    assert same.correlation == one.correlation
    # a second model with the reversed ROI order: the mean best layer is flat (0.5) everywhere
    flipped = spatial_score(group.assign(layer_depth=1 - group.layer_depth), labels, rois, "backprop")
    both = combined_spatial([one, flipped])
    np.testing.assert_allclose(both.rois.best_layer, 0.5)
    assert np.isnan(both.correlation.r)  # constant best layer: undefined, not a fake number
    np.testing.assert_allclose(both.rois.forward_score, (one.rois.forward_score + flipped.rois.forward_score) / 2)


def test_depth_bins():
    np.testing.assert_array_equal(depth_bins([0, 0.2, 0.5, 0.74, 1.0], 3), [0, 0, 1, 1, 2])
    with pytest.raises(ValueError):
        depth_bins([1.5], 3)


def test_course_statistics_equals_scipy_and_statsmodels():
    from statsmodels.stats.multitest import fdrcorrection

    rng = np.random.default_rng(0)
    times = np.linspace(-0.1, 1.0, 12)
    rows = []
    for model in ("a", "b"):
        for subject in (1, 2, 3):
            score = 0.1 * (times > 0.3) + rng.normal(0, 0.02, len(times))
            rows.append(pd.DataFrame({"signal": "forward", "model": model, "subject": subject, "time": times,
                                      "score": score}))
    courses = pd.concat(rows, ignore_index=True)
    out = course_statistics(courses, ["signal"], ["subject", "model"], q=0.05)
    x = courses.pivot_table(index=["subject", "model"], columns="time", values="score").to_numpy()
    ref = sps.ttest_1samp(x, 0, axis=0, alternative="greater")
    np.testing.assert_allclose(out["t"], ref.statistic)
    np.testing.assert_allclose(out["pvalue"], ref.pvalue)
    reject, p_fdr = fdrcorrection(ref.pvalue, 0.05)
    np.testing.assert_allclose(out["pvalue_fdr"], p_fdr)
    np.testing.assert_array_equal(out["significant"], reject)
    np.testing.assert_allclose(out["sem"], sps.sem(x, axis=0))
    assert (out["n"] == 6).all() and out.loc[out.time > 0.3, "significant"].all()


# ---------------------------------------------------------------- the paper's ROIs, distances, best layers

ROOT = Path(__file__).resolve().parents[1]


def _two_hemisphere_atlas(rng, n_areas=180, per_area=3, n_unknown=7):
    """Labels (2V,) of n_areas areas in each hemisphere (shuffled vertex order, a few unknown vertices),
    the per-hemisphere ROI table with three distance columns, and a group table (5 layers, forward and
    backprop, every vertex significant in 2 of 2 subjects) whose forward best layer follows
    ``dist_euclidean``."""
    hemi = np.r_[np.repeat(np.arange(1, n_areas + 1), per_area), np.zeros(n_unknown, np.int64)]
    labels = np.concatenate([rng.permutation(hemi), rng.permutation(hemi)])
    rois = pd.DataFrame({"hemi": np.repeat(["lh", "rh"], n_areas), "roi": np.tile(np.arange(1, n_areas + 1), 2),
                         "name": np.tile([f"A{i}" for i in range(1, n_areas + 1)], 2), "n_vertices": per_area,
                         "dist_geodesic": rng.uniform(0, 100, 2 * n_areas),
                         "dist_euclidean": np.tile(np.linspace(0, 80, n_areas), 2) + rng.uniform(0, 0.1, 2 * n_areas),
                         "dist_geodesic_centroid": rng.uniform(0, 100, 2 * n_areas)})
    n = len(labels)
    pref = np.where(labels > 0, (np.maximum(labels, 1) - 1) / (n_areas - 1), 0.0)  # area a -> depth (a-1)/179
    level = rng.uniform(0.1, 0.5, n)
    frames = [pd.DataFrame({"model": "m", "checkpoint": "it10", "layer": LAYERS[li], "layer_depth": d,
                            "signal": signal, "vertex": np.arange(n),
                            "mean": level * (1 - ((d - (pref if signal == "forward" else 1 - pref)) ** 2)),
                            "n_significant": 2, "n_subjects": 2})
              for signal in ("forward", "backprop") for li, d in enumerate(DEPTHS)]
    return labels, rois, pd.concat(frames, ignore_index=True), level


def test_merged_areas_rank_180_and_select_a_tercile_of_60_as_the_paper_config():
    from brainprop.brain.atlas import analysis_rois
    from brainprop.config import resolve_config

    figures = resolve_config([ROOT / "config/paper.yaml"], workflow_dir=ROOT)["figures"]
    assert (figures["roi_hemispheres"], figures["roi_best_layer"], figures["min_significant"]) == (
        "merged", "profile", "majority")
    labels, rois, group, level = _two_hemisphere_atlas(np.random.default_rng(7))
    res = spatial_score(group, labels, analysis_rois(rois, figures["roi_hemispheres"]), "forward",
                        figures["min_significant"], figures["roi_fraction"], figures["distance"],
                        figures["roi_best_layer"])
    assert res.n_ranked == 180 and res.rois.selected.sum() == 60 and res.correlation.n == 60
    assert (res.rois.hemi == "both").all() and (res.rois.n == 6).all()
    # the area's forward score: mean over its vertices of BOTH hemispheres (naive reference)
    best = group[group.signal == "forward"].groupby("vertex")["mean"].max().to_numpy()
    naive = [best[labels == a].mean() for a in range(1, 181)]
    np.testing.assert_allclose(res.rois.forward_score, naive)
    top = np.argsort(naive)[-60:] + 1
    assert set(res.rois.roi[res.rois.selected]) == set(top)
    sep = spatial_score(group, labels, analysis_rois(rois, "separate"), "forward", fraction=figures["roi_fraction"])
    assert sep.n_ranked == 360 and sep.rois.selected.sum() == 120 and sep.correlation.n == 120
    with pytest.raises(ValueError, match="hemispheres must be one of"):
        analysis_rois(rois, "both")


def test_roi_means_of_merged_areas_pool_both_hemispheres():
    from brainprop.brain.atlas import merge_hemispheres

    labels = np.array([1, 1, 2, 2, 0, 3, 1, 2, 2, 2, 3, 0])
    values = np.array([1.0, 3.0, 5.0, np.nan, 100.0, 7.0, 2.0, 4.0, 6.0, 8.0, np.nan, 50.0])
    merged = merge_hemispheres(ROIS.assign(n_vertices=[2, 2, 1, 3, 1]))
    out = roi_means(values, labels, merged)
    # area 1: {1, 3} + {2}; area 2: {5} + {4, 6, 8}; area 3: {7} + NaN
    np.testing.assert_allclose(out["mean"].to_numpy(), [2.0, 23 / 4, 7.0])
    np.testing.assert_array_equal(out["n"].to_numpy(), [3, 4, 1])
    with pytest.raises(ValueError, match="mixes merged"):
        roi_means(values, labels, pd.concat([merged, ROIS.iloc[:1]]))


@pytest.mark.parametrize("distance", ["dist_geodesic", "dist_euclidean", "dist_geodesic_centroid"])
def test_each_distance_can_be_selected(distance):
    from brainprop.brain.atlas import DISTANCES, analysis_rois

    labels, rois, group, _ = _two_hemisphere_atlas(np.random.default_rng(8))
    res = spatial_score(group, labels, analysis_rois(rois), "forward", distance=distance)
    sel = res.rois[res.rois.selected]
    assert res.correlation == correlation(sel[distance], sel.best_layer)
    others = [spatial_score(group, labels, analysis_rois(rois), "forward", distance=d).correlation.r
              for d in DISTANCES if d != distance]
    assert all(abs(res.correlation.r - r) > 0.05 for r in others)  # the column really is the one used
    if distance == "dist_euclidean":  # the planted best layer (5 layers) grows with the Euclidean distance
        assert np.all(np.diff(sel.sort_values(distance).best_layer) >= 0) and res.correlation.r > 0.9


def test_roi_best_layer_profile_versus_vertex_mean():
    # ROI 1: one vertex strongly best at layer 0, two weakly best at the last layer; ROI 2: one vertex, layer 2
    scores = np.array([[0.9, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.5],
                       [0.1, 0.0, 0.0, 0.0], [0.1, 0.2, 0.2, 0.0]])
    table = _subject_table(scores, np.ones_like(scores, bool), vertices=np.arange(4))
    table = pd.concat([table, table.assign(signal="backprop")])
    labels = np.array([1, 1, 1, 2, 0, 0, 0, 0])
    rois = pd.DataFrame({"hemi": "lh", "roi": [1, 2], "dist_geodesic": [0.0, 1.0]})
    profile = spatial_score(table, labels, rois, "forward", fraction=1.0)  # default: profile
    np.testing.assert_allclose(profile.rois.best_layer, [0.0, 0.5])  # argmax of mean [.3, .03, .03, .03, .13]
    vmean = spatial_score(table, labels, rois, "forward", fraction=1.0, method="vertex_mean")
    np.testing.assert_allclose(vmean.rois.best_layer, [(0 + 1 + 1) / 3, 0.5])
    with pytest.raises(ValueError, match="method must be one of"):
        spatial_score(table, labels, rois, "forward", method="roi_profile")


def test_subject_threshold_majority_and_counts():
    assert [subject_threshold("majority", n) for n in (1, 2, 3, 4, 8)] == [1, 2, 2, 3, 5]
    assert subject_threshold(3, 8) == 3
    for bad in ("union", 0, 1.5, True):
        with pytest.raises(ValueError, match="min_significant"):
            subject_threshold(bad, 8)
    # the group table's subjects set the majority: 3 of 4 here
    scores = np.eye(L, 3)
    group = _subject_table(scores, np.ones((L, 3), bool)).rename(columns={"score": "mean"})
    group = group.drop(columns=["subject", "significant"]).assign(n_subjects=4)
    group["n_significant"] = np.repeat([2, 3, 4], 1)[np.tile(np.arange(3), L)]
    assert best_layer_per_vertex(group, "forward").vertex.tolist() == [10, 20]
    assert best_layer_per_vertex(group, "forward", min_significant=1).vertex.tolist() == [0, 10, 20]


def test_majority_keeps_the_false_positive_share_flat_while_the_union_grows_with_subjects():
    """Per-subject BH at q over 2000 vertices (400 true in every subject), group map by each criterion:
    the union's share of null vertices among the kept grows about as S * q; the majority's does not."""
    from brainprop.stats import fdr_bh

    rng = np.random.default_rng(11)
    m, m1, q, reps = 2000, 400, 0.05, 30
    truth = np.arange(m) < m1
    share = {"union": {}, "majority": {}}
    for n_subjects in (1, 2, 4, 8):
        runs = {k: [] for k in share}
        for _ in range(reps):
            p = sps.norm.sf(rng.normal(size=(n_subjects, m)) + 3.5 * truth)  # independent subjects
            n_sig = np.sum([fdr_bh(ps, q)[0] for ps in p], axis=0)
            group = pd.DataFrame({"model": "m", "checkpoint": "it1", "layer": "b", "layer_depth": 1.0,
                                  "signal": "forward", "vertex": np.arange(m), "mean": 0.1, "n_significant": n_sig,
                                  "n_subjects": n_subjects})
            for name, criterion in (("union", 1), ("majority", "majority")):
                kept = significant_map(group, "forward", min_significant=criterion).vertex.to_numpy()
                runs[name].append((~truth[kept]).sum() / max(len(kept), 1))
        for name in share:
            share[name][n_subjects] = float(np.mean(runs[name]))
    union, majority = share["union"], share["majority"]
    assert union[1] == pytest.approx(majority[1]) and union[1] <= q  # one subject: the same, BH's FDR
    assert union[1] < union[2] < union[4] < union[8] and union[8] > 4 * union[1] and union[8] > 2 * q
    assert all(majority[s] <= majority[1] for s in (2, 4, 8)), share


def test_headline_reports_n_rois_next_to_every_spatial_score(tmp_path):
    from brainprop.brain.atlas import analysis_rois
    from brainprop.figures import headline_table, spatial_rows

    labels, rois, group, _ = _two_hemisphere_atlas(np.random.default_rng(9))
    rows = []
    for signal in ("forward", "backprop"):
        res = spatial_score(group, labels, analysis_rois(rois), signal, distance="dist_euclidean")
        rows += spatial_rows(res, model="m", checkpoint="it10", modality="fmri", signal=signal, layer="all")
    path = tmp_path / "fig2_hierarchy.csv"
    pd.DataFrame(rows).assign(figure="fig2_hierarchy").to_csv(path, index=False)
    table = headline_table({"fig2_hierarchy": path}, tmp_path / "headline.csv")
    spatial = table[table.statistic.str.startswith("spatial")]
    assert len(spatial) == 8 and (spatial.n_rois == 60).all() and (spatial.n_rois_ranked == 180).all()
    assert pd.read_csv(tmp_path / "headline.csv").n_rois.notna().sum() == 8
    fwd = spatial.set_index(["statistic", "signal"]).loc[("spatial_r", "forward")]
    bwd = spatial.set_index(["statistic", "signal"]).loc[("spatial_r", "backprop")]
    assert fwd.value > 0.9 and fwd.paper_value == 0.35 and bwd.value < -0.9 and bwd.paper_value == -0.27


def _figure_inputs(tmp_path, checkpoints=("it10",)):
    """Parquet/npy inputs of the ROI figures from the 2 x 180-area atlas and planted MEG peaks (after a
    larger baseline bump at -0.4 s that the peak search must ignore)."""
    labels, rois, group, _ = _two_hemisphere_atlas(np.random.default_rng(12))
    times = np.round(np.arange(-0.5, 1.5, 1 / 30), 6)
    inputs = {"rois": tmp_path / "rois.parquet", "vertex_rois": tmp_path / "vertex_rois.npy", "fmri": [], "meg": []}
    rois.to_parquet(inputs["rois"])
    np.save(inputs["vertex_rois"], labels)
    for i, ckpt in enumerate(checkpoints):
        scale = (i + 1) / len(checkpoints)
        meg = pd.concat([_meg_group(times[[21, 23, 25, 27, 29]], times, "forward", ckpt),
                         _meg_group([0.4] * L, times, "backprop", ckpt)])
        meg["mean"] = scale * (meg["mean"] + 3 * np.exp(-0.5 * ((meg["time"] + 0.4) / 0.05) ** 2))
        inputs["fmri"].append(_write_group(group.assign(checkpoint=ckpt, mean=group["mean"] * scale), len(labels),
                                           tmp_path / f"fmri_{ckpt}"))
        meg.to_parquet(tmp_path / f"meg_{ckpt}.parquet")
        inputs["meg"].append(tmp_path / f"meg_{ckpt}.parquet")
    return inputs, times


def _write_group(table: pd.DataFrame, n_vertices: int, folder) -> Path:
    """A tidy fMRI group table written as the group arrays of brainprop.fmri_arrays (the figures' input)."""
    from brainprop.fmri_arrays import write_meta

    layers = table.drop_duplicates("layer").sort_values("layer_depth")
    signals = list(dict.fromkeys(table["signal"]))
    shape = (len(layers), len(signals), n_vertices)
    arrays = {"mean": np.full(shape, np.nan, np.float32), "n_significant": np.zeros(shape, np.uint8),
              "n_subjects": np.zeros(shape, np.uint8)}
    li = table["layer"].map({name: i for i, name in enumerate(layers["layer"])}).to_numpy()
    si = table["signal"].map({name: i for i, name in enumerate(signals)}).to_numpy()
    for name, arr in arrays.items():
        arr[li, si, table["vertex"].to_numpy()] = table[name].to_numpy()
    folder.mkdir()
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr)
    write_meta(folder / "meta.json", {"kind": "group", "model": table["model"].iloc[0],
                                      "checkpoint": table["checkpoint"].iloc[0], "layers": layers["layer"].tolist(),
                                      "layer_depths": layers["layer_depth"].tolist(), "signals": signals,
                                      "n_vertices": n_vertices, "subjects": list(range(1, 5))})
    return folder / "meta.json"


FIGURE_PARAMS = {"min_significant": "majority", "roi_hemispheres": "merged", "roi_best_layer": "profile",
                 "roi_fraction": 1 / 3, "distance": "dist_euclidean", "surface": "inflated",
                 "smoothing_iterations": 0, "smoothing_weight": 0.3, "title": "t", "model": "m",
                 "halftime_fraction": 0.5}


@pytest.mark.parametrize("hemispheres, ranked", [("merged", 180), ("separate", 360)])
def test_fig2_numbers_use_the_configured_rois_and_peaks_after_onset(tmp_path, monkeypatch, hemispheres, ranked):
    from brainprop import figures

    monkeypatch.setattr(figures, "_surfaces", lambda params: None)  # surface drawing is tested in test_surface
    monkeypatch.setattr(figures, "_map_panel", lambda *a, **k: None)
    inputs, times = _figure_inputs(tmp_path)
    fig, numbers = figures.fig_hierarchy(inputs, {**FIGURE_PARAMS, "roi_hemispheres": hemispheres})
    spatial = numbers[numbers.statistic.str.startswith("spatial")].set_index(["statistic", "signal"])
    assert len(spatial) == 8 and (spatial.n_rois == ranked // 3).all() and (spatial.n_rois_ranked == ranked).all()
    assert spatial.loc[("spatial_r", "forward"), "value"] > 0.9 > -0.9 > spatial.loc[("spatial_r", "backprop"), "value"]
    peaks = numbers[(numbers.statistic == "meg_peak_time") & (numbers.signal == "forward")]
    np.testing.assert_allclose(peaks.value, times[[21, 23, 25, 27, 29]])  # not the baseline bump at -0.4 s
    assert "Euclidean" in fig.axes[0].get_xlabel()
    plt_close(fig)


def test_fig_halftime_reports_n_rois_with_each_spatial_score(tmp_path):
    from brainprop import figures

    inputs, _ = _figure_inputs(tmp_path, ("it0", "it10", "it100"))
    fig, numbers = figures.fig_halftime(inputs, FIGURE_PARAMS)
    spatial = numbers[numbers.statistic == "spatial_score"]
    assert len(spatial) == 6 and (spatial.n_rois == 60).all() and (spatial.n_rois_ranked == 180).all()
    # per-area half-times of the merged areas; area 1 (best at layer 0) scores 0 at the last layer: no half-time
    assert numbers.loc[numbers.statistic == "roi_half_time_vs_distance_r", "n_rois"].iloc[0] == 179
    plt_close(fig)


def plt_close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)
