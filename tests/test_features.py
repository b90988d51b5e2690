"""Per-image forward/backprop extraction: exact against single-image autograd passes."""

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from brainprop.features import FeatureExtractor, extract_features, pool_tokens
from brainprop.projection import GaussianProjection
from brainprop.utils import stable_seed

LAYERS = ["blocks.0.mlp.fc2", "blocks.2.mlp.fc2"]


class ToyImageWiseLoss:
    """A per-image loss over two views of different sizes (two network calls), seeded per image id.

    Follows the image-wise loss protocol of ``brainprop.features``: the network sees every
    image's global view in one call and its local view in a second call; loss_b is a
    function of image b's rows only.
    """

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.network = timm.models.eva.Eva(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2,
                                           num_classes=0, num_reg_tokens=2, use_rot_pos_emb=True,
                                           use_abs_pos_emb=False, rope_type="dinov3", dynamic_img_size=True,
                                           init_values=0.5).eval()
        self.seed = seed

    def plain_view(self, images):
        return F.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", align_corners=False)

    def _local(self, img, image_id):
        g = torch.Generator().manual_seed(stable_seed(self.seed, image_id))
        y, x = torch.randint(0, 17, (2,), generator=g).tolist()
        return img[:, y:y + 16, x:x + 16]

    def __call__(self, images, image_ids):
        x = self.plain_view(images)
        local = torch.stack([self._local(im, i) for im, i in zip(x, image_ids)])
        a = self.network.forward_features(x)  # (B, T, D)
        b = self.network.forward_features(local.flip(-1))
        target = torch.tanh(a.detach().mean(1) * 3)
        losses = ((a[:, 0] - target) ** 2).sum(1) + ((b.mean(1) - target) ** 2).sum(1) + (a**3).mean((1, 2))
        owner = torch.arange(len(image_ids)).repeat(2)
        return losses, owner


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 40, 40), generator=g, dtype=torch.uint8)
    return images, ["img_a", "img_b", "img_c"]


def _weight_grad_alone(loss, image, image_id, layer):
    module = dict(loss.network.named_modules())[layer]
    losses, _ = loss(image[None], [image_id])
    (g,) = torch.autograd.grad(losses.sum(), module.weight)
    return g


def test_weight_gradients_equal_single_image_autograd(batch):
    images, ids = batch
    loss = ToyImageWiseLoss()
    ex = FeatureExtractor(loss, LAYERS, backprop_target="weight", projection="none")
    feats = ex.backprop(images, ids)
    for layer in LAYERS:
        for b in range(len(ids)):
            ref = _weight_grad_alone(loss, images[b], ids[b], layer).flatten()
            assert ref.abs().max() > 0
            torch.testing.assert_close(feats[layer][b], ref, rtol=1e-5, atol=1e-7)


def test_batch_order_does_not_change_an_image_features(batch):
    images, ids = batch
    loss = ToyImageWiseLoss()
    ex = FeatureExtractor(loss, LAYERS, backprop_target="weight", projection="gaussian", projection_dim=16)
    full = ex.backprop(images, ids)
    perm = [2, 0, 1]
    shuffled = ex.backprop(images[perm], [ids[i] for i in perm])
    for layer in LAYERS:
        torch.testing.assert_close(shuffled[layer], full[layer][perm], rtol=1e-5, atol=1e-6)


def test_output_gradients_are_pooled_and_summed_over_views(batch):
    images, ids = batch
    loss = ToyImageWiseLoss()
    ex = FeatureExtractor(loss, LAYERS, pooling="mean", backprop_target="output", projection="none")
    feats = ex.backprop(images, ids)
    for b in range(len(ids)):
        outs = []
        module = dict(loss.network.named_modules())[LAYERS[1]]
        h = module.register_forward_hook(lambda m, a, o: outs.append(o))
        losses, _ = loss(images[b:b + 1], [ids[b]])
        h.remove()
        grads = torch.autograd.grad(losses.sum(), outs)
        ref = sum(g.mean(1)[0] for g in grads)
        torch.testing.assert_close(feats[LAYERS[1]][b], ref, rtol=1e-5, atol=1e-7)


def test_kronecker_matches_gaussian_free_reference(batch):
    """The Kronecker path never forms G yet equals vec(G) @ kron(A, B) on the exact per-image G."""
    images, ids = batch
    loss = ToyImageWiseLoss()
    exact = FeatureExtractor(loss, LAYERS, projection="none").backprop(images, ids)
    kron = FeatureExtractor(loss, LAYERS, projection="kronecker", projection_dim=12)
    feats = kron.backprop(images, ids)
    for layer in LAYERS:
        proj = kron.projectors[layer]
        ref = exact[layer] @ torch.kron(proj.a, proj.b)
        torch.testing.assert_close(feats[layer], ref, rtol=1e-4, atol=1e-7)


def test_forward_features_are_pooled_layer_outputs(batch):
    images, ids = batch
    loss = ToyImageWiseLoss()
    ex = FeatureExtractor(loss, LAYERS, pooling="cls")
    feats = ex.forward(images)
    outs = {}
    hooks = [dict(loss.network.named_modules())[n].register_forward_hook(
        lambda m, a, o, n=n: outs.__setitem__(n, o)) for n in LAYERS]
    with torch.no_grad():
        loss.network.forward_features(loss.plain_view(images))
    for h in hooks:
        h.remove()
    for n in LAYERS:
        torch.testing.assert_close(feats[n], outs[n][:, 0])


def test_extract_features_runs_in_batches_and_matches_one_batch(batch):
    images, ids = batch
    dataset = [(images[i], ids[i]) for i in range(3)]
    loss = ToyImageWiseLoss()
    ex = FeatureExtractor(loss, LAYERS, projection="gaussian", projection_dim=10, seed=3)
    fwd1, bwd1, ids1, _ = extract_features(ex, dataset, batch_size=2)
    fwd3, bwd3, _, _ = extract_features(ex, dataset, batch_size=3)
    assert ids1 == ids
    for n in LAYERS:
        assert fwd1[n].shape == (3, 24) and bwd1[n].shape == (3, 10) and bwd1[n].dtype == np.float32
        np.testing.assert_allclose(bwd1[n], bwd3[n], rtol=1e-4, atol=2e-6)  # float32 summation order
        np.testing.assert_allclose(fwd1[n], fwd3[n], rtol=1e-5, atol=1e-6)


def test_unknown_layer_and_bad_options_are_clear_errors():
    loss = ToyImageWiseLoss()
    with pytest.raises(ValueError, match="blocks.9.mlp.fc2"):
        FeatureExtractor(loss, ["blocks.9.mlp.fc2"])
    with pytest.raises(ValueError, match="torch.nn.Linear"):
        FeatureExtractor(loss, ["blocks.0.mlp"], backprop_target="weight")
    with pytest.raises(ValueError, match="pooling"):
        FeatureExtractor(loss, LAYERS, pooling="max")


def test_pool_tokens_shapes():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(pool_tokens(x, "mean"), x.mean(1))
    assert torch.equal(pool_tokens(x, "cls"), x[:, 0])
    assert pool_tokens(x, "flatten").shape == (2, 12)


def test_pool_tokens_reads_a_feature_map_as_spatial_tokens():
    fmap = torch.randn(2, 5, 3, 4)  # (N, C, H, W)
    assert torch.allclose(pool_tokens(fmap, "mean"), fmap.mean(dim=(2, 3)))
    assert torch.equal(pool_tokens(fmap, "flatten")[:, :5], fmap[:, :, 0, 0])
    with pytest.raises(ValueError, match="CLS"):
        pool_tokens(fmap, "cls")


class _TupleBlock(torch.nn.Module):
    """A residual block that, like some transformers layers, takes keywords and returns a tuple."""

    def __init__(self, dim):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, hidden_states):
        return hidden_states + torch.tanh(self.fc(hidden_states)), None


class _TupleNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([_TupleBlock(6) for _ in range(2)])

    def forward(self, x):  # (B, 3, H, W) -> tokens (B, 4, 6)
        h = x.float().flatten(2)[:, :, :24].reshape(x.shape[0], 4, 18)[..., :6]
        for block in self.blocks:
            h, _ = block(hidden_states=h)
        return h


class _TupleLoss:
    network = _TupleNet()

    def plain_view(self, images):
        return images.float() / 255

    def __call__(self, images, image_ids):
        out = self.network(self.plain_view(images))
        return (out ** 2).sum((1, 2)), torch.arange(len(image_ids))


def test_output_gradients_of_blocks_called_with_keywords_returning_tuples(batch):
    images, ids = batch
    loss = _TupleLoss()
    ex = FeatureExtractor(loss, ["blocks.0"], pooling="mean", backprop_target="output", projection="none")
    feats, fwd = ex.backprop(images, ids)["blocks.0"], ex.forward(images)["blocks.0"]
    for b in range(len(ids)):
        outs = []
        h = loss.network.blocks[0].register_forward_hook(lambda m, a, o: outs.append(o[0]))
        losses, _ = loss(images[b:b + 1], [ids[b]])
        h.remove()
        (g,) = torch.autograd.grad(losses.sum(), outs)
        torch.testing.assert_close(feats[b], g.mean(1)[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fwd[b], outs[0].detach().mean(1)[0], rtol=1e-5, atol=1e-7)


def test_gaussian_projection_of_output_gradients_is_seeded():
    a = GaussianProjection(50, 8, seed=1)(torch.ones(2, 50))
    b = GaussianProjection(50, 8, seed=1)(torch.ones(2, 50))
    c = GaussianProjection(50, 8, seed=2)(torch.ones(2, 50))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.fixture(scope="module")
def dino_checkpoint(tmp_path_factory):
    """A tiny DINOv3-style checkpoint after 2 updates (teacher != student)."""
    from brainprop.models import train_dino

    cfg = {"iterations": 2, "batch_size": 4,
           "arch": {"timm_name": "vit_small_patch16_dinov3",
                    "kwargs": {"embed_dim": 32, "num_heads": 2, "depth": 3, "patch_size": 8, "img_size": 32}},
           "head": {"hidden_dim": 32, "bottleneck_dim": 16, "n_prototypes": 16, "ibot_n_prototypes": 16},
           "crops": {"global_size": 32, "local_size": 16, "n_local": 2}}
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 256, (3, 40, 40), generator=g, dtype=torch.uint8), f"im{i}") for i in range(8)]
    path = tmp_path_factory.mktemp("dino") / "it2.pt"
    train_dino(data, cfg, [2], [path], seed=0, device="cpu", log_every=0)
    return path, data


def test_dino_image_wise_weight_gradients_batch_equals_single(dino_checkpoint):
    """With the real image-wise DINO+iBOT loss, a batch gives each image's single-image gradient."""
    from brainprop.models import build_image_wise_loss

    path, data = dino_checkpoint
    loss = build_image_wise_loss({"kind": "dino_checkpoint", "loss": {"n_views": 2}}, path, seed=5,
                                 bank_dataset=data[3:])
    layers = ["blocks.0.mlp.fc2", "blocks.2.mlp.fc2"]
    ex = FeatureExtractor(loss, layers, projection="none")
    images = torch.stack([im for im, _ in data[:3]])
    ids = [i for _, i in data[:3]]
    batch = ex.backprop(images, ids)
    for b in range(3):
        single = ex.backprop(images[b:b + 1], ids[b:b + 1])
        ref = _weight_grad_alone(loss, images[b], ids[b], layers[1]).flatten()
        for layer in layers:
            assert single[layer].abs().max() > 0
            torch.testing.assert_close(batch[layer][b], single[layer][0], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(batch[layers[1]][b], ref, rtol=1e-4, atol=1e-7)


def test_run_feature_extraction_and_pca_write_aligned_files(dino_checkpoint, tmp_path):
    from brainprop.features import run_feature_extraction, run_pca
    from brainprop.stimuli import generate_things_demo, things_stimulus_table

    path, _ = dino_checkpoint
    root = tmp_path / "things"
    generate_things_demo(root, n_concepts=3, images_per_concept=2, n_test_concepts=1, n_catch=0, image_size=32, seed=0)
    table = things_stimulus_table(root)
    table.to_parquet(tmp_path / "things.parquet")
    layers = ["blocks.0.mlp.fc2", "blocks.2.mlp.fc2"]
    features = {"layers": layers, "pooling": "mean", "backprop_target": "weight", "batch_size": 3,
                "projection": {"method": "kronecker", "dim": 12, "memory_budget_mb": 1}}
    model = {"kind": "dino_checkpoint", "image_size": 32, "forward_network": "teacher", "loss": {"n_views": 2}}
    features["pooled_tokens"] = "all"
    run_feature_extraction(path, tmp_path / "things.parquet", root, tmp_path / "raw", model, features, seed=0,
                           bank_tables=[tmp_path / "things.parquet"], bank_roots=[root])
    index = pd.read_parquet(tmp_path / "raw/index.parquet")
    assert index.image_id.tolist() == table.image_id.tolist()
    losses = pd.read_parquet(tmp_path / "raw/losses.parquet")
    assert losses.columns.tolist() == ["image_id", "loss", "target_entropy", "log_k"]
    assert losses.image_id.tolist() == table.image_id.tolist()
    np.testing.assert_allclose(losses.log_k, np.log(16))
    assert (losses.target_entropy > 0).all() and (losses.target_entropy <= np.log(16) + 1e-6).all()
    # the stored loss is the image-wise loss of each image, recomputed alone
    from brainprop.features import training_images
    from brainprop.models import build_image_wise_loss

    bank = training_images([tmp_path / "things.parquet"], [root], 32)
    loss = build_image_wise_loss(model, path, seed=0, bank_dataset=bank)
    image, image_id = bank[4]
    with torch.no_grad():
        alone = loss(image[None], [image_id])[0]
    np.testing.assert_allclose(losses.loss[4], float(alone[0]), rtol=1e-5)
    np.testing.assert_allclose(losses.target_entropy[4], float(loss.last_target_entropy[0]), rtol=1e-5)
    fwd = np.load(tmp_path / "raw/blocks.2.mlp.fc2.forward.npy")
    bwd = np.load(tmp_path / "raw/blocks.2.mlp.fc2.backprop.npy")
    assert fwd.shape == (7, 32) and bwd.shape == (7, 12) and np.isfinite(bwd).all() and bwd.std() > 0
    run_pca(tmp_path / "raw", tmp_path / "pca", layers, n_components=4, seed=0)
    assert np.load(tmp_path / "pca/blocks.0.mlp.fc2.backprop.npy").shape == (7, 4)
    assert pd.read_parquet(tmp_path / "pca/pca_summary.parquet").shape[0] == 4


def test_a_layer_projection_does_not_depend_on_the_other_layers(batch, tmp_path):
    """Seeded by the layer's name: alone (as in the robustness rule) or among others, same features;
    and the same whether its matrix is kept in memory or memory-mapped from a scratch file."""
    images, ids = batch
    loss = ToyImageWiseLoss()
    together = FeatureExtractor(loss, LAYERS, projection="gaussian", projection_dim=16, seed=3).backprop(images, ids)
    alone = FeatureExtractor(loss, LAYERS[1:], projection="gaussian", projection_dim=16, seed=3)
    mapped = FeatureExtractor(loss, LAYERS[1:], projection="gaussian", projection_dim=16, seed=3,
                              memory_budget_mb=1e-6, scratch_dir=tmp_path)
    assert alone.projectors[LAYERS[1]].storage == "device" and mapped.projectors[LAYERS[1]].storage == "memmap"
    a, m = alone.backprop(images, ids)[LAYERS[1]], mapped.backprop(images, ids)[LAYERS[1]]
    assert a.abs().max() > 0 and len(list(tmp_path.iterdir())) == 1
    assert torch.equal(a, together[LAYERS[1]])
    torch.testing.assert_close(m, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())
    # equal-shaped layers still get independent maps
    assert not torch.allclose(together[LAYERS[0]], FeatureExtractor(
        loss, LAYERS[::-1], projection="gaussian", projection_dim=16, seed=3).backprop(images, ids)[LAYERS[1]])
    mapped.close()
    assert not list(tmp_path.iterdir())


def test_nested_projection_equals_a_direct_extraction_at_that_dim(batch):
    """Fig. S2: the k-dim backprop features derived from one K-dim extraction equal a k-dim extraction."""
    from brainprop.projection import nested_gaussian

    images, ids = batch
    loss = ToyImageWiseLoss()
    big = FeatureExtractor(loss, LAYERS[1:], projection_dim=48, seed=0).backprop(images, ids)[LAYERS[1]].numpy()
    for k in (8, 40):
        direct = FeatureExtractor(loss, LAYERS[1:], projection_dim=k, seed=0).backprop(images, ids)[LAYERS[1]].numpy()
        # float32 sums of D = 24 x 96 products: within 1e-5 of the largest value
        np.testing.assert_allclose(nested_gaussian(big, k), direct, rtol=0, atol=1e-5 * np.abs(direct).max())


class _UnevenLoss(ToyImageWiseLoss):
    """Images whose id ends in "a" own two rows of the second network call, the others one."""

    def __call__(self, images, image_ids):
        x = self.plain_view(images)
        local = torch.stack([self._local(im, i) for im, i in zip(x, image_ids)])
        extra = torch.tensor([b for b, i in enumerate(image_ids) if i.endswith("a")], dtype=torch.long)
        a = self.network.forward_features(x)
        b = self.network.forward_features(torch.cat([local, local[extra].flip(-1)]))
        target = torch.tanh(a.detach().mean(1) * 3)
        losses = ((a[:, 0] - target) ** 2).sum(1) + ((b[:len(image_ids)].mean(1) - target) ** 2).sum(1)
        losses = losses.index_add(0, extra, (b[len(image_ids):] ** 2).mean((1, 2)))
        owner = torch.cat([torch.arange(len(image_ids)), torch.arange(len(image_ids)), extra])
        return losses, owner


def test_weight_gradients_with_uneven_rows_per_image_equal_single_image_autograd(batch):
    images, ids = batch
    loss = _UnevenLoss()
    feats = FeatureExtractor(loss, LAYERS, projection="none").backprop(images, ids)
    for layer in LAYERS:
        for b in range(len(ids)):
            ref = _weight_grad_alone(loss, images[b], ids[b], layer).flatten()
            torch.testing.assert_close(feats[layer][b], ref, rtol=1e-5, atol=1e-7)


def test_run_feature_extraction_memory_mapped_leaves_no_scratch_and_matches_in_memory(dino_checkpoint, tmp_path):
    from brainprop.features import run_feature_extraction
    from brainprop.stimuli import generate_things_demo, things_stimulus_table

    path, _ = dino_checkpoint
    root = tmp_path / "things"
    generate_things_demo(root, n_concepts=2, images_per_concept=2, n_test_concepts=1, n_catch=0, image_size=32, seed=0)
    things_stimulus_table(root).to_parquet(tmp_path / "things.parquet")
    layer = "blocks.1.mlp.fc2"
    model = {"kind": "dino_checkpoint", "image_size": 32, "loss": {"n_views": 1, "bank_size": 3}}
    out = {}
    for budget in (64, 1e-6):  # in memory; memory-mapped in the job's output folder
        features = {"layers": [layer], "pooling": "mean", "pooled_tokens": "all", "backprop_target": "weight",
                    "batch_size": 3, "projection": {"method": "gaussian", "dim": 24, "memory_budget_mb": budget}}
        run_feature_extraction(path, tmp_path / "things.parquet", root, tmp_path / f"raw{budget}", model, features,
                               seed=0, bank_tables=[tmp_path / "things.parquet"], bank_roots=[root])
        names = sorted(p.name for p in (tmp_path / f"raw{budget}").iterdir())
        assert names == [f"{layer}.backprop.npy", f"{layer}.forward.npy", "index.parquet", "losses.parquet"]
        out[budget] = np.load(tmp_path / f"raw{budget}/{layer}.backprop.npy")
    assert np.abs(out[64]).max() > 0
    np.testing.assert_allclose(out[1e-6], out[64], rtol=0, atol=1e-5 * np.abs(out[64]).max())


def test_forward_network_and_pooled_tokens(dino_checkpoint):
    """Forward features come from the configured network; ``patches`` drops the CLS and register tokens."""
    from brainprop.models import build_image_wise_loss

    path, data = dino_checkpoint
    images = torch.stack([im for im, _ in data[:2]])
    feats = {}
    for net in ("teacher", "student"):
        loss = build_image_wise_loss({"kind": "dino_checkpoint", "forward_network": net, "loss": {"n_views": 1}},
                                     path, seed=5, bank_dataset=data)
        network = loss.teacher.backbone if net == "teacher" else loss.student.backbone
        assert loss.forward_network is network
        outs = {}
        hook = dict(network.named_modules())["blocks.1.mlp.fc2"].register_forward_hook(
            lambda m, a, o: outs.__setitem__("x", o))
        with torch.no_grad():
            network.forward_features(loss.plain_view(images))
        hook.remove()
        n_prefix = network.num_prefix_tokens
        assert n_prefix == 5  # CLS + 4 registers
        for tokens, ref in (("all", outs["x"].mean(1)), ("patches", outs["x"][:, n_prefix:].mean(1))):
            feats[net, tokens] = FeatureExtractor(loss, ["blocks.1.mlp.fc2"], tokens=tokens).forward(images)
            torch.testing.assert_close(feats[net, tokens]["blocks.1.mlp.fc2"], ref)
    # two training steps with EMA: teacher and student differ
    assert not torch.allclose(feats["teacher", "all"]["blocks.1.mlp.fc2"], feats["student", "all"]["blocks.1.mlp.fc2"])
    with pytest.raises(ValueError, match="patches"):
        FeatureExtractor(loss, ["blocks.1.mlp.fc2"], pooling="cls", tokens="patches")
