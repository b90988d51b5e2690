"""What the eight benchmark models share: their blocks, offline loading, image views and captions.

Every benchmark model is wrapped as an image-wise loss (the protocol of :mod:`brainprop.features`):
``loss.network`` is the vision encoder whose residual blocks are hooked, ``loss.plain_view`` the
model's own preprocessing of a uint8 batch, and ``loss(images_uint8, image_ids)`` returns
``(losses (B,), owner (N,))`` with ``losses[b]`` a function of image ``b`` (and its caption) only.

Weights load offline only (``local_files_only``): a hub id is read from the local Hugging Face cache,
a folder or file path directly; anything missing fails at once with a message naming what to
download and which config key to point at it.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

#: Blocks of each vision encoder whose outputs give the forward and backprop signals (paper section 2.2).
N_BLOCKS = 10
#: Labels of those blocks in the feature files (their module names are in the features' layers.parquet).
BENCHMARK_LAYERS = [f"block{k}" for k in range(N_BLOCKS)]
#: ``models.<name>.kind`` of the pretrained benchmark models, and their one checkpoint label.
BENCHMARK_KINDS = ("mae", "timm", "clip", "owlvit", "siglip2")
PRETRAINED = "pretrained"


def evenly_spaced(blocks: Sequence[str], n: int = N_BLOCKS) -> list[str]:
    """The ``n`` blocks at ``round(linspace(0, len(blocks) - 1, n))`` of an ordered block list."""
    if len(blocks) < n:
        raise ValueError(f"the encoder has {len(blocks)} residual blocks; {n} evenly spaced ones need at least {n}")
    return [blocks[i] for i in np.round(np.linspace(0, len(blocks) - 1, n)).astype(int)]


def block_depths(layers: Sequence[str], blocks: Sequence[str]) -> list[float]:
    """Normalised depth of each chosen block: its index among all blocks / (number of blocks - 1)."""
    index = {name: i for i, name in enumerate(blocks)}
    return [index[name] / max(len(blocks) - 1, 1) for name in layers]


def load_offline(loader: Callable, source: str, what: str, key: str, **kwargs):
    """``loader(source, local_files_only=True, **kwargs)``, or a clear error naming what to download.

    ``what`` names the weights (e.g. ``"CLIP ViT-B/16 (openai/clip-vit-base-patch16)"``), ``key`` the
    config key that points at them (e.g. ``"models.clip.source"``).
    """
    try:
        return loader(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"{key}={source!r}: cannot load {what} offline ({type(err).__name__}: {err}). Download it on a "
            f"machine with internet (e.g. `hf download <hub id> --local-dir DIR`), copy DIR here and set "
            f"{key}: DIR") from err


def pixel_view(images_uint8: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A uint8 (B, 3, H, W) batch resized to ``size`` x ``size`` (bilinear, antialiased) and normalised."""
    x = images_uint8.float() / 255
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def captions_of(table: pd.DataFrame, template: str = "a photo of a {concept}") -> dict[str, str]:
    """Caption of every image of a stimulus table: its ``caption``, else ``template`` on its ``concept``.

    THINGS images have no captions unless a captions CSV was configured; the template then describes
    them by their concept (underscores read as spaces).
    """
    missing = [c for c in ("image_id", "concept") if c not in table.columns]
    if missing:
        raise ValueError(f"stimulus table lacks column(s) {missing}; expected image_id, concept and caption")
    captions = table["caption"] if "caption" in table.columns else pd.Series([None] * len(table), index=table.index)
    out = {}
    for image_id, concept, caption in zip(table.image_id, table.concept, captions):
        if isinstance(caption, str) and caption.strip():
            out[image_id] = caption
        else:
            out[image_id] = template.format(concept=str(concept).replace("_", " "))
    return out


class BenchmarkLoss(abc.ABC):
    """Base of the benchmark models' image-wise losses.

    Subclasses set ``network`` (the vision encoder), ``blocks`` (the names, in ``network``, of all its
    residual blocks in order), ``image_size``, ``mean`` and ``std``, and implement ``__call__``.
    ``log_k`` is ln of the number of outcomes the loss scores (classes or captions; NaN when it has
    none), ``last_target_entropy`` the per-image entropy of a soft target, when the loss has one.
    """

    network: torch.nn.Module
    blocks: list[str]
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    log_k: float = math.nan
    last_target_entropy: torch.Tensor | None = None

    def __init__(self, captions: Mapping[str, str] | None = None):
        self.captions = dict(captions or {})

    @property
    def layers(self) -> list[str]:
        """The :data:`N_BLOCKS` evenly spaced blocks whose outputs are the signals."""
        return evenly_spaced(self.blocks)

    @property
    def layer_depths(self) -> list[float]:
        return block_depths(self.layers, self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def plain_view(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return pixel_view(images_uint8.to(self.device), self.image_size, self.mean, self.std)

    def caption(self, image_ids: Sequence[str]) -> list[str]:
        missing = [i for i in image_ids if i not in self.captions]
        if missing:
            raise KeyError(f"no caption for image(s) {missing[:5]}; the loss needs the stimulus table's captions")
        return [self.captions[i] for i in image_ids]

    @abc.abstractmethod
    def __call__(self, images_uint8: torch.Tensor, image_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses (B,), owner (N,))`` of the image-wise loss protocol (:mod:`brainprop.features`)."""
