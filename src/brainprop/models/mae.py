"""ViT-MAE (He et al., 2022) as an image-wise loss: the native masked reconstruction loss, per image.

Model: transformers ``ViTMAEForPreTraining`` (pinned transformers 5.24). The paper names "ViT-MAE"
without a size; the real run loads ``facebook/vit-mae-base`` (ViT-B/16, 12 encoder blocks, 224 px),
the reference Hugging Face checkpoint of the MAE release; ``facebook/vit-mae-large`` loads through
the same code by changing ``source``.

Signals (paper section 2.2):

* **forward**: residual-block outputs of an UNMASKED encoder pass (:class:`UnmaskedEncoder`, the
  ``network`` that the feature extractor hooks). transformers has no switch that turns masking off:
  ``random_masking`` keeps ``int(L * (1 - config.mask_ratio))`` patches in the order of
  ``argsort(noise)``, so the unmasked pass sets ``mask_ratio = 0`` for the duration of the call and
  passes ``noise = arange(L)``, which keeps every patch in raster order. ``interpolate_pos_encoding``
  is not needed: images are resized to the checkpoint's own size.
* **backprop**: gradient of the image's masked reconstruction loss with respect to the same block
  outputs during the MASKED pass (where the loss's gradient flows); those outputs hold the CLS token
  and the visible patches only, and pooling over tokens still gives one D-vector per block.

Loss of image ``b``: the library's loss restricted to that image, i.e. the mean over its masked
patches of the per-patch mean squared error between the decoder's prediction and the patch pixels
(each patch standardised by its own mean and unbiased variance + 1e-6 when ``norm_pix_loss``). The
mask comes from the model's ``noise`` argument, drawn by a generator seeded by ``(seed, image id)``,
so an image's mask does not depend on its batch. The library reduces a batch as
``(loss * mask).sum() / mask.sum()``: a mean over all masked patches of the batch; since every image
keeps the same ``int(L * (1 - mask_ratio))`` patches, every image has the same number of masked
patches and that batch loss equals the mean of the per-image losses (tested).

Blocks: the encoder's ``ViTMAELayer`` modules in order (found by class under the encoder, since
their path moved from ``vit.encoder.layer`` in 4.x to ``vit.layers`` in 5.x; the decoder's layers
share the class and are excluded). The MAE loss uses no caption: ``captions`` is accepted for the
common builder signature only.

Config entry of the model (``models.<name>``, read by :func:`load_mae`):

* ``source``: hub id (read from the local Hugging Face cache) or a local folder holding
  ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` (mean, std, size).
* ``mask_ratio``: fraction of patches masked in the loss; null = the checkpoint's (0.75 for the
  released weights).
* ``norm_pix_loss``: standardise each target patch; null = the checkpoint's config value, i.e. the
  target its decoder was trained to predict (the hub's ViT-MAE weights were converted from the MAE
  release's visualisation checkpoints, trained on unnormalised pixels; check ``config.json``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from brainprop.models.benchmark import BenchmarkLoss, load_offline
from brainprop.utils import stable_seed

#: What :func:`load_mae` names in its error when the weights are missing.
MAE_WEIGHTS = "ViT-MAE (transformers ViTMAEForPreTraining, e.g. facebook/vit-mae-base)"


@contextmanager
def mask_ratio_of(model, ratio: float):
    """Within the block, ``model`` masks a fraction ``ratio`` of the patches (the library reads it from its config)."""
    config = model.vit.embeddings.config
    saved = config.mask_ratio
    config.mask_ratio = ratio
    try:
        yield
    finally:
        config.mask_ratio = saved


class UnmaskedEncoder(nn.Module):
    """``forward(pixel_values)``: the MAE encoder on every patch in raster order, (B, 1 + L, D) after its LayerNorm.

    Holds the whole ``ViTMAEForPreTraining`` as ``mae`` so that the masked pass of the loss
    (:meth:`masked`) runs through the same hooked blocks.
    """

    num_prefix_tokens = 1  # the CLS token

    def __init__(self, mae):
        super().__init__()
        self.mae = mae

    @property
    def num_patches(self) -> int:
        return self.mae.vit.embeddings.patch_embeddings.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n = self.num_patches
        in_order = torch.arange(n, dtype=torch.float32, device=pixel_values.device).expand(len(pixel_values), n)
        with mask_ratio_of(self.mae, 0.0):
            return self.mae.vit(pixel_values, noise=in_order).last_hidden_state

    def masked(self, pixel_values: torch.Tensor, noise: torch.Tensor, ratio: float):
        """The library's pretraining pass (``logits``, ``mask`` (B, L), 1 = masked) with ``noise`` (B, L)."""
        with mask_ratio_of(self.mae, ratio):
            return self.mae(pixel_values, noise=noise)


def encoder_blocks(network: UnmaskedEncoder) -> list[str]:
    """Names in ``network`` of the encoder's residual blocks (``ViTMAELayer``), in order."""
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer

    return [f"mae.vit.{name}" for name, module in network.mae.vit.named_modules() if isinstance(module, ViTMAELayer)]


class MaeReconstructionLoss(BenchmarkLoss):
    """Per-image masked reconstruction loss of a ``ViTMAEForPreTraining`` (see module docstring).

    Parameters
    ----------
    model : ``ViTMAEForPreTraining`` (put in eval mode: dropout off).
    mean, std : per-channel normalisation of the checkpoint's image processor.
    captions : unused by the loss (common signature of the benchmark losses).
    seed : seeds every image's mask together with its id.
    mask_ratio, norm_pix_loss : None = the checkpoint's config values.
    """

    def __init__(self, model, mean: Sequence[float], std: Sequence[float], captions: Mapping[str, str] | None = None,
                 seed: int = 0, mask_ratio: float | None = None, norm_pix_loss: bool | None = None):
        super().__init__(captions)
        self.network = UnmaskedEncoder(model.eval())
        self.blocks = encoder_blocks(self.network)
        self.image_size = int(model.config.image_size)
        self.mean, self.std = list(mean), list(std)
        self.seed = seed
        self.mask_ratio = float(model.config.mask_ratio if mask_ratio is None else mask_ratio)
        self.norm_pix_loss = bool(model.config.norm_pix_loss if norm_pix_loss is None else norm_pix_loss)
        n = self.network.num_patches
        kept = int(n * (1 - self.mask_ratio))
        if not 0 <= kept < n:
            raise ValueError(f"mask_ratio={self.mask_ratio} keeps {kept} of {n} patches; the loss needs at least "
                             f"one masked patch (0 < mask_ratio <= 1)")

    def noise(self, image_ids: Sequence[str]) -> torch.Tensor:
        """(B, L) uniform noise whose argsort is each image's patch order (lowest kept), seeded by ``(seed, id)``."""
        n = self.network.num_patches
        rows = [torch.rand(n, generator=torch.Generator().manual_seed(stable_seed("mae-mask", self.seed, i)))
                for i in image_ids]
        return torch.stack(rows).to(self.device)

    def __call__(self, images_uint8: torch.Tensor, image_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.plain_view(images_uint8)
        out = self.network.masked(x, self.noise(image_ids), self.mask_ratio)
        target = self.network.mae.patchify(x)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1.0e-6) ** 0.5
        per_patch = ((out.logits - target) ** 2).mean(-1)
        losses = (per_patch * out.mask).sum(1) / out.mask.sum(1)
        return losses, torch.arange(len(image_ids), device=losses.device)


def load_mae(cfg: Mapping, captions: Mapping[str, str] | None, seed: int, device: str | torch.device = "cpu",
             key: str = "models.vit_mae.source") -> MaeReconstructionLoss:
    """The ViT-MAE loss of config entry ``cfg`` (keys in the module docstring), weights read offline.

    ``key`` names the config key of ``cfg["source"]`` in the error raised when the weights are missing.
    """
    from transformers import AutoImageProcessor, ViTMAEForPreTraining

    source = str(cfg["source"])
    model = load_offline(ViTMAEForPreTraining.from_pretrained, source, MAE_WEIGHTS, key, dtype=torch.float32)
    processor = load_offline(AutoImageProcessor.from_pretrained, source, f"the image processor of {MAE_WEIGHTS}", key)
    size = (processor.size["height"], processor.size["width"])
    if size != (model.config.image_size, model.config.image_size):
        raise ValueError(f"{key}={source!r}: the image processor resizes to {size} but the model's position "
                         f"embeddings are for {model.config.image_size} px")
    return MaeReconstructionLoss(model.to(device), processor.image_mean, processor.image_std, captions, seed,
                                 cfg.get("mask_ratio"), cfg.get("norm_pix_loss"))


def write_tiny_mae(out_dir: str | os.PathLike, seed: int, hidden_size: int = 32, num_hidden_layers: int = 12,
                   image_size: int = 32, patch_size: int = 8) -> Path:
    """Write a tiny random ``ViTMAEForPreTraining`` and its image processor to ``out_dir``, as a hub folder.

    ``initializer_range=0.2`` (the library's default 0.02 leaves the residual branches so small next
    to the sin-cos position embeddings that all blocks output nearly the same tokens); mask ratio 0.75
    and normalised pixel targets as in He et al. (2022). Returns ``out_dir``.
    """
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                          intermediate_size=2 * hidden_size, image_size=image_size, patch_size=patch_size,
                          decoder_hidden_size=hidden_size // 2, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=hidden_size,
                          mask_ratio=0.75, norm_pix_loss=True, initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTMAEForPreTraining(config).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(out_dir)
    return out_dir
