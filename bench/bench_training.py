"""Benchmark of DINOv3-style training: measured CPU images/s, and the expected H100/H200 figure on paper.

Prints, in one table:

* measured CPU training throughput (images/s, one full iteration: views, teacher forward, student
  forward/backward, AdamW, EMA) of the demo model (the demo run's resolved training section) and of
  ViT-S/16 at the paper's crops (2 x 224 + 8 x 96, heads with 65,536 prototypes) with a small batch;
* measured CPU multi-crop view building (images/s on one core) at the paper's crops from a
  427 x 320 image (an ImageNet-sized image after the shorter-side bound of 320);
* FLOPs per image per iteration at the paper config, counted with
  :class:`torch.utils.flop_counter.FlopCounterMode` over one real training iteration (teacher forward,
  student forward/backward, heads; attention through the math SDPA path so it is counted; blur off,
  it is data-side CPU work);
* the expected GPU throughput at a stated MFU of the 989 TFLOP/s dense bf16 peak (H100 SXM and H200
  share it), the GPU-hours of the paper's 500,000 iterations at its batch size, the CPU cores
  needed to build views that fast, and the data-bound rate of a GPU node's cores.

Usage::

    python bench/bench_training.py                  # ~4 min on 2 busy cores
    python bench/bench_training.py --vit-batch 4 --vit-iterations 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from brainprop.config import resolve_config
from brainprop.models import count_parameters, initial_checkpoint, make_views, resolve_training_config, train_segment

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16 = 989e12  # dense bf16 FLOP/s, H100 SXM and H200 (same GH100 tensor cores; H200 adds memory)
MFUS = (0.35, 0.40, 0.45)


class RandomImages(Dataset):
    """``n`` seeded uint8 images (3, h, w) with ids, the training loop's input format."""

    def __init__(self, n: int, h: int, w: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], f"img{i:05d}"


def demo_config() -> dict:
    """The demo run's training config (config/base.yaml + the demo overlay)."""
    return resolve_training_config(resolve_config(workflow_dir=ROOT)["training"])


def paper_config(batch_size: int) -> dict:
    """The paper run's training config (config/base.yaml + config/paper.yaml) with a benchmark batch size."""
    training = resolve_config([ROOT / "config/paper.yaml"], workflow_dir=ROOT)["training"]
    return resolve_training_config({**training, "batch_size": batch_size})


def cpu_images_per_s(cfg: dict, n_iterations: int, image_hw: tuple[int, int]) -> float:
    """Training images/s on the CPU, timed over ``n_iterations`` after one warm-up iteration."""
    cfg = {**cfg, "iterations": n_iterations + 1}
    data = RandomImages(cfg["batch_size"] * (n_iterations + 1), *image_hw)
    warm, _ = train_segment(data, initial_checkpoint(cfg, seed=0), 1, device="cpu", log_every=0)
    t0 = time.perf_counter()
    train_segment(data, warm, n_iterations + 1, device="cpu", log_every=0)
    return cfg["batch_size"] * n_iterations / (time.perf_counter() - t0)


def flops_per_image(cfg: dict) -> float:
    """FLOPs of one training iteration divided by the batch size (counted, not estimated)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = {**cfg, "iterations": 1, "crops": {**cfg["crops"], "blur_p": [0.0, 0.0, 0.0]}}
    data = RandomImages(cfg["batch_size"], 320, 427)
    start = initial_checkpoint(cfg, seed=0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        train_segment(data, start, 1, device="cpu", log_every=0)
    return counter.get_total_flops() / cfg["batch_size"]


def views_per_s(cfg: dict, n: int = 8) -> float:
    """Multi-crop views (2 global + n_local, masks) built per second on one core (one intra-op thread, as
    in a DataLoader worker) from 427 x 320 images."""
    data = RandomImages(n, 320, 427)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    make_views(data[0][0], 0, cfg, 16)
    t0 = time.perf_counter()
    for i in range(n):
        make_views(data[i][0], i, cfg, 16)
    rate = n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-iterations", type=int, default=3)
    parser.add_argument("--vit-batch", type=int, default=2, help="ViT-S/16 CPU batch (paper: 256)")
    parser.add_argument("--vit-iterations", type=int, default=1)
    parser.add_argument("--gpu-node-cores", type=int, default=16, help="CPU cores beside the GPU (one drives it)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    demo = demo_config()
    paper = paper_config(args.vit_batch)
    method = resolve_config([ROOT / "config/paper.yaml"], workflow_dir=ROOT)["training"]
    batch, iterations = method["batch_size"], method["iterations"]
    student = initial_checkpoint(paper, seed=0).student
    print(f"torch {torch.__version__}, {args.threads} CPU threads; paper student: {count_parameters(student) / 1e6:.1f} M "
          f"parameters ({count_parameters(student.backbone) / 1e6:.1f} M backbone)")

    views = views_per_s(paper)
    demo_ips = cpu_images_per_s(demo, args.demo_iterations, (64, 64))
    vit_ips = cpu_images_per_s(paper, args.vit_iterations, (320, 427))
    flops = flops_per_image(paper_config(2))

    rows = [
        ("CPU, demo model (batch %d, crops %d/%d x %d local)" % (demo["batch_size"], demo["crops"]["global_size"],
                                                               demo["crops"]["local_size"], demo["crops"]["n_local"]),
         f"{demo_ips:10.1f} img/s", "measured"),
        (f"CPU, ViT-S/16 paper crops 2x224 + 8x96, 65,536 prototypes (batch {args.vit_batch})",
         f"{vit_ips:10.2f} img/s", "measured"),
        ("CPU, multi-crop views at paper crops, one core", f"{views:10.1f} img/s", "measured"),
        ("FLOPs per image per iteration (paper config)", f"{flops / 1e9:10.1f} GFLOP", "FlopCounterMode"),
    ]
    for mfu in MFUS:
        gpu_ips = PEAK_BF16 * mfu / flops
        hours = iterations * batch / gpu_ips / 3600
        rows.append((f"H100 SXM / H200 at {mfu:.0%} MFU of 989 TFLOP/s bf16", f"{gpu_ips:10.0f} img/s",
                     f"{hours:.1f} GPU-h for {iterations:,} it x {batch}; needs {gpu_ips / views:.0f} cores of views"))
    fed = (args.gpu_node_cores - 1) * views
    rows.append((f"same GPU fed by {args.gpu_node_cores - 1} view workers (CPU views, measured rate)",
                 f"{fed:10.0f} img/s", f"{iterations * batch / fed / 3600:.0f} GPU-h: data-bound"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'quantity'.ljust(width)} | {'value':>16} | note")
    print("-" * (width + 60))
    for name, value, note in rows:
        print(f"{name.ljust(width)} | {value:>16} | {note}")


if __name__ == "__main__":
    main()
