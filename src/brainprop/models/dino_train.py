"""DINOv3-style self-supervised training from scratch, in resumable segments between checkpoints.

One iteration: B images -> multi-crop views (seeded per (seed, epoch, image id)) -> teacher
targets on the 2 global crops (Sinkhorn-Knopp over the batch, or softmax centering) -> student
on masked global + local crops -> DINO + iBOT + KoLeo loss -> AdamW step (clipped) -> EMA teacher
update. Schedules (cosine unless said): lr (linear warm-up then cosine to ``min_lr``), weight
decay (``weight_decay`` -> ``weight_decay_end``), teacher momentum (0.992 -> 1), teacher
temperature (linear warm-up 0.04 -> 0.07, then constant).

Training runs in segments: :func:`initial_checkpoint` makes the state of iteration 0 and
:func:`train_segment` advances a checkpoint's full state (weights, centers, AdamW moments, RNG)
to a later iteration. Every schedule and the data order are functions of (seed, iteration), so
0 -> a -> N gives bit-identical results to 0 -> N (on the CPU, same thread count).
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

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
    load_checkpoint,
    make_views,
    random_permutation,
    resolve_training_config,
    _to_cpu,
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
from brainprop.utils import get_logger, resolve_device, save_parquet_atomic, stable_seed

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
    """Batches ``start .. stop - 1`` of ``(epoch, index)``: a seeded permutation per epoch, last incomplete
    batch dropped. Batch ``it`` is epoch ``it // (n_items // batch_size)``, so a resumed run starts at the
    right epoch and offset without replaying the batches before it."""

    def __init__(self, n_items: int, batch_size: int, start: int, stop: int, seed: int):
        self.n_items, self.batch_size, self.start, self.stop, self.seed = n_items, batch_size, start, stop, seed

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        per_epoch = self.n_items // self.batch_size
        epoch, perm = None, None
        for it in range(self.start, self.stop):
            e, b = divmod(it, per_epoch)
            if e != epoch:
                epoch, perm = e, random_permutation(random.Random(stable_seed(self.seed, "epoch", e)), self.n_items)
            yield [(epoch, i) for i in perm[b * self.batch_size:(b + 1) * self.batch_size]]


def loader_workers(threads: int, device) -> tuple[int, int]:
    """Split a job's ``threads`` cores into (DataLoader workers, intra-op compute threads).

    CUDA: one thread drives the GPU, every other core builds views (decoding and multi-crop are the
    CPU's work there). CPU: compute gets the cores; from 4 threads on, a quarter builds views in workers.
    """
    threads = max(1, int(threads))
    if resolve_device(device).type == "cuda":
        return threads - 1, 1
    workers = threads // 4 if threads >= 4 else 0
    return workers, threads - workers


# ----------------------------------------------------------------------------- training


def _param_groups(model: DinoModel) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases, norms, layer scales, tokens, mask token)."""
    no_wd = {f"backbone.{n}" for n in model.backbone.no_weight_decay()} | {"mask_token"}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in no_wd else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def _optimizer(student: DinoModel, cfg: dict) -> torch.optim.AdamW:
    return torch.optim.AdamW(_param_groups(student), lr=cfg["optim"]["lr"], betas=tuple(cfg["optim"]["betas"]))


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


def initial_checkpoint(cfg: dict, seed: int) -> DinoCheckpoint:
    """The training state of iteration 0 (CPU): seeded initialisation, teacher = student, zero centers,
    fresh AdamW state, and the torch RNG state after initialisation (the caller's RNG is left as it was)."""
    cfg = resolve_training_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initialisation (and drop-path, if configured) draw from the global RNG
        student = build_dino_model(cfg)
        teacher = build_dino_model(cfg)
        teacher.load_state_dict(student.state_dict())
        rng = {"torch": torch.get_rng_state(), "cuda": None}
    teacher.requires_grad_(False)
    return DinoCheckpoint(student.eval(), teacher.eval(), torch.zeros(cfg["head"]["n_prototypes"]),
                          torch.zeros(cfg["head"]["ibot_n_prototypes"]), 0, teacher_temp_at(0, cfg), cfg,
                          config_hash(cfg), int(seed), optimizer=_optimizer(student, cfg).state_dict(), rng=rng)


LOG_COLUMNS = ["iteration", "loss", "dino", "ibot", "koleo", "lr", "weight_decay", "momentum", "teacher_temp"]


def train_segment(dataset, start: DinoCheckpoint, until: int, save: Mapping[int, str | os.PathLike] | None = None,
                  device=None, num_workers: int = 0, log_every: int = 50,
                  ) -> tuple[DinoCheckpoint, pd.DataFrame]:
    """Advance a resumable checkpoint from ``start.iteration`` to iteration ``until``.

    Parameters
    ----------
    dataset : torch Dataset of ``(image uint8 (3, H, W), image_id str)``; images may differ in size.
    start : checkpoint with its training state (:func:`initial_checkpoint`, or
        ``load_checkpoint(path, training_state=True)``); it is not modified.
    until : iteration (updates done) to stop at, ``start.iteration <= until <= config["iterations"]``.
    save : ``{iteration: path}`` checkpoints to write on the way (``start.iteration < iteration <= until``),
        each atomically, so an interrupted segment leaves no partial file.
    device : "cpu", "cuda", None/"auto" (CUDA when available). On CUDA, ``amp: bf16`` runs the forward
        passes under bf16 autocast (fp32 master weights, AdamW state and losses).
    num_workers : DataLoader worker processes building the views (results do not depend on it).
    log_every : log the running losses every this many iterations (0: never).

    Returns
    -------
    (checkpoint at ``until`` with its training state, loss log DataFrame with one row per update:
    ``iteration`` (updates done before it), ``loss``, ``dino``, ``ibot``, ``koleo``, ``lr``,
    ``weight_decay``, ``momentum``, ``teacher_temp``).
    """
    cfg = resolve_training_config(start.config)
    seed, first = start.seed, start.iteration
    if start.optimizer is None or start.rng is None:
        raise ValueError("checkpoint has no training state: load it with load_checkpoint(path, training_state=True)")
    if not first <= until <= cfg["iterations"]:
        raise ValueError(f"until={until}: expected an iteration in [{first} (the checkpoint's), "
                         f"iterations={cfg['iterations']}]")
    save = {int(k): v for k, v in (save or {}).items()}
    if any(not first < k <= until for k in save):
        raise ValueError(f"save iterations {sorted(save)}: expected iterations in ({first}, {until}]")
    device = resolve_device(device)
    amp = cfg["amp"] == "bf16" and device.type == "cuda"
    if cfg["amp"] != "none" and not amp:
        log.info("amp %s is for CUDA only: training in float32 on %s", cfg["amp"], device)
    n_items, bs = len(dataset), cfg["batch_size"]
    if n_items < bs:
        raise ValueError(f"dataset has {n_items} images, fewer than training batch_size {bs}")
    if n_items % bs and first == 0:
        log.info("each epoch drops %d of %d images (last incomplete batch; the permutation changes per epoch)",
                 n_items % bs, n_items)
    lo, o = cfg["loss"], cfg["optim"]
    cuda = [device] if device.type == "cuda" else []

    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(start.rng["torch"])
        if cuda and start.rng["cuda"] is not None:
            torch.cuda.set_rng_state(start.rng["cuda"], device)
        elif cuda:  # a CPU-made state (iteration 0) carries no CUDA RNG: seed it from (seed, iteration)
            torch.cuda.manual_seed(stable_seed(seed, "cuda", first))
        student = copy.deepcopy(start.student).to(device).train()
        teacher = copy.deepcopy(start.teacher).to(device).eval().requires_grad_(False)
        dino_center, ibot_center = start.dino_center.to(device, copy=True), start.ibot_center.to(device, copy=True)
        optimizer = _optimizer(student, cfg)
        optimizer.load_state_dict(copy.deepcopy(start.optimizer))  # AdamW would step start's "step" tensors in place
        last_layers = [p for n, p in student.named_parameters() if "last_layer" in n]

        def state(it: int) -> DinoCheckpoint:
            rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None}
            return DinoCheckpoint(student, teacher, dino_center, ibot_center, it,
                                  teacher_temp_at(min(it, cfg["iterations"]), cfg), cfg, start.config_hash, seed,
                                  optimizer=optimizer.state_dict(), rng=rng)

        # the loader's own generator: creating its iterator must not draw from the global RNG
        loader = DataLoader(_MultiCropDataset(dataset, cfg, seed, student.patch_size),
                            batch_sampler=_EpochBatches(n_items, bs, first, until, seed),
                            collate_fn=MultiCropViews.stack, num_workers=num_workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
        rows = []
        bar = tqdm(total=until - first, desc=f"DINO training {first}->{until}", unit="it", disable=until == first)
        for it, views in enumerate(loader, start=first):
            views = views.to(device, non_blocking=device.type == "cuda")  # pinned on CUDA
            lr, wd, temp = lr_at(it, cfg), weight_decay_at(it, cfg), teacher_temp_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
                if group["apply_wd"]:
                    group["weight_decay"] = wd
            b = views.global_crops.shape[0]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                t_cls, t_patch = teacher_forward(teacher, views)
                out = student_forward(student, views)
            # losses, targets and centers in float32 (no-ops without autocast)
            t_cls, t_patch = t_cls.float(), t_patch.float()
            out = replace(out, dino_logits=out.dino_logits.float(), global_cls=out.global_cls.float(),
                          ibot_logits=out.ibot_logits.float(), ibot_weight=out.ibot_weight.float())
            with torch.no_grad():  # batch-level centering: training only
                p_cls = teacher_targets(t_cls.flatten(0, 1), lo["centering"], temp, dino_center,
                                        lo["sinkhorn_iterations"]).view_as(t_cls)
                p_patch = (teacher_targets(t_patch, lo["centering"], temp, ibot_center, lo["sinkhorn_iterations"])
                           if t_patch.shape[0] else t_patch)
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
            if log_every and (it + 1 - first) % log_every == 0:
                recent = pd.DataFrame(rows[-log_every:])
                log.info("iteration %d/%d: loss %.4f (dino %.4f, ibot %.4f, koleo %.4f), lr %.2e, teacher temp %.3f",
                         it + 1, until, recent.loss.mean(), recent.dino.mean(), recent.ibot.mean(),
                         recent.koleo.mean(), lr, temp)
            if it + 1 in save:
                save_checkpoint(save[it + 1], state(it + 1))
                log.info("saved checkpoint of iteration %d to %s", it + 1, save[it + 1])
        bar.close()
        final = state(until)
    final = replace(final, student=student.eval(), optimizer=_to_cpu(final.optimizer))
    return final, pd.DataFrame(rows, columns=LOG_COLUMNS)


def train_dino(dataset, cfg: dict, checkpoint_iters: Sequence[int], checkpoint_paths: Sequence[str | os.PathLike],
               seed: int, device=None, log_every: int = 50, num_workers: int = 0) -> pd.DataFrame:
    """Train a DINOv3-style student/teacher from scratch in one go and write checkpoints.

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
    pandas.DataFrame, the loss log of :func:`train_segment` (one row per update).
    Training stops after the last checkpoint (schedules still span ``cfg["iterations"]``).
    """
    state = initial_checkpoint(cfg, seed)
    iters = _check_checkpoints(checkpoint_iters, checkpoint_paths, state.config["iterations"])
    to_save = dict(zip(iters, checkpoint_paths))
    if 0 in to_save:
        save_checkpoint(to_save.pop(0), state)
    _, history = train_segment(dataset, state, max(iters), to_save, device=device, num_workers=num_workers,
                               log_every=log_every)
    return history


def training_dataset(tables: Sequence[str | os.PathLike], roots: Sequence[str | os.PathLike],
                     max_short_side: int | None):
    """Training images of the stimulus-format ``tables`` (with their ``roots``), concatenated in order."""
    from torch.utils.data import ConcatDataset

    from brainprop.stimuli import StimulusDataset

    if len(tables) != len(roots):
        raise ValueError(f"{len(tables)} training tables but {len(roots)} roots")
    return ConcatDataset([StimulusDataset(pd.read_parquet(t), r, max_short_side=max_short_side)
                          for t, r in zip(tables, roots)])


def run_training_init(cfg: dict, out: str | os.PathLike, seed: int) -> None:
    """Rule entry point: write the resumable checkpoint of iteration 0 (initialisation) to ``out``."""
    save_checkpoint(out, initial_checkpoint(cfg, seed))
    log.info("initial DINO checkpoint (seed %d) written to %s", seed, out)


def run_training_segment(tables: Sequence[str | os.PathLike], roots: Sequence[str | os.PathLike], cfg: dict,
                         previous: str | os.PathLike, until: int, out: str | os.PathLike,
                         log_path: str | os.PathLike, threads: int = 1, device=None) -> pd.DataFrame:
    """Rule entry point: resume ``previous`` (a checkpoint of this config) and train to ``until``.

    Writes the checkpoint ``out`` and the segment's loss log ``log_path`` (Parquet, one row per update),
    both atomically. ``threads`` are split between view-building workers and compute
    (:func:`loader_workers`). ``cfg`` is the workflow's ``training`` section; a previous checkpoint
    of another configuration is an error.
    """
    device = resolve_device(device)
    workers, compute = loader_workers(threads, device)
    torch.set_num_threads(compute)
    start = load_checkpoint(previous, "cpu", training_state=True)
    expected = config_hash(resolve_training_config(cfg))
    if start.config_hash != expected:
        raise ValueError(f"{previous}: trained with another training config (hash {start.config_hash[:12]}, "
                         f"config gives {expected[:12]}); delete it to retrain")
    dataset = training_dataset(tables, roots, cfg.get("max_short_side"))
    log.info("training %d -> %d on %d images from %d tables (%d loader workers, %d compute threads, %s)",
             start.iteration, until, len(dataset), len(tables), workers, compute, device)
    _, history = train_segment(dataset, start, until, {until: out}, device=device, num_workers=workers)
    save_parquet_atomic(history, log_path)
    return history
