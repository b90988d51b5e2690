"""Fig. S2 grid: nested PCA, cell scores equal to the main encoding, summaries on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainprop.encoding import cross_validated_ridge
from brainprop.projection import fit_pca, nested_gaussian
from brainprop.robustness import grid_features, nested_pca, score_grid, summarise_fmri, summarise_meg
from brainprop.scoring import alphas_from_config

ENCODING = {"alphas": {"log10_min": 0, "log10_max": 4, "n": 5}, "n_splits": 3, "inner_cv": "loo",
            "standardize": True, "dtype": "float64", "memory_budget_mb": 64}


def test_nested_pca_truncates_one_fit_and_skips_infeasible_dims():
    x = np.random.default_rng(0).normal(size=(30, 12))
    out = nested_pca(x, [2, 5, 12, 40], seed=3)
    assert sorted(out) == [2, 5, 12]
    full, _ = fit_pca(x, 12, 3)
    for k, v in out.items():
        np.testing.assert_array_equal(v, full[:, :k])


def _write(folder, layer, fwd, bwd, ids):
    folder.mkdir(parents=True)
    np.save(folder / f"{layer}.forward.npy", fwd)
    np.save(folder / f"{layer}.backprop.npy", bwd)
    pd.DataFrame({"image_id": ids}).to_parquet(folder / "index.parquet")


def test_grid_features_and_scores_match_the_main_encoding(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"img{i}" for i in range(40)]
    fwd, bwd = rng.normal(size=(40, 10)), rng.normal(size=(40, 8))
    _write(tmp_path / "raw", "L", fwd, bwd, ids)
    feats, order = grid_features(tmp_path / "raw", "L", [8, 4], [2, 6], seed=0)
    assert sorted(feats) == [("backprop", 4, 2), ("backprop", 8, 2), ("backprop", 8, 6), ("forward", 0, 2),
                             ("forward", 0, 6)]
    # each projection dim is the PCA of the nested projection derived from the one extraction
    np.testing.assert_array_equal(feats[("backprop", 4, 2)], fit_pca(nested_gaussian(bwd, 4), 2, 0)[0])
    np.testing.assert_array_equal(feats[("backprop", 8, 6)], fit_pca(bwd.astype(np.float32), 6, 0)[0])
    Y = rng.normal(size=(40, 7))
    Y[:, 0] += 3 * feats[("forward", 0, 2)][:, 0] / feats[("forward", 0, 2)][:, 0].std()
    targets = ids[::-1]  # the brain data's own image order
    scores = score_grid(feats, order, Y[::-1], targets, ENCODING, seed=5, what="test")
    ref = cross_validated_ridge(feats[("forward", 0, 2)], Y, alphas_from_config(ENCODING), n_splits=3, seed=5,
                                dtype="float64", progress=False).mean_scores
    # same rows in another order give other CV splits, so compare against a fit in the target order
    ref_t = cross_validated_ridge(feats[("forward", 0, 2)][::-1], Y[::-1], alphas_from_config(ENCODING), n_splits=3,
                                  seed=5, dtype="float64", progress=False).mean_scores
    np.testing.assert_allclose(scores[("forward", 0, 2)], ref_t, atol=1e-10)
    assert ref[0] > 0.5 and scores[("forward", 0, 2)][0] > 0.5


def test_grid_features_rejects_a_wrong_projection_width(tmp_path):
    ids = ["a", "b", "c"]
    _write(tmp_path / "raw", "L", np.ones((3, 2)), np.ones((3, 5)), ids)
    with pytest.raises(ValueError, match="expected the largest projection dim 4"):
        grid_features(tmp_path / "raw", "L", [2, 4], [1], seed=0)


def test_one_extraction_at_the_largest_dim_gives_each_dim_of_direct_extractions(tmp_path):
    """The grid's derived projection dims equal one extraction per dim (the former rule), same layer seed."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_features import ToyImageWiseLoss

    from brainprop.features import FeatureExtractor, extract_features

    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (3, 40, 40), generator=g, dtype=torch.uint8), f"im{i}") for i in range(12)]
    loss, layer = ToyImageWiseLoss(), "blocks.2.mlp.fc2"

    def extract(dim, layers):
        ex = FeatureExtractor(loss, layers, projection_dim=dim, seed=4)
        fwd, bwd, ids, _ = extract_features(ex, data, batch_size=5, desc="test")
        return fwd[layer], bwd[layer], ids

    # the grid's one job: this layer alone, at the largest dim; the references: the main extraction's layer list
    fwd, bwd, ids = extract(24, [layer])
    _write(tmp_path / "raw", layer, fwd, bwd, ids)
    feats, _ = grid_features(tmp_path / "raw", layer, [6, 16, 24], [3], seed=0)
    for dim in (6, 16, 24):
        _, direct, _ = extract(dim, ["blocks.0.mlp.fc2", layer])
        ref = fit_pca(direct, 3, 0)[0]
        # float32 projections agree to 1e-5 of their scale; PCA scores (sign-fixed) follow to 1e-3 of theirs
        np.testing.assert_allclose(nested_gaussian(bwd, dim), direct, rtol=0, atol=1e-5 * np.abs(direct).max())
        np.testing.assert_allclose(feats[("backprop", dim, 3)], ref, rtol=0, atol=1e-3 * np.abs(ref).max())


def test_summaries_on_hand_made_scores():
    cell_f, cell_b = ("forward", 0, 2), ("backprop", 8, 2)
    per_subject = [(np.array([0, 1, 2]), {cell_f: np.array([0.1, 0.2, 0.3]), cell_b: np.array([0.0, 0.4, 0.8])}),
                   (np.array([1, 2, 3]), {cell_f: np.array([0.4, 0.5, 0.6]), cell_b: np.array([0.2, 0.2, 0.2])})]
    masks = {"forward": np.array([1, 3]), "backprop": np.array([2, 9])}
    f = summarise_fmri(per_subject, masks).set_index("signal")
    # vertex 1: mean(0.2, 0.4) = 0.3; vertex 3: 0.6 (one subject) -> 0.45
    assert f.loc["forward", "score"] == pytest.approx(0.45) and f.loc["forward", "n_targets"] == 2
    # vertex 2: mean(0.8, 0.2) = 0.5; vertex 9 absent
    assert f.loc["backprop", "score"] == pytest.approx(0.5) and f.loc["backprop", "n_targets"] == 1
    # MEG: 2 channels x 3 times, channel-major; course = mean over channels then subjects
    meg = [(None, {cell_f: np.array([0.0, 0.2, 0.1, 0.0, 0.4, 0.1])}),
           (None, {cell_f: np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.1])})]
    m = summarise_meg(meg, 3)
    assert m.loc[0, "score"] == pytest.approx((0.3 + 0.1) / 2) and m.loc[0, "peak"] == 1
