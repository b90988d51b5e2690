"""The benchmark's supervised classifiers (ViT-L/16, ConvNeXt-L, ResNet-50) and their caption loss.

Models (paper section 2.2): timm ``vit_large_patch16_224`` (supervised ViT), ``convnext_large`` and
``resnet50`` (supervised CNNs), each the timm ImageNet-1k classifier of that name (its default
pretrained tag unless ``name`` names one, e.g. ``convnext_large.fb_in22k_ft_in1k``).

Residual blocks (the signals' layers) are found from the network's own structure: every module that
is a timm ViT ``Block``, ``ConvNeXtBlock`` or ResNet ``Bottleneck``/``BasicBlock``, in module order
(ViT-L/16: ``blocks.0..23``; ConvNeXt-L: every block of every stage, ``stages.S.blocks.B``, 36; ResNet-50:
every Bottleneck of ``layer1..4``, 16). The 10 evenly spaced ones are hooked. CNN block outputs are
(N, C, H, W) maps, which the FeatureExtractor pools over space.

CLIP-bridged caption similarity (the paper only names the loss; this is our reading). A classifier
has no text side, so a CLIP text encoder bridges the image's caption to the classifier's 1000 classes:

* class embeddings ``e_k``: the CLIP text embeddings of the ImageNet class prompts (open_clip's class
  names and templates; ``templates: openai`` averages the 80 prompts of CLIP's zero-shot ImageNet
  classifier, ``simple`` uses "a photo of a {}."), L2-normalised, then averaged over templates and
  normalised again (CLIP's zero-shot recipe). Computed once, without gradient, when the loss is built.
* target ``q_b = softmax_k(c_b . e_k / temperature)``, with ``c_b`` the normalised CLIP embedding of
  image b's caption. ``temperature`` 0.01 is CLIP's own learned logit scale (100), i.e. the softness
  with which CLIP itself turns cosine similarities into a class distribution.
* ``loss_b = -sum_k q_bk log softmax(logits_b)_k``: the cross-entropy between that target and the
  classifier's own 1000-way prediction of image b. ``last_target_entropy = H(q_b)``, ``log_k = ln 1000``.

The network runs in eval mode (BatchNorm statistics frozen, dropout off), so ``loss_b`` depends on
image b and its caption only; nothing in the loss is random.

Config entry (``models.<name>``, ``kind: timm``), read by :func:`load_timm_classifier`:

* ``name``: timm model name, optionally with a pretrained tag (``vit_large_patch16_224``).
* ``source``: the weights, one of: a folder in timm's Hugging Face layout (``config.json`` with the
  ``architecture``, ``model_args`` and ``pretrained_cfg``, and ``model.safetensors``; what
  ``hf download timm/<name>.<tag> --local-dir DIR`` gives and what :func:`write_tiny_timm` writes);
  a hub id (``timm/vit_large_patch16_224.augreg_in21k_ft_in1k``) read from the local Hugging Face cache;
  or a single state-dict file (``.safetensors``/``.pth``) for the architecture's default configuration.
  Loaded as ``timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=...))``;
  image size, mean and std come from the (overlaid) pretrained_cfg.
* ``bridge.text_model``: the configured CLIP model whose text encoder (:func:`brainprop.models.vlm.clip_text_encoder`)
  embeds captions and prompts (the workflow passes its resolved source as ``bridge.text_source``).
* ``bridge.temperature`` (0.01) and ``bridge.templates`` (``openai`` | ``simple``), as above.

Cost of the class embeddings: ``openai`` encodes 80 000 prompts, ``simple`` 1000. A CLIP ViT-B text
transformer (12 x 512, random weights, 2 shared CPU cores) took 7.6 s per 1000 prompts trimmed to
their 14 tokens (about 10 min for ``openai``) and 140 s per 1000 when padded to 77 tokens; on a GPU
both take seconds.

Memory at 224 px (:func:`block_output_memory`, float32, per image at the 10 chosen blocks): ViT-L/16
block outputs are (197, 1024), 0.77 MiB each (7.7 MiB in all); the pooled output gradient is 1024-dim,
so each block's Gaussian projection to 800 dims is a 1024 x 800 matrix (3.1 MiB; 31.3 MiB for the 10).
ConvNeXt-L outputs range from (192, 56, 56) (2.3 MiB) to (1536, 7, 7) (0.29 MiB), 7.75 MiB in all;
only the last stage (1536 channels) is projected (4.7 MiB). ResNet-50: 13.0 MiB of outputs, 1024- and
2048-channel blocks projected (25.0 MiB).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from timm.models import convnext, resnet, vision_transformer

from brainprop.models.benchmark import BenchmarkLoss, block_depths, evenly_spaced, load_offline

#: Classes of the residual blocks of the three classifier families, in timm.
RESIDUAL_BLOCKS = (vision_transformer.Block, convnext.ConvNeXtBlock, resnet.Bottleneck, resnet.BasicBlock)

#: Prompt templates of the ImageNet class embeddings: CLIP's 80 zero-shot templates, or one.
TEMPLATES: dict[str, Sequence[Callable[[str], str]]] = {
    "openai": open_clip.OPENAI_IMAGENET_TEMPLATES,
    "simple": (lambda c: f"a photo of a {c}.",),
}

#: Prompts per call of the text encoder while embedding the class prompts.
TEXT_CHUNK = 1000

#: Tiny widths of each architecture for the demo (>= 10 residual blocks, 1000 classes), with the
#: initialisation that keeps residual branches alive (timm's zero_init_last / ls_init_value=1e-6 make
#: a random ResNet / ConvNeXt nearly an identity through every block).
TINY_ARGS: dict[str, dict] = {
    "vit_large_patch16_224": dict(patch_size=8, embed_dim=32, depth=10, num_heads=2),
    "convnext_large": dict(depths=(2, 2, 6, 2), dims=(8, 16, 32, 64), ls_init_value=1.0),
    "resnet50": dict(channels=(4, 8, 16, 32), stem_width=8, zero_init_last=False),
}

TextEncoder = Callable[[list[str]], torch.Tensor]


def residual_blocks(network: torch.nn.Module) -> list[str]:
    """Names of all residual blocks of a timm classifier (instances of :data:`RESIDUAL_BLOCKS`), in order."""
    blocks = [name for name, m in network.named_modules() if isinstance(m, RESIDUAL_BLOCKS)]
    if not blocks:
        raise ValueError(f"{type(network).__name__} has no residual block of the classes "
                         f"{[c.__name__ for c in RESIDUAL_BLOCKS]}")
    return blocks


def class_embeddings(encode_text: TextEncoder, templates: str = "openai",
                     classnames: Sequence[str] = open_clip.IMAGENET_CLASSNAMES) -> torch.Tensor:
    """(n_classes, d) normalised mean over ``templates`` of the normalised prompt embeddings of each class."""
    if templates not in TEMPLATES:
        raise ValueError(f"templates must be one of {sorted(TEMPLATES)}, got {templates!r}")
    prompts = [t(c) for c in classnames for t in TEMPLATES[templates]]
    with torch.no_grad():
        emb = torch.cat([encode_text(prompts[i:i + TEXT_CHUNK]).float() for i in range(0, len(prompts), TEXT_CHUNK)])
    emb = F.normalize(emb, dim=-1).reshape(len(classnames), len(TEMPLATES[templates]), -1).mean(1)
    return F.normalize(emb, dim=-1)


class CaptionBridgedLoss(BenchmarkLoss):
    """CLIP-bridged caption similarity of a 1000-way classifier (see the module docstring).

    Parameters
    ----------
    network : the classifier (eval mode is set here); its forward maps pixels to (B, 1000) logits.
    encode_text : ``list[str] -> (n, d)`` normalised CLIP text embeddings.
    captions : {image_id: caption}.
    image_size, mean, std : the classifier's preprocessing.
    temperature : softness of the caption-to-class target.
    templates : ``openai`` | ``simple`` class prompts.
    """

    def __init__(self, network: torch.nn.Module, encode_text: TextEncoder, captions: Mapping[str, str],
                 image_size: int, mean: Sequence[float], std: Sequence[float], temperature: float = 0.01,
                 templates: str = "openai"):
        super().__init__(captions)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.network = network.eval()
        self.blocks = residual_blocks(network)
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.encode_text, self.temperature = encode_text, float(temperature)
        self.class_emb = class_embeddings(encode_text, templates).to(self.device)
        n_out = getattr(network, "num_classes", None)
        if n_out != len(self.class_emb):
            raise ValueError(f"the classifier has {n_out} outputs; the caption bridge scores the "
                             f"{len(self.class_emb)} ImageNet classes")
        self.log_k = math.log(len(self.class_emb))

    def target(self, image_ids: Sequence[str]) -> torch.Tensor:
        """(B, 1000) caption-to-class target distribution of the images."""
        with torch.no_grad():
            caption_emb = self.encode_text(self.caption(image_ids)).float().to(self.device)
            return torch.softmax(caption_emb @ self.class_emb.T / self.temperature, dim=-1)

    def __call__(self, images_uint8: torch.Tensor, image_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.target(image_ids)
        log_p = torch.log_softmax(self.network(self.plain_view(images_uint8)).float(), dim=-1)
        self.last_target_entropy = torch.special.entr(q).sum(-1)
        return -(q * log_p).sum(-1), torch.arange(len(image_ids), device=log_p.device)


def _weights(source: str, local_files_only: bool = True) -> tuple[str, dict | None]:
    """(state-dict file, timm ``config.json`` contents or None) of a folder, file or cached hub id."""
    path = Path(source)
    if path.is_file():
        return str(path), None
    if path.is_dir():
        missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"folder {path} lacks {missing} (timm's Hugging Face layout)")
        return str(path / "model.safetensors"), json.loads((path / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    config = hf_hub_download(source, "config.json", local_files_only=local_files_only)
    weights = hf_hub_download(source, "model.safetensors", local_files_only=local_files_only)
    return weights, json.loads(Path(config).read_text())


def create_classifier(architecture: str, source: str, key: str, device=None) -> torch.nn.Module:
    """The timm classifier ``architecture`` with the weights at ``source`` (offline), in eval mode.

    ``key`` is the config key of ``source``, named in the error when the weights are missing.
    """
    weights, config = load_offline(_weights, str(source), f"timm {architecture} weights (hub id, timm folder "
                                   f"with config.json and model.safetensors, or a state-dict file)", key)
    config = config or {}
    name = architecture.split(".")[0]
    if config.get("architecture", name) != name:
        raise ValueError(f"{key}={source!r} holds a {config['architecture']!r}, not the configured {name!r}")
    # a state dict, whatever the original release format (custom_load reads e.g. Google's .npz)
    overlay = dict(config.get("pretrained_cfg", {}), file=weights, custom_load=False)
    model = timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=overlay,
                              **config.get("model_args", {}))
    return model.to(device).eval()


def load_timm_classifier(cfg: Mapping, captions: Mapping[str, str], seed: int, device=None,
                         encode_text: TextEncoder | None = None, key: str = "models.<name>.source") -> CaptionBridgedLoss:
    """The caption-bridged loss of a ``kind: timm`` config entry (keys in the module docstring).

    ``encode_text`` defaults to the CLIP text encoder at ``cfg["bridge"]["text_source"]`` (the resolved
    source of the bridge's ``text_model``); ``key`` names ``cfg["source"]`` in errors. ``seed`` is unused
    beyond the builders' common signature: nothing in this loss is random.
    """
    del seed
    network = create_classifier(cfg["name"], cfg["source"], key, device)
    bridge = cfg["bridge"]
    if encode_text is None:
        from brainprop.models.vlm import clip_text_encoder

        encode_text = clip_text_encoder(bridge["text_source"], device, key=f"models.{bridge['text_model']}.source")
    data = network.pretrained_cfg
    return CaptionBridgedLoss(network, encode_text, captions, data["input_size"][-1], data["mean"], data["std"],
                              bridge["temperature"], bridge["templates"])


def _variance_preserving_init(model: torch.nn.Module, seed: int) -> None:
    """Weights of every Linear and Conv2d ~ N(0, 2 / fan_in) (He), the classifier's ~ N(0, 1 / fan_in);
    biases 0 (seeded).

    timm's own init (std 0.02, or zeroed last layers) leaves a tiny model's residual branches near zero,
    so that every block would pass its input on almost unchanged.
    """
    g = torch.Generator().manual_seed(seed)
    head = model.get_classifier()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                gain = 1.0 if m is head else 2.0
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(gain / m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.zero_()


def _calibrate_batchnorm(model: torch.nn.Module, image_size: int, seed: int, n_images: int = 64) -> None:
    """Set the BatchNorm running statistics to those of seeded N(0, 1) pixel images (no-op without BatchNorm).

    Random weights with identity running statistics let a ResNet's activations grow block after block
    until its softmax saturates; calibrated statistics normalise them as trained ones do.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.randn(n_images, 3, image_size, image_size, generator=g))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def write_tiny_timm(name: str, out_dir: str | os.PathLike, seed: int, image_size: int = 32, **kwargs) -> Path:
    """Write a tiny random timm ``name`` (:data:`TINY_ARGS`, overridden by ``kwargs``) in timm's folder layout.

    ``out_dir`` gets ``config.json`` (architecture, ``model_args``, ``pretrained_cfg`` with ``input_size``
    ``image_size``) and ``model.safetensors``, the layout of a downloaded timm checkpoint, so that
    :func:`create_classifier` loads it exactly like the real weights.
    """
    if name not in TINY_ARGS:
        raise ValueError(f"no tiny version of {name!r}; known: {sorted(TINY_ARGS)}")
    args = dict(TINY_ARGS[name], **kwargs)
    if name.startswith("vit"):
        args["img_size"] = image_size
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False,
                              pretrained_cfg_overlay=dict(input_size=(3, image_size, image_size)), **args)
    _variance_preserving_init(model, seed)
    _calibrate_batchnorm(model, image_size, seed)
    timm.models.save_for_hf(model, out_dir, model_args=args, safe_serialization=True)
    return Path(out_dir)


def block_output_memory(architecture: str, image_size: int = 224, projection_dim: int = 800) -> pd.DataFrame:
    """Per-image sizes at the 10 chosen blocks of the real ``architecture`` (built on the meta device).

    One row per block: ``layer``, ``depth``, ``shape`` (per image), ``activation_bytes`` (float32 block
    output of one image), ``pooled_dim`` (dimension of the pooled forward / output-gradient signal) and
    ``projection_bytes`` (float32 Gaussian matrix mapping the pooled output gradient to
    ``projection_dim``; 0 when it is not larger).
    """
    with torch.device("meta"):
        network = timm.create_model(architecture, pretrained=False)
    blocks = residual_blocks(network)
    layers = evenly_spaced(blocks)
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(network.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:])))
               for n in layers]
    with torch.no_grad():
        network(torch.empty(1, 3, image_size, image_size, device="meta"))
    for h in handles:
        h.remove()
    rows = []
    for layer, depth in zip(layers, block_depths(layers, blocks)):
        shape = shapes[layer]
        pooled = shape[-1] if len(shape) == 2 else shape[0]  # ViT (T, D) -> D; CNN (C, H, W) -> C
        rows.append({"layer": layer, "depth": depth, "shape": shape, "activation_bytes": 4 * int(np.prod(shape)),
                     "pooled_dim": pooled,
                     "projection_bytes": 4 * pooled * projection_dim if pooled > projection_dim else 0})
    return pd.DataFrame(rows)
