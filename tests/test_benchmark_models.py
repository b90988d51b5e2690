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
