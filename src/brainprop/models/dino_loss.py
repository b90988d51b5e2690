"""DINO, iBOT and KoLeo losses, teacher centering, and the image-wise DINOv3 loss.

Shapes: B images, V = 2 global crops, n local crops, K prototypes, M masked patches, D width.

The per-image DINO and iBOT terms are written so that image b's loss reads only image b's
rows; training averages them over the batch (plus the batch-level KoLeo term), and
:class:`ImageWiseDinoLoss` returns them one per image, with batch-free teacher centering
(:class:`SinkhornBank`: Sinkhorn-Knopp of an image's rows with a fixed bank of training rows).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from brainprop.models.dino import (
    FORWARD_NETWORKS,
    PHOTOMETRIC_KEYS,
    DinoCheckpoint,
    DinoModel,
    MultiCropViews,
    make_views,
    plain_view,
    random_permutation,
    resolve_imagewise_config,
)
from brainprop.utils import get_logger, stable_seed

log = get_logger(__name__)


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


class SinkhornBank:
    """Sinkhorn-Knopp of each image's rows together with a fixed bank of teacher rows.

    For a group of rows ``x`` (one image) the targets equal
    ``sinkhorn_knopp(cat([x, bank]), T, n)[:len(x)]`` -- the bank rows are discarded -- but are
    computed in scaling-vector form ``Q = diag(u) E diag(v)`` (Q as (K, N), E = exp(logits / T)):
    the bank's ``exp`` is computed once, and each iteration needs two matmuls of the (G, K) / (G, Nb)
    scaling vectors of G groups with the (Nb, K) bank, never a (G, Nb, K) tensor.

    Parameters
    ----------
    bank_logits : (Nb, K) teacher logits of the bank.
    teacher_temp : temperature T.
    """

    def __init__(self, bank_logits: torch.Tensor, teacher_temp: float):
        if bank_logits.ndim != 2 or bank_logits.shape[0] == 0:
            raise ValueError(f"bank_logits: expected a non-empty (Nb, K) tensor, got {tuple(bank_logits.shape)}")
        self.teacher_temp = float(teacher_temp)
        self.max = bank_logits.max()
        self.exp = torch.exp((bank_logits - self.max) / self.teacher_temp)  # (Nb, K), entries in (0, 1]

    @property
    def n_rows(self) -> int:
        return self.exp.shape[0]

    def nbytes(self) -> int:
        return self.exp.numel() * self.exp.element_size()

    def targets(self, logits: torch.Tensor, group: torch.Tensor, n_groups: int, n_iterations: int) -> torch.Tensor:
        """Targets of the rows of ``n_groups`` independent groups.

        Parameters
        ----------
        logits : (M, K) teacher logits; row m belongs to group ``group[m]`` (long, (M,)).
        n_groups : G; a group without rows is allowed (it yields nothing).
        n_iterations : Sinkhorn iterations (as :func:`sinkhorn_knopp`).

        Returns
        -------
        (M, K) probabilities, each row summing to 1; row m depends only on its group's rows and the bank.
        """
        if n_iterations < 1:
            raise ValueError(f"n_iterations: expected an int >= 1, got {n_iterations!r}")
        t = self.teacher_temp
        bank = self.exp.to(logits.dtype)
        nb, k = bank.shape
        # Common shift per group: the largest logit of the group and of the bank; a global shift of all
        # columns of one Sinkhorn cancels exactly, so only the overflow/underflow safety depends on it.
        shift = torch.full((n_groups,), float(self.max), dtype=logits.dtype, device=logits.device)
        shift = shift.scatter_reduce(0, group, logits.max(dim=1).values, reduce="amax", include_self=True)
        e = torch.exp((logits - shift[group, None]) / t)  # (M, K)
        # Bank columns of group g are alpha_g * bank; w = alpha * v_b carries the factor, so after the first
        # iteration it no longer enters (w = 1 / (N u @ bank.T)) and cannot underflow into 0 * inf.
        w = torch.exp((self.max.to(logits.dtype) - shift) / t)[:, None].expand(n_groups, nb)  # (G, Nb)
        n = (torch.bincount(group, minlength=n_groups) + nb).to(logits.dtype)  # (G,) columns of each Sinkhorn
        v_x = torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)  # image columns
        zeros = torch.zeros(n_groups, k, dtype=logits.dtype, device=logits.device)
        for _ in range(n_iterations):
            row = zeros.index_add(0, group, e * v_x[:, None])  # (G, K) the group's own columns
            u = 1.0 / (k * (row + w @ bank))  # (G, K): each prototype gets mass 1/K
            v_x = 1.0 / (n[group] * (u[group] * e).sum(dim=1))  # each sample gets mass 1/N
            w = 1.0 / (n[:, None] * (u @ bank.T))
        return n[group, None] * u[group] * e * v_x[:, None]


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


def target_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of probability rows: (..., K) -> (...); ``0 log 0 = 0``."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


class ImageWiseDinoLoss:
    """DINO (+ iBOT) loss of each image alone, for per-image backpropagated gradients.

    For every image the teacher and student see the same random views each call: ``n_views``
    independent draws of 2 global crops (student side masked for iBOT) and ``n_local`` local crops,
    draw r from a generator seeded by ``stable_seed(seed, image_id)`` (r = 0) or
    ``stable_seed(seed, image_id, r)`` -- independent of the batch, of the image's position in it and
    of the checkpoint; the image's loss is the mean over its draws. Teacher targets are computed
    under ``no_grad`` without other images of the batch:

    * ``centering="sinkhorn"``: Sinkhorn-Knopp over the image's teacher rows together with a FIXED
      bank (:class:`SinkhornBank`) built once here from ``bank_size`` seeded training images (their
      2 global-crop CLS logits for DINO, the teacher patch logits at their masked patches for iBOT),
      each draw's rows normalised with the bank, the bank rows discarded: the batch-like
      normalisation of DINOv3's training loss, without the batch;
    * ``centering="softmax"``: softmax of the teacher logits minus the EMA center stored in the
      checkpoint (DINO/DINOv2).

    KoLeo, a batch-level term, is left out. Student and teacher are in eval mode.

    Parameters
    ----------
    checkpoint : from :func:`~brainprop.models.dino.load_checkpoint`.
    loss_cfg : see :func:`~brainprop.models.dino.resolve_imagewise_config` (None values = as trained).
    seed : seed of the per-image views and of the bank (its images and views).
    bank_dataset : dataset of ``(uint8 (3, H, W) image, image_id)``, the training images; required for
        ``centering="sinkhorn"``, unused otherwise.
    forward_network : ``teacher`` | ``student``: the backbone :attr:`forward_network` points at.

    Attributes
    ----------
    network : the student backbone (timm Eva, eval mode); its submodules (``blocks.N.mlp.fc2`` ...) see
        every student row. Rows go through ``patch_embed``/``blocks``/``norm``; ``network.forward``
        (which pools) is only what :meth:`plain_view` outputs are meant for.
    forward_network : the backbone whose activations are the forward features (released DINO
        backbones are the teacher); same module names as ``network``.
    dino_bank, ibot_bank : :class:`SinkhornBank` (``None`` with softmax centering or no iBOT term).
    bank_ids : image ids of the bank images.
    last_target_entropy : (B,) mean entropy (nats) of the teacher CLS targets of each image of the
        last call, over its 2 global crops and ``n_views`` draws.
    """

    def __init__(self, checkpoint: DinoCheckpoint, loss_cfg: dict | None, seed: int, bank_dataset=None,
                 forward_network: str = "teacher"):
        if forward_network not in FORWARD_NETWORKS:
            raise ValueError(f"forward_network must be one of {FORWARD_NETWORKS}, got {forward_network!r}")
        self.checkpoint = checkpoint
        self.training_cfg = checkpoint.config
        self.cfg = resolve_imagewise_config(loss_cfg, checkpoint.config)
        self.seed = int(seed)
        self.student = checkpoint.student.eval()
        self.teacher = checkpoint.teacher.eval().requires_grad_(False)
        self.network = self.student.backbone
        self.forward_network = (self.teacher if forward_network == "teacher" else self.student).backbone
        self.teacher_temp = (checkpoint.teacher_temp if self.cfg["teacher_temp"] is None
                             else float(self.cfg["teacher_temp"]))
        self.view_cfg = copy.deepcopy(self.training_cfg)
        if not self.cfg["photometric"]:
            for key in PHOTOMETRIC_KEYS:
                value = self.view_cfg["crops"][key]
                self.view_cfg["crops"][key] = [0.0] * len(value) if isinstance(value, list) else 0.0
        self.dino_bank = self.ibot_bank = None
        self.bank_ids: list[str] = []
        self.last_target_entropy: torch.Tensor | None = None
        if self.cfg["centering"] == "sinkhorn":
            if bank_dataset is None:
                raise ValueError("centering='sinkhorn' needs bank_dataset (the training images) for its fixed bank")
            self._build_banks(bank_dataset)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def log_k(self) -> float:
        """ln K of the DINO head's K prototypes: the entropy of a uniform target."""
        return math.log(self.training_cfg["head"]["n_prototypes"])

    @torch.no_grad()
    def _build_banks(self, dataset, batch_size: int = 64) -> None:
        """Teacher logits of ``bank_size`` seeded training images under training-style views -> the banks."""
        n = len(dataset)
        if n == 0:
            raise ValueError("bank_dataset is empty")
        size = min(self.cfg["bank_size"], n)
        if size < self.cfg["bank_size"]:
            log.warning("bank_size %d > %d training images: the bank uses all of them", self.cfg["bank_size"], n)
        chosen = sorted(random_permutation(random.Random(stable_seed(self.seed, "bank")), n)[:size])
        cls, patch = [], []
        for start in range(0, size, batch_size):
            items = [dataset[i] for i in chosen[start:start + batch_size]]
            ids = [str(i) for _, i in items]
            views = MultiCropViews.stack([  # training's own views (photometric included), no local crops
                make_views(im.cpu(), stable_seed(self.seed, "bank", i), self.training_cfg, self.student.patch_size,
                           n_local=0) for im, i in items]).to(self.device, self.dtype)
            t_cls, t_patch = teacher_forward(self.teacher, views)
            cls.append(t_cls.flatten(0, 1))
            patch.append(t_patch)
            self.bank_ids.extend(ids)
        self.dino_bank = SinkhornBank(torch.cat(cls), self.teacher_temp)
        patch = torch.cat(patch)
        if self.cfg["ibot_weight"]:
            if patch.shape[0] == 0:
                raise ValueError("the bank images have no masked patches (training masking.probability = 0): "
                                 "no iBOT bank; set ibot_weight: 0 or use softmax centering")
            self.ibot_bank = SinkhornBank(patch, self.teacher_temp)
        log.info("Sinkhorn bank: %d images, %d DINO rows (%.1f MiB), %d iBOT rows (%.1f MiB)", size,
                 self.dino_bank.n_rows, self.dino_bank.nbytes() / 2**20,
                 0 if self.ibot_bank is None else self.ibot_bank.n_rows,
                 0 if self.ibot_bank is None else self.ibot_bank.nbytes() / 2**20)

    def plain_view(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, G, G) normalised, G = global crop size, on the network's device."""
        return plain_view(images_uint8.to(self.device), self.training_cfg["crops"]["global_size"]).to(self.dtype)

    def view_seed(self, image_id: str, draw: int) -> int:
        """Seed of view draw ``draw`` of an image (draw 0 keeps the single-draw seed ``(seed, image_id)``)."""
        return stable_seed(self.seed, image_id) if draw == 0 else stable_seed(self.seed, image_id, draw)

    def views(self, image_uint8: torch.Tensor, image_id: str, draw: int = 0) -> MultiCropViews:
        """The views of one (3, H, W) uint8 image, on CPU; identical on every call for the same id, draw and seed."""
        return make_views(image_uint8.cpu(), self.view_seed(image_id, draw), self.view_cfg, self.student.patch_size,
                          n_local=self.cfg["n_local"], mask_probability=self.cfg["mask_probability"])

    def _targets(self, t_cls: torch.Tensor, t_patch: torch.Tensor, patch_draw: torch.Tensor,
                 n_draws: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher probabilities: CLS (R, 2, K) and patches (M, K_ibot), each draw normalised on its own."""
        iterations = self.training_cfg["loss"]["sinkhorn_iterations"]
        if self.cfg["centering"] == "softmax":
            return (softmax_centered(t_cls, self.checkpoint.dino_center.to(t_cls.dtype), self.teacher_temp),
                    softmax_centered(t_patch, self.checkpoint.ibot_center.to(t_patch.dtype), self.teacher_temp))
        r, v, k = t_cls.shape
        draw = torch.arange(r, device=t_cls.device).repeat_interleave(v)
        p_cls = self.dino_bank.targets(t_cls.flatten(0, 1), draw, r, iterations).view(r, v, k)
        p_patch = (self.ibot_bank.targets(t_patch, patch_draw, n_draws, iterations) if self.ibot_bank is not None
                   else torch.zeros_like(t_patch))
        return p_cls, p_patch

    def __call__(self, images_uint8: torch.Tensor,
                 image_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image losses (B,) and the owner (N,) of each student row.

        ``losses[b]`` depends on image b only; ``owner[n]`` is the image of row n of the student's
        backbone calls, concatenated in call order: first the global crops (image-major, each image's
        ``n_views`` draws together: ``[0] * 2 R + [1] * 2 R + ...``), then the local crops (image-major).
        Also sets :attr:`last_target_entropy`.
        """
        if images_uint8.ndim != 4 or images_uint8.shape[1] != 3 or images_uint8.dtype != torch.uint8:
            raise ValueError(f"images_uint8: expected a (B, 3, H, W) uint8 tensor, got "
                             f"{tuple(images_uint8.shape)} {images_uint8.dtype}")
        image_ids = [str(i) for i in image_ids]
        b, r = images_uint8.shape[0], self.cfg["n_views"]
        if len(image_ids) != b:
            raise ValueError(f"image_ids: expected {b} ids for {b} images, got {len(image_ids)}")
        # draw j of image i is pseudo-image i * R + j: one batched pass over all draws
        views = MultiCropViews.stack([self.views(images_uint8[i], image_ids[i], j) for i in range(b) for j in range(r)])
        views = views.to(self.device, self.dtype)
        student_temp = self.training_cfg["loss"]["student_temp"]
        t_cls, t_patch = teacher_forward(self.teacher, views)
        out = student_forward(self.student, views)
        with torch.no_grad():
            p_cls, p_patch = self._targets(t_cls, t_patch, out.ibot_image, b * r)
            self.last_target_entropy = target_entropy(p_cls).view(b, r * p_cls.shape[1]).mean(dim=1)
        losses = self.cfg["dino_weight"] * dino_loss_per_image(out.dino_logits, p_cls, student_temp)
        if self.cfg["ibot_weight"]:
            losses = losses + self.cfg["ibot_weight"] * ibot_loss_per_image(
                out.ibot_logits, p_patch, out.ibot_weight, out.ibot_image, b * r, student_temp)
        return losses.view(b, r).mean(dim=1), torch.div(out.owner, r, rounding_mode="floor")
