"""The benchmark models: per-image forward + backprop throughput of each tiny model on the CPU, and the
memory of the real ViT-L/16 and ConvNeXt-L signals at 224 px.

Throughput: for each of the seven pretrained kinds, its tiny demo version (``write_tiny_model``, the
demo's own) extracts forward and backprop features (ten blocks, output gradients pooled) of a batch of
``--batch`` random images, through :class:`brainprop.features.FeatureExtractor` as the workflow does.
The obvious implementation it is compared with runs one image at a time (B single-image passes: the
definition of a per-image gradient); the ratio is the speed-up of the batched per-image gradients.

Memory: per image, the float32 outputs of the ten chosen blocks and the Gaussian projection matrices of
the pooled output gradients wider than 800 (``classifiers.block_output_memory``, from the real
architectures built on the meta device, no weights).

Usage::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_models.py [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brainprop.features import FeatureExtractor
from brainprop.models import build_benchmark_loss, write_tiny_model
from brainprop.models.benchmark import BENCHMARK_KINDS

KINDS = {"vit_mae": {"kind": "mae"},
         "vit_l16": {"kind": "timm", "name": "vit_large_patch16_224"},
         "convnext_l": {"kind": "timm", "name": "convnext_large"},
         "resnet50": {"kind": "timm", "name": "resnet50"},
         "owlvit": {"kind": "owlvit", "bank_size": 255},
         "clip": {"kind": "clip", "bank_size": 255},
         "siglip2": {"kind": "siglip2", "bank_size": 255}}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def throughput(root: Path, batch: int, repeats: int, seed: int = 0) -> list[dict]:
    captions = [f"a toy image number {i} with a {c} shape" for i, c in enumerate(["red", "blue", "green"] * 100)]
    tiny = {}
    for name in ("clip", *[n for n in KINDS if n != "clip"]):  # the classifiers' bridge reads the tiny CLIP
        entry = {**KINDS[name], "image_size": None, "config_key": f"models.{name}"}
        write_tiny_model(entry, root / name, seed, captions)
        tiny[name] = {**entry, "source": str(root / name)}
    rows = []
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 64, 64), generator=g, dtype=torch.uint8)
    ids = [f"img{i}" for i in range(batch)]
    for name, entry in tiny.items():
        if entry["kind"] == "timm":
            entry = {**entry, "bridge": {"text_model": "clip", "text_source": tiny["clip"]["source"],
                                         "temperature": 0.01, "templates": "simple"}}
        loss = build_benchmark_loss(entry, {f"img{k}": c for k, c in enumerate(captions)}, seed)
        ex = FeatureExtractor(loss, loss.layers, "mean", "output", "gaussian", 128, seed=seed)
        batched = _timed(lambda: (ex.forward(images), ex.backprop(images, ids)), repeats)
        single = _timed(lambda: [(ex.forward(images[b:b + 1]), ex.backprop(images[b:b + 1], ids[b:b + 1]))
                                 for b in range(batch)], max(1, repeats // 2))
        n_params = sum(p.numel() for p in loss.network.parameters())
        rows.append({"model": name, "kind": entry["kind"], "params": n_params, "image_size": loss.image_size,
                     "batched_img_per_s": batch / batched, "single_img_per_s": batch / single,
                     "ratio": single / batched})
    return rows


def memory(projection_dim: int = 800) -> list[str]:
    from brainprop.models.classifiers import block_output_memory

    lines = []
    for arch in ("vit_large_patch16_224", "convnext_large"):
        table = block_output_memory(arch, 224, projection_dim)
        act, proj = table["activation_bytes"].sum() / 2**20, table["projection_bytes"].sum() / 2**20
        lines.append(f"{arch}: block outputs {act:.2f} MiB per image at the 10 blocks; Gaussian projections "
                     f"{proj:.2f} MiB (once per job); pooled dims {sorted(set(table['pooled_dim']))}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assert set(e["kind"] for e in KINDS.values()) == set(BENCHMARK_KINDS)
    with tempfile.TemporaryDirectory() as tmp:
        rows = throughput(Path(tmp), args.batch, args.repeats)
    print(f"tiny models, batch {args.batch}, CPU threads {torch.get_num_threads()} (median of {args.repeats}):")
    print(f"{'model':12s} {'kind':7s} {'params':>8s} {'px':>4s} {'batched img/s':>14s} {'one-by-one img/s':>17s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['model']:12s} {r['kind']:7s} {r['params']:8d} {r['image_size']:4d} {r['batched_img_per_s']:14.1f} "
              f"{r['single_img_per_s']:17.1f} {r['ratio']:6.2f}")
    print("real sizes at 224 px:")
    for line in memory():
        print("  " + line)


if __name__ == "__main__":
    main()
