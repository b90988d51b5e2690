"""What the benchmark models share: evenly spaced blocks, captions, offline loading errors."""

import pandas as pd
import pytest
import torch

from brainprop.models.benchmark import block_depths, captions_of, evenly_spaced, load_offline, pixel_view


def test_ten_evenly_spaced_blocks_include_first_and_last():
    blocks = [f"b{i}" for i in range(24)]
    chosen = evenly_spaced(blocks)
    assert len(chosen) == 10 and chosen[0] == "b0" and chosen[-1] == "b23"
    idx = [int(c[1:]) for c in chosen]
    assert max(abs(a - b) for a, b in zip(idx, [round(i * 23 / 9) for i in range(10)])) == 0
    assert block_depths(chosen, blocks) == pytest.approx([i / 23 for i in idx])
    with pytest.raises(ValueError, match="at least 10"):
        evenly_spaced(blocks[:9])


def test_captions_fall_back_to_the_concept():
    table = pd.DataFrame({"image_id": ["a", "b", "c"], "concept": ["ice_cream", "dog", "cat"],
                          "caption": ["two cats on a sofa", None, ""]})
    assert captions_of(table) == {"a": "two cats on a sofa", "b": "a photo of a dog", "c": "a photo of a cat"}
    assert captions_of(table.drop(columns="caption"))["a"] == "a photo of a ice cream"
    with pytest.raises(ValueError, match="concept"):
        captions_of(table.drop(columns="concept"))


def test_a_missing_checkpoint_names_the_key_and_what_to_download(tmp_path):
    from transformers import CLIPModel

    with pytest.raises(FileNotFoundError, match=r"models\.clip\.source.*CLIP ViT-B/16.*download"):
        load_offline(CLIPModel.from_pretrained, str(tmp_path / "absent"), "CLIP ViT-B/16", "models.clip.source")
    with pytest.raises(FileNotFoundError, match="models.clip.source"):
        load_offline(CLIPModel.from_pretrained, "no-such-org/no-such-model", "CLIP", "models.clip.source")


def test_pixel_view_resizes_and_normalises():
    images = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    x = pixel_view(images, 4, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert x.shape == (2, 3, 4, 4) and torch.allclose(x, torch.full_like(x, 2.0))


@pytest.fixture(scope="module")
def things(tmp_path_factory):
    from brainprop.stimuli import generate_things_demo, things_stimulus_table

    root = tmp_path_factory.mktemp("stimuli") / "things"
    generate_things_demo(root, n_concepts=3, images_per_concept=2, n_test_concepts=1, n_catch=0, image_size=32, seed=0)
    table = things_stimulus_table(root)
    table.to_parquet(root.parent / "things.parquet")
    return root, root.parent / "things.parquet", table


FEATURES = {"pooling": "mean", "pooled_tokens": "all", "backprop_target": "weight", "batch_size": 3,
            "projection": {"method": "gaussian", "dim": 24, "memory_budget_mb": 1}}


def test_benchmark_extraction_writes_ten_named_blocks_and_image_wise_losses(things, tmp_path):
    """The rule entry point on tiny CLIP and a tiny CLIP-bridged ResNet: block0..block9 files in table order,
    layers.parquet naming the evenly spaced modules, output gradients (not weight gradients, whatever
    features.backprop_target says), and each stored loss equal to the image's loss computed alone."""
    import numpy as np

    from brainprop.features import run_benchmark_extraction
    from brainprop.models import build_benchmark_loss, write_tiny_model
    from brainprop.models.benchmark import BENCHMARK_LAYERS, captions_of

    root, table_path, table = things
    write_tiny_model({"kind": "clip"}, tmp_path / "clip", 0, [])
    write_tiny_model({"kind": "timm", "name": "resnet50"}, tmp_path / "resnet", 0, [])
    entries = {"clip": {"kind": "clip", "source": str(tmp_path / "clip"), "bank_size": 2, "image_size": None,
                        "config_key": "models.clip"},
               "resnet50": {"kind": "timm", "name": "resnet50", "source": str(tmp_path / "resnet"), "image_size": None,
                            "config_key": "models.resnet50",
                            "bridge": {"text_model": "clip", "text_source": str(tmp_path / "clip"),
                                       "temperature": 0.01, "templates": "simple"}}}
    for name, entry in entries.items():
        out = tmp_path / name / "features"
        run_benchmark_extraction(table_path, root, out, entry, FEATURES, seed=0)
        layers = pd.read_parquet(out / "layers.parquet")
        assert layers.layer.tolist() == BENCHMARK_LAYERS
        n = int(layers.n_blocks.iloc[0])
        assert layers.block_index.tolist() == np.round(np.linspace(0, n - 1, 10)).astype(int).tolist()
        assert pd.read_parquet(out / "index.parquet").image_id.tolist() == table.image_id.tolist()
        loss = build_benchmark_loss(entry, captions_of(table), seed=0)
        modules = dict(loss.network.named_modules())
        for label, module in zip(layers.layer, layers.module):
            forward, backprop = (np.load(out / f"{label}.{s}.npy") for s in ("forward", "backprop"))
            assert module in modules and forward.shape[0] == backprop.shape[0] == len(table)
            assert backprop.shape[1] == min(forward.shape[1], 24)  # pooled output gradient, projected when wider
        stored = pd.read_parquet(out / "losses.parquet")
        from brainprop.stimuli import StimulusDataset

        image, image_id = StimulusDataset(table, root, loss.image_size)[3]
        with torch.no_grad():
            alone = loss(image[None], [image_id])[0]
        np.testing.assert_allclose(stored.loss[3], float(alone[0]), rtol=1e-5)
        assert np.isfinite(stored.loss).all() and stored.loss.std() > 0, name
    with pytest.raises(FileNotFoundError, match=r"models\.clip\.source"):
        build_benchmark_loss({**entries["clip"], "source": str(tmp_path / "absent")}, captions_of(table), seed=0)
    with pytest.raises(ValueError, match=r"models\.clip\.image_size=64"):
        build_benchmark_loss({**entries["clip"], "image_size": 64}, captions_of(table), seed=0)
