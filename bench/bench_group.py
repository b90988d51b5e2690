"""Group fMRI statistics of one (model, checkpoint) at the real size: time and peak memory.

Real size: 8 subjects x 327,684 fsaverage vertices x 12 layers x 4 signals, random scores, about a
quarter of vertex-layers significant, 1 % of vertices not analysed per subject. Stages, each in a fresh
process so that its peak resident memory is its own:

* ``group``: :func:`brainprop.fmri_arrays.group_fmri` from memory-mapped subject arrays;
* ``figure read``: what Fig. 2 reads of the group (every layer, forward and backprop, as the tidy view of
  :func:`brainprop.fmri_arrays.read_fmri`) and its Spatial score (:func:`brainprop.analysis.spatial_score`
  over 180 merged areas);
* ``tidy (old)``: the obvious implementation this replaces: per-subject tidy Parquet tables concatenated
  and grouped in pandas. Run at ``--tidy-fraction`` of the vertices (its memory at full size does not fit
  this machine) and extrapolated linearly, which is how its cost grows.

Usage::

    python bench/bench_group.py                   # real size (writes ~0.7 GB of arrays under --workdir)
    python bench/bench_group.py --vertices 20484  # fsaverage5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

SIGNALS = ["forward", "backprop", "forward+backprop", "residual"]


def make_subjects(root: Path, n_subjects: int, n_layers: int, n_vertices: int, seed: int) -> list[Path]:
    """Subject folders holding what the group reads (scores, significant, meta.json)."""
    from brainprop.fmri_arrays import write_meta

    rng = np.random.default_rng(seed)
    metas = []
    for s in range(1, n_subjects + 1):
        folder = root / f"subj{s:02d}"
        folder.mkdir(parents=True)
        scores = rng.normal(0.05, 0.1, size=(n_layers, len(SIGNALS), n_vertices)).astype(np.float32)
        scores[..., rng.random(n_vertices) < 0.01] = np.nan
        np.save(folder / "scores.npy", scores)
        np.save(folder / "significant.npy", (scores > 0.12) & np.isfinite(scores))
        meta = {"model": "m", "checkpoint": "it0", "subject": s, "layers": [f"l{i}" for i in range(n_layers)],
                "layer_depths": np.linspace(0, 1, n_layers).tolist(), "signals": SIGNALS,
                "n_vertices": n_vertices, "n_splits": 5, "fdr_q": 0.05}
        write_meta(folder / "meta.json", {"kind": "subject", **meta})
        metas.append(folder / "meta.json")
    return metas


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage_group(metas, out):
    from brainprop.fmri_arrays import group_fmri

    base = _peak_mb()
    t0 = time.perf_counter()
    group_fmri(metas, out)
    return (time.perf_counter() - t0, _peak_mb(), base)


def _stage_figure(group_meta, n_vertices):
    from brainprop import analysis as an
    from brainprop.fmri_arrays import read_fmri

    base = _peak_mb()
    t0 = time.perf_counter()
    table = read_fmri(group_meta, signals=["forward", "backprop"])
    half = n_vertices // 2
    area = np.random.default_rng(1).integers(1, 181, size=half)
    vertex_rois = np.concatenate([area, area])
    rois = pd.DataFrame({"hemi": "both", "roi": np.arange(1, 181), "dist_geodesic": np.linspace(0, 150, 180)})
    res = an.spatial_score(table, vertex_rois, rois, "backprop", "majority")
    return (time.perf_counter() - t0, _peak_mb(), base, len(table), res.correlation.n)


def _stage_tidy(metas):
    """The previous implementation: tidy per-subject tables, concatenated and grouped in pandas."""
    base = _peak_mb()
    t0 = time.perf_counter()
    tables = []
    for path in metas:
        meta = json.loads(Path(path).read_text())
        scores = np.load(Path(path).parent / "scores.npy")
        signif = np.load(Path(path).parent / "significant.npy")
        n_l, n_s, n_v = scores.shape
        tables.append(pd.DataFrame({
            "subject": meta["subject"], "model": meta["model"], "checkpoint": meta["checkpoint"],
            "layer": np.repeat(meta["layers"], n_s * n_v), "layer_depth": np.repeat(meta["layer_depths"], n_s * n_v),
            "signal": np.tile(np.repeat(SIGNALS, n_v), n_l), "vertex": np.tile(np.arange(n_v), n_l * n_s),
            "score": scores.ravel(), "significant": signif.ravel()}))
    per_subject = pd.concat(tables)
    del tables
    per_subject.groupby(["model", "checkpoint", "layer", "layer_depth", "signal", "vertex"], sort=True).agg(
        mean=("score", "mean"), n_significant=("significant", "sum"), n_subjects=("score", "count")).reset_index()
    return (time.perf_counter() - t0, _peak_mb(), base)


def _run(target, *args):
    """``target(*args)`` in a fresh process (its exceptions propagate)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(target, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vertices", type=int, default=327_684)
    parser.add_argument("--tidy-fraction", type=float, default=1 / 16)
    parser.add_argument("--workdir", default=None, help="folder for the arrays (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_group_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        metas = make_subjects(root / "full", args.subjects, args.layers, args.vertices, args.seed)
        print(f"{args.subjects} subjects x {args.layers} layers x {len(SIGNALS)} signals x {args.vertices:,} vertices "
              f"({sum(f.stat().st_size for f in root.rglob('*.npy')) / 2**20:,.0f} MiB of arrays, written in "
              f"{time.perf_counter() - t0:.0f} s)")
        g_time, g_peak, g_base = _run(_stage_group, metas, root / "group")
        print(f"group (memory-mapped arrays): {g_time:6.1f} s, peak memory {g_peak:7.0f} MiB "
              f"(interpreter alone {g_base:.0f} MiB)")
        f_time, f_peak, f_base, n_rows, n_sel = _run(_stage_figure, root / "group/meta.json", args.vertices)
        print(f"Fig. 2 read + Spatial score: {f_time:6.1f} s, peak memory {f_peak:7.0f} MiB ({n_rows:,} rows, "
              f"{n_sel} ROIs selected)")
        n_small = int(args.vertices * args.tidy_fraction)
        small = make_subjects(root / "small", args.subjects, args.layers, n_small, args.seed)
        s_groups, s_peak, s_base = _run(_stage_group, small, root / "small_group")
        t_time, t_peak, t_base = _run(_stage_tidy, small)
        scale = args.vertices / n_small
        t_full, m_full = t_time * scale, t_base + (t_peak - t_base) * scale
        print(f"tidy pandas (old), {n_small:,} vertices: {t_time:6.1f} s, peak {t_peak:7.0f} MiB; at full size "
              f"about {t_full:.0f} s and {m_full / 1024:.1f} GiB")
        print(f"old / arrays: time {t_time / s_groups:.0f}x at {n_small:,} vertices (both measured); at full size "
              f"time {t_full / g_time:.0f}x and peak memory {m_full / g_peak:.0f}x (old extrapolated)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
