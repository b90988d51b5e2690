"""Models trained or wrapped by the workflow: a DINOv3-style student/teacher trained from scratch.

``dino`` holds the configuration, backbone, heads, views and checkpoints; ``dino_loss`` the DINO,
iBOT and KoLeo losses and the image-wise loss; ``dino_train`` the training loop.
"""

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
    raise ValueError(f"model kind {model['kind']!r} is not supported (supported: dino_checkpoint)")

__all__ = [
    "DEFAULT_IMAGEWISE_LOSS_CONFIG", "DEFAULT_TRAINING_CONFIG", "DinoCheckpoint", "DinoHead", "DinoModel",
    "ImageWiseDinoLoss", "MultiCropViews", "SinkhornBank", "build_backbone", "build_dino_model", "count_parameters",
    "dino_loss_per_image", "forward_tokens", "ibot_loss_per_image", "koleo_loss", "load_checkpoint", "make_views",
    "plain_view", "resolve_imagewise_config", "initial_checkpoint", "run_training_init", "run_training_segment",
    "train_segment", "build_image_wise_loss", "resolve_training_config", "save_checkpoint", "sinkhorn_knopp",
    "softmax_centered", "target_entropy", "train_dino", "training_config_hash",
]
