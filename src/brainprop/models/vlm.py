"""The vision-language benchmark models (CLIP, OWL-ViT, SigLIP2) as image-wise losses.

Each image is scored against its own caption and a FIXED bank of negative captions, the same for
every image, so that its loss depends on that image (and its caption) only (paper section 2.2; the
libraries' own contrastive losses couple the images of a batch):

* ``clip``, ``owlvit``: image-to-text InfoNCE over [own caption, bank],
  ``-log softmax_j(s * <v, t_j>)`` at the own caption, ``s = exp(logit_scale)`` of the model.
* ``siglip2``: the sigmoid loss of the own pair (label +1) plus every bank pair (label -1),
  ``-sum_j log sigmoid(y_j (s * <v, t_j> + logit_bias))`` (the SigLIP loss of one image row).

``v`` and ``t_j`` are the model's normalised image and text embeddings. Text embeddings (bank and
own caption) are computed without gradient: the gradient flows through the image only. The bank:
``bank_size`` captions drawn without replacement, with the seed, from the sorted unique stimulus
captions (:func:`caption_bank`); a bank caption equal to an image's own caption is masked out of
that image's loss (it would be a false negative), so ``log_k = ln(bank_size + 1)`` is the size of
the scored set for all other images. The bank's text embeddings are computed once at construction.

``loss.network`` is the model's vision tower (``vision_model``: CLIP/OWL-ViT take its CLS output
through ``visual_projection`` in the loss; SigLIP's tower ends in its attention-pooling head);
``loss.blocks`` are all its encoder layers, found by their class (``CLIPEncoderLayer``,
``OwlViTEncoderLayer``, ``SiglipEncoderLayer``) in module order. Images are resized (square, no
crop) to the tower's ``image_size`` and normalised with the checkpoint's image-processor mean/std.

Text as each model was trained: CLIP pads to the longest caption (max 77 tokens, attention-masked,
pooled at the end-of-text token); OWL-ViT pads to its 16 text positions, as its processor does;
SigLIP2 lowercases (SigLIP2's training default), right-pads to its 64 text positions and passes no
attention mask (as big_vision trains it; the tower pools the last position).

Config entry keys (``models.<name>``):

* ``kind``: ``clip`` | ``owlvit`` | ``siglip2``.
* ``source``: hub id (read from the local Hugging Face cache) or local folder holding the model,
  its tokenizer and image processor, e.g. ``openai/clip-vit-base-patch16``,
  ``google/owlvit-base-patch32`` (a detection checkpoint: ``OwlViTModel`` loads its shared CLIP-style
  weights and ignores the detection heads ``box_head``, ``class_head``, ``layer_norm``, which
  transformers lists as UNEXPECTED keys), ``google/siglip2-base-patch16-224`` (fixed resolution:
  its config's ``model_type`` is ``siglip``, so ``AutoModel`` builds a ``SiglipModel``; the NaFlex
  ids are ``siglip2`` models and are refused).
* ``bank_size``: number of negative captions; at most the number of unique stimulus captions (a
  clear error otherwise). The paper names only "native image-text similarity"; 255 negatives (256
  scored captions per image, a CLIP-style batch) is this workflow's choice at the real scale.

The loss resizes to the tower's own input size (224 px for CLIP ViT-B/16 and SigLIP2-B/16-224,
768 px for OWL-ViT B/32, 32 px for the tiny ones): reading the stimuli at that ``image_size`` resizes
them once. Builders (:func:`load_clip`, :func:`load_owlvit`, :func:`load_siglip2`) take the entry,
the captions, the seed and the device; ``key`` names the entry's source in errors. A source folder
without tokenizer files is refused (transformers would build an empty tokenizer from it).

Tiny versions for the demo (:func:`write_tiny_clip`, :func:`write_tiny_owlvit`,
:func:`write_tiny_siglip2`): random models of the same classes, vision tower 10 layers of width 32
(2 heads, MLP 64) on 32 px images with 8 px patches, text tower 2 layers of width 32, embeddings of
dimension 32; saved with ``save_pretrained`` with their tokenizer and image processor, so the demo
runs the same loading code. CLIP and OWL-ViT use the real CLIP BPE vocabulary shipped by
``open_clip`` (:func:`clip_bpe_tokenizer`); SigLIP2's Gemma tokenizer is not available offline, so
its tiny version trains a small BPE tokenizer on the captions.
"""

from __future__ import annotations

import gzip
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brainprop.models.benchmark import BenchmarkLoss, load_offline

#: Captions per text-encoder call when embedding the bank.
TEXT_BATCH = 256


@dataclass(frozen=True)
class _Family:
    """How one vision-language family is loaded, tokenised and scored."""

    what: str  # names the weights in errors
    model_class: str  # transformers class that loads the checkpoint
    layer_class: str  # class of the vision encoder's residual blocks
    objective: str  # "infonce" | "sigmoid"
    padding: str | bool  # tokenizer padding
    text_mask: bool  # whether the text tower gets the attention mask
    lowercase: bool
    n_prefix: int  # CLS tokens before the patch tokens


FAMILIES = {
    "clip": _Family("CLIP (e.g. openai/clip-vit-base-patch16)", "CLIPModel", "CLIPEncoderLayer", "infonce",
                    True, True, False, 1),
    "owlvit": _Family("OWL-ViT (e.g. google/owlvit-base-patch32)", "OwlViTModel", "OwlViTEncoderLayer", "infonce",
                      "max_length", True, False, 1),
    "siglip2": _Family("SigLIP2 (e.g. google/siglip2-base-patch16-224)", "AutoModel", "SiglipEncoderLayer", "sigmoid",
                       "max_length", False, True, 0),
}


def caption_bank(captions: Mapping[str, str], size: int, seed: int) -> list[str]:
    """``size`` captions drawn without replacement (seeded) from the sorted unique ``captions`` values."""
    pool = sorted(set(captions.values()))
    if not 0 < size <= len(pool):
        raise ValueError(f"bank_size={size}: the bank is drawn from the {len(pool)} unique stimulus captions; "
                         f"set bank_size between 1 and {len(pool)}")
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=size, replace=False)]


def encoder_blocks(network: torch.nn.Module, layer_class: type) -> list[str]:
    """Names of every ``layer_class`` module of ``network``, in module (= forward) order."""
    return [name for name, module in network.named_modules() if isinstance(module, layer_class)]


class TextEncoder:
    """Normalised text embeddings (n, d) of a vision-language model's text tower, without gradient,
    with the text preprocessing of its family (``padding``, ``text_mask``, ``lowercase``)."""

    def __init__(self, model, tokenizer, family: _Family):
        self.model, self.tokenizer, self.family = model, tokenizer, family
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def tokens(self, texts: Sequence[str]) -> dict:
        texts = [t.lower() for t in texts] if self.family.lowercase else list(texts)
        return self.tokenizer(texts, padding=self.family.padding, truncation=True, max_length=self.max_length,
                              padding_side="right", return_tensors="pt")

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), TEXT_BATCH):
            tok = self.tokens(texts[start:start + TEXT_BATCH])
            mask = tok["attention_mask"].to(device) if self.family.text_mask else None
            emb = self.model.get_text_features(input_ids=tok["input_ids"].to(device), attention_mask=mask).pooler_output
            out.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(out)


class VisionLanguageLoss(BenchmarkLoss):
    """Image-wise caption loss of a vision-language model against a fixed negative-caption bank.

    Parameters
    ----------
    model : a loaded ``CLIPModel``, ``OwlViTModel`` or ``SiglipModel`` (eval mode is set here).
    tokenizer : its tokenizer.
    mean, std : its image normalisation (3 floats each).
    kind : ``clip`` | ``owlvit`` | ``siglip2`` (see :data:`FAMILIES`).
    captions : {image_id: caption} of every stimulus (own captions and the bank's pool).
    bank_size : number of negative captions; seed : draws them.
    """

    def __init__(self, model, tokenizer, mean: Sequence[float], std: Sequence[float], kind: str,
                 captions: Mapping[str, str], bank_size: int, seed: int):
        super().__init__(captions)
        if kind not in FAMILIES:
            raise ValueError(f"vision-language kind must be one of {sorted(FAMILIES)}, got {kind!r}")
        self.kind, family = kind, FAMILIES[kind]
        self.model = model.eval()
        self.network = model.vision_model
        self.network.num_prefix_tokens = family.n_prefix  # read by FeatureExtractor(tokens="patches")
        layer_class = getattr(sys.modules[type(model).__module__], family.layer_class)
        self.blocks = encoder_blocks(self.network, layer_class)
        self.image_size = int(model.config.vision_config.image_size)
        self.mean, self.std = list(mean), list(std)
        self.objective = family.objective
        self.text = TextEncoder(model, tokenizer, family)
        self.bank = caption_bank(self.captions, bank_size, seed)
        self.bank_embeddings = self.text(self.bank)  # (bank_size, d), once
        self.log_k = math.log(bank_size + 1)

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, d) normalised image embeddings of a preprocessed batch, with gradient."""
        pooled = self.network(pixel_values=pixels).pooler_output
        projection = getattr(self.model, "visual_projection", None)  # CLIP, OWL-ViT; SigLIP's tower ends in its head
        return F.normalize(pooled if projection is None else projection(pooled), dim=-1)

    def logits(self, images_uint8: torch.Tensor, image_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, 1 + bank_size) of each image against [own caption, bank], and the mask of the
        bank captions that equal the image's own caption (False at column 0)."""
        own = self.caption(image_ids)
        v = self.image_embeddings(self.plain_view(images_uint8))
        cosines = torch.cat([(v * self.text(own)).sum(1, keepdim=True), v @ self.bank_embeddings.T], dim=1)
        logits = self.model.logit_scale.exp() * cosines
        if self.objective == "sigmoid":
            logits = logits + self.model.logit_bias
        same = torch.tensor([[False] + [c == b for b in self.bank] for c in own], device=logits.device)
        return logits, same

    def __call__(self, images_uint8: torch.Tensor, image_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, same = self.logits(images_uint8, image_ids)
        if self.objective == "infonce":
            losses = -torch.log_softmax(logits.masked_fill(same, -math.inf), dim=1)[:, 0]
        else:
            labels = torch.full_like(logits, -1.0)
            labels[:, 0] = 1.0
            losses = -(F.logsigmoid(labels * logits) * (~same)).sum(1)
        return losses, torch.arange(len(image_ids), device=losses.device)


def _load_tokenizer(source: str, what: str, key: str, vocab_size: int):
    """The tokenizer at ``source``; refused when far smaller than the text tower's vocabulary.

    A folder without tokenizer files makes transformers build an empty default tokenizer (e.g. a
    CLIPTokenizer of 2 tokens) instead of failing, which would silently embed every caption alike.
    """
    from transformers import AutoTokenizer

    tokenizer = load_offline(AutoTokenizer.from_pretrained, source, f"{what} tokenizer", key)
    if len(tokenizer) < vocab_size // 2:
        raise FileNotFoundError(f"{key}={source!r}: its tokenizer has {len(tokenizer)} tokens for a text tower of "
                                f"{vocab_size}; the tokenizer files (tokenizer.json, or vocab.json and merges.txt) "
                                f"are missing: download them with the model")
    return tokenizer


def _image_normalisation(source: str, what: str, key: str) -> tuple[list[float], list[float]]:
    from transformers import AutoImageProcessor

    processor = load_offline(AutoImageProcessor.from_pretrained, source, f"{what} image processor", key)
    return list(processor.image_mean), list(processor.image_std)


def load_vision_language(kind: str, cfg: Mapping, captions: Mapping[str, str], seed: int, device=None,
                         key: str | None = None) -> VisionLanguageLoss:
    """The :class:`VisionLanguageLoss` of a ``models.<name>`` entry (``source``, ``bank_size``), offline.

    ``key`` names the entry's source in errors (default ``models.<kind>.source``).
    """
    import transformers

    family = FAMILIES[kind]
    key = key or f"models.{kind}.source"
    source = str(cfg["source"])
    loader = getattr(transformers, family.model_class).from_pretrained
    model = load_offline(loader, source, family.what, key, dtype=torch.float32)
    if kind == "siglip2" and not isinstance(model, transformers.SiglipModel):
        raise ValueError(f"{key}={source!r} loads a {type(model).__name__}; the siglip2 loss needs a fixed-resolution "
                         f"checkpoint (model_type 'siglip', e.g. google/siglip2-base-patch16-224), not a NaFlex one")
    tokenizer = _load_tokenizer(source, family.what, key, model.config.text_config.vocab_size)
    mean, std = _image_normalisation(source, family.what, key)
    if device is not None:
        model = model.to(device)
    return VisionLanguageLoss(model, tokenizer, mean, std, kind, captions, int(cfg["bank_size"]), seed)


def load_clip(cfg: Mapping, captions: Mapping[str, str], seed: int, device=None, key: str | None = None):
    """CLIP's image-to-text InfoNCE loss (see :func:`load_vision_language`)."""
    return load_vision_language("clip", cfg, captions, seed, device, key)


def load_owlvit(cfg: Mapping, captions: Mapping[str, str], seed: int, device=None, key: str | None = None):
    """OWL-ViT's image-to-text InfoNCE loss (see :func:`load_vision_language`)."""
    return load_vision_language("owlvit", cfg, captions, seed, device, key)


def load_siglip2(cfg: Mapping, captions: Mapping[str, str], seed: int, device=None, key: str | None = None):
    """SigLIP2's sigmoid image-text loss (see :func:`load_vision_language`)."""
    return load_vision_language("siglip2", cfg, captions, seed, device, key)


def clip_text_encoder(source: str, device=None, key: str = "models.clip.source") -> TextEncoder:
    """``encode(texts) -> (n, d)`` normalised CLIP text embeddings (no gradient) of the CLIP at ``source``."""
    from transformers import CLIPModel

    what = "CLIP (e.g. openai/clip-vit-base-patch16)"
    model = load_offline(CLIPModel.from_pretrained, str(source), what, key, dtype=torch.float32).eval()
    if device is not None:
        model = model.to(device)
    tokenizer = _load_tokenizer(str(source), what, key, model.config.text_config.vocab_size)
    return TextEncoder(model, tokenizer, FAMILIES["clip"])


# --- tiny versions for the demo -------------------------------------------------------------------

#: Sizes of the tiny vision-language models (vision tower, text tower, embedding).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=10, num_attention_heads=2,
                   image_size=32, patch_size=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_PROJECTION = 32


def clip_bpe_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP's tokenizer (``CLIPTokenizer``) built from the BPE vocabulary that ``open_clip`` ships.

    Vocabulary as CLIP's ``SimpleTokenizer`` defines it: the 256 byte symbols, the same with the
    end-of-word mark ``</w>``, the first 48894 merges, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, pad_token=pad_token)


def _save(model, tokenizer, processor, out_dir) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _tiny_vision(vision_layers: int) -> dict:
    return dict(TINY_VISION, num_hidden_layers=vision_layers)


def _tiny_image_processor(cls, mean, std):
    size = TINY_VISION["image_size"]
    return cls(size={"height": size, "width": size}, image_mean=mean, image_std=std)


def _write_tiny_clip_like(out_dir, seed: int, vision_layers: int, names: tuple[str, str, str], pad_token: str,
                          text_positions: int) -> Path:
    """A tiny random CLIP-style model (transformers class names: config, model, image processor) with the
    real CLIP BPE tokenizer, saved like a hub checkpoint."""
    import transformers
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    config_cls, model_cls, processor_cls = (getattr(transformers, n) for n in names)
    tokenizer = clip_bpe_tokenizer(pad_token=pad_token)
    text = dict(TINY_TEXT, vocab_size=len(tokenizer), max_position_embeddings=text_positions,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config_cls(text_config=text, vision_config=_tiny_vision(vision_layers),
                                     projection_dim=TINY_PROJECTION))
    processor = _tiny_image_processor(processor_cls, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    return _save(model, tokenizer, processor, out_dir)


def write_tiny_clip(out_dir: str | os.PathLike, seed: int, vision_layers: int = 10) -> Path:
    """A tiny random ``CLIPModel`` with the real CLIP tokenizer, saved like a hub checkpoint."""
    return _write_tiny_clip_like(out_dir, seed, vision_layers, ("CLIPConfig", "CLIPModel", "CLIPImageProcessor"),
                                 "<|endoftext|>", 77)


def write_tiny_owlvit(out_dir: str | os.PathLike, seed: int, vision_layers: int = 10) -> Path:
    """A tiny random ``OwlViTForObjectDetection`` (the layout of the real detection checkpoints); OWL-ViT pads
    with "!" (id 0), pools at the highest id and has 16 text positions."""
    return _write_tiny_clip_like(out_dir, seed, vision_layers,
                                 ("OwlViTConfig", "OwlViTForObjectDetection", "OwlViTImageProcessor"), "!", 16)


def train_caption_tokenizer(captions: Sequence[str], vocab_size: int = 512):
    """A small lowercasing BPE tokenizer trained on ``captions`` that appends ``<eos>`` (like Gemma's for SigLIP2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(list(captions), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def write_tiny_siglip2(out_dir: str | os.PathLike, seed: int, captions: Sequence[str], vision_layers: int = 10) -> Path:
    """A tiny random ``SiglipModel`` (the class google/siglip2-base-patch16-224 resolves to) with a
    tokenizer trained on ``captions``; logit scale and bias at SigLIP's initialisation (ln 10, -10)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tokenizer = train_caption_tokenizer(captions)
    # SigLIP's image embedding is the vision tower's width: the text head projects to it
    text = dict(TINY_TEXT, vocab_size=len(tokenizer), max_position_embeddings=64,
                projection_size=TINY_VISION["hidden_size"],
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=_tiny_vision(vision_layers)))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    processor = _tiny_image_processor(SiglipImageProcessor, [0.5] * 3, [0.5] * 3)
    return _save(model, tokenizer, processor, out_dir)
