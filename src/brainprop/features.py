"""Per-image forward activations and backpropagated gradients of chosen layers.

For each image and each hooked layer (a ``torch.nn.Linear``, default the MLP output
projection ``blocks.N.mlp.fc2``):

* **forward**: the layer's output on the image's plain view, in the loss's
  ``forward_network`` (the teacher for DINO checkpoints, as released DINO backbones are;
  ``loss.network`` when the loss has none), pooled over tokens (``mean`` by default: it
  keeps the layer width as dimension, weighs the patch tokens that carry most of the
  image's content, and is the usual choice in encoding studies of ViTs; ``cls`` takes
  token 0, ``flatten`` keeps every token). ``tokens="all"`` pools prefix (CLS, register)
  and patch tokens, ``"patches"`` only the patch tokens.
* **backprop**: the gradient of the image's OWN loss with respect to either the layer's
  weight (``weight``: the per-image synaptic update ``sum_views sum_tokens
  outer(grad_output, input)``, bias excluded) or its output (``output``: the backward
  activation, pooled over tokens like forward and summed over the image's views).

Losses follow the image-wise loss protocol: ``loss(images_uint8, image_ids)`` returns
``(losses (B,), owner (N,))`` where ``owner[n]`` is the image of row ``n`` of every batch
the loss ran ``loss.network`` on, and ``losses[b]`` depends on image ``b`` only; so the
gradient of ``losses.sum()`` at a row is the gradient of its owner's loss, and a batch
of B images gives exactly the gradients of B single-image passes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from brainprop.projection import GaussianProjection, KroneckerProjection, fit_pca, layer_seed, storage_plan
from brainprop.utils import get_logger, resolve_device, save_npy_atomic, save_parquet_atomic

log = get_logger(__name__)

POOLINGS = ("mean", "cls", "flatten")
BACKPROP_TARGETS = ("weight", "output")
POOLED_TOKENS = ("all", "patches")


def pool_tokens(x: torch.Tensor, pooling: str, n_prefix: int = 0) -> torch.Tensor:
    """Pool (N, T, D) token features to (N, D) (``mean``, ``cls``) or (N, T' * D) (``flatten``).

    ``n_prefix`` > 0 drops the first ``n_prefix`` tokens (CLS and registers) before ``mean`` or ``flatten``.
    A CNN feature map (N, C, H, W) is read as H * W tokens of C channels (no prefix, no CLS token).
    """
    if x.ndim == 2:  # already one vector per row (e.g. a pooled CNN layer)
        return x
    if x.ndim == 4:
        if pooling == "cls":
            raise ValueError("pooling='cls' needs a token sequence; a CNN feature map has no CLS token")
        x, n_prefix = x.flatten(2).transpose(1, 2), 0
    if n_prefix and pooling != "cls":
        x = x[:, n_prefix:]
    if pooling == "mean":
        return x.mean(dim=1)
    if pooling == "cls":
        return x[:, 0]
    if pooling == "flatten":
        return x.flatten(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@dataclass
class _Capture:
    """Inputs and outputs of one layer over every call of the network during a step."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)

    def hook(self, module, args, output):
        # a block returning (hidden_states, ...) is read at its hidden states; the input is only
        # needed for weight gradients of a Linear layer, which is always called positionally
        self.inputs.append(args[0] if args else None)
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def clear(self):
        self.inputs.clear()
        self.outputs.clear()


class FeatureExtractor:
    """Extract forward and backprop features of ``layers`` of ``loss.network``.

    Parameters
    ----------
    loss : image-wise loss (see module docstring); ``loss.network`` is hooked, ``loss.plain_view``
        gives the forward view.
    layers : module names, e.g. ``["blocks.0.mlp.fc2", ...]``; each must be a ``torch.nn.Linear``
        when ``backprop_target="weight"``.
    pooling : ``mean`` | ``cls`` | ``flatten``.
    tokens : ``all`` | ``patches``: whether ``mean``/``flatten`` pooling (forward, output gradients)
        includes the network's ``num_prefix_tokens`` prefix tokens (CLS, registers).
    backprop_target : ``weight`` | ``output``.
    projection : ``gaussian`` | ``kronecker`` | ``none``; weight gradients (and output gradients
        larger than ``projection_dim``) are projected to ``projection_dim`` dims, each layer by the
        map seeded by ``(seed, layer name)``.
    memory_budget_mb : float
        Total MiB of Gaussian matrices kept on the compute device (layers in order, while they fit);
        the other layers' matrices are memory-mapped from scratch files. Each matrix is generated once.
    scratch_dir : folder of those scratch files (None: ``$TMPDIR``), deleted by :meth:`close`.
    """

    def __init__(self, loss, layers: Sequence[str], pooling: str = "mean", backprop_target: str = "weight",
                 projection: str = "gaussian", projection_dim: int = 800, seed: int = 0,
                 memory_budget_mb: float = 24576.0, scratch_dir: str | os.PathLike | None = None,
                 tokens: str = "all"):
        if tokens not in POOLED_TOKENS:
            raise ValueError(f"tokens must be one of {POOLED_TOKENS}, got {tokens!r}")
        if tokens == "patches" and pooling == "cls":
            raise ValueError("tokens='patches' excludes the CLS token that pooling='cls' takes")
        if backprop_target not in BACKPROP_TARGETS:
            raise ValueError(f"backprop_target must be one of {BACKPROP_TARGETS}, got {backprop_target!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.loss, self.layers = loss, list(layers)
        self.pooling, self.backprop_target = pooling, backprop_target
        modules = dict(loss.network.named_modules())
        missing = [name for name in self.layers if name not in modules]
        if missing:
            linear = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)][:8]
            raise ValueError(f"layers {missing} not found in the network; Linear layers include {linear} ...")
        self.modules = {name: modules[name] for name in self.layers}
        if backprop_target == "weight":
            bad = [n for n, m in self.modules.items() if not isinstance(m, torch.nn.Linear)]
            if bad:
                raise ValueError(f"backprop_target='weight' needs torch.nn.Linear layers; {bad} are not")
        self.projection, self.projection_dim = projection, projection_dim
        self.seed, self.memory_budget_mb, self.scratch_dir = seed, memory_budget_mb, scratch_dir
        self.projectors = {}
        if backprop_target == "weight" and projection != "none":
            shapes = {name: module.weight.shape for name, module in self.modules.items()}
            plan = storage_plan([4 * r * c * projection_dim for r, c in shapes.values()], memory_budget_mb)
            for (name, (rows, cols)), storage in zip(shapes.items(), plan):
                self.projectors[name] = self._projector(name, rows, cols, storage)
        self._captures = {name: _Capture() for name in self.layers}
        self.forward_network = getattr(loss, "forward_network", loss.network)
        forward_modules = dict(self.forward_network.named_modules())
        self.forward_modules = {name: forward_modules[name] for name in self.layers}
        self.n_prefix = int(getattr(loss.network, "num_prefix_tokens", 0)) if tokens == "patches" else 0
        self.last_losses = self.last_target_entropy = None

    def _projector(self, name: str, rows: int, cols: int, storage: str):
        """The weight-gradient projection of layer ``name`` (rows x cols weight), seeded by the name."""
        seed = layer_seed(self.seed, name)
        if self.projection == "kronecker":
            return KroneckerProjection(rows, cols, self.projection_dim, seed)
        return GaussianProjection(rows * cols, self.projection_dim, seed, storage, self.scratch_dir)

    def close(self) -> None:
        """Free the projection matrices and delete their scratch files."""
        for proj in self.projectors.values():
            if isinstance(proj, GaussianProjection):
                proj.close()

    def _hooks(self, modules=None):
        modules = self.modules if modules is None else modules
        return [modules[n].register_forward_hook(self._captures[n].hook) for n in self.layers]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled forward activations of ``forward_network``, {layer: (B, d)}."""
        handles = self._hooks(self.forward_modules)
        try:
            with torch.no_grad():
                self.forward_network(self.loss.plain_view(images))
            return {n: pool_tokens(c.outputs[0], self.pooling, self.n_prefix).float()
                    for n, c in self._captures.items()}
        finally:
            for h in handles:
                h.remove()
            for c in self._captures.values():
                c.clear()

    def backprop(self, images: torch.Tensor, image_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-image backprop features, {layer: (B, k)}.

        Also sets ``last_losses`` (B,) and ``last_target_entropy`` (B,) (the loss's own, or None).
        """
        handles = self._hooks()
        try:
            losses, owner = self.loss(images, image_ids)
            outputs = [o for n in self.layers for o in self._captures[n].outputs]
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
            result, i = {}, 0
            for n in self.layers:
                cap = self._captures[n]
                g = [torch.zeros_like(o) if gr is None else gr for o, gr in zip(cap.outputs, grads[i:i + len(cap.outputs)])]
                i += len(cap.outputs)
                result[n] = self._per_image(n, [None if x is None else x.detach() for x in cap.inputs], g, owner, len(image_ids))
            self.last_losses = losses.detach()
            entropy = getattr(self.loss, "last_target_entropy", None)
            self.last_target_entropy = None if entropy is None else entropy.detach()
            return result
        finally:
            for h in handles:
                h.remove()
            for c in self._captures.values():
                c.clear()

    def _per_image(self, name, inputs, grads, owner, n_images) -> torch.Tensor:
        owner = owner.to(grads[0].device)
        offsets = np.cumsum([0] + [g.shape[0] for g in grads])
        if offsets[-1] != owner.shape[0]:
            raise RuntimeError(f"loss returned {owner.shape[0]} owners for {offsets[-1]} network rows at {name}")
        chunks = [owner[offsets[c]:offsets[c + 1]] for c in range(len(grads))]
        if self.backprop_target == "output":
            pooled = [pool_tokens(g, self.pooling, self.n_prefix).float() for g in grads]
            if len({p.shape[1] for p in pooled}) > 1:
                raise ValueError(f"{name}: output gradients of views with different token counts cannot be "
                                 f"combined with pooling={self.pooling!r}; use mean or cls")
            out = torch.zeros(n_images, pooled[0].shape[1], device=pooled[0].device)
            for p, own in zip(pooled, chunks):
                out.index_add_(0, own, p)
            if out.shape[1] > self.projection_dim and self.projection != "none":
                if name not in self.projectors:
                    used = sum(p.nbytes for p in self.projectors.values() if p.storage == "device")
                    (storage,) = storage_plan([4 * out.shape[1] * self.projection_dim],
                                              self.memory_budget_mb - used / 2**20)
                    self.projectors[name] = GaussianProjection(out.shape[1], self.projection_dim,
                                                               layer_seed(self.seed, name), storage, self.scratch_dir)
                out = self.projectors[name](out)
            return out
        proj = self.projectors.get(name)
        if isinstance(proj, KroneckerProjection):
            return sum(proj.from_factors(g, x, own, n_images) for g, x, own in zip(grads, inputs, chunks))
        rows, cols = self.modules[name].weight.shape
        weight_grads = torch.zeros(n_images, rows, cols, device=grads[0].device)
        for g, x, own in zip(grads, inputs, chunks):
            g2, x2 = g.float().reshape(g.shape[0], -1, rows), x.float().reshape(x.shape[0], -1, cols)
            present, counts = own.unique(return_counts=True)
            if bool((counts == counts[0]).all()):
                # every image owns as many rows of this call: one batched product over its sorted rows
                order = torch.argsort(own, stable=True)
                per = (len(present), -1)
                weight_grads.index_add_(0, present, torch.bmm(g2[order].reshape(*per, rows).transpose(1, 2),
                                                              x2[order].reshape(*per, cols)))
                continue
            for b in present.tolist():
                rows_b = own == b
                weight_grads[b] += g2[rows_b].reshape(-1, rows).T @ x2[rows_b].reshape(-1, cols)
        flat = weight_grads.reshape(n_images, -1)
        return flat if proj is None else proj(flat)


def extract_features(extractor: FeatureExtractor, dataset, batch_size: int, device=None,
                     desc: str = "features") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str],
                                                      pd.DataFrame]:
    """Run ``extractor`` over a dataset of ``(uint8 image, image_id)``.

    Returns
    -------
    forward, backprop : ``{layer: (n_images, d) float32}`` in dataset order.
    image_ids : list of n_images ids.
    losses : DataFrame, one row per image: ``image_id``, ``loss`` (the image-wise loss) and
        ``target_entropy`` (the loss's ``last_target_entropy``; NaN when it has none).
    """
    device = resolve_device(device)
    forward: dict[str, list[np.ndarray]] = {n: [] for n in extractor.layers}
    backprop: dict[str, list[np.ndarray]] = {n: [] for n in extractor.layers}
    ids: list[str] = []
    losses: list[np.ndarray] = []
    entropies: list[np.ndarray] = []
    n = len(dataset)
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch"):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        images = torch.stack([im for im, _ in items]).to(device)
        batch_ids = [i for _, i in items]
        for name, x in extractor.forward(images).items():
            forward[name].append(x.cpu().numpy())
        for name, x in extractor.backprop(images, batch_ids).items():
            backprop[name].append(x.cpu().numpy())
        losses.append(extractor.last_losses.double().cpu().numpy())
        entropy = extractor.last_target_entropy
        entropies.append(np.full(len(items), np.nan) if entropy is None else entropy.double().cpu().numpy())
        ids.extend(batch_ids)
    cat = lambda d: {k: np.concatenate(v).astype(np.float32) for k, v in d.items()}  # noqa: E731
    table = pd.DataFrame({"image_id": ids, "loss": np.concatenate(losses), "target_entropy": np.concatenate(entropies)})
    return cat(forward), cat(backprop), ids, table


def training_images(tables: Sequence[str | os.PathLike], roots: Sequence[str | os.PathLike], image_size: int):
    """ConcatDataset of :class:`~brainprop.stimuli.StimulusDataset` over (stimulus table, root) pairs."""
    from torch.utils.data import ConcatDataset

    from brainprop.stimuli import StimulusDataset

    if len(tables) != len(roots) or not tables:
        raise ValueError(f"expected one root per training table, got {len(tables)} tables and {len(roots)} roots")
    return ConcatDataset([StimulusDataset(pd.read_parquet(t), r, image_size) for t, r in zip(tables, roots)])


def run_feature_extraction(checkpoint: str | os.PathLike, stimulus_table: str | os.PathLike,
                           stimulus_root: str | os.PathLike, out_dir: str | os.PathLike, model: dict,
                           features: dict, seed: int, device: str | None = None,
                           bank_tables: Sequence[str | os.PathLike] = (),
                           bank_roots: Sequence[str | os.PathLike] = ()) -> None:
    """Rule entry point: write ``{out_dir}/{layer}.{forward,backprop}.npy``, ``{out_dir}/index.parquet``
    and ``{out_dir}/losses.parquet``.

    ``model`` is the model's config entry (kind, image_size, forward_network, loss settings);
    ``features`` the ``features`` config section (layers, pooling, pooled_tokens, backprop_target,
    projection, batch_size); ``bank_tables``/``bank_roots`` the training images' stimulus tables and
    roots (the Sinkhorn bank; needed for ``loss.centering: sinkhorn``). ``losses.parquet``: one row per
    image with ``image_id``, ``loss`` and ``target_entropy`` (nats) and ``log_k`` (ln of the number of
    DINO prototypes).
    """
    from brainprop.models import build_image_wise_loss

    device = resolve_device(device)
    bank = training_images(bank_tables, bank_roots, model["image_size"]) if bank_tables else None
    loss = build_image_wise_loss(model, checkpoint, seed=seed, device=device, bank_dataset=bank)
    proj = features["projection"]
    extractor = FeatureExtractor(loss, features["layers"], features["pooling"], features["backprop_target"],
                                 proj["method"], proj["dim"], seed=seed, memory_budget_mb=proj["memory_budget_mb"],
                                 scratch_dir=proj.get("scratch_dir") or out_dir, tokens=features["pooled_tokens"])
    _extract_and_write(extractor, features["layers"], pd.read_parquet(stimulus_table), stimulus_root,
                       model["image_size"], out_dir, features["batch_size"], device)


def run_benchmark_extraction(stimulus_table: str | os.PathLike, stimulus_root: str | os.PathLike,
                             out_dir: str | os.PathLike, model: dict, features: dict, seed: int,
                             device: str | None = None) -> None:
    """Rule entry point of a pretrained benchmark model (``model["kind"]`` in ``BENCHMARK_KINDS``).

    Forward: the outputs of its ten evenly spaced residual blocks on the model's own view, pooled over
    tokens (``features.pooling``, ``features.pooled_tokens``; CNN maps over space); backprop: the
    gradient of the image's own loss (captions from the stimulus table) at those outputs, pooled alike
    and Gaussian-projected to ``features.projection.dim`` when wider (paper section 2.2: gradients at
    the residual-block outputs, whatever ``features.backprop_target`` says for the models trained here).
    Files are ``block0..block9.{forward,backprop}.npy``; ``layers.parquet`` names each block's module,
    its index among all ``n_blocks`` blocks and its depth index / (n_blocks - 1).
    """
    from brainprop.models import build_benchmark_loss
    from brainprop.models.benchmark import BENCHMARK_LAYERS, captions_of

    device = resolve_device(device)
    table = pd.read_parquet(stimulus_table)
    loss = build_benchmark_loss(model, captions_of(table), seed=seed, device=device)
    proj = features["projection"]
    extractor = FeatureExtractor(loss, loss.layers, features["pooling"], "output", proj["method"], proj["dim"],
                                 seed=seed, memory_budget_mb=proj["memory_budget_mb"],
                                 scratch_dir=proj.get("scratch_dir") or out_dir, tokens=features["pooled_tokens"])
    _extract_and_write(extractor, BENCHMARK_LAYERS, table, stimulus_root, loss.image_size, out_dir,
                       features["batch_size"], device)
    index = {name: i for i, name in enumerate(loss.blocks)}
    save_parquet_atomic(pd.DataFrame({"layer": BENCHMARK_LAYERS, "module": loss.layers,
                                      "block_index": [index[m] for m in loss.layers], "n_blocks": len(loss.blocks),
                                      "block_depth": loss.layer_depths}), Path(out_dir) / "layers.parquet")


def _extract_and_write(extractor: FeatureExtractor, labels: Sequence[str], table: pd.DataFrame, stimulus_root,
                       image_size: int, out_dir, batch_size: int, device) -> None:
    """Extract the stimulus table's images and write ``{label}.{forward,backprop}.npy`` (one label per
    extractor layer), ``index.parquet`` and ``losses.parquet``."""
    from brainprop.stimuli import StimulusDataset

    dataset = StimulusDataset(table, stimulus_root, image_size)
    Path(extractor.scratch_dir).mkdir(parents=True, exist_ok=True)
    fwd, bwd, ids, losses = extract_features(extractor, dataset, batch_size, device,
                                             desc=f"features {Path(out_dir).name}")
    extractor.close()
    if ids != table.image_id.tolist():
        raise RuntimeError("feature rows are out of order with the stimulus table")
    out_dir = Path(out_dir)
    for label, name in zip(labels, extractor.layers):
        save_npy_atomic(out_dir / f"{label}.forward.npy", fwd[name])
        save_npy_atomic(out_dir / f"{label}.backprop.npy", bwd[name])
    save_parquet_atomic(pd.DataFrame({"image_id": ids}), out_dir / "index.parquet")
    log_k = extractor.loss.log_k
    losses["log_k"] = log_k
    save_parquet_atomic(losses, out_dir / "losses.parquet")
    log.info("wrote %d layers x 2 signals for %d images to %s; mean loss %.4f, mean target entropy / ln K %.4f",
             len(labels), len(ids), out_dir, losses.loss.mean(), (losses.target_entropy / log_k).mean())


def run_pca(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, layers: Sequence[str], n_components: int,
            seed: int) -> None:
    """Rule entry point: PCA of every ``{raw_dir}/{layer}.{signal}.npy`` to ``{out_dir}/{layer}.{signal}.npy``."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    rows = []
    for layer in tqdm(layers, desc="PCA", unit="layer"):
        for signal in ("forward", "backprop"):
            x = np.load(raw_dir / f"{layer}.{signal}.npy")
            scores, ratio = fit_pca(x, n_components, seed)
            save_npy_atomic(out_dir / f"{layer}.{signal}.npy", scores)
            rows.append({"layer": layer, "signal": signal, "raw_dim": x.shape[1], "n_components": scores.shape[1],
                         "explained_variance": float(ratio.sum())})
    save_parquet_atomic(pd.read_parquet(raw_dir / "index.parquet"), out_dir / "index.parquet")
    save_parquet_atomic(pd.DataFrame(rows), out_dir / "pca_summary.parquet")
