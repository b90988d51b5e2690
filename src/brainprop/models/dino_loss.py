"""DINO, iBOT and KoLeo losses, teacher centering, and the image-wise DINOv3 loss.

Shapes: B images, V = 2 global crops, n local crops, K prototypes, M masked patches, D width.

The per-image DINO and iBOT terms are written so that image b's loss reads only image b's
rows; training averages them over the batch (plus the batch-level KoLeo term), and
:class:`ImageWiseDinoLoss` returns them one per image, with batch-free teacher centering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from brainprop.models.dino import (
    DinoCheckpoint,
    DinoModel,
    MultiCropViews,
    make_views,
    plain_view,
    resolve_imagewise_config,
)
from brainprop.utils import stable_seed


# ----------------------------------------------------------------------------- centering


def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (DINOv2/v3 ``SinkhornKnoppTeacher``).

    Parameters
    ----------
    teacher_logits : (N, K) teacher head outputs of N samples.
    teacher_temp : softmax temperature.
    n_iterations : alternating normalisations (3 in DINOv3).

    Returns
    -------
    (N, K) probabilities: each row sums to 1 and, at convergence, every prototype receives 1/K of
    the total mass (columns sum to N/K); after finitely many iterations the marginals are approximate.
    """
    q = torch.exp((teacher_logits - teacher_logits.max()) / teacher_temp).T  # (K, N); a global shift cancels
    n, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k  # each prototype gets mass 1/K
        q = q / q.sum(dim=0, keepdim=True) / n  # each sample gets mass 1/N
    return (q * n).T


def softmax_centered(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """DINO/DINOv2 targets ``softmax((t - center) / T)``: (N, K) logits, (K,) center -> (N, K) probabilities."""
    return F.softmax((teacher_logits - center) / teacher_temp, dim=-1)


def teacher_targets(teacher_logits: torch.Tensor, centering: str, teacher_temp: float, center: torch.Tensor | None,
                    sinkhorn_iterations: int) -> torch.Tensor:
    """Teacher probabilities by ``centering`` ("sinkhorn" over the given rows, or "softmax" with ``center``)."""
    if centering == "sinkhorn":
        return sinkhorn_knopp(teacher_logits, teacher_temp, sinkhorn_iterations)
    if centering == "softmax":
        return softmax_centered(teacher_logits, center, teacher_temp)
    raise ValueError(f"centering must be 'sinkhorn' or 'softmax', got {centering!r}")


# ----------------------------------------------------------------------------- losses


def dino_loss_per_image(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                        student_temp: float) -> torch.Tensor:
    """DINO cross-entropy of each image, averaged over its (teacher view, other student view) pairs.

    Parameters
    ----------
    student_logits : (B, Vs, K); the first Vt student views are the global crops the teacher saw.
    teacher_probs : (B, Vt, K) centred teacher probabilities.
    student_temp : student softmax temperature (0.1).

    Returns
    -------
    (B,) ``mean_{t, s != t} -sum_k p_t[k] log softmax(s / student_temp)[k]``.
    """
    b, vs, _ = student_logits.shape
    vt = teacher_probs.shape[1]
    logp = F.log_softmax(student_logits / student_temp, dim=-1)
    ce = -torch.einsum("btk,bsk->bts", teacher_probs, logp)  # (B, Vt, Vs)
    keep = torch.ones(vt, vs, dtype=ce.dtype, device=ce.device)
    keep[torch.arange(vt), torch.arange(vt)] = 0  # a view is not its own target
    return (ce * keep).sum(dim=(1, 2)) / keep.sum()


def ibot_loss_per_image(student_logits: torch.Tensor, teacher_probs: torch.Tensor, weight: torch.Tensor,
                        image: torch.Tensor, n_images: int, student_temp: float) -> torch.Tensor:
    """iBOT masked-patch cross-entropy summed per image.

    Parameters
    ----------
    student_logits, teacher_probs : (M, K) at the masked patches (student masked, teacher unmasked).
    weight : (M,) ``1 / (masked patches of the row's crop * global crops per image)``, so an image's
        loss is the mean over its global crops of the mean over each crop's masked patches
        (an unmasked crop contributes 0, as in DINOv2).
    image : (M,) long, image of each row.

    Returns
    -------
    (n_images,) losses.
    """
    ce = -(teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1)).sum(dim=-1)
    out = torch.zeros(n_images, dtype=ce.dtype, device=ce.device)
    return out.index_add(0, image, ce * weight)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo entropy estimator ``-mean_i log ||x_i - x_nn(i)||`` of L2-normalised rows of (N, D) ``x``.

    Couples the samples of a batch: used in training only, never in the image-wise loss.
    """
    x = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)
        nn_index = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nn_index], eps=eps)
    return -torch.log(distances + eps).mean()


# ----------------------------------------------------------------------------- forward passes


@dataclass
class StudentOutputs:
    """Student outputs for B images.

    dino_logits : (B, 2 + n, K) DINO head on the CLS tokens (global crops first).
    global_cls : (B, 2, D) backbone CLS tokens of the global crops (KoLeo input).
    ibot_logits : (M, K_ibot) iBOT head on the masked patch tokens.
    ibot_weight, ibot_image : (M,) see :func:`ibot_loss_per_image`.
    owner : (N,) long, image of each row in the order the rows went through the backbone.
    """

    dino_logits: torch.Tensor
    global_cls: torch.Tensor
    ibot_logits: torch.Tensor
    ibot_weight: torch.Tensor
    ibot_image: torch.Tensor
    owner: torch.Tensor


def student_forward(model: DinoModel, views: MultiCropViews) -> StudentOutputs:
    """Run the student on batched views: one backbone call on the 2B masked global crops (image-major),
    then one on the nB local crops (skipped when n = 0)."""
    b, v = views.global_crops.shape[:2]
    n = views.local_crops.shape[1]
    dev = views.global_crops.device
    masks = views.masks.flatten(0, 1)  # (B*V, P)
    g = model.tokens(views.global_crops.flatten(0, 1), masks)
    cls = g[:, 0]
    logits = [model.dino_head(cls).view(b, v, -1)]
    owner = [torch.arange(b, device=dev).repeat_interleave(v)]
    if n:
        loc = model.tokens(views.local_crops.flatten(0, 1))
        logits.append(model.dino_head(loc[:, 0]).view(b, n, -1))
        owner.append(torch.arange(b, device=dev).repeat_interleave(n))
    patches = g[:, model.backbone.num_prefix_tokens:]
    crop = torch.arange(b * v, device=dev)[:, None].expand_as(masks)[masks]
    n_masked = masks.sum(dim=1).to(g.dtype)
    return StudentOutputs(
        dino_logits=torch.cat(logits, dim=1), global_cls=cls.view(b, v, -1),
        ibot_logits=model.ibot(patches[masks]), ibot_weight=1.0 / (n_masked[crop] * v), ibot_image=crop // v,
        owner=torch.cat(owner))


@torch.no_grad()
def teacher_forward(model: DinoModel, views: MultiCropViews) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits on the unmasked global crops: CLS (B, 2, K) and patches at the student's masks (M, K_ibot)."""
    b, v = views.global_crops.shape[:2]
    g = model.tokens(views.global_crops.flatten(0, 1))
    patches = g[:, model.backbone.num_prefix_tokens:]
    return model.dino_head(g[:, 0]).view(b, v, -1), model.ibot(patches[views.masks.flatten(0, 1)])


# ----------------------------------------------------------------------------- image-wise loss


class ImageWiseDinoLoss:
    """DINO (+ iBOT) loss of each image alone, for per-image backpropagated gradients.

    For every image the teacher and student see the same random views each call: 2 global crops
    (student side masked for iBOT) and ``n_local`` local crops, drawn from a generator seeded by
    ``stable_seed(seed, image_id)`` -- independent of the batch, of the image's position in it and of
    the checkpoint. Teacher targets are computed under ``no_grad`` and centred without other images:
    ``centering="sinkhorn"`` runs Sinkhorn-Knopp over the image's OWN teacher outputs (its 2 global
    CLS rows for DINO, its own masked patches for iBOT); ``"softmax"`` uses the EMA center stored in
    the checkpoint. KoLeo, a batch-level term, is left out. Student and teacher are in eval mode.

    Parameters
    ----------
    checkpoint : from :func:`~brainprop.models.dino.load_checkpoint`.
    loss_cfg : see :func:`~brainprop.models.dino.resolve_imagewise_config` (None values = as trained).
    seed : seed of the per-image views.

    Attributes
    ----------
    network : the student backbone (timm Eva, eval mode); its submodules (``blocks.N.mlp.fc2`` ...) see
        every student row. Rows go through ``patch_embed``/``blocks``/``norm``; ``network.forward``
        (which pools) is only what :meth:`plain_view` outputs are meant for.
    """

    def __init__(self, checkpoint: DinoCheckpoint, loss_cfg: dict | None, seed: int):
        self.checkpoint = checkpoint
        self.training_cfg = checkpoint.config
        self.cfg = resolve_imagewise_config(loss_cfg, checkpoint.config)
        self.seed = int(seed)
        self.student = checkpoint.student.eval()
        self.teacher = checkpoint.teacher.eval().requires_grad_(False)
        self.network = self.student.backbone
        self.teacher_temp = (checkpoint.teacher_temp if self.cfg["teacher_temp"] is None
                             else float(self.cfg["teacher_temp"]))

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def plain_view(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, G, G) normalised, G = global crop size, on the network's device."""
        return plain_view(images_uint8.to(self.device), self.training_cfg["crops"]["global_size"]).to(self.dtype)

    def views(self, image_uint8: torch.Tensor, image_id: str) -> MultiCropViews:
        """The views of one (3, H, W) uint8 image, on CPU; identical on every call for the same id and seed."""
        return make_views(image_uint8.cpu(), stable_seed(self.seed, image_id), self.training_cfg,
                          self.student.patch_size,
                          n_local=self.cfg["n_local"], mask_probability=self.cfg["mask_probability"])

    def __call__(self, images_uint8: torch.Tensor,
                 image_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image losses (B,) and the owner (N,) of each student row.

        ``losses[b]`` depends on image b only; ``owner[n]`` is the image of row n of the student's
        backbone calls, concatenated in call order: first the 2B global crops (image-major:
        ``[0, 0, 1, 1, ...]``), then the ``n_local * B`` local crops (image-major).
        """
        if images_uint8.ndim != 4 or images_uint8.shape[1] != 3 or images_uint8.dtype != torch.uint8:
            raise ValueError(f"images_uint8: expected a (B, 3, H, W) uint8 tensor, got "
                             f"{tuple(images_uint8.shape)} {images_uint8.dtype}")
        image_ids = [str(i) for i in image_ids]
        b = images_uint8.shape[0]
        if len(image_ids) != b:
            raise ValueError(f"image_ids: expected {b} ids for {b} images, got {len(image_ids)}")
        views = MultiCropViews.stack([self.views(images_uint8[i], image_ids[i]) for i in range(b)])
        views = views.to(self.device, self.dtype)
        lcfg = self.training_cfg["loss"]
        t_cls, t_patch = teacher_forward(self.teacher, views)
        out = student_forward(self.student, views)
        with torch.no_grad():
            if self.cfg["centering"] == "softmax":
                p_cls = softmax_centered(t_cls, self.checkpoint.dino_center.to(t_cls.dtype), self.teacher_temp)
                p_patch = softmax_centered(t_patch, self.checkpoint.ibot_center.to(t_patch.dtype), self.teacher_temp)
            else:  # Sinkhorn over each image's own rows
                p_cls = torch.stack([sinkhorn_knopp(t_cls[i], self.teacher_temp, lcfg["sinkhorn_iterations"])
                                     for i in range(b)])
                p_patch = torch.empty_like(t_patch)
                for i in range(b):
                    rows = out.ibot_image == i
                    if rows.any():
                        p_patch[rows] = sinkhorn_knopp(t_patch[rows], self.teacher_temp, lcfg["sinkhorn_iterations"])
        losses = self.cfg["dino_weight"] * dino_loss_per_image(out.dino_logits, p_cls, lcfg["student_temp"])
        if self.cfg["ibot_weight"]:
            losses = losses + self.cfg["ibot_weight"] * ibot_loss_per_image(
                out.ibot_logits, p_patch, out.ibot_weight, out.ibot_image, b, lcfg["student_temp"])
        return losses, out.owner
