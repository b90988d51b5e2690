"""Models trained or wrapped by the workflow: a DINOv3-style student/teacher trained from scratch.

``dino`` holds the configuration, backbone, heads, views and checkpoints; ``dino_loss`` the DINO,
iBOT and KoLeo losses and the image-wise loss; ``dino_train`` the training loop.
"""

from brainprop.models.benchmark import BENCHMARK_KINDS
from brainprop.models.dino import (
    DEFAULT_IMAGEWISE_LOSS_CONFIG,
    DEFAULT_TRAINING_CONFIG,
    DinoCheckpoint,
    DinoHead,
    DinoModel,
    MultiCropViews,
    build_backbone,
    build_dino_model,
    count_parameters,
    forward_tokens,
    load_checkpoint,
    make_views,
    plain_view,
    resolve_imagewise_config,
    resolve_training_config,
    save_checkpoint,
    training_config_hash,
)
from brainprop.models.dino_loss import (
    ImageWiseDinoLoss,
    SinkhornBank,
    dino_loss_per_image,
    ibot_loss_per_image,
    koleo_loss,
    sinkhorn_knopp,
    softmax_centered,
    target_entropy,
)
from brainprop.models.dino_train import (
    initial_checkpoint,
    run_training_init,
    run_training_segment,
    train_dino,
    train_segment,
)


def build_image_wise_loss(model: dict, checkpoint, seed: int, device=None, bank_dataset=None):
    """The image-wise loss of a configured model (``models.<name>`` entry) at a checkpoint file.

    ``kind: dino_checkpoint``: :class:`ImageWiseDinoLoss` on a checkpoint written by the training rule,
    with the entry's ``loss`` options and ``forward_network`` (default teacher); ``bank_dataset`` (the
    training images) feeds the fixed Sinkhorn bank.
    """
    if model["kind"] == "dino_checkpoint":
        return ImageWiseDinoLoss(load_checkpoint(checkpoint, device), model.get("loss"), seed,
                                 bank_dataset=bank_dataset, forward_network=model.get("forward_network", "teacher"))
    raise ValueError(f"model kind {model['kind']!r} is not supported here (supported: dino_checkpoint; the benchmark "
                     f"kinds {BENCHMARK_KINDS} load through build_benchmark_loss)")


def build_benchmark_loss(model: dict, captions: dict, seed: int, device=None):
    """The image-wise loss of a pretrained benchmark model (``models.<name>`` entry, ``source`` resolved).

    ``captions`` maps image ids to captions (:func:`~brainprop.models.benchmark.captions_of`);
    ``model["config_key"]`` (``models.<name>``, added by the workflow) names the entry in errors.
    """
    from brainprop.models.classifiers import load_timm_classifier
    from brainprop.models.mae import load_mae
    from brainprop.models.vlm import load_clip, load_owlvit, load_siglip2

    key = f"{model.get('config_key', 'models.<name>')}.source"
    loaders = {"mae": load_mae, "timm": load_timm_classifier, "clip": load_clip, "owlvit": load_owlvit,
               "siglip2": load_siglip2}
    if model["kind"] not in loaders:
        raise ValueError(f"model kind {model['kind']!r} is not a benchmark kind {BENCHMARK_KINDS}")
    loss = loaders[model["kind"]](model, captions, seed, device=device or "cpu", key=key)
    if model.get("image_size") not in (None, loss.image_size):
        raise ValueError(f"{model.get('config_key', 'models.<name>')}.image_size={model['image_size']} but the checkpoint "
                         f"{model['source']!r} takes {loss.image_size} px; set it to null (the checkpoint's)")
    return loss


def write_tiny_model(model: dict, out_dir, seed: int, captions: list[str]):
    """Write the demo's tiny random version of a benchmark model to ``out_dir`` (the real checkpoint's layout)."""
    from brainprop.models.classifiers import write_tiny_timm
    from brainprop.models.mae import write_tiny_mae
    from brainprop.models.vlm import write_tiny_clip, write_tiny_owlvit, write_tiny_siglip2

    writers = {"mae": lambda: write_tiny_mae(out_dir, seed), "timm": lambda: write_tiny_timm(model["name"], out_dir, seed),
               "clip": lambda: write_tiny_clip(out_dir, seed), "owlvit": lambda: write_tiny_owlvit(out_dir, seed),
               "siglip2": lambda: write_tiny_siglip2(out_dir, seed, captions)}
    return writers[model["kind"]]()


def run_tiny_model(model: dict, stimulus_tables, out_dir, seed: int) -> None:
    """Rule entry point: the tiny model of ``model`` (its captions from the stimulus tables) in ``out_dir``."""
    import pandas as pd

    from brainprop.models.benchmark import captions_of

    captions = sorted({c for t in stimulus_tables for c in captions_of(pd.read_parquet(t)).values()})
    write_tiny_model(model, out_dir, seed, captions)

__all__ = [
    "DEFAULT_IMAGEWISE_LOSS_CONFIG", "DEFAULT_TRAINING_CONFIG", "DinoCheckpoint", "DinoHead", "DinoModel",
    "ImageWiseDinoLoss", "MultiCropViews", "SinkhornBank", "build_backbone", "build_dino_model", "count_parameters",
    "dino_loss_per_image", "forward_tokens", "ibot_loss_per_image", "koleo_loss", "load_checkpoint", "make_views",
    "plain_view", "resolve_imagewise_config", "initial_checkpoint", "run_training_init", "run_training_segment",
    "train_segment", "build_image_wise_loss", "build_benchmark_loss", "write_tiny_model", "run_tiny_model", "resolve_training_config", "save_checkpoint", "sinkhorn_knopp",
    "softmax_centered", "target_entropy", "train_dino", "training_config_hash",
]
