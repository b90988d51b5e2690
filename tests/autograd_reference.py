"""The definition a per-image gradient is checked against: one image through the loss alone."""

import torch


def single_image_output_grads(loss, image_batch, image_ids):
    """``(loss value (1,), {layer: gradient of the loss at that layer's output})`` for one image (a batch of one),
    by plain autograd through forward hooks on ``loss.layers``."""
    modules = dict(loss.network.named_modules())
    outs = {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o)) for n in loss.layers]
    try:
        value, _ = loss(image_batch, image_ids)
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(value.sum(), [outs[n] for n in loss.layers])
    return value, dict(zip(loss.layers, grads))
