"""CLIP, OWL-ViT and SigLIP2 as image-wise losses: exact per-image gradients, hand-computed losses,
evenly spaced blocks, offline errors, informative and deterministic losses, non-degenerate tiny models."""

import math

import numpy as np
import open_clip
import pytest
import torch
import transformers

from brainprop.features import FeatureExtractor
from brainprop.models.benchmark import evenly_spaced
from brainprop.models.vlm import (
    caption_bank,
    clip_bpe_tokenizer,
    clip_text_encoder,
    load_clip,
    load_owlvit,
    load_siglip2,
    load_vision_language,
    write_tiny_clip,
    write_tiny_owlvit,
    write_tiny_siglip2,
)

from autograd_reference import single_image_output_grads

CAPTIONS = {
    "im0": "A dog lying on a sofa.", "im1": "Two cats sleeping in the sun", "im2": "a red car parked on the street",
    "im3": "A man riding a wave on top of a surfboard.", "im4": "a bowl of fruit", "im5": "a giraffe in a field",
    "im6": "a train at a station", "im7": "a plate of food with broccoli",
}
KINDS = ("clip", "owlvit", "siglip2")
LOADERS = {"clip": load_clip, "owlvit": load_owlvit, "siglip2": load_siglip2}
BANK = 5
SEED = 3


def _write(kind, out_dir, seed=0, **sizes):
    if kind == "clip":
        return write_tiny_clip(out_dir, seed, **sizes)
    if kind == "owlvit":
        return write_tiny_owlvit(out_dir, seed, **sizes)
    return write_tiny_siglip2(out_dir, seed, sorted(CAPTIONS.values()), **sizes)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: _write(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def losses(folders):
    return {kind: LOADERS[kind]({"source": str(folders[kind]), "bank_size": BANK}, CAPTIONS, SEED)
            for kind in KINDS}


def _images(n, seed=0, size=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _ids_with_a_banked_caption(loss):
    """Three image ids, the first of which has its caption in the bank (masked), the others not."""
    banked = [i for i, c in CAPTIONS.items() if c in loss.bank]
    free = [i for i, c in CAPTIONS.items() if c not in loss.bank]
    return [banked[0], free[0], free[1]]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_output_gradients_equal_single_image_autograd(losses, kind):
    loss = losses[kind]
    ids = _ids_with_a_banked_caption(loss)
    images = _images(3)
    feats = FeatureExtractor(loss, loss.layers, pooling="mean", backprop_target="output",
                             projection="none").backprop(images, ids)
    for b in range(3):
        _, grads = single_image_output_grads(loss, images[b:b + 1], ids[b:b + 1])
        for n, g in grads.items():
            assert g.abs().max() > 0
            # batched vs single-image matmuls differ in float32 summation order only: measured at most
            # 8.4e-7 of the gradient's largest entry over the three tiny models
            ref = g.mean(1)[0]
            torch.testing.assert_close(feats[n][b], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _library_logits(loss, images, texts):
    """The library's own image-text logits (B, T) (scale, and SigLIP's bias, applied by the model)."""
    if loss.kind == "clip":
        tok = loss.text.tokenizer(texts, padding=True, return_tensors="pt")
    elif loss.kind == "owlvit":
        tok = loss.text.tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
    else:  # SigLIP2: lowercased, right-padded to 64 positions, no attention mask
        tok = loss.text.tokenizer([t.lower() for t in texts], padding="max_length", max_length=64, return_tensors="pt")
        tok.pop("attention_mask")
    with torch.no_grad():
        return loss.model(**tok, pixel_values=loss.plain_view(images)).logits_per_image.double()


@pytest.mark.parametrize("kind", KINDS)
def test_the_loss_equals_the_formula_on_the_library_logits(losses, kind):
    loss = losses[kind]
    ids = _ids_with_a_banked_caption(loss)
    images = _images(3, seed=1)
    with torch.no_grad():
        got, owner = loss(images, ids)
    assert owner.tolist() == [0, 1, 2]
    own = [CAPTIONS[i] for i in ids]
    logits = _library_logits(loss, images, own + loss.bank)
    for b in range(3):
        # column b is the own caption; a bank caption equal to it is left out
        negatives = [logits[b, 3 + j].item() for j, c in enumerate(loss.bank) if c != own[b]]
        assert len(negatives) == (BANK - 1 if b == 0 else BANK)
        z = logits[b, b].item()
        if kind == "siglip2":
            expected = math.log1p(math.exp(-z)) + sum(math.log1p(math.exp(n)) for n in negatives)
        else:
            expected = math.log(math.exp(z) + sum(math.exp(n) for n in negatives)) - z
        assert got[b].item() == pytest.approx(expected, rel=1e-5)
    assert loss.log_k == pytest.approx(math.log(BANK + 1))
    assert loss.last_target_entropy is None


@pytest.mark.parametrize("kind", KINDS)
def test_ten_evenly_spaced_blocks_are_the_vision_encoder_layers_in_forward_order(tmp_path, kind):
    loss = load_vision_language(kind, {"source": str(_write(kind, tmp_path, vision_layers=13)), "bank_size": BANK},
                                CAPTIONS, SEED)
    called = []
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: called.append(n))
             for n, m in loss.network.named_modules() if type(m).__name__.endswith("EncoderLayer")]
    with torch.no_grad():
        loss.network(loss.plain_view(_images(1)))
    for h in hooks:
        h.remove()
    assert loss.blocks == called and len(called) == 13  # the vision tower only: no text layers
    assert loss.layers == [called[i] for i in (0, 1, 3, 4, 5, 7, 8, 9, 11, 12)]
    assert loss.layer_depths == pytest.approx([i / 12 for i in (0, 1, 3, 4, 5, 7, 8, 9, 11, 12)])
    assert loss.layers == evenly_spaced(called)


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_checkpoint_or_tokenizer_names_the_key(tmp_path, folders, kind):
    with pytest.raises(FileNotFoundError, match=rf"models\.{kind}\.source.*download"):
        LOADERS[kind]({"source": str(tmp_path / "absent"), "bank_size": BANK}, CAPTIONS, SEED)
    with pytest.raises(FileNotFoundError, match=r"models\.my_clip\.source"):
        LOADERS[kind]({"source": "no-such-org/no-such-model", "bank_size": BANK}, CAPTIONS, SEED,
                      key="models.my_clip.source")
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for f in ("config.json", "model.safetensors"):
        (weights_only / f).write_bytes((folders[kind] / f).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        LOADERS[kind]({"source": str(weights_only), "bank_size": BANK}, CAPTIONS, SEED)


@pytest.mark.parametrize("kind", KINDS)
def test_patch_tokens_follow_the_cls_token_of_clip_and_owlvit_only(losses, kind):
    loss = losses[kind]
    ex = FeatureExtractor(loss, loss.layers[:1], backprop_target="output", tokens="patches")
    outs = []
    hook = dict(loss.network.named_modules())[loss.layers[0]].register_forward_hook(lambda m, a, o: outs.append(o))
    feats = ex.forward(_images(2))
    hook.remove()
    n_patches = (32 // 8) ** 2
    assert ex.n_prefix == (0 if kind == "siglip2" else 1) and outs[0].shape[1] == ex.n_prefix + n_patches
    torch.testing.assert_close(feats[loss.layers[0]], outs[0][:, ex.n_prefix:].mean(1))


def test_siglip2_text_is_lowercased_right_padded_to_its_positions_and_unmasked(losses, monkeypatch):
    text = losses["siglip2"].text
    seen = {}
    tokenizer, features = text.tokenizer, text.model.get_text_features

    def recording_tokenizer(texts, **kwargs):
        seen.update(texts=texts, **kwargs)
        return tokenizer(texts, **kwargs)

    def recording_features(input_ids, attention_mask):
        seen.update(shape=tuple(input_ids.shape), mask=attention_mask)
        return features(input_ids=input_ids, attention_mask=attention_mask)

    monkeypatch.setattr(text, "tokenizer", recording_tokenizer)
    monkeypatch.setattr(text.model, "get_text_features", recording_features)
    text(["A Giraffe IN a field"])
    assert seen["texts"] == ["a giraffe in a field"] and seen["padding"] == "max_length"
    assert seen["padding_side"] == "right" and seen["shape"] == (1, 64) and seen["mask"] is None


def test_siglip2_refuses_a_checkpoint_of_another_class(folders):
    with pytest.raises(ValueError, match="CLIPModel.*fixed-resolution"):
        load_siglip2({"source": str(folders["clip"]), "bank_size": BANK}, CAPTIONS, SEED)


def test_a_bank_larger_than_the_captions_is_a_clear_error(folders):
    with pytest.raises(ValueError, match=r"bank_size=9.*8 unique"):
        load_clip({"source": str(folders["clip"]), "bank_size": 9}, CAPTIONS, SEED)


@pytest.mark.parametrize("kind", KINDS)
def test_the_loss_depends_on_the_image_and_on_its_caption(folders, losses, kind):
    loss = losses[kind]
    image_id = next(i for i, c in CAPTIONS.items() if c not in loss.bank)
    images = _images(2, seed=2)
    ex = FeatureExtractor(loss, loss.layers, backprop_target="output", projection="none")
    grads = ex.backprop(images[:1], [image_id])
    base = ex.last_losses.clone()
    ex.backprop(images[1:], [image_id])
    assert not torch.allclose(ex.last_losses, base, rtol=1e-4)
    other = dict(CAPTIONS, **{image_id: "a wooden boat on a quiet lake"})
    recaptioned = LOADERS[kind]({"source": str(folders[kind]), "bank_size": BANK}, other, SEED)
    recaptioned.bank = loss.bank  # the same negatives: only the own caption differs
    recaptioned.bank_embeddings = loss.bank_embeddings
    ex2 = FeatureExtractor(recaptioned, loss.layers, backprop_target="output", projection="none")
    grads2 = ex2.backprop(images[:1], [image_id])
    assert not torch.allclose(ex2.last_losses, base, rtol=1e-4)
    for n in loss.layers:
        assert not torch.allclose(grads2[n], grads[n], rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_the_tiny_model_blocks_differ(losses, kind):
    loss = losses[kind]
    ex = FeatureExtractor(loss, loss.layers, backprop_target="output", projection="none")
    images, ids = _images(4, seed=4), ["im0", "im1", "im2", "im3"]
    fwd, bwd = ex.forward(images), ex.backprop(images, ids)
    for signal in (fwd, bwd):
        x = [signal[n] - signal[n].mean(0) for n in loss.layers]  # image-by-image variation at each block
        # measured: consecutive blocks differ by >= 0.19 of their norm, first vs last cosine <= 0.85
        for a, b in zip(x, x[1:]):
            assert (a - b).norm() > 0.1 * a.norm()  # consecutive chosen blocks are not near-identical
        assert torch.nn.functional.cosine_similarity(x[0].flatten(), x[-1].flatten(), dim=0) < 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_two_builds_with_the_same_seed_give_identical_losses(tmp_path, kind):
    images, ids = _images(3, seed=5), ["im0", "im4", "im6"]
    out = []
    for run in ("a", "b"):
        loss = LOADERS[kind]({"source": str(_write(kind, tmp_path / run, seed=7)), "bank_size": BANK}, CAPTIONS, SEED)
        with torch.no_grad():
            out.append(loss(images, ids)[0])
    assert torch.equal(out[0], out[1])


def test_the_caption_bank_is_a_seeded_draw_from_the_sorted_unique_captions():
    captions = dict(CAPTIONS, dup="a bowl of fruit")
    bank = caption_bank(captions, 4, seed=0)
    pool = sorted(set(CAPTIONS.values()))
    assert bank == [pool[i] for i in np.random.default_rng(0).choice(len(pool), 4, replace=False)]
    assert caption_bank(dict(reversed(list(captions.items()))), 4, seed=0) == bank  # order of the table is irrelevant
    assert caption_bank(captions, 4, seed=1) != bank
    with pytest.raises(ValueError, match="bank_size=0"):
        caption_bank(captions, 0, seed=0)


def test_the_clip_tokenizer_from_open_clip_bpe_tokenizes_like_open_clip(folders):
    ours = clip_bpe_tokenizer()
    saved = transformers.AutoTokenizer.from_pretrained(folders["clip"], local_files_only=True)
    reference = open_clip.tokenizer.SimpleTokenizer()
    for caption in [*CAPTIONS.values(), "Don't   STOP—naïve café, 3.5 km!!", "ice_cream & hot-dogs"]:
        expected = [reference.sot_token_id, *reference.encode(caption), reference.eot_token_id]
        assert ours(caption)["input_ids"] == expected
        assert saved(caption)["input_ids"] == expected


def test_the_tiny_siglip2_tokenizer_lowercases_and_ends_with_eos(folders):
    tok = transformers.AutoTokenizer.from_pretrained(folders["siglip2"], local_files_only=True)
    ids = tok("A Giraffe in a field")["input_ids"]
    assert ids == tok("a giraffe in a field")["input_ids"] and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids


def test_owlvit_loads_the_shared_weights_of_a_detection_checkpoint(folders, losses):
    detector = transformers.OwlViTForObjectDetection.from_pretrained(folders["owlvit"], local_files_only=True)
    shared = detector.owlvit.state_dict()
    loaded = losses["owlvit"].model.state_dict()
    assert loaded.keys() == shared.keys()
    assert all(torch.equal(loaded[k], shared[k]) for k in shared)


def test_clip_text_encoder_gives_normalised_clip_text_embeddings(folders, losses):
    encode = clip_text_encoder(str(folders["clip"]))
    texts = ["a photo of a dog", "a photo of a tabby cat sleeping"]
    emb = encode(texts)
    model = losses["clip"].model
    tok = losses["clip"].text.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.get_text_features(**tok).pooler_output
    assert emb.shape == (2, 32) and not emb.requires_grad
    torch.testing.assert_close(emb, ref / ref.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"models\.clip\.source"):
        clip_text_encoder("/nonexistent/clip")
