"""The cost model (bench/bench_scale.py, docs/scale.md): the engine's flop count and the model's arithmetic."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from brainprop.config import resolve_config
from brainprop.encoding import RidgeEncoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench/bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_scale"]
    sys.path.remove(str(ROOT / "bench"))


@pytest.mark.parametrize("max_basis", [None, 1])
def test_loo_flop_count_is_that_of_the_products_the_engine_runs(max_basis):
    """torch's flop counter over one split's run equals loo_flops_per_target x columns, once the two in-place
    products it does not see (``y_perp = y - U z``: 2 n r; ``w^T y_perp^2``: 2 A n) are added; with a short
    basis (max_basis=1) the exact rows |S| > 0 count too."""
    from brainprop.encoding import _LooSplit

    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.standard_normal((200, 12)) * np.linspace(3, 0.3, 12))
    alphas = np.logspace(0, 8, 10)
    train, test = np.arange(40, 200), np.arange(40)
    st = _LooSplit(X, train, test, alphas, True, torch.float32, max_basis=max_basis)
    assert max_basis is None or len(st.special) > 0
    enc = RidgeEncoder(X.numpy(), alphas, 5, 0, "loo", True, "cpu", torch.float32)
    Y = torch.from_numpy(rng.standard_normal((200, 7)).astype(np.float32))
    with FlopCounterMode(display=False) as counter:
        st.run(Y, enc.ws)
    unseen = 2 * st.n_train * st.rank + 2 * len(alphas) * st.n_train
    assert counter.get_total_flops() + 7 * unseen == 7 * st.flops_per_column()


def test_cost_model_workload_and_hours(scale):
    """The paper config's work: 12 x 8 + 7 x 10 = 166 (layer, checkpoint), 15 last layers; the baseline tests 3
    signals at all of them and the residual everywhere, the restricted one the config's 2 signals and the
    residual at the last layers; GPU-hours = flops / (peak x efficiency) + bytes / bandwidth."""
    config = resolve_config([ROOT / "config/paper.yaml"], workflow_dir=ROOT)
    T = 2 * 10  # two subjects of 10 vertices
    base = scale.workload(config, (100, 100), 10, restricted=False, stop_share=None)
    assert base["perm"] == 3 * 166 * T * 1000 and base["residual"] == 166 * T * 1000
    assert base["fmri_obs"] == 3 * 166 * T and base["meg"] == 3 * 166 * 4 * 271 * 106
    assert base["encoders"] == (166 * 1000 + 3 * 166) * 2
    cut = scale.workload(config, (100, 100), 10, restricted=True, stop_share=0.25)
    assert cut["perm"] == 2 * 166 * T * 1000 * 0.25 and cut["residual"] == 15 * T * 1000 * 0.25
    assert cut["encoders"] == (15 * 1000 + 2 * 166 * math.ceil(1000 / 50)) * 2
    split = scale.Split(n_train=80, rank=20, n_basis=2, n_special=1, n_test=20)
    rate = {"efficiency": 0.5}
    rows = scale.cost_rows(config, [split] * 5, [split] * 5, rate, 0.25, nsd_images=(100, 100), n_vertices=10)
    f = 5 * (4 * 80 * 20 + 2 * 10 * 400 + 2 * 2 * 20 * 80 + 2 * 2 * 10 * 20 + 2 * 10 * 1 * 20 + 2 * 10 * 80
             + 2 * 20 * 20)
    assert scale.fit_flops([split] * 5, 10) == f
    fits = base["fmri_obs"] + base["perm"] + base["residual"]
    flops = (fits + base["meg"]) * f + base["encoders"] * scale.precompute_flops([split] * 5, 300)
    assert rows[0]["flops"] == flops
    nbytes = (fits + base["meg"]) * scale.fit_bytes([split] * 5, 10)
    assert rows[0]["hours"] == pytest.approx((flops / (67e12 * 0.5) + nbytes / 4.8e12) / 3600)
    # the tensor-core rows change the peak (and BF16 halves the bytes), not the work
    assert rows[3]["flops"] == rows[2]["flops"] == rows[4]["flops"]
    assert rows[3]["hours_flops"] == pytest.approx(rows[2]["hours_flops"] * 67 / 494.5)
    assert rows[4]["hours_hbm"] == pytest.approx(rows[2]["hours_hbm"] / 2)
    # (with 10 vertices the per-block encoders of sequential stopping outweigh its saving: not compared)
    assert rows[0]["hours"] > rows[1]["hours"] and rows[2]["hours"] > rows[3]["hours"] > rows[4]["hours"]


def test_cost_script_runs_quickly(scale, capsys):
    out = scale.main(["--quick", "--signal-shares", "0.5"])
    printed = capsys.readouterr().out
    assert "GPU-h" in printed and "NOT implemented" in printed
    assert len(out["rows"]) == 5 and 0 < out["stops"][0]["share"] <= 1
    assert 0 < out["rate"]["efficiency"] <= 1
