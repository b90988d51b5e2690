"""Benchmark: prepare one full-resolution NSD subject (fsaverage, 163842 vertices per hemisphere).

Compares :func:`brainprop.brain.nsd.prepare_nsd_subject` (session-by-session
streaming, per-image sums on disk) with the obvious implementation (load every
session of both hemispheres with nibabel at once, z-score with
``scipy.stats.zscore``, average repetitions in memory) on the same simulated
sessions, checks that both give the same betas, and extrapolates time and memory
to a 40-session subject.

Each method runs in its own subprocess; memory is reported as
- peak RSS (``ru_maxrss``; includes file pages of memory maps, which the kernel can drop), and
- peak anonymous RSS (``RssAnon`` from /proc/self/status, sampled every 20 ms):
  the memory that must really be available.

Usage: ``python bench/bench_nsd_prepare.py [--sessions 3] [--images 1000] [--skip-naive]``
(~3-4 minutes on 2 cores; writes ~3 GB to a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_VERTICES = 163842
TRIALS = 750


def write_root(root: Path, n_sessions: int, n_images: int, seed: int = 0) -> None:
    """Minimal full-resolution NSD root: design, labels (for the vertex count) and betas."""
    import nibabel as nib
    import scipy.io

    from brainprop.brain import atlas
    from brainprop.brain.nsd import betas_path, expdesign_path
    from brainprop.simulate.nsd import make_design, write_betas_session

    rng = np.random.default_rng(seed)
    n_trials = n_sessions * TRIALS
    master = make_design(n_images, n_trials, 3, rng) + 1
    subjectim = (rng.permutation(73000)[:n_images] + 1).reshape(1, -1)
    expdesign_path(root).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(expdesign_path(root)), {"masterordering": master.reshape(1, -1).astype(float),
                                                 "subjectim": subjectim.astype(float),
                                                 "sharedix": subjectim[:, :10].astype(float)})
    atlas.label_path(root, "lh").parent.mkdir(parents=True, exist_ok=True)
    for hemi in atlas.HEMIS:
        nib.save(nib.MGHImage(np.zeros((N_VERTICES, 1, 1), np.int32), np.eye(4)), str(atlas.label_path(root, hemi)))
    nan_vertices = rng.choice(N_VERTICES, size=N_VERTICES // 50, replace=False)
    for k in range(1, n_sessions + 1):
        for hemi in atlas.HEMIS:
            x = rng.standard_normal((TRIALS, N_VERTICES), dtype=np.float32)
            x *= np.float32(2.0)
            x += rng.standard_normal(N_VERTICES, dtype=np.float32)
            x[:, nan_vertices] = np.nan
            write_betas_session(betas_path(root, 1, hemi, k), x)
            del x


def naive_prepare(root: Path, out_betas: Path, n_sessions: int) -> None:
    """The obvious implementation: everything in memory at once."""
    import nibabel as nib
    import scipy.stats

    from brainprop.brain.nsd import betas_path, expdesign_path, load_expdesign, trial_nsd_ids

    design = load_expdesign(expdesign_path(root))
    ids = trial_nsd_ids(design, 1)[: n_sessions * TRIALS]
    sessions = []
    for k in range(1, n_sessions + 1):
        hemis = [nib.load(str(betas_path(root, 1, h, k))).get_fdata(dtype=np.float32)[:, 0, 0, :] for h in ("lh", "rh")]
        sessions.append(np.concatenate(hemis).T)  # (T, 2V)
        del hemis
    data = np.stack(sessions)  # (S, T, 2V)
    del sessions
    z = scipy.stats.zscore(data, axis=1)  # NaN vertices stay NaN
    del data
    z = z.reshape(-1, z.shape[-1])
    images, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros((images.size, z.shape[1]), np.float32)
    np.add.at(sums, inverse, z)
    keep = np.isfinite(z).all(axis=0)
    betas = sums[:, keep] / np.bincount(inverse)[:, None].astype(np.float32)
    np.save(out_betas, betas.astype(np.float32))


def _child(method: str, root: str, out: str, n_sessions: int) -> None:
    """Run one method, sampling anonymous RSS; print a JSON line."""
    import resource
    import threading

    peak_anon = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    out = Path(out)
    if method == "streaming":
        import logging

        logging.basicConfig(level=logging.WARNING)
        from brainprop.brain.nsd import prepare_nsd_subject

        prepare_nsd_subject(root, 1, out / "betas.npy", out / "images.parquet", out / "mask.npy")
    else:
        naive_prepare(Path(root), out / "betas_naive.npy", n_sessions)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"method": method, "wall_s": wall, "maxrss_gib": maxrss / 2**20, "anon_gib": peak_anon[0] / 2**20}))


def _run(method: str, root: Path, out: Path, n_sessions: int) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    res = subprocess.run([sys.executable, __file__, "--child", method, str(root), str(out), str(n_sessions)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--images", type=int, default=1000, help="distinct images in the design (shown 1-3 times)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench_nsd_"))
    try:
        t0 = time.perf_counter()
        write_root(tmp / "nsd", args.sessions, args.images)
        gen = time.perf_counter() - t0
        raw_gib = 2 * args.sessions * TRIALS * N_VERTICES * 4 / 2**30
        print(f"simulated {args.sessions} sessions x 2 hemis x ({N_VERTICES} vertices x {TRIALS} trials) float32 "
              f"= {raw_gib:.2f} GiB in {gen:.0f} s")
        (tmp / "out").mkdir()
        results = [_run("streaming", tmp / "nsd", tmp / "out", args.sessions)]
        if not args.skip_naive:
            results.append(_run("naive", tmp / "nsd", tmp / "out", args.sessions))
            a = np.load(tmp / "out" / "betas.npy", mmap_mode="r")
            b = np.load(tmp / "out" / "betas_naive.npy", mmap_mode="r")
            assert a.shape == b.shape, (a.shape, b.shape)
            err = max(float(np.max(np.abs(a[i : i + 100] - b[i : i + 100]))) for i in range(0, a.shape[0], 100))
            print(f"outputs agree: shape {a.shape}, max |difference| = {err:.2e}")
            del a, b
        out_gib = args.images * 2 * N_VERTICES * 4 / 2**30
        print(f"\n{'method':<10} {'wall s':>8} {'s/session':>10} {'peak RSS GiB':>13} {'peak anon GiB':>14} "
              f"{'40-session wall s':>18} {'40-session anon GiB':>20}")
        for r in results:
            per = r["wall_s"] / args.sessions
            if r["method"] == "streaming":
                anon40 = r["anon_gib"]  # independent of the number of sessions
            else:
                anon40 = r["anon_gib"] * 40 / args.sessions  # scales with everything loaded at once
            print(f"{r['method']:<10} {r['wall_s']:>8.1f} {per:>10.1f} {r['maxrss_gib']:>13.2f} {r['anon_gib']:>14.2f} "
                  f"{per * 40:>18.0f} {anon40:>20.1f}")
        if len(results) == 2:
            s, n = results
            print(f"\nratio naive/streaming: time {n['wall_s'] / s['wall_s']:.2f}x, peak anon memory "
                  f"{n['anon_gib'] / s['anon_gib']:.1f}x (at 40 sessions ~{n['anon_gib'] * 40 / args.sessions / s['anon_gib']:.0f}x)")
        print(f"per-image sums on disk: {out_gib:.2f} GiB here; a full subject (10,000 images) needs "
              f"{10000 * 2 * N_VERTICES * 4 / 2**30:.1f} GiB of disk for the sums and as much for the output")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
