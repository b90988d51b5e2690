"""Training through Snakemake: one job per checkpoint interval; a killed segment reruns from the previous
checkpoint and ends bit-identical to an uninterrupted run (CPU, tiny model, pretraining-folder images)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

pytestmark = pytest.mark.slow  # about a minute: five Snakemake jobs, each importing torch

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {
    "images": "pretraining", "iterations": 60, "batch_size": 4, "checkpoints": [0, 2, 60], "max_short_side": 32,
    "arch": {"timm_name": "vit_small_patch16_dinov3",
             "kwargs": {"embed_dim": 32, "num_heads": 2, "depth": 2, "patch_size": 8, "img_size": 32}},
    "head": {"hidden_dim": 32, "bottleneck_dim": 16, "n_prototypes": 16, "ibot_n_prototypes": 16},
    "crops": {"global_size": 32, "local_size": 16, "n_local": 1},
}


@pytest.fixture()
def workdir(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        for k in range(4):  # portrait images of several heights, downscaled to a shorter side of 32
            path = tmp_path / "images" / f"n{c:02d}" / f"img{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48 + 8 * k, 40, 3), dtype=np.uint8)).save(path)
    (tmp_path / "config").symlink_to(ROOT / "config")  # the Snakefile's configfile, relative to the workdir
    overlay = {"results": str(tmp_path / "results"), "data": {"pretraining_images": str(tmp_path / "images")},
               "training": TRAINING, "simulation": {"checkpoint": 2}, "figures": {"stages": [2, 60]}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    return tmp_path


def _snakemake(workdir, target, **popen):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--configfile", "overlay.yaml", "-c1",
           "--rerun-incomplete", str(target)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _kill_segment_job(proc, log: Path, timeout: float = 300) -> None:
    """SIGKILL the job process of segment 2 -> 60 (a walltime kill) once it has started training."""
    deadline = time.time() + timeout
    while not (log.exists() and "training 2 -> 60" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the segment job did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # inside the ~60 tiny iterations
    jobs = [p for p in psutil.Process(proc.pid).children(recursive=True)
            if any("train_dino_segment" in part for part in p.cmdline())]
    assert jobs, "no running train_dino_segment job process"
    for job in jobs:
        os.kill(job.pid, signal.SIGKILL)


def test_killed_segment_reruns_from_previous_checkpoint_bit_identical(workdir):
    from brainprop.models import train_dino
    from brainprop.models.dino_train import training_dataset

    out = workdir / "results" / "training" / "dinov3_s"
    proc = _snakemake(workdir, out / "checkpoint_it60.pt")
    _kill_segment_job(proc, workdir / "results" / "logs" / "train_dinov3_s_it60.log")
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, stdout
    assert not (out / "checkpoint_it60.pt").exists() and (out / "checkpoint_it2.pt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_it0.pt", "checkpoint_it2.pt", "log_it2.parquet"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    proc = _snakemake(workdir, out / "checkpoint_it60.pt")
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert "training 2 -> 60" in stdout and "train_dino_init" not in stdout  # only the killed segment reran
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())

    # the same run in one process, uninterrupted, with the resolved config (demo keys + overlay) and seed
    # the workflow used, on the pretraining table it wrote
    a = torch.load(out / "checkpoint_it60.pt", weights_only=True)
    torch.set_num_threads(1)
    dataset = training_dataset([workdir / "results" / "training" / "pretraining.parquet"], [workdir / "images"], 32)
    train_dino(dataset, a["config"], [60], [workdir / "uninterrupted.pt"], seed=a["seed"], device="cpu", log_every=0)
    b = torch.load(workdir / "uninterrupted.pt", weights_only=True)
    assert a["config_hash"] == b["config_hash"] and a["iteration"] == b["iteration"] == 60
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert torch.equal(a["dino_center"], b["dino_center"]) and torch.equal(a["ibot_center"], b["ibot_center"])
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][i][k]) for k in state)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
