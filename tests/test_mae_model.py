"""ViT-MAE image-wise loss: per-image gradients, the native loss by hand and by the library, blocks, loading."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainprop.features import FeatureExtractor
from brainprop.models.benchmark import evenly_spaced
from brainprop.models.mae import encoder_blocks, load_mae, write_tiny_mae

IDS = ["img_a", "img_b", "img_c"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_mae(tmp_path_factory.mktemp("tiny_mae"), seed=0)


@pytest.fixture(scope="module")
def loss(tiny_dir):
    return load_mae({"source": str(tiny_dir), "mask_ratio": None, "norm_pix_loss": None}, {}, seed=3)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 3, 40, 40), generator=g, dtype=torch.uint8)


def _block_io(loss, layer, run):
    """Output of block ``layer`` during ``run()``, and what ``run`` returned."""
    captured = []
    handle = dict(loss.network.named_modules())[layer].register_forward_hook(lambda m, a, o: captured.append(o))
    try:
        result = run()
    finally:
        handle.remove()
    (out,) = captured
    return out, result


def _pooled(x, tokens):
    return (x[:, 1:] if tokens == "patches" else x).mean(1)


@pytest.mark.parametrize("tokens", ["all", "patches"])
def test_batch_features_equal_single_image_passes(loss, images, tokens):
    ex = FeatureExtractor(loss, loss.layers, pooling="mean", backprop_target="output", projection="none",
                          tokens=tokens)
    forward, backprop = ex.forward(images), ex.backprop(images, IDS)
    n_visible = 1 + int(loss.network.num_patches * (1 - loss.mask_ratio))
    for layer in loss.layers:
        for b in range(3):
            image = images[b:b + 1]
            out, _ = _block_io(loss, layer, lambda: loss.network(loss.plain_view(image)))
            assert out.shape[1] == 1 + loss.network.num_patches  # forward: every patch (unmasked)
            torch.testing.assert_close(forward[layer][b], _pooled(out, tokens)[0], rtol=1e-5, atol=1e-6)
            out, (alone, _) = _block_io(loss, layer, lambda: loss(image, [IDS[b]]))
            assert out.shape[1] == n_visible  # backprop: CLS + visible patches of the masked pass
            (grad,) = torch.autograd.grad(alone.sum(), out)
            ref = _pooled(grad, tokens)[0]
            assert ref.abs().max() > 0
            torch.testing.assert_close(backprop[layer][b], ref, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(ex.last_losses[b], alone.detach()[0], rtol=1e-5, atol=0)


def _patches_by_hand(x, p):
    """(L, p * p * C) patches of one (C, H, W) image in raster order, pixels row-major, channels last."""
    c, h, w = x.shape
    return np.stack([x[:, i:i + p, j:j + p].transpose(1, 2, 0).reshape(-1)
                     for i in range(0, h, p) for j in range(0, w, p)])


@pytest.mark.parametrize("mask_ratio, norm_pix_loss", [(None, None), (0.5, False)])
def test_loss_equals_the_hand_computed_masked_mse(tiny_dir, images, mask_ratio, norm_pix_loss):
    loss = load_mae({"source": str(tiny_dir), "mask_ratio": mask_ratio, "norm_pix_loss": norm_pix_loss}, {}, seed=3)
    ratio = 0.75 if mask_ratio is None else mask_ratio
    norm = True if norm_pix_loss is None else norm_pix_loss
    losses, owner = loss(images, IDS)
    assert owner.tolist() == [0, 1, 2]
    x = loss.plain_view(images)
    with torch.no_grad():
        logits = loss.network.masked(x, loss.noise(IDS), ratio).logits.double().numpy()
    assert loss.network.mae.config.mask_ratio == 0.75  # the checkpoint's config is restored after the call
    n, p = loss.network.num_patches, loss.network.mae.config.patch_size
    for b, image_id in enumerate(IDS):
        noise = loss.noise([image_id])[0].numpy()
        masked = np.argsort(noise)[int(n * (1 - ratio)):]  # the patches with the largest noise are masked
        assert len(masked) == n - int(n * (1 - ratio))
        target = _patches_by_hand(x[b].double().numpy(), p)
        if norm:
            target = (target - target.mean(1, keepdims=True)) / np.sqrt(target.var(1, ddof=1, keepdims=True) + 1e-6)
        expected = ((logits[b] - target) ** 2).mean(1)[masked].mean()
        assert losses[b].item() == pytest.approx(expected, rel=1e-5)


def test_per_image_losses_match_the_library_batch_loss(loss, images):
    x = loss.plain_view(images)
    noise = loss.noise(IDS)
    with torch.no_grad():
        losses, _ = loss(images, IDS)
        for b in range(3):  # one image: the library's loss is that image's loss
            single = loss.network.mae(x[b:b + 1], noise=noise[b:b + 1])
            assert single.loss.item() == pytest.approx(losses[b].item(), rel=1e-5)
        batch = loss.network.mae(x, noise=noise)
    # the library averages over all masked patches of the batch; every image has as many of them
    assert batch.mask.sum(1).unique().tolist() == [loss.network.num_patches * 0.75]
    assert batch.loss.item() == pytest.approx(losses.mean().item(), rel=1e-5)


def test_blocks_are_the_encoder_layers_in_call_order_and_ten_evenly_spaced(loss, images):
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer

    calls = []
    handles = [m.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
               for name, m in loss.network.named_modules() if isinstance(m, ViTMAELayer)]
    try:
        with torch.no_grad():
            loss.network(loss.plain_view(images))  # the encoder alone: every encoder block, in order
    finally:
        for h in handles:
            h.remove()
    assert loss.blocks == calls == encoder_blocks(loss.network)
    assert len(loss.blocks) == loss.network.mae.config.num_hidden_layers == 12
    assert not any("decoder" in b for b in loss.blocks)
    assert loss.layers == evenly_spaced(loss.blocks) == [loss.blocks[i] for i in (0, 1, 2, 4, 5, 6, 7, 9, 10, 11)]
    assert loss.layer_depths == pytest.approx([i / 11 for i in (0, 1, 2, 4, 5, 6, 7, 9, 10, 11)])


def test_unmasked_pass_keeps_every_patch_in_order(loss, images):
    x = loss.plain_view(images)
    emb = loss.network.mae.vit.embeddings
    pos = emb.position_embeddings
    tokens = emb.patch_embeddings(x) + pos[:, 1:]
    tokens = torch.cat([(emb.cls_token + pos[:, :1]).expand(len(x), -1, -1), tokens], dim=1)
    modules = dict(loss.network.named_modules())
    with torch.no_grad():
        for name in loss.blocks:
            tokens = modules[name](tokens)
        expected = loss.network.mae.vit.layernorm(tokens)
        torch.testing.assert_close(loss.network(x), expected, rtol=1e-5, atol=1e-5)


def test_a_missing_checkpoint_names_the_key_and_the_weights(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match=r"models\.vit_mae\.source.*ViT-MAE.*vit-mae-base.*download"):
        load_mae({"source": str(tmp_path / "absent")}, {}, seed=0)
    no_processor = shutil.copytree(tiny_dir, tmp_path / "no_processor")
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"models\.mae_l\.source.*image processor"):
        load_mae({"source": str(no_processor)}, {}, seed=0, key="models.mae_l.source")
    with pytest.raises(ValueError, match="at least one masked patch"):
        load_mae({"source": str(tiny_dir), "mask_ratio": 0.0}, {}, seed=0)


def test_loss_depends_on_the_image_and_its_mask_not_on_a_caption(tiny_dir, loss, images):
    losses, _ = loss(images, IDS)
    assert len(set(np.round(losses.tolist(), 6))) == 3
    same_image = images[:1].repeat(2, 1, 1, 1)
    other_masks, _ = loss(same_image, ["img_a", "img_z"])  # another id, another mask
    assert other_masks[0] == losses[0] and abs(other_masks[1] - other_masks[0]) > 1e-4
    x = loss.plain_view(images).requires_grad_(True)
    out = loss.network.masked(x, loss.noise(IDS), loss.mask_ratio)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert all(grad[b].abs().max() > 0 for b in range(3))
    captioned = load_mae({"source": str(tiny_dir)}, dict(zip(IDS, ["a dog", "a cat", "a car"])), seed=3)
    torch.testing.assert_close(captioned(images, IDS)[0], losses, rtol=0, atol=0)  # MAE reads no caption


def _smallest_block_change(network, layers, x):
    """Over consecutive chosen blocks: the smallest relative change of the tokens, and the first-last cosine."""
    outs = []
    modules = dict(network.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o: outs.append(o)) for n in layers]
    try:
        with torch.no_grad():
            network(x)
    finally:
        for h in handles:
            h.remove()
    change = min(((b - a).norm() / a.norm()).item() for a, b in zip(outs, outs[1:]))
    return change, F.cosine_similarity(outs[0].flatten(), outs[-1].flatten(), dim=0).item()


def test_the_tiny_model_is_not_degenerate(loss, images):
    from transformers import ViTMAEForPreTraining

    from brainprop.models.mae import UnmaskedEncoder

    x = loss.plain_view(images)
    change, cosine = _smallest_block_change(loss.network, loss.layers, x)
    assert change > 0.1 and cosine < 0.9
    # the criterion catches the library's default initialisation, whose blocks barely differ
    config = loss.network.mae.config.__class__(**{**loss.network.mae.config.to_dict(), "initializer_range": 0.02})
    torch.manual_seed(0)
    default = UnmaskedEncoder(ViTMAEForPreTraining(config).eval())
    change, cosine = _smallest_block_change(default, loss.layers, x)
    assert change < 0.1 and cosine > 0.9


def test_builds_are_deterministic(tmp_path, tiny_dir, loss, images):
    from safetensors.torch import load_file

    again = write_tiny_mae(tmp_path / "again", seed=0)
    other = write_tiny_mae(tmp_path / "other", seed=1)
    a, b, c = (load_file(d / "model.safetensors") for d in (tiny_dir, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    torch.testing.assert_close(load_mae({"source": str(again)}, {}, seed=3)(images, IDS)[0], loss(images, IDS)[0],
                               rtol=0, atol=0)
    assert not torch.equal(load_mae({"source": str(again)}, {}, seed=4).noise(IDS), loss.noise(IDS))
