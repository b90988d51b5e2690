"""Benchmark of per-image forward + backprop feature extraction against the obvious implementation.

One run, same images, same checkpoint, 12 layers (``blocks.N.mlp.fc2``), CPU. Prints:

* end to end, images/s of ``FeatureExtractor`` (one batched forward, one batched backward of the
  image-wise loss, per-image weight gradients from the captured rows, each layer's Gaussian matrix
  generated once per job and kept) against the obvious implementation: for every image its own
  forward and its own backward pass (``autograd.grad`` of its loss w.r.t. each layer's weight), and,
  for every batch, each layer's dense projection matrix materialised anew (same seeded tiles, so the
  features are identical: asserted);
* the projection step alone, on the same per-image gradients: ours (matrix kept on the device, one
  (B x D) @ (D x k) product per layer; and memory-mapped, streamed in row blocks) against the
  obvious (materialise each layer's matrix per batch, then one vector-matrix product per image),
  and against materialise-per-batch with one batched product (the previous over-budget path);
* the one-off generation time of the 12 matrices, and the projection memory of ViT-S/16 fc2
  (384 x 1536) at 800 dims, per layer and for 12 layers.

Model: the demo's narrow 12-block DINOv3 ViT (timm ``vit_small_patch16_dinov3`` with embed_dim 48,
3 heads, patch 8, 32-px images, fc2 48 x 192, D = 9216), its initialisation checkpoint (random
weights, teacher = student), the image-wise DINO + iBOT loss with its default views.

Usage::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_features.py      # ~4 min on 2 cores
    python bench/bench_features.py --n 64 --dim 128 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brainprop.features import FeatureExtractor, extract_features
from brainprop.projection import GaussianProjection, gaussian_matrix, layer_seed

LAYERS = [f"blocks.{i}.mlp.fc2" for i in range(12)]
DEMO_TRAINING = {"iterations": 1, "batch_size": 4,
                 "arch": {"timm_name": "vit_small_patch16_dinov3",
                          "kwargs": {"embed_dim": 48, "num_heads": 3, "patch_size": 8, "img_size": 32,
                                     "init_values": 1.0}},
                 "head": {"hidden_dim": 256, "bottleneck_dim": 64, "n_prototypes": 64, "ibot_n_prototypes": 64},
                 "crops": {"global_size": 32, "local_size": 16, "n_local": 2}}


def demo_loss(folder: Path, seed: int):
    """The image-wise loss of the demo ViT at its initialisation checkpoint (written into ``folder``)."""
    from brainprop.models import build_image_wise_loss, train_dino

    g = torch.Generator().manual_seed(seed)
    data = [(torch.randint(0, 256, (3, 40, 40), generator=g, dtype=torch.uint8), f"t{i}") for i in range(4)]
    path = folder / "it0.pt"
    train_dino(data, DEMO_TRAINING, [0], [path], seed=seed, device="cpu", log_every=0)
    # the demo's image-wise loss: Sinkhorn with a bank of the 4 training images, 2 view draws per image
    return build_image_wise_loss({"kind": "dino_checkpoint", "loss": {"bank_size": 4, "n_views": 2}}, path, seed=seed,
                                 device="cpu", bank_dataset=data)


def obvious_extraction(loss, layers, dataset, batch_size: int, dim: int, seed: int):
    """One forward and one backward pass per image; each layer's dense matrix materialised per batch."""
    weights = [dict(loss.network.named_modules())[n].weight for n in layers]
    forward_modules = dict(loss.forward_network.named_modules())
    captured = {}
    hooks = [forward_modules[n].register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, o)) for n in layers]
    fwd, bwd = {n: [] for n in layers}, {n: [] for n in layers}
    try:
        for start in range(0, len(dataset), batch_size):
            items = dataset[start:start + batch_size]
            mats = {n: gaussian_matrix(w.numel(), dim, layer_seed(seed, n)) for n, w in zip(layers, weights)}
            for image, image_id in items:
                with torch.no_grad():
                    loss.forward_network(loss.plain_view(image[None]))
                for n in layers:
                    fwd[n].append(captured[n].mean(dim=1)[0].numpy())
                losses, _ = loss(image[None], [image_id])
                grads = torch.autograd.grad(losses.sum(), weights)
                for n, g in zip(layers, grads):
                    bwd[n].append((g.flatten() @ mats[n]).numpy())
    finally:
        for h in hooks:
            h.remove()
    return ({n: np.stack(v) for n, v in fwd.items()}, {n: np.stack(v) for n, v in bwd.items()})


def per_image_gradients(loss, layers, images, ids) -> dict[str, torch.Tensor]:
    """Unprojected per-image weight gradients {layer: (B, D)} of one batch."""
    return FeatureExtractor(loss, layers, projection="none").backprop(images, ids)


def timed(fn, repeats: int = 1):
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=192, help="images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=800, help="projection dimension (paper: 800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(LAYERS)} layers, "
          f"{args.n} images, batch {args.batch_size}, projection dim {args.dim}")

    d_paper, k_paper = 384 * 1536, 800
    per_layer = 4 * d_paper * k_paper
    print(f"projection memory, ViT-S/16 fc2 (384 x 1536 = {d_paper:,}) at {k_paper} dims: {per_layer:,} B "
          f"({per_layer / 1e9:.2f} GB) per layer, {12 * per_layer:,} B ({12 * per_layer / 1e9:.1f} GB) for 12 layers; "
          f"memory-mapped: {4 * 8192 * k_paper / 1e6:.0f} MB in memory per streamed block")

    with tempfile.TemporaryDirectory() as tmp:
        loss = demo_loss(Path(tmp), args.seed)
        g = torch.Generator().manual_seed(args.seed + 1)
        dataset = [(torch.randint(0, 256, (3, 40, 40), generator=g, dtype=torch.uint8), f"im{i}")
                   for i in range(args.n)]
        rows, cols = dict(loss.network.named_modules())[LAYERS[0]].weight.shape
        print(f"model: demo DINOv3 ViT, 12 blocks, fc2 {rows} x {cols} (D = {rows * cols:,}), random init checkpoint")

        # end to end; ours includes generating its 12 matrices (once per job)
        def ours():
            ex = FeatureExtractor(loss, LAYERS, projection="gaussian", projection_dim=args.dim, seed=args.seed)
            fwd, bwd, _, _ = extract_features(ex, dataset, args.batch_size, "cpu", desc="ours")
            ex.close()
            return fwd, bwd

        extract_features(FeatureExtractor(loss, LAYERS, projection_dim=args.dim, seed=args.seed),
                         dataset[:2], 2, "cpu", desc="warm-up")
        t_ours, (fwd, bwd) = timed(ours)
        t_obv, (fwd_o, bwd_o) = timed(lambda: obvious_extraction(loss, LAYERS, dataset, args.batch_size, args.dim,
                                                                 args.seed))
        err = 0.0
        for n in LAYERS:
            np.testing.assert_allclose(fwd[n], fwd_o[n], rtol=1e-5, atol=1e-6)
            scale = np.abs(bwd_o[n]).max()
            np.testing.assert_allclose(bwd[n], bwd_o[n], rtol=0, atol=1e-4 * scale)
            err = max(err, float(np.abs(bwd[n] - bwd_o[n]).max() / scale))
        end_to_end = (f"  ours     {args.n / t_ours:8.1f} images/s  ({t_ours:.2f} s, including the one-off "
                      "generation of its 12 matrices)")
        obvious_line = f"  obvious  {args.n / t_obv:8.1f} images/s  ({t_obv:.2f} s)"
        identical = (f"features identical: forward rtol 1e-5, backprop max |diff| = {err:.1e} of the largest value")

        # the projection step alone, on one batch of per-image gradients
        images = torch.stack([im for im, _ in dataset[:args.batch_size]])
        ids = [i for _, i in dataset[:args.batch_size]]
        flats = per_image_gradients(loss, LAYERS, images, ids)
        projs = [GaussianProjection(rows * cols, args.dim, layer_seed(args.seed, n)) for n in LAYERS]
        t_gen, _ = timed(lambda: [p(flats[n][:1]) for p, n in zip(projs, LAYERS)])  # the first call generates
        mapped = [GaussianProjection(rows * cols, args.dim, layer_seed(args.seed, n), "memmap", tmp) for n in LAYERS]
        [p(flats[n][:1]) for p, n in zip(mapped, LAYERS)]

        def step_ours(ps):
            return [p(flats[n]) for p, n in zip(ps, LAYERS)]

        def step_obvious():
            out = []
            for n in LAYERS:
                mat = gaussian_matrix(rows * cols, args.dim, layer_seed(args.seed, n))
                out.append(torch.stack([f @ mat for f in flats[n]]))
            return out

        def step_batched():
            return [flats[n] @ gaussian_matrix(rows * cols, args.dim, layer_seed(args.seed, n)) for n in LAYERS]

        t_dev, y_dev = timed(lambda: step_ours(projs), repeats=5)
        t_map, y_map = timed(lambda: step_ours(mapped), repeats=5)
        t_ob, y_ob = timed(step_obvious, repeats=2)
        t_ba, _ = timed(step_batched, repeats=2)
        for a, b, c in zip(y_dev, y_map, y_ob):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-4 * c.abs().max().item())
            torch.testing.assert_close(b, c, rtol=0, atol=1e-4 * c.abs().max().item())
        for p in mapped:
            p.close()
        b = args.batch_size
        print("\nend to end (forward + backprop features, 12 layers)")
        print(end_to_end)
        print(obvious_line)
        print(f"  speed-up {t_obv / t_ours:8.1f} x; without the one-off generation ({t_gen:.2f} s): "
              f"{t_obv / (t_ours - t_gen):.1f} x; {identical}")
        print(f"\nprojection step alone (12 layers, one batch of {b} per-image gradients, "
              f"D = {rows * cols:,} -> {args.dim})")
        print(f"  ours, on the device         {b / t_dev:10.0f} images/s  ({1e3 * t_dev:.1f} ms)")
        print(f"  ours, memory-mapped         {b / t_map:10.0f} images/s  ({1e3 * t_map:.1f} ms)")
        print(f"  obvious (materialise + per-image products) {b / t_ob:7.0f} images/s  ({1e3 * t_ob:.1f} ms)")
        print(f"  materialise + one batched product          {b / t_ba:7.0f} images/s  ({1e3 * t_ba:.1f} ms)")
        print(f"  speed-up vs obvious {t_ob / t_dev:.1f} x (memory-mapped {t_ob / t_map:.1f} x); "
              f"vs materialise + batched {t_ba / t_dev:.1f} x; same features (1e-4 of the largest value)")
        print(f"  one-off per job: generating the 12 matrices {t_gen:.2f} s")


if __name__ == "__main__":
    main()
