"""DINOv3-style self-supervised training from scratch, writing checkpoints at chosen iterations.

One iteration: B images -> multi-crop views (seeded per (seed, epoch, image id)) -> teacher
targets on the 2 global crops (Sinkhorn-Knopp over the batch, or softmax centering) -> student
on masked global + local crops -> DINO + iBOT + KoLeo loss -> AdamW step (clipped) -> EMA teacher
update. Schedules (cosine unless said): lr (linear warm-up then cosine to ``min_lr``), weight
decay (``weight_decay`` -> ``weight_decay_end``), teacher momentum (0.992 -> 1), teacher
temperature (linear warm-up 0.04 -> 0.07, then constant).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from brainprop.config import config_hash
from brainprop.models.dino import (
    DinoCheckpoint,
    DinoModel,
    MultiCropViews,
    build_dino_model,
    make_views,
    random_permutation,
    resolve_training_config,
    save_checkpoint,
)
from brainprop.models.dino_loss import (
    dino_loss_per_image,
    ibot_loss_per_image,
    koleo_loss,
    student_forward,
    teacher_forward,
    teacher_targets,
)
from brainprop.utils import get_logger, resolve_device, stable_seed

log = get_logger(__name__)


# ----------------------------------------------------------------------------- schedules


def _cosine(start: float, end: float, step: int, total: int) -> float:
    if total <= 0:
        return end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / total))


def lr_at(it: int, cfg: dict) -> float:
    """Learning rate of update ``it`` (0-based): linear warm-up to ``optim.lr``, then cosine to ``optim.min_lr``."""
    o, total = cfg["optim"], cfg["iterations"]
    warm = int(round(o["warmup_fraction"] * total))
    if it < warm:
        return o["lr"] * (it + 1) / warm
    return _cosine(o["lr"], o["min_lr"], it - warm, total - warm)


def weight_decay_at(it: int, cfg: dict) -> float:
    """Weight decay of update ``it``: cosine from ``optim.weight_decay`` to ``optim.weight_decay_end``."""
    return _cosine(cfg["optim"]["weight_decay"], cfg["optim"]["weight_decay_end"], it, cfg["iterations"])


def momentum_at(it: int, cfg: dict) -> float:
    """Teacher EMA momentum after update ``it``: cosine from ``momentum_teacher`` to ``momentum_teacher_end``."""
    return _cosine(cfg["optim"]["momentum_teacher"], cfg["optim"]["momentum_teacher_end"], it, cfg["iterations"])


def teacher_temp_at(it: int, cfg: dict) -> float:
    """Teacher temperature at iteration ``it``: linear ``warmup_teacher_temp`` -> ``teacher_temp``, then constant."""
    lo = cfg["loss"]
    warm = int(round(lo["teacher_temp_warmup_fraction"] * cfg["iterations"]))
    if it >= warm:
        return lo["teacher_temp"]
    return lo["warmup_teacher_temp"] + (lo["teacher_temp"] - lo["warmup_teacher_temp"]) * it / warm


# ----------------------------------------------------------------------------- data


class _MultiCropDataset(Dataset):
    """Wraps ``(uint8 (3, H, W), id)`` items; item ``(epoch, index)`` -> views seeded by (seed, epoch, id)."""

    def __init__(self, dataset, cfg: dict, seed: int, patch_size: int):
        self.dataset, self.cfg, self.seed, self.patch_size = dataset, cfg, seed, patch_size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        item = self.dataset[index]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"dataset item {index}: expected (image_uint8 (3, H, W), image_id), got {type(item)}")
        image, image_id = item
        return make_views(torch.as_tensor(image), stable_seed(self.seed, "train", epoch, image_id), self.cfg,
                          self.patch_size)


class _EpochBatches:
    """Batches of ``(epoch, index)``: a seeded permutation per epoch, last incomplete batch dropped."""

    def __init__(self, n_items: int, batch_size: int, n_batches: int, seed: int):
        self.n_items, self.batch_size, self.n_batches, self.seed = n_items, batch_size, n_batches, seed

    def __len__(self):
        return self.n_batches

    def __iter__(self):
        made, epoch = 0, 0
        while made < self.n_batches:
            perm = random_permutation(random.Random(stable_seed(self.seed, "epoch", epoch)), self.n_items)
            for start in range(0, self.n_items - self.batch_size + 1, self.batch_size):
                yield [(epoch, i) for i in perm[start:start + self.batch_size]]
                made += 1
                if made == self.n_batches:
                    return
            epoch += 1


# ----------------------------------------------------------------------------- training


def _param_groups(model: DinoModel) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases, norms, layer scales, tokens, mask token)."""
    no_wd = {f"backbone.{n}" for n in model.backbone.no_weight_decay()} | {"mask_token"}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in no_wd else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def _check_checkpoints(checkpoint_iters: Sequence[int], checkpoint_paths: Sequence, iterations: int) -> list[int]:
    iters = [int(i) for i in checkpoint_iters]
    if len(iters) != len(checkpoint_paths):
        raise ValueError(f"checkpoint_iters ({len(iters)}) and checkpoint_paths ({len(checkpoint_paths)}) "
                         "must have the same length")
    if not iters:
        raise ValueError("checkpoint_iters is empty: training would write nothing")
    if len(set(iters)) != len(iters) or any(i < 0 or i > iterations for i in iters):
        raise ValueError(f"checkpoint_iters {iters}: expected distinct iterations in [0, iterations={iterations}]")
    return iters


def train_dino(dataset, cfg: dict, checkpoint_iters: Sequence[int], checkpoint_paths: Sequence[str | os.PathLike],
               seed: int, device=None, log_every: int = 50, num_workers: int = 0) -> pd.DataFrame:
    """Train a DINOv3-style student/teacher from scratch and write checkpoints.

    Parameters
    ----------
    dataset : torch Dataset of ``(image uint8 (3, H, W), image_id str)``; images may differ in size.
    cfg : ``training:`` config section (see :func:`~brainprop.models.dino.resolve_training_config`).
    checkpoint_iters : iterations (number of updates done, 0 = initialisation) at which to save.
    checkpoint_paths : one output file per entry of ``checkpoint_iters``.
    seed : seeds initialisation, batch order, views and masks; same seed -> identical checkpoints
        (bit-identical on CPU with the same thread count).
    device : "cpu", "cuda", None/"auto" (CUDA when available).
    log_every : log the running losses every this many iterations.
    num_workers : DataLoader worker processes building the views (results do not depend on it).

    Returns
    -------
    pandas.DataFrame, one row per update: ``iteration`` (updates done before it, 0-based), ``loss``,
    ``dino``, ``ibot``, ``koleo``, ``lr``, ``weight_decay``, ``momentum``, ``teacher_temp``.
    Training stops after the last checkpoint (schedules still span ``cfg["iterations"]``).
    """
    cfg = resolve_training_config(cfg)
    chash = config_hash(cfg)
    iters = _check_checkpoints(checkpoint_iters, checkpoint_paths, cfg["iterations"])
    to_save = dict(zip(iters, checkpoint_paths))
    n_updates = max(iters)
    device = resolve_device(device)
    n_items, bs = len(dataset), cfg["batch_size"]
    if n_items < bs:
        raise ValueError(f"dataset has {n_items} images, fewer than training batch_size {bs}")
    if n_items % bs:
        log.info("each epoch drops %d of %d images (last incomplete batch; the permutation changes per epoch)",
                 n_items % bs, n_items)
    lo, o = cfg["loss"], cfg["optim"]

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # initialisation (and drop-path, if configured) draw from the global RNG
        student = build_dino_model(cfg).to(device)
        teacher = build_dino_model(cfg).to(device)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False).eval()
        student.train()
        dino_center = torch.zeros(cfg["head"]["n_prototypes"], device=device)
        ibot_center = torch.zeros(cfg["head"]["ibot_n_prototypes"], device=device)
        optimizer = torch.optim.AdamW(_param_groups(student), lr=o["lr"], betas=tuple(o["betas"]))
        last_layers = [p for n, p in student.named_parameters() if "last_layer" in n]

        def save(it: int):
            ckpt = DinoCheckpoint(student, teacher, dino_center, ibot_center, it,
                                  teacher_temp_at(min(it, cfg["iterations"]), cfg), cfg, chash, seed)
            save_checkpoint(to_save[it], ckpt)
            log.info("saved checkpoint of iteration %d to %s", it, to_save[it])

        if 0 in to_save:
            save(0)
        loader = DataLoader(_MultiCropDataset(dataset, cfg, seed, student.patch_size),
                            batch_sampler=_EpochBatches(n_items, bs, n_updates, seed),
                            collate_fn=MultiCropViews.stack, num_workers=num_workers)
        rows = []
        bar = tqdm(total=n_updates, desc="DINO training", unit="it", disable=n_updates == 0)
        for it, views in enumerate(loader):
            views = views.to(device)
            lr, wd, temp = lr_at(it, cfg), weight_decay_at(it, cfg), teacher_temp_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
                if group["apply_wd"]:
                    group["weight_decay"] = wd
            b = views.global_crops.shape[0]
            t_cls, t_patch = teacher_forward(teacher, views)
            with torch.no_grad():  # batch-level centering: training only
                p_cls = teacher_targets(t_cls.flatten(0, 1), lo["centering"], temp, dino_center,
                                        lo["sinkhorn_iterations"]).view_as(t_cls)
                p_patch = (teacher_targets(t_patch, lo["centering"], temp, ibot_center, lo["sinkhorn_iterations"])
                           if t_patch.shape[0] else t_patch)
            out = student_forward(student, views)
            dino = dino_loss_per_image(out.dino_logits, p_cls, lo["student_temp"]).mean()
            ibot = ibot_loss_per_image(out.ibot_logits, p_patch, out.ibot_weight, out.ibot_image, b,
                                       lo["student_temp"]).mean()
            koleo = sum(koleo_loss(out.global_cls[:, v]) for v in range(out.global_cls.shape[1]))
            loss = lo["dino_weight"] * dino + lo["ibot_weight"] * ibot + lo["koleo_weight"] * koleo
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DINO training: non-finite loss {loss.item()} at iteration {it}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if o["clip_grad"]:
                torch.nn.utils.clip_grad_norm_(student.parameters(), o["clip_grad"])
            if it < o["freeze_last_layer_iterations"]:
                for p in last_layers:
                    p.grad = None
            optimizer.step()
            m = momentum_at(it, cfg)
            with torch.no_grad():
                for p_teacher, p_student in zip(teacher.parameters(), student.parameters()):
                    p_teacher.lerp_(p_student.detach(), 1 - m)  # teacher <- m * teacher + (1 - m) * student
                cm = lo["center_momentum"]  # EMA centers are tracked in every run (softmax centering, checkpoints)
                dino_center.mul_(cm).add_(t_cls.flatten(0, 1).mean(0), alpha=1 - cm)
                if t_patch.shape[0]:
                    ibot_center.mul_(cm).add_(t_patch.mean(0), alpha=1 - cm)
            rows.append(dict(iteration=it, loss=loss.item(), dino=dino.item(), ibot=ibot.item(), koleo=koleo.item(),
                             lr=lr, weight_decay=wd, momentum=m, teacher_temp=temp))
            bar.update(1)
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
            if log_every and (it + 1) % log_every == 0:
                recent = pd.DataFrame(rows[-log_every:])
                log.info("iteration %d/%d: loss %.4f (dino %.4f, ibot %.4f, koleo %.4f), lr %.2e, teacher temp %.3f",
                         it + 1, n_updates, recent.loss.mean(), recent.dino.mean(), recent.ibot.mean(),
                         recent.koleo.mean(), lr, temp)
            if it + 1 in to_save:
                save(it + 1)
        bar.close()
    return pd.DataFrame(rows, columns=["iteration", "loss", "dino", "ibot", "koleo", "lr", "weight_decay",
                                       "momentum", "teacher_temp"])


def run_training(tables: Sequence[str | os.PathLike], roots: Sequence[str | os.PathLike], image_size: int,
                 cfg: dict, checkpoint_paths: Sequence[str | os.PathLike], seed: int, threads: int = 1,
                 device=None) -> pd.DataFrame:
    """Rule entry point: train on the images of the stimulus ``tables`` (with their ``roots``) and write the
    checkpoints of ``cfg["checkpoints"]`` to ``checkpoint_paths`` (same order). Returns the loss log."""
    from torch.utils.data import ConcatDataset

    from brainprop.stimuli import StimulusDataset

    torch.set_num_threads(threads)
    dataset = ConcatDataset([StimulusDataset(pd.read_parquet(t), r, image_size) for t, r in zip(tables, roots)])
    log.info("training on %d images from %d stimulus tables", len(dataset), len(tables))
    return train_dino(dataset, cfg, cfg["checkpoints"], checkpoint_paths, seed=seed, device=device)
