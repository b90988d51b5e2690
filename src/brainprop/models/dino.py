"""DINOv3-style student/teacher model: configuration, backbone, heads, views and checkpoints.

The backbone is timm's :class:`~timm.models.eva.Eva` (``vit_small_patch16_dinov3`` in the paper,
a narrow 12-block version of it in the demo), so layer names are timm's (``blocks.N.mlp.fc2``).
On top of it sit a DINO head (CLS token) and an iBOT head (masked patch tokens), each an MLP ->
bottleneck -> L2 norm -> weight-normalised prototypes, plus the learnable mask token that
replaces masked patch embeddings of the student's global crops.

Random views (multi-crop augmentation and iBOT masks) are drawn from an explicit seed, so a
view depends only on the image and that seed: training seeds it per (seed, epoch, image id),
the image-wise loss per (seed, image id).

Training lives in :mod:`brainprop.models.dino_train`, losses in :mod:`brainprop.models.dino_loss`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from brainprop.config import config_hash
from brainprop.utils import atomic_output, get_logger

log = get_logger(__name__)

CHECKPOINT_FORMAT = "brainprop.dino.checkpoint/2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CENTERINGS = ("sinkhorn", "softmax")
MASK_MODES = ("block", "random")
# Keys of the workflow's ``training:`` section that concern the rule (which images, which checkpoints,
# which seed; all passed to ``train_dino`` separately), not the model and its optimisation: they are
# accepted, ignored, and left out of the config hash (so adding a checkpoint keeps the hash).
WORKFLOW_KEYS = ("checkpoints", "seed", "datasets", "images", "max_short_side")
AMP_MODES = ("bf16", "none")

DEFAULT_TRAINING_CONFIG: dict = {
    "iterations": 500000,
    "batch_size": 256,
    "amp": "bf16",
    "arch": {"timm_name": "vit_small_patch16_dinov3", "kwargs": {}},
    "head": {
        "n_layers": 3,
        "hidden_dim": 2048,
        "bottleneck_dim": 256,
        "n_prototypes": 65536,
        "ibot_n_prototypes": 65536,
        "ibot_separate_head": True,
    },
    "crops": {
        "global_size": 224,
        "local_size": 96,
        "n_local": 8,
        "global_scale": [0.32, 1.0],
        "local_scale": [0.05, 0.32],
        "flip_p": 0.5,
        "jitter_p": 0.8,
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.2,
        "hue": 0.1,
        "grayscale_p": 0.2,
        "blur_p": [1.0, 0.1, 0.5],
        "blur_sigma": [0.1, 2.0],
        "solarize_p": 0.2,
    },
    "masking": {"probability": 0.5, "ratio": [0.1, 0.5], "mode": "block"},
    "loss": {
        "student_temp": 0.1,
        "teacher_temp": 0.07,
        "warmup_teacher_temp": 0.04,
        "teacher_temp_warmup_fraction": 0.3,
        "centering": "sinkhorn",
        "sinkhorn_iterations": 3,
        "center_momentum": 0.9,
        "dino_weight": 1.0,
        "ibot_weight": 1.0,
        "koleo_weight": 0.1,
    },
    "optim": {
        "lr": 5e-4,
        "min_lr": 1e-6,
        "warmup_fraction": 0.1,
        "weight_decay": 0.04,
        "weight_decay_end": 0.2,
        "betas": [0.9, 0.999],
        "clip_grad": 3.0,
        "momentum_teacher": 0.992,
        "momentum_teacher_end": 1.0,
        "freeze_last_layer_iterations": 0,
    },
}

DEFAULT_IMAGEWISE_LOSS_CONFIG: dict = {
    "centering": None,
    "bank_size": 255,
    "n_views": 8,
    "photometric": True,
    "n_local": None,
    "mask_probability": 1.0,
    "dino_weight": None,
    "ibot_weight": None,
    "teacher_temp": None,
}
# Photometric augmentation probabilities of the crops section (``photometric: false`` zeroes them).
PHOTOMETRIC_KEYS = ("jitter_p", "grayscale_p", "blur_p", "solarize_p")
FORWARD_NETWORKS = ("teacher", "student")


# ----------------------------------------------------------------------------- configuration


def _merge(defaults: dict, given: dict, path: str, free: tuple[str, ...] = ()) -> dict:
    """Recursive merge of ``given`` into ``defaults``; unknown keys raise ValueError naming their dotted path."""
    if not isinstance(given, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(given).__name__}")
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        dotted = f"{path}.{key}" if path else key
        if key not in defaults:
            raise ValueError(f"unknown config key {dotted!r}; expected one of {sorted(defaults)}")
        if isinstance(defaults[key], dict) and dotted not in free:
            out[key] = _merge(defaults[key], value or {}, dotted, free)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check(cond: bool, key: str, expectation: str, value) -> None:
    if not cond:
        raise ValueError(f"training config {key}: expected {expectation}, got {value!r}")


def resolve_training_config(cfg: dict | None) -> dict:
    """Fill defaults into a ``training:`` config section and validate it.

    Parameters
    ----------
    cfg : the section (nested dict); missing keys take :data:`DEFAULT_TRAINING_CONFIG` values,
        ``arch.kwargs`` is passed to timm unchecked, keys in :data:`WORKFLOW_KEYS` are dropped.

    Returns
    -------
    dict : the complete configuration, JSON-serialisable, the input of :func:`config_hash`.

    Raises
    ------
    ValueError : unknown key or out-of-range value, naming the dotted key.
    """
    cfg = dict(cfg or {})
    for key in WORKFLOW_KEYS:
        if key in cfg:
            log.debug("training config: %r is a workflow key, not part of the model config", key)
            cfg.pop(key)
    out = _merge(DEFAULT_TRAINING_CONFIG, cfg, "", free=("arch.kwargs",))
    for key, low in (("iterations", 0), ("batch_size", 1)):
        _check(isinstance(out[key], int) and out[key] >= low, key, f"an int >= {low}", out[key])
    _check(out["amp"] in AMP_MODES, "amp", f"one of {AMP_MODES}", out["amp"])
    _check(isinstance(out["arch"]["timm_name"], str), "arch.timm_name", "a timm model name", out["arch"]["timm_name"])
    _check(isinstance(out["arch"]["kwargs"], dict), "arch.kwargs", "a mapping", out["arch"]["kwargs"])
    for key in ("n_layers", "hidden_dim", "bottleneck_dim", "n_prototypes", "ibot_n_prototypes"):
        _check(int(out["head"][key]) >= 1, f"head.{key}", "an int >= 1", out["head"][key])
    c = out["crops"]
    _check(c["n_local"] >= 0, "crops.n_local", "an int >= 0", c["n_local"])
    for key in ("global_scale", "local_scale", "blur_sigma"):
        lo, hi = c[key]
        _check(0 < lo <= hi, f"crops.{key}", "[low, high] with 0 < low <= high", c[key])
    _check(len(c["blur_p"]) == 3, "crops.blur_p", "3 probabilities (global 1, global 2, local)", c["blur_p"])
    for key in ("flip_p", "jitter_p", "grayscale_p", "solarize_p"):
        _check(0 <= c[key] <= 1, f"crops.{key}", "a probability", c[key])
    _check(all(0 <= p <= 1 for p in c["blur_p"]), "crops.blur_p", "probabilities", c["blur_p"])
    m = out["masking"]
    _check(0 <= m["probability"] <= 1, "masking.probability", "a probability", m["probability"])
    _check(0 < m["ratio"][0] <= m["ratio"][1] < 1, "masking.ratio", "[low, high] in (0, 1)", m["ratio"])
    _check(m["mode"] in MASK_MODES, "masking.mode", f"one of {MASK_MODES}", m["mode"])
    lo = out["loss"]
    _check(lo["centering"] in CENTERINGS, "loss.centering", f"one of {CENTERINGS}", lo["centering"])
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        _check(lo[key] > 0, f"loss.{key}", "a temperature > 0", lo[key])
    _check(0 <= lo["teacher_temp_warmup_fraction"] <= 1, "loss.teacher_temp_warmup_fraction", "in [0, 1]",
           lo["teacher_temp_warmup_fraction"])
    _check(lo["sinkhorn_iterations"] >= 1, "loss.sinkhorn_iterations", "an int >= 1", lo["sinkhorn_iterations"])
    o = out["optim"]
    _check(0 <= o["warmup_fraction"] <= 1, "optim.warmup_fraction", "in [0, 1]", o["warmup_fraction"])
    _check(0 < o["momentum_teacher"] <= o["momentum_teacher_end"] <= 1, "optim.momentum_teacher",
           "0 < momentum_teacher <= momentum_teacher_end <= 1", (o["momentum_teacher"], o["momentum_teacher_end"]))
    json.dumps(out)  # must be serialisable for the hash and the checkpoint
    return out


def training_config_hash(cfg: dict) -> str:
    """sha256 of the canonical JSON of the resolved training config (workflow keys excluded)."""
    return config_hash(resolve_training_config(cfg))


def resolve_imagewise_config(loss_cfg: dict | None, training_cfg: dict) -> dict:
    """Fill the image-wise loss config; ``None`` values take the value used in training.

    Keys (see :data:`DEFAULT_IMAGEWISE_LOSS_CONFIG`): ``centering`` (sinkhorn = Sinkhorn-Knopp of the
    image's rows with a fixed bank of ``bank_size`` training images | softmax = the stored EMA center),
    ``n_views`` (seeded view draws the loss is averaged over), ``photometric`` (colour jitter, grey,
    blur and solarize in the image-wise views; crops and flips always), ``n_local`` (local crops per
    image), ``mask_probability`` (chance that a global crop is masked for iBOT), ``dino_weight``,
    ``ibot_weight``, ``teacher_temp`` (None = the checkpoint's).
    """
    out = _merge(DEFAULT_IMAGEWISE_LOSS_CONFIG, dict(loss_cfg or {}), "loss_cfg")
    if out["centering"] is None:
        out["centering"] = training_cfg["loss"]["centering"]
    if out["n_local"] is None:
        out["n_local"] = training_cfg["crops"]["n_local"]
    for key in ("dino_weight", "ibot_weight"):
        if out[key] is None:
            out[key] = training_cfg["loss"][key]
    if out["centering"] not in CENTERINGS:
        raise ValueError(f"loss_cfg centering: expected one of {CENTERINGS}, got {out['centering']!r}")
    if not 0 <= out["mask_probability"] <= 1:
        raise ValueError(f"loss_cfg mask_probability: expected a probability, got {out['mask_probability']!r}")
    for key, low in (("n_local", 0), ("n_views", 1), ("bank_size", 1)):
        if int(out[key]) != out[key] or int(out[key]) < low:
            raise ValueError(f"loss_cfg {key}: expected an int >= {low}, got {out[key]!r}")
    if not isinstance(out["photometric"], bool):
        raise ValueError(f"loss_cfg photometric: expected true or false, got {out['photometric']!r}")
    if out["teacher_temp"] is not None and not out["teacher_temp"] > 0:
        raise ValueError(f"loss_cfg teacher_temp: expected a temperature > 0 or null, got {out['teacher_temp']!r}")
    return out


# ----------------------------------------------------------------------------- modules


def build_backbone(arch: dict) -> nn.Module:
    """Build a timm Eva backbone from ``{"timm_name": ..., "kwargs": {...}}`` without downloading weights.

    ``kwargs`` override the timm model's own arguments (e.g. ``embed_dim``, ``num_heads``,
    ``patch_size``, ``img_size``); ``num_classes=0`` and ``dynamic_img_size=True`` are forced so the
    backbone returns features and accepts global and local crops of different sizes.

    Raises
    ------
    ValueError : unknown timm name, or a backbone that is not an Eva with a class token.
    """
    import timm
    from timm.models.eva import Eva

    if "timm_name" not in arch:
        raise ValueError(f"arch: expected a 'timm_name' key, got keys {sorted(arch)}")
    kwargs = dict(arch.get("kwargs") or {})
    if kwargs.get("dynamic_img_size") is False:
        raise ValueError("arch.kwargs.dynamic_img_size must stay True: multi-crop feeds crops of several sizes")
    kwargs.update(num_classes=0, dynamic_img_size=True)
    try:
        model = timm.create_model(arch["timm_name"], pretrained=False, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown model names
        raise ValueError(f"arch.timm_name {arch['timm_name']!r}: {err}") from err
    if not isinstance(model, Eva) or model.cls_token is None:
        raise ValueError(f"arch.timm_name {arch['timm_name']!r}: expected a timm Eva ViT with a class token")
    return model


class WeightNormLinear(nn.Module):
    """Prototype layer ``x @ normalize(W).T``: weight normalisation with the gain fixed to 1 (as in DINO)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DinoHead(nn.Module):
    """DINO / iBOT projection head: MLP (GELU) -> bottleneck -> L2 norm -> prototypes.

    Maps (N, in_dim) tokens to (N, n_prototypes) logits, each a cosine similarity in [-1, 1].
    """

    def __init__(self, in_dim: int, n_prototypes: int, hidden_dim: int, bottleneck_dim: int, n_layers: int = 3):
        super().__init__()
        if n_layers == 1:
            layers = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(n_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DinoModel(nn.Module):
    """Backbone + DINO head + iBOT head (``None`` when shared with the DINO head) + mask token (1, D)."""

    def __init__(self, backbone: nn.Module, dino_head: DinoHead, ibot_head: DinoHead | None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))

    @property
    def ibot(self) -> DinoHead:
        """The head applied to masked patch tokens."""
        return self.dino_head if self.ibot_head is None else self.ibot_head

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])

    def tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm tokens (N, prefix + patches, D) of images (N, 3, h, w); see :func:`forward_tokens`."""
        return forward_tokens(self.backbone, x, masks, self.mask_token)


def build_dino_model(cfg: dict) -> DinoModel:
    """Student (or teacher) network for a resolved training config; checks crop sizes fit the patch size."""
    backbone = build_backbone(cfg["arch"])
    p = backbone.patch_embed.patch_size
    for key in ("global_size", "local_size"):
        size = cfg["crops"][key]
        if size % p[0] or size % p[1]:
            raise ValueError(f"training config crops.{key} = {size} is not a multiple of the patch size {p}")
    h = cfg["head"]
    dino = DinoHead(backbone.embed_dim, h["n_prototypes"], h["hidden_dim"], h["bottleneck_dim"], h["n_layers"])
    ibot = (DinoHead(backbone.embed_dim, h["ibot_n_prototypes"], h["hidden_dim"], h["bottleneck_dim"], h["n_layers"])
            if h["ibot_separate_head"] else None)
    if not h["ibot_separate_head"] and h["ibot_n_prototypes"] != h["n_prototypes"]:
        raise ValueError("training config head.ibot_n_prototypes must equal head.n_prototypes when the iBOT head "
                         "is shared (ibot_separate_head: false)")
    return DinoModel(backbone, dino, ibot)


def forward_tokens(backbone: nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None,
                   mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Eva ``forward_features`` with iBOT masking: masked patch embeddings are replaced by ``mask_token``.

    Runs the backbone's submodules (``patch_embed``, ``blocks.N``, ``norm``), so forward hooks on
    them see every row; ``backbone.forward`` itself (which pools) is not called.

    Parameters
    ----------
    backbone : timm Eva built with ``dynamic_img_size=True``.
    x : (N, 3, h, w) normalised images, h and w multiples of the patch size.
    masks : (N, h/p * w/p) bool, row-major patch order, True = masked; None = no masking.
    mask_token : (1, D) replacement embedding, required when ``masks`` is given.

    Returns
    -------
    (N, n_prefix + n_patches, D) tokens after the final norm: CLS, registers, then patches.
    """
    t = backbone.patch_embed(x)  # (N, gh, gw, D) with dynamic_img_size
    if masks is not None:
        n, gh, gw, d = t.shape
        if masks.shape != (n, gh * gw):
            raise ValueError(f"masks: expected shape {(n, gh * gw)} for images {tuple(x.shape)}, "
                             f"got {tuple(masks.shape)}")
        t = torch.where(masks.view(n, gh, gw, 1), mask_token.to(t.dtype).view(1, 1, 1, d), t)
    t, rope = backbone._pos_embed(t)
    t = backbone.norm_pre(t)
    mixed = getattr(backbone, "rope_mixed", False) and rope is not None
    for i, blk in enumerate(backbone.blocks):
        t = blk(t, rope=rope[i] if mixed else rope)
    return backbone.norm(t)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- views


@dataclass
class MultiCropViews:
    """Views of one image (or a batch, with a leading B dimension).

    global_crops : (2, 3, G, G) float32, normalised.
    local_crops : (n_local, 3, L, L) float32, normalised.
    masks : (2, (G/p)^2) bool iBOT masks of the global crops (student side), True = masked.
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    masks: torch.Tensor

    @staticmethod
    def stack(views: list["MultiCropViews"]) -> "MultiCropViews":
        return MultiCropViews(torch.stack([v.global_crops for v in views]), torch.stack([v.local_crops for v in views]),
                              torch.stack([v.masks for v in views]))

    def to(self, device, dtype=None, non_blocking: bool = False) -> "MultiCropViews":
        return MultiCropViews(self.global_crops.to(device, dtype, non_blocking=non_blocking),
                              self.local_crops.to(device, dtype, non_blocking=non_blocking),
                              self.masks.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "MultiCropViews":
        """Page-locked copy (called by the DataLoader's pin-memory thread on custom batch types)."""
        return MultiCropViews(self.global_crops.pin_memory(), self.local_crops.pin_memory(), self.masks.pin_memory())


def _uniform(rng: random.Random, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Integer in [lo, hi), from ``rng.random()`` only (whose stream Python guarantees across versions)."""
    return lo + min(int(rng.random() * (hi - lo)), hi - lo - 1)


def random_permutation(rng: random.Random, n: int) -> list[int]:
    """Fisher-Yates shuffle of range(n) from ``rng.random()``."""
    out = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _randint(rng, 0, i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def random_resized_crop_box(height: int, width: int, scale, rng: random.Random,
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop, torchvision's RandomResizedCrop rule drawn from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(rng, *scale)
        aspect = math.exp(_uniform(rng, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(rng, 0, height - h + 1), _randint(rng, 0, width - w + 1), h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _augment(img: torch.Tensor, size: int, scale, blur_p: float, solarize_p: float, c: dict,
             rng: random.Random) -> torch.Tensor:
    """One DINO crop of a (3, H, W) float image in [0, 1]: resized crop, flip, colour jitter, grey, blur, solarize."""
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], scale, rng)
    x = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True).clamp_(0, 1)
    if _uniform(rng, 0, 1) < c["flip_p"]:
        x = x.flip(-1)
    if _uniform(rng, 0, 1) < c["jitter_p"]:
        for k in random_permutation(rng, 4):
            if k == 0 and c["brightness"] > 0:
                x = TF.adjust_brightness(x, _uniform(rng, max(0.0, 1 - c["brightness"]), 1 + c["brightness"]))
            elif k == 1 and c["contrast"] > 0:
                x = TF.adjust_contrast(x, _uniform(rng, max(0.0, 1 - c["contrast"]), 1 + c["contrast"]))
            elif k == 2 and c["saturation"] > 0:
                x = TF.adjust_saturation(x, _uniform(rng, max(0.0, 1 - c["saturation"]), 1 + c["saturation"]))
            elif k == 3 and c["hue"] > 0:
                x = TF.adjust_hue(x, _uniform(rng, -c["hue"], c["hue"]))
    if _uniform(rng, 0, 1) < c["grayscale_p"]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if _uniform(rng, 0, 1) < blur_p:
        sigma = _uniform(rng, *c["blur_sigma"]) * size / 224  # sigma range is given for a 224-pixel crop
        kernel = min(2 * math.ceil(3 * sigma) + 1, size - 1 + size % 2)
        x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    if _uniform(rng, 0, 1) < solarize_p:
        x = TF.solarize(x, threshold=0.5)
    return x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of (..., 3, h, w) images in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def block_mask(grid: tuple[int, int], n_masked: int, rng: random.Random, min_block: int = 4,
               min_aspect: float = 0.3) -> torch.Tensor:
    """BEiT block-wise mask of exactly ``n_masked`` patches, flattened row-major: (gh * gw,) bool.

    Rectangles with log-uniform aspect ratio in [min_aspect, 1/min_aspect] are added until
    ``n_masked`` is reached; when no rectangle fits any more the rest is filled with random patches.
    """
    gh, gw = grid
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    count = 0
    while count < n_masked:
        left_to_mask = n_masked - count
        added = 0
        for _ in range(10):
            target = _uniform(rng, min(min_block, left_to_mask), left_to_mask)
            aspect = math.exp(_uniform(rng, math.log(min_aspect), -math.log(min_aspect)))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h < gh and 0 < w < gw:
                top, left = _randint(rng, 0, gh - h + 1), _randint(rng, 0, gw - w + 1)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= left_to_mask:
                    mask[top:top + h, left:left + w] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    flat = mask.flatten()
    if count < n_masked:  # complete with random free patches
        free = torch.nonzero(~flat).flatten()
        flat[free[random_permutation(rng, free.numel())[:n_masked - count]]] = True
    return flat


def draw_mask(grid: tuple[int, int], ratio, mode: str, rng: random.Random) -> torch.Tensor:
    """Mask (gh * gw,) bool with a uniform ratio in ``ratio`` of the patches (at least one), block or random."""
    n = grid[0] * grid[1]
    n_masked = max(1, int(n * _uniform(rng, *ratio)))
    if mode == "block":
        return block_mask(grid, n_masked, rng)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[random_permutation(rng, n)[:n_masked]] = True
    return flat


def make_views(image: torch.Tensor, seed: int, cfg: dict, patch_size: int, n_local: int | None = None,
               mask_probability: float | None = None) -> MultiCropViews:
    """Multi-crop views of one image and the iBOT masks of its global crops, all drawn from ``seed``.

    Parameters
    ----------
    image : (3, H, W) uint8 RGB.
    seed : seeds a :class:`random.Random` consumed in a fixed order (global 1, global 2, locals,
        masks), only through ``random()``, whose stream Python keeps identical across versions.
    cfg : resolved training config (``crops`` and ``masking`` sections are used).
    patch_size : backbone patch size in pixels (mask grid = crop size / patch size).
    n_local, mask_probability : override ``crops.n_local`` / ``masking.probability``.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    c, m = cfg["crops"], cfg["masking"]
    n_local = c["n_local"] if n_local is None else int(n_local)
    mask_probability = m["probability"] if mask_probability is None else mask_probability
    img = image.float() / 255
    rng = random.Random(int(seed))
    g1 = _augment(img, c["global_size"], c["global_scale"], c["blur_p"][0], 0.0, c, rng)
    g2 = _augment(img, c["global_size"], c["global_scale"], c["blur_p"][1], c["solarize_p"], c, rng)
    local = [_augment(img, c["local_size"], c["local_scale"], c["blur_p"][2], 0.0, c, rng) for _ in range(n_local)]
    grid = (c["global_size"] // patch_size, c["global_size"] // patch_size)
    masks = []
    for _ in range(2):
        if _uniform(rng, 0, 1) < mask_probability:
            masks.append(draw_mask(grid, m["ratio"], m["mode"], rng))
        else:
            masks.append(torch.zeros(grid[0] * grid[1], dtype=torch.bool))
    local_t = (torch.stack(local) if local else
               torch.zeros(0, 3, c["local_size"], c["local_size"]))
    return MultiCropViews(normalize(torch.stack([g1, g2])), normalize(local_t), torch.stack(masks))


def plain_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic view for forward activations: (B, 3, H, W) uint8 -> (B, 3, size, size) float, normalised.

    The shorter side is resized to ``size`` (bilinear, antialiased), then the centre is cropped.
    """
    from torchvision.transforms.v2 import functional as TF

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a (B, 3, H, W) uint8 tensor, got {tuple(images.shape)} {images.dtype}")
    x = TF.resize(images.float() / 255, [size], antialias=True)
    x = TF.center_crop(x, [size, size]).clamp_(0, 1)
    return normalize(x)


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class DinoCheckpoint:
    """Everything the image-wise loss needs, at one training iteration.

    student, teacher : :class:`DinoModel` (eval mode, on the requested device).
    dino_center, ibot_center : (K,) / (K_ibot,) EMA of the teacher logits (softmax centering); tracked in
        every run, used by training only when ``loss.centering == "softmax"``.
    iteration : number of optimiser updates done (0 = initialisation).
    teacher_temp : teacher temperature of the schedule at this iteration.
    config, config_hash : resolved training config and its sha256 (:func:`training_config_hash`).
    seed : training seed.
    optimizer : AdamW ``state_dict()`` (CPU tensors) at this iteration, for resuming; None when not loaded.
    rng : ``{"torch": ByteTensor, "cuda": ByteTensor | None}`` global RNG states at this iteration; None
        when not loaded. The data order needs no state: it is a function of (seed, iteration).
    """

    student: DinoModel
    teacher: DinoModel
    dino_center: torch.Tensor
    ibot_center: torch.Tensor
    iteration: int
    teacher_temp: float
    config: dict
    config_hash: str
    seed: int
    optimizer: dict | None = None
    rng: dict | None = None


def _to_cpu(obj):
    """Copy of a nested dict / list / tuple with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, ckpt: DinoCheckpoint) -> None:
    """Write ``ckpt`` to one file (torch.save of plain tensors and Python values) through a temporary file.

    A checkpoint with ``optimizer`` and ``rng`` is resumable (:func:`brainprop.models.dino_train.train_segment`).
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "iteration": int(ckpt.iteration),
        "teacher_temp": float(ckpt.teacher_temp),
        "student": _cpu_state(ckpt.student),
        "teacher": _cpu_state(ckpt.teacher),
        "dino_center": ckpt.dino_center.detach().cpu().clone(),
        "ibot_center": ckpt.ibot_center.detach().cpu().clone(),
        "config": ckpt.config,
        "config_hash": ckpt.config_hash,
        "seed": int(ckpt.seed),
        "optimizer": _to_cpu(ckpt.optimizer),
        "rng": _to_cpu(ckpt.rng),
    }
    with atomic_output(path, ".pt.tmp") as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)


def load_checkpoint(path: str | os.PathLike, device=None, training_state: bool = False) -> DinoCheckpoint:
    """Rebuild student and teacher (eval mode, teacher frozen) from a checkpoint file; no download.

    ``training_state=True`` also returns the optimizer and RNG states (CPU) needed to resume training;
    by default they are dropped (the AdamW moments are twice the size of the student).

    Raises
    ------
    FileNotFoundError : ``path`` does not exist.
    ValueError : not a brainprop DINO checkpoint, or its config does not match its stored hash.
    """
    from brainprop.utils import resolve_device

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINO checkpoint {path} does not exist")
    device = resolve_device(device)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a brainprop DINO checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if config_hash(payload["config"]) != payload["config_hash"]:
        raise ValueError(f"{path}: stored config_hash {payload['config_hash']} does not match its config")
    cfg = resolve_training_config(payload["config"])
    with torch.random.fork_rng(devices=[]):  # the throw-away initialisation must not move the caller's RNG
        student, teacher = build_dino_model(cfg), build_dino_model(cfg)
    student.load_state_dict(payload["student"])
    teacher.load_state_dict(payload["teacher"])
    teacher.requires_grad_(False)
    return DinoCheckpoint(
        student=student.to(device).eval(), teacher=teacher.to(device).eval(),
        dino_center=payload["dino_center"].to(device), ibot_center=payload["ibot_center"].to(device),
        iteration=int(payload["iteration"]), teacher_temp=float(payload["teacher_temp"]), config=cfg,
        config_hash=payload["config_hash"], seed=int(payload["seed"]),
        optimizer=payload["optimizer"] if training_state else None, rng=payload["rng"] if training_state else None)
