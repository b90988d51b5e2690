"""Scoring of (layer, signal) per subject: residual definition, planted-effect recovery, tidy tables, group stats."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from brainprop.brain.meg import write_meg_table
from brainprop.encoding import cross_validated_ridge, residual_scores
from brainprop.fmri_arrays import group_fmri, read_fmri
from brainprop.scoring import (
    encode_meg_subject,
    encode_nsd_subject,
    group_meg,
    layer_dims,
    residual_pvalues,
    score_subject,
    signal_pvalues,
)
from brainprop.stats import permutation_test, pooled_permutation_pvalues, residual_permutation_test

LAYERS = ["l0", "l1"]
ENCODING = {"alphas": {"log10_min": 0, "log10_max": 4, "n": 5}, "n_splits": 3, "inner_cv": "loo",
            "standardize": True, "dtype": "float64", "memory_budget_mb": 64, "fdr_q": 0.05,
            "permutation": {"n": 30, "method": "refit", "null_distribution": "per_target", "modalities": ["nsd"],
                            "signals": ["forward", "backprop"], "sequential_block": 50},
            "pooled_targets": None, "residual": {"n": 0, "pvalues": "empirical", "layers": "last",
                                                 "sequential_block": 50}}


def planted(n=240, d=10, seed=0):
    """Features of 2 layers; target 0 reads forward l0, target 1 reads backprop l1 (orthogonal to forward), target 2 noise."""
    rng = np.random.default_rng(seed)
    feats = {(layer, s): rng.normal(size=(n, d)) for layer in LAYERS for s in ("forward", "backprop")}
    y = np.stack([feats[("l0", "forward")][:, 0] + 0.5 * rng.normal(size=n),
                  feats[("l1", "backprop")][:, 0] + 0.5 * rng.normal(size=n),
                  rng.normal(size=n)], axis=1)
    return feats, y


def test_residual_is_joint_minus_forward_and_recovers_planted_backprop():
    feats, y = planted()
    out = score_subject(feats, LAYERS, y, ENCODING, dim=6, residual_dim=3, seed=0)
    s = out["scores"]
    np.testing.assert_allclose(s[:, 3], s[:, 2] - s[:, 0], atol=1e-6)
    ref = cross_validated_ridge(feats[("l1", "backprop")][:, :6], y, np.logspace(0, 4, 5), n_splits=3, seed=0,
                                dtype="float64", progress=False)
    np.testing.assert_allclose(s[1, 1], ref.mean_scores, atol=1e-6)
    assert s[0, 0, 0] > 0.8 and s[1, 0, 0] < 0.2  # forward target: layer 0 forward only
    assert s[1, 1, 1] > 0.8 and s[1, 3, 1] > 0.5  # backprop target: backprop and residual of layer 1
    assert abs(s[0, 3, 0]) < 0.05  # forward target: no residual beyond forward
    assert np.all(np.abs(s[:, :, 2]) < 0.2)  # noise target
    assert np.isnan(out["pvalues"]).all()  # no permutations asked


def test_a_narrow_layer_is_encoded_at_one_dimension_for_every_signal():
    """A layer with fewer PCA columns than features.pca.dim (ResNet-50's 256 channels at the paper's 300):
    forward, backprop and forward+backprop all at 2 x residual_dim, residual_dim = half its columns."""
    assert layer_dims(300, 300, 300, 150) == (300, 150)
    assert layer_dims(256, 300, 300, 150) == (256, 128) and layer_dims(300, 7, 300, 150) == (6, 3)
    feats, y = planted(d=10)
    narrow = {k: (v[:, :5] if k[0] == "l0" else v) for k, v in feats.items()}
    out = score_subject(narrow, LAYERS, y, ENCODING, dim=8, residual_dim=4, seed=0)
    alphas = np.logspace(0, 4, 5)
    kw = dict(n_splits=3, seed=0, dtype="float64", progress=False)
    ref_f = cross_validated_ridge(narrow[("l0", "forward")][:, :4], y, alphas, **kw)
    np.testing.assert_allclose(out["scores"][0, 0], ref_f.mean_scores, atol=1e-6)
    ref = residual_scores(narrow[("l0", "forward")], narrow[("l0", "backprop")], y, alphas, 2, 2, 4, **kw)
    np.testing.assert_allclose(out["scores"][0, 3], ref.residual, atol=1e-6)
    # the wide layer keeps the configured dimensions
    ref_b = cross_validated_ridge(feats[("l1", "backprop")][:, :8], y, alphas, **kw)
    np.testing.assert_allclose(out["scores"][1, 1], ref_b.mean_scores, atol=1e-6)


def test_nsd_subject_tables_with_permutations(tmp_path):
    feats, y = planted()
    ids = [f"nsd{i:05d}" for i in range(y.shape[0])]
    fdir = tmp_path / "features"
    fdir.mkdir()
    order = np.random.default_rng(1).permutation(len(ids))  # features stored in another order than the brain rows
    for (layer, s), x in feats.items():
        np.save(fdir / f"{layer}.{s}.npy", x[order].astype(np.float32))
    pd.DataFrame({"image_id": np.array(ids)[order]}).to_parquet(fdir / "index.parquet")
    mask = np.zeros(10, bool)
    mask[[1, 4, 7]] = True
    np.save(tmp_path / "betas.npy", y.astype(np.float32))
    np.save(tmp_path / "mask.npy", mask)
    pd.DataFrame({"image_id": ids}).to_parquet(tmp_path / "images.parquet")
    keys = {"subject": 1, "model": "m", "checkpoint": "it0"}
    encoding = {**ENCODING, "permutation": {**ENCODING["permutation"], "n": 99},
                "residual": {**ENCODING["residual"], "n": 99}}
    meta = encode_nsd_subject(fdir, LAYERS, tmp_path / "betas.npy", tmp_path / "images.parquet",
                              tmp_path / "mask.npy", tmp_path / "out", encoding, 6, 3, 0, keys)
    table = read_fmri(meta)
    assert len(table) == 2 * 4 * 3 and set(table.vertex) == {1, 4, 7}
    assert (table.modality == "fmri").all() and (table.subject == 1).all()
    fwd0 = table[(table.layer == "l0") & (table.signal == "forward")].set_index("vertex")
    # the planted target beats all 99 shuffles: p = 1/100, BH over 3 vertices: 0.03 <= 0.05
    assert fwd0.loc[1, "pvalue"] == pytest.approx(1 / 100) and fwd0.loc[1, "pvalue_fdr"] == pytest.approx(0.03)
    assert fwd0.loc[1, "significant"] and not fwd0.loc[7, "significant"]
    # the residual has its own test, at the last layer only: the backprop target (vertex 4) beats all 99
    # permutations of backprop's unexplained part; the forward target (vertex 1) does not
    res = table[table.signal == "residual"].set_index(["layer", "vertex"])
    assert res.loc[("l1", 4), "pvalue"] == pytest.approx(1 / 100) and res.loc[("l1", 4), "significant"]
    assert res.loc[("l1", 1), "pvalue"] > 0.05 and not res.loc[("l1", 1), "significant"]
    assert res.loc["l0", "pvalue"].isna().all() and not res.loc["l0", "significant"].any()
    np.testing.assert_allclose(table.layer_depth.unique(), [0, 1])
    # arrays on the full vertex axis: NaN / not significant at the vertices outside the mask
    scores = np.load(tmp_path / "out/scores.npy")
    assert scores.shape == (2, 4, 10) and np.isnan(scores[..., ~mask]).all() and np.isfinite(scores[..., mask]).all()
    np.testing.assert_allclose(scores[0, 0, [1, 4, 7]], fwd0.score.to_numpy(), atol=1e-6)
    assert np.load(tmp_path / "out/split_scores.npy").shape == (2, 3, 3, 10)
    assert not np.load(tmp_path / "out/significant.npy")[..., ~mask].any()
    # a second subject: the same arrays, one vertex fewer analysed and vertex 4 not significant for the residual
    second = tmp_path / "second"
    shutil.copytree(tmp_path / "out", second)
    s2 = np.load(second / "scores.npy")
    s2[..., 7] = np.nan
    np.save(second / "scores.npy", s2)
    sig2 = np.load(second / "significant.npy")
    sig2[1, 3, 4] = False
    np.save(second / "significant.npy", sig2)
    meta2 = json.loads((second / "meta.json").read_text())
    (second / "meta.json").write_text(json.dumps({**meta2, "subject": 2}))
    group_meta = group_fmri([meta, second / "meta.json"], tmp_path / "group")
    group = read_fmri(group_meta)
    assert set(group.signal) == {"forward", "backprop", "forward+backprop", "residual"}
    g = group.set_index(["layer", "signal", "vertex"])
    assert (g.xs(7, level="vertex")["n_subjects"] == 1).all() and (g.drop(7, level="vertex")["n_subjects"] == 2).all()
    np.testing.assert_allclose(g.loc[("l0", "forward", 7), "mean"], scores[0, 0, 7], rtol=1e-6)
    np.testing.assert_allclose(g.loc[("l1", "backprop", 4), "mean"], scores[1, 1, 4], rtol=1e-6)
    assert g.loc[("l1", "residual", 4), "n_significant"] == 1
    assert g.xs("residual", level="signal")["n_significant"].sum() == 1
    assert list(read_fmri(group_meta, last_layer=True, signals=["forward"]).layer.unique()) == ["l1"]
    with pytest.raises(ValueError, match="differ"):
        (second / "meta.json").write_text(json.dumps({**meta2, "subject": 2, "checkpoint": "it9"}))
        group_fmri([meta, second / "meta.json"], tmp_path / "group")


def test_meg_subjects_and_group_ttest(tmp_path):
    rng = np.random.default_rng(3)
    n, n_ch, times = 150, 3, np.array([0.0, 0.1, 0.2, 0.3])
    feats = {(layer, s): rng.normal(size=(n, 6)) for layer in LAYERS for s in ("forward", "backprop")}
    ids = [f"c_{i:02d}s" for i in range(n)]
    fdir = tmp_path / "features"
    fdir.mkdir()
    for (layer, s), x in feats.items():
        np.save(fdir / f"{layer}.{s}.npy", x.astype(np.float32))
    pd.DataFrame({"image_id": ids}).to_parquet(fdir / "index.parquet")
    tables = []
    for subject in (1, 2, 3):
        data = rng.normal(size=(n, n_ch, len(times)))
        data[:, :, 2] += feats[("l0", "forward")][:, :1] * (0.5 + 0.3 * subject)  # time 0.2 s encodes forward l0
        sub = tmp_path / f"s{subject}"
        sub.mkdir()
        np.save(sub / "data.npy", data.astype(np.float32))
        np.save(sub / "times.npy", times)
        write_meg_table(pd.DataFrame({"image_id": ids}), sub / "images.parquet", {"channels": ["MLC11", "MLC12", "MRO11"]})
        t = encode_meg_subject(fdir, LAYERS, sub / "data.npy", sub / "images.parquet", sub / "times.npy", sub / "out",
                               ENCODING, 6, 3, 0, {"subject": subject, "model": "m", "checkpoint": "it0"})
        assert len(t) == 2 * 4 * n_ch * len(times) and set(t.channel) == {"MLC11", "MLC12", "MRO11"}
        tables.append(sub / "out/scores.parquet")
    group = group_meg(tables, tmp_path / "group.parquet", q=0.05)
    g = group[(group.layer == "l0") & (group.signal == "forward")].set_index("time")
    per_subject = pd.concat(pd.read_parquet(p) for p in tables)
    courses = per_subject[(per_subject.layer == "l0") & (per_subject.signal == "forward")].groupby(
        ["subject", "time"]).score.mean().unstack()
    ref = stats.ttest_1samp(courses.to_numpy(), 0, axis=0, alternative="greater")
    np.testing.assert_allclose(g.t.to_numpy(), ref.statistic, rtol=1e-6)
    np.testing.assert_allclose(g["mean"].to_numpy(), courses.mean(0).to_numpy(), rtol=1e-6)
    assert g.loc[0.2, "mean"] > 0.3 and g["mean"].drop(0.2).abs().max() < 0.15


def test_misaligned_images_are_named(tmp_path):
    fdir = tmp_path / "f"
    fdir.mkdir()
    for layer in LAYERS:
        for s in ("forward", "backprop"):
            np.save(fdir / f"{layer}.{s}.npy", np.zeros((2, 3), np.float32))
    pd.DataFrame({"image_id": ["a", "b"]}).to_parquet(fdir / "index.parquet")
    np.save(tmp_path / "betas.npy", np.zeros((2, 1), np.float32))
    np.save(tmp_path / "mask.npy", np.ones(1, bool))
    pd.DataFrame({"image_id": ["a", "zzz"]}).to_parquet(tmp_path / "images.parquet")
    with pytest.raises(ValueError, match="zzz"):
        encode_nsd_subject(fdir, LAYERS, tmp_path / "betas.npy", tmp_path / "images.parquet", tmp_path / "mask.npy",
                           tmp_path / "out", ENCODING, 2, 1, 0, {})


def test_pooled_null_resolves_small_pvalues_with_few_shuffles():
    feats, y = planted()
    encoding = {**ENCODING, "permutation": {**ENCODING["permutation"], "n": 5, "null_distribution": "pooled"}}
    out = score_subject(feats, LAYERS[:1], y, encoding, dim=6, residual_dim=3, seed=0, permutations=True)
    # the planted target beats all 5 x 3 pooled null scores: p = 1 / 16, below the per-target floor 1 / 6
    assert out["pvalues"][0, 0, 0] == pytest.approx(1 / 16)
    assert out["pvalues"][0, 0, 2] > 0.1


def test_pooled_null_of_a_target_subset_is_seeded_and_reaches_its_floor():
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(200, 5)), rng.normal(size=(200, 60))
    Y[:, 0] += 3 * X[:, 0]
    encoding = {**ENCODING, "pooled_targets": 7,
                "permutation": {**ENCODING["permutation"], "n": 9, "null_distribution": "pooled"}}
    obs = cross_validated_ridge(X, Y, np.logspace(0, 4, 5), n_splits=3, seed=0, dtype="float64", progress=False)
    p = signal_pvalues(X, Y, obs.mean_scores, encoding, 0, 11)
    assert p[0] == pytest.approx(1 / (9 * 7 + 1))  # the pool: 9 shuffles of 7 targets, whatever T
    np.testing.assert_array_equal(p, signal_pvalues(X, Y, obs.mean_scores, encoding, 0, 11))
    assert not np.array_equal(p, signal_pvalues(X, Y, obs.mean_scores, encoding, 0, 12))
    # the pool's p-values are those of pooled_permutation_pvalues against the refit null of the subset
    cols = np.sort(np.random.default_rng(11).choice(60, 7, replace=False))
    null = permutation_test(X, Y[:, cols], np.logspace(0, 4, 5), 9, permutation_seed=11, observed=obs.mean_scores[cols],
                            n_splits=3, seed=0, dtype="float64", progress=False).null
    np.testing.assert_array_equal(p, pooled_permutation_pvalues(obs.mean_scores, null))


def test_residual_pvalues_follow_the_config():
    feats, y = planted()
    fwd, bwd = feats[("l1", "forward")], feats[("l1", "backprop")]
    kw = dict(n_splits=3, seed=0, dtype="float64", progress=False)
    res = residual_scores(fwd, bwd, y, np.logspace(0, 4, 5), 3, 3, 6, **kw)
    test = residual_permutation_test(fwd, bwd, y, np.logspace(0, 4, 5), 3, 3, 6, 19, 5, res, **kw)
    for kind, expected in (("empirical", test.pvalues), ("gaussian", test.pvalues_gaussian)):
        encoding = {**ENCODING, "residual": {**ENCODING["residual"], "n": 19, "pvalues": kind}}
        np.testing.assert_array_equal(residual_pvalues(fwd, bwd, y, res, encoding, 6, 3, 0, 5), expected)
    assert test.pvalues_gaussian[1] < 1e-3 < test.pvalues[1] == pytest.approx(1 / 20)
    # residual.sequential_block reaches the test (empirical p-values): the noise target stops early
    seq = residual_permutation_test(fwd, bwd, y, np.logspace(0, 4, 5), 3, 3, 6, 19, 5, res, sequential_block=4,
                                    fdr_q=0.05, **kw)
    assert seq.stopped.any() and not np.array_equal(seq.pvalues, test.pvalues)
    encoding = {**ENCODING, "residual": {**ENCODING["residual"], "n": 19, "sequential_block": 4}}
    np.testing.assert_array_equal(residual_pvalues(fwd, bwd, y, res, encoding, 6, 3, 0, 5), seq.pvalues)


def test_permutation_signals_and_sequential_block_follow_the_config():
    """Only the fitted signals of permutation.signals get p-values (forward+backprop: NaN by default); the
    per-target refit test stops by permutation.sequential_block at fdr_q, as permutation_test does."""
    feats, y = planted()
    y = np.concatenate([y, np.random.default_rng(5).normal(size=(y.shape[0], 9))], axis=1)  # more noise targets
    encoding = {**ENCODING, "permutation": {**ENCODING["permutation"], "n": 40, "sequential_block": 10}}
    out = score_subject(feats, LAYERS[:1], y, encoding, dim=6, residual_dim=3, seed=0, permutations=True)
    assert np.isfinite(out["pvalues"][0, :2]).all() and np.isnan(out["pvalues"][0, 2:]).all()
    every = {**encoding, "permutation": {**encoding["permutation"], "signals": ["forward", "backprop", "forward+backprop"]}}
    out_all = score_subject(feats, LAYERS[:1], y, every, dim=6, residual_dim=3, seed=0, permutations=True)
    assert np.isfinite(out_all["pvalues"][0, 2]).all()
    np.testing.assert_array_equal(out_all["pvalues"][0, :2], out["pvalues"][0, :2])
    X = feats[("l0", "forward")][:, :6]
    kw = dict(n_splits=3, seed=0, dtype="float64", progress=False)
    obs = cross_validated_ridge(X, y, np.logspace(0, 4, 5), **kw).mean_scores
    seq = permutation_test(X, y, np.logspace(0, 4, 5), 40, permutation_seed=7, observed=obs, sequential_block=10,
                           fdr_q=0.05, **kw)
    assert seq.stopped.any()
    np.testing.assert_array_equal(signal_pvalues(X, y, obs, encoding, 0, 7), seq.pvalues)
    off = {**encoding, "permutation": {**encoding["permutation"], "sequential_block": 0}}
    full = permutation_test(X, y, np.logspace(0, 4, 5), 40, permutation_seed=7, observed=obs, **kw)
    np.testing.assert_array_equal(signal_pvalues(X, y, obs, off, 0, 7), full.pvalues)


def test_config_requires_the_residual_to_compare_equal_dimensions():
    from pathlib import Path

    from brainprop.config import ConfigError, resolve_config

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=r"features\.pca\.dim \(48\) must be 2 x features\.pca\.residual_dim \(20\)"):
        resolve_config(overrides={"features": {"pca": {"residual_dim": 20}}}, workflow_dir=root)
    assert resolve_config(overrides={"features": {"pca": {"dim": 40, "residual_dim": 20}}}, workflow_dir=root)
