"""Stimulus sets: the embedded demo generator and the per-dataset stimulus tables.

The demo writes images in the real layouts of the two brain datasets:

* THINGS-like: ``images_meg/<concept>/<concept>_NNs.jpg`` (training images),
  ``images_test_meg/<concept>_NNs.jpg`` (test images, repeated in MEG) and
  ``images_catch_meg/catchNNN.jpg`` (catch images, never analysed).
* NSD-like: ``nsd_stimuli.hdf5`` (dataset ``imgBrick``, uint8 RGB, N x H x W x 3,
  row = ``nsdId``) with a partial ``nsd_stim_info_merged.csv`` (image columns only;
  the NSD simulator adds the per-subject design columns).

Each demo image carries a concept and a caption (``captions.csv``) because the
benchmark losses need captions. Images have structure at several levels so a
model trained on them develops a hierarchy:

* low level: colour palette of object and background, texture orientation and frequency;
* mid level: object shape (disc, square, triangle, cross, ring, bar), scale, position;
* high level: the concept = (superordinate colour family, shape, texture kind), with
  concepts grouped into superordinate categories that share shape families.

A stimulus table (Parquet, one row per image) is the model side's index of a dataset:
``image_id`` (THINGS: file stem; NSD: ``nsd{nsdId:05d}``), ``dataset``, ``source``
(path relative to the stimulus root, or ``nsd_stimuli.hdf5``), ``hdf5_row`` (-1 for
files), ``concept``, ``caption``, ``split``, and for NSD ``cocoId``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from brainprop.utils import get_logger

log = get_logger(__name__)

TABLE_COLUMNS = ["image_id", "dataset", "source", "hdf5_row", "concept", "caption", "split"]

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar")
PALETTES = {  # colour family -> (object rgb, background rgb), both in [0, 1]
    "red": ((0.85, 0.15, 0.12), (0.25, 0.35, 0.45)),
    "green": ((0.15, 0.75, 0.25), (0.45, 0.30, 0.35)),
    "blue": ((0.15, 0.30, 0.90), (0.50, 0.45, 0.25)),
    "yellow": ((0.95, 0.85, 0.15), (0.20, 0.25, 0.40)),
}
TEXTURES = ("striped", "dotted", "plain")


def demo_concepts(n_concepts: int) -> list[tuple[str, str, str]]:
    """Return ``n_concepts`` distinct (colour, shape, texture) triples in a fixed, interleaved order."""
    all_triples = list(itertools.product(PALETTES, SHAPES, TEXTURES))
    if n_concepts > len(all_triples):
        raise ValueError(f"stimuli.n_concepts={n_concepts} exceeds the {len(all_triples)} demo concepts available")
    # A fixed permutation (not the config seed: concepts are names, not random draws) so small
    # demos still span colours, shapes and textures.
    order = np.random.default_rng(2026).permutation(len(all_triples))
    return [all_triples[i] for i in order[:n_concepts]]


def concept_name(colour: str, shape: str, texture: str) -> str:
    """THINGS-style concept name (underscores inside, like ``ice_cream``)."""
    return f"{colour}_{texture}_{shape}"


def caption_for(colour: str, shape: str, texture: str, scale: float, rng: np.random.Generator) -> str:
    size = "small" if scale < 0.28 else "large"
    where = rng.choice(["in the centre", "on the left", "on the right", "near the top", "near the bottom"])
    tex = {"plain": "plain", "striped": "striped", "dotted": "dotted"}[texture]
    return f"a {size} {tex} {colour} {shape} {where} on a textured background"


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    if shape == "disc":
        return u**2 + v**2 < r**2
    if shape == "ring":
        d = np.sqrt(u**2 + v**2)
        return (d < r) & (d > 0.55 * r)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.85 * r
    if shape == "triangle":
        return (v > -0.7 * r) & (v < 0.9 * r - 1.6 * np.abs(u))
    if shape == "cross":
        return ((np.abs(u) < 0.3 * r) & (np.abs(v) < r)) | ((np.abs(v) < 0.3 * r) & (np.abs(u) < r))
    if shape == "bar":
        return (np.abs(u) < 1.1 * r) & (np.abs(v) < 0.35 * r)
    raise ValueError(f"unknown shape {shape!r}")


def render_image(colour: str, shape: str, texture: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Draw one image (uint8, size x size x 3) of a concept; return it with the object's scale."""
    from PIL import Image

    obj_rgb, bg_rgb = (np.asarray(c) for c in PALETTES[colour])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size - 0.5
    # background: low-frequency coloured noise around the palette's background colour
    low = rng.normal(size=(3, 5, 5))
    bg = np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize((size, size), Image.BICUBIC)) for c in low], -1)
    img = bg_rgb + 0.06 * bg
    # object: shape at a random position, scale and rotation
    scale = rng.uniform(0.18, 0.38)
    cx, cy = rng.uniform(-0.22, 0.22, size=2)
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    mask = _shape_mask(shape, u, v, scale)
    if texture == "striped":
        freq = rng.uniform(10, 16)
        pattern = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * freq * (u + 0.3 * v)))
    elif texture == "dotted":
        freq = rng.uniform(8, 12)
        pattern = ((np.sin(2 * np.pi * freq * u) * np.sin(2 * np.pi * freq * v)) > 0.3).astype(float)
    else:
        pattern = np.ones_like(u)
    shade = obj_rgb * (0.55 + 0.45 * pattern[..., None]) + rng.normal(0, 0.03, size=3)
    img = np.where(mask[..., None], shade, img)
    img = img + rng.normal(0, 0.02, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), float(scale)


def _save_jpg(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def generate_things_demo(root: str | os.PathLike, n_concepts: int, images_per_concept: int,
                         n_test_concepts: int, n_catch: int, image_size: int, seed: int) -> pd.DataFrame:
    """Write a THINGS-like image tree under ``root`` and return its captions table.

    Training images ``images_meg/<concept>/<concept>_NNs.jpg`` (NN = 01..images_per_concept),
    one test image per concept for the first ``n_test_concepts`` concepts
    (``images_test_meg/<concept>_{NN+1}s.jpg``) and ``n_catch`` catch images.
    Returns a DataFrame (image_id, concept, caption) also written to ``root/captions.csv``.
    """
    root = Path(root)
    if n_test_concepts > n_concepts:
        raise ValueError(f"stimuli.things.n_test_concepts={n_test_concepts} > n_concepts={n_concepts}")
    rng = np.random.default_rng([seed, 1])
    rows = []
    for c, (colour, shape, texture) in enumerate(demo_concepts(n_concepts)):
        name = concept_name(colour, shape, texture)
        n_img = images_per_concept + (1 if c < n_test_concepts else 0)
        for k in range(1, n_img + 1):
            img, scale = render_image(colour, shape, texture, image_size, rng)
            stem = f"{name}_{k:02d}s"
            rel = f"images_test_meg/{stem}.jpg" if k > images_per_concept else f"images_meg/{name}/{stem}.jpg"
            _save_jpg(root / rel, img)
            rows.append((stem, name, caption_for(colour, shape, texture, scale, rng)))
    for k in range(1, n_catch + 1):
        # catch images: a distinctive target (no concept), never analysed
        img = (rng.uniform(size=(image_size, image_size, 3)) * 255).astype(np.uint8)
        _save_jpg(root / f"images_catch_meg/catch{k:03d}.jpg", img)
    table = pd.DataFrame(rows, columns=["image_id", "concept", "caption"])
    table.to_csv(root / "captions.csv", index=False)
    log.info("THINGS demo: %d concepts, %d images, %d catch images under %s", n_concepts, len(table), n_catch, root)
    return table


def generate_nsd_demo(root: str | os.PathLike, n_images: int, n_concepts: int, n_shared: int,
                      image_size: int, seed: int) -> pd.DataFrame:
    """Write ``nsd_stimuli.hdf5`` (``imgBrick``), a partial ``nsd_stim_info_merged.csv`` and ``captions.csv``.

    Concepts are drawn uniformly from the first ``n_concepts`` demo concepts; the first
    ``n_shared`` nsdIds are flagged ``shared1000``. Returns the stim-info table.
    """
    import h5py

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    concepts = demo_concepts(n_concepts)
    brick = np.empty((n_images, image_size, image_size, 3), dtype=np.uint8)
    info, captions = [], []
    for nsd_id in range(n_images):
        colour, shape, texture = concepts[rng.integers(n_concepts)]
        brick[nsd_id], scale = render_image(colour, shape, texture, image_size, rng)
        coco_id = 100000 + 7 * nsd_id
        info.append((coco_id, "train2017" if nsd_id % 10 else "val2017", nsd_id, nsd_id < n_shared))
        captions.append((f"nsd{nsd_id:05d}", concept_name(colour, shape, texture),
                         caption_for(colour, shape, texture, scale, rng)))
    tmp = root / "nsd_stimuli.hdf5.tmp"
    with h5py.File(tmp, "w") as fh:
        fh.create_dataset("imgBrick", data=brick)
    os.replace(tmp, root / "nsd_stimuli.hdf5")
    stim_info = pd.DataFrame(info, columns=["cocoId", "cocoSplit", "nsdId", "shared1000"])
    stim_info.to_csv(root / "nsd_stim_info_merged.csv")
    pd.DataFrame(captions, columns=["image_id", "concept", "caption"]).to_csv(root / "captions.csv", index=False)
    log.info("NSD demo: %d images (%d shared) in %s", n_images, n_shared, root / "nsd_stimuli.hdf5")
    return stim_info


def _read_captions(path: str | os.PathLike | None) -> pd.DataFrame | None:
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"captions file {path} does not exist")
    if path.suffix == ".json":  # COCO annotations: {"annotations": [{"image_id": cocoId, "caption": ...}]}
        ann = json.loads(path.read_text())["annotations"]
        df = pd.DataFrame(ann)[["image_id", "caption"]].rename(columns={"image_id": "cocoId"})
        return df.groupby("cocoId", as_index=False).first()
    df = pd.read_csv(path)
    missing = {"image_id", "caption"} - set(df.columns)
    if missing:
        raise ValueError(f"captions file {path} lacks columns {sorted(missing)} (expected image_id, caption[, concept])")
    return df


def things_database_path(meg_path: str) -> str:
    """Where a THINGS-MEG image path lies in the THINGS database layout (``<concept>/<file>``).

    ``images_meg/<concept>/<file>`` and ``images_test_meg/<file>`` (any prefix before those
    folders) map to ``<concept>/<file>``, the concept being the file stem before its last
    underscore (THINGS concepts contain underscores); other paths are returned unchanged.
    """
    parts = str(meg_path).replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        if part in ("images_meg", "images_test_meg") and len(parts) > i + 1:
            name = parts[-1]
            return f"{Path(name).stem.rsplit('_', 1)[0]}/{name}"
    return str(meg_path)


def _meg_images(root: Path, sample_attributes) -> pd.DataFrame:
    """The exp/test images named by THINGS-MEG sample attributes, located in either layout under ``root``."""
    from brainprop.brain.meg import read_sample_attributes

    files = [sample_attributes] if isinstance(sample_attributes, (str, os.PathLike)) else list(sample_attributes)
    attrs = pd.concat([read_sample_attributes(f) for f in files], ignore_index=True)
    shown = attrs[attrs.trial_type != "catch"].drop_duplicates("source").sort_values("source", kind="stable")
    rows, missing = [], []
    for meg_path, image_id, concept, split in zip(shown.source, shown.image_id, shown.concept, shown.split):
        found = next((c for c in (meg_path, things_database_path(meg_path)) if (root / c).is_file()), None)
        if found is None:
            missing.append(f"{meg_path} (or {things_database_path(meg_path)})")
        rows.append((image_id, "things", found, -1, concept, "", split))
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(shown)} images THINGS-MEG shows (sample attributes "
                                f"{files[0]}{' ...' if len(files) > 1 else ''}) are missing under {root} in both "
                                f"layouts (images_meg/, images_test_meg/ or the THINGS database's <concept>/<file>), "
                                f"e.g. {missing[:5]}")
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def things_stimulus_table(image_root: str | os.PathLike, captions: str | os.PathLike | None = None,
                          sample_attributes=None) -> pd.DataFrame:
    """Index the THINGS images, in the THINGS-MEG layout or the THINGS database layout.

    Layouts under ``image_root``: THINGS-MEG's ``images_meg/<concept>/*.jpg`` and
    ``images_test_meg/*.jpg``, or the licensed THINGS database as extracted,
    ``<concept>/<file>.jpg`` (:func:`things_database_path` maps one onto the other).

    With ``sample_attributes`` (THINGS-MEG ``sourcedata/sample_attributes_P{n}.csv``, one
    path or several) the table holds exactly the exp/test images they name, each ``source``
    pointing at the file that exists in either layout, ``split`` from the MEG folder
    (``images_test_meg`` = test). Without them the ``images_meg``/``images_test_meg`` folders
    are globbed; the database layout then raises, since it holds every THINGS image and does
    not mark the test images. Catch images are never part of the table. Without a captions
    file the caption is ``"a photo of a <concept>"``. Image ids are file stems; concepts are
    the stem before its last underscore.

    Raises
    ------
    FileNotFoundError
        No images in either layout, or images named by the sample attributes missing
        (a few are listed).
    """
    root = Path(image_root)
    if sample_attributes is not None:
        table = _meg_images(root, sample_attributes)
    else:
        train = sorted(root.glob("images_meg/*/*.jpg"))
        test = sorted(root.glob("images_test_meg/*.jpg"))
        if not train:
            database = sorted(root.glob("*/*.jpg"))
            layout = (f"{root} looks like the THINGS database layout (<concept>/<file>.jpg, e.g. "
                      f"{database[0].relative_to(root)}): give the THINGS-MEG sample attributes so the table "
                      "holds the images THINGS-MEG shows, with their split") if database else (
                      f"no training images found: expected {root}/images_meg/<concept>/<concept>_NN<letter>.jpg "
                      "or the THINGS database layout <concept>/<concept>_NN<letter>.jpg")
            raise FileNotFoundError(layout)
        rows = [(p.stem, "things", str(p.relative_to(root)), -1, p.stem.rsplit("_", 1)[0], "", split)
                for split, paths in (("train", train), ("test", test)) for p in paths]
        table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    dup = table.image_id[table.image_id.duplicated()]
    if len(dup):
        raise ValueError(f"duplicate THINGS image ids under {root}: {sorted(set(dup))[:10]}")
    cap = _read_captions(captions)
    if cap is None:
        table["caption"] = "a photo of a " + table.concept.str.replace("_", " ")
    else:
        table = _merge_captions(table, cap.set_index("image_id").caption, captions)
    return table


def nsd_stimulus_table(hdf5_path: str | os.PathLike, stim_info_csv: str | os.PathLike,
                       captions: str | os.PathLike | None = None, subjects: list[int] | None = None) -> pd.DataFrame:
    """Index the NSD stimuli: one row per nsdId (restricted to images shown to ``subjects`` when the
    stim-info file has ``subjectS`` columns). Captions come from a demo ``captions.csv`` or a COCO
    annotations JSON (first caption per cocoId)."""
    import h5py

    info = pd.read_csv(stim_info_csv)
    missing = {"nsdId", "cocoId"} - set(info.columns)
    if missing:
        raise ValueError(f"{stim_info_csv} lacks columns {sorted(missing)}")
    with h5py.File(hdf5_path, "r") as fh:
        if "imgBrick" not in fh:
            raise ValueError(f"{hdf5_path} has no dataset 'imgBrick'")
        n_rows = fh["imgBrick"].shape[0]
    if info.nsdId.max() >= n_rows:
        raise ValueError(f"{stim_info_csv} lists nsdId {info.nsdId.max()} but {hdf5_path} has {n_rows} images")
    cols = [f"subject{s}" for s in subjects or []]
    if cols and all(c in info.columns for c in cols):
        info = info[(info[cols] == 1).any(axis=1)]
    table = pd.DataFrame({
        "image_id": [f"nsd{i:05d}" for i in info.nsdId],
        "dataset": "nsd",
        "source": Path(hdf5_path).name,
        "hdf5_row": info.nsdId.to_numpy(dtype=np.int64),
        "concept": "",
        "caption": "",
        "split": np.where(info["shared1000"].astype(bool), "shared", "train") if "shared1000" in info else "train",
        "cocoId": info.cocoId.to_numpy(dtype=np.int64),
    })
    cap = _read_captions(captions)
    if cap is not None and "cocoId" in cap.columns:
        table = _merge_captions(table.set_index("cocoId", drop=False), cap.set_index("cocoId").caption, captions)
        table = table.reset_index(drop=True)
    elif cap is not None:
        table = _merge_captions(table, cap.set_index("image_id").caption, captions)
        if "concept" in cap.columns:
            table["concept"] = table.image_id.map(cap.set_index("image_id").concept)
    else:
        log.warning("no NSD captions given: caption column left empty (caption-based losses will refuse it)")
    return table.reset_index(drop=True)


def _merge_captions(table: pd.DataFrame, captions: pd.Series, path) -> pd.DataFrame:
    key = table.index if table.index.name == "cocoId" else table.image_id
    mapped = pd.Series(key.map(captions), index=table.index)
    missing = table.image_id[mapped.isna().to_numpy()]
    if len(missing):
        raise ValueError(f"captions file {path} has no caption for {len(missing)} images, e.g. {list(missing[:10])}")
    table = table.copy()
    table["caption"] = mapped.to_numpy()
    return table


class StimulusDataset:
    """Torch-style dataset over a stimulus table: item -> ``(uint8 tensor (3, h, w), image_id)``.

    Images are decoded and converted to RGB, then resized (bilinear, antialiased) either to
    ``image_size`` x ``image_size`` (so batches stack; feature extraction) or, with
    ``max_short_side``, down to that shorter side with the aspect ratio kept (training: bounds the
    decode and multi-crop work on large images; smaller images are left as they are). With
    neither, images keep their own size. The model's own preprocessing (crops, normalisation)
    happens later. An unreadable image raises ``ValueError`` naming the file.
    """

    def __init__(self, table: pd.DataFrame, root: str | os.PathLike, image_size: int | None = None,
                 max_short_side: int | None = None):
        if image_size is not None and max_short_side is not None:
            raise ValueError("StimulusDataset: give image_size (square) or max_short_side, not both")
        self.table = table.reset_index(drop=True)
        self.root = Path(root)
        self.image_size = None if image_size is None else int(image_size)
        self.max_short_side = None if max_short_side is None else int(max_short_side)
        self._h5 = None

    def __len__(self) -> int:
        return len(self.table)

    def _load(self, row) -> np.ndarray:
        if row.hdf5_row >= 0:
            import h5py

            if self._h5 is None:
                self._h5 = h5py.File(self.root / row.source, "r")["imgBrick"]
            return np.asarray(self._h5[int(row.hdf5_row)])
        from PIL import Image

        path = self.root / row.source
        if not path.exists():
            raise FileNotFoundError(f"stimulus image {path} (image_id {row.image_id}) is missing")
        try:
            with Image.open(path) as im:
                if self.max_short_side is not None:  # JPEG: decode at a reduced scale >= the target (cheap)
                    im.draft("RGB", (self.max_short_side, self.max_short_side))
                return np.array(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or corrupt files
            raise ValueError(f"cannot decode image {path} (image_id {row.image_id}): {err}") from err

    def _target_size(self, h: int, w: int) -> tuple[int, int]:
        if self.image_size is not None:
            return self.image_size, self.image_size
        if self.max_short_side is not None and min(h, w) > self.max_short_side:
            scale = self.max_short_side / min(h, w)
            return max(self.max_short_side, round(h * scale)), max(self.max_short_side, round(w * scale))
        return h, w

    def __getitem__(self, i: int):
        import torch
        import torch.nn.functional as F

        row = self.table.iloc[i]
        img = torch.from_numpy(self._load(row)).permute(2, 0, 1)
        size = self._target_size(*img.shape[-2:])
        if img.shape[-2:] != size:
            img = F.interpolate(img[None].float(), size=size, mode="bilinear",
                                antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        return img, str(row.image_id)


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def pretraining_table(root: str | os.PathLike | None, image_list: str | os.PathLike | None = None) -> pd.DataFrame:
    """Index a pretraining image set (ImageFolder layout ``<class>/<file>.JPEG``, e.g. ImageNet-1k ``train/``).

    Parameters
    ----------
    root : the folder (``data.pretraining_images``), scanned recursively for files with an extension of
        :data:`IMAGE_EXTENSIONS` (any case), sorted by relative path.
    image_list : optional text file (``data.pretraining_list``), one path per line relative to ``root``
        (blank lines and ``#`` comments skipped); it replaces the scan, in its own order.

    Returns
    -------
    DataFrame in the stimulus-table format (:data:`TABLE_COLUMNS`): ``image_id`` = relative path without
    extension, ``dataset`` = "pretraining", ``source`` = relative path, ``hdf5_row`` = -1,
    ``concept`` = first folder (the class; "" for files at the top), ``caption`` = "", ``split`` = "train".

    Raises
    ------
    FileNotFoundError : ``root`` is unset or missing, or a listed file is missing (naming it).
    ValueError : no image found, or duplicate image ids.
    """
    if not root:
        raise FileNotFoundError("data.pretraining_images is not set: it must name the pretraining image folder "
                                "(ImageFolder layout <class>/<file>.JPEG), or set training.images: stimuli")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.pretraining_images: pretraining image folder {root} does not exist")
    if image_list:
        lines = [ln.strip() for ln in Path(image_list).read_text().splitlines()]
        rel = [ln for ln in lines if ln and not ln.startswith("#")]
        missing = [r for r in rel if not (root / r).is_file()]
        if missing:
            raise FileNotFoundError(f"data.pretraining_list {image_list}: {len(missing)} listed files are missing "
                                    f"under {root}, e.g. {root / missing[0]}")
    else:
        rel = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                     if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not rel:
        raise ValueError(f"no images under data.pretraining_images {root} (extensions {IMAGE_EXTENSIONS})")
    paths = [Path(r) for r in rel]
    table = pd.DataFrame({
        "image_id": [p.with_suffix("").as_posix() for p in paths],
        "dataset": "pretraining",
        "source": [p.as_posix() for p in paths],
        "hdf5_row": np.full(len(paths), -1, dtype=np.int64),
        "concept": [p.parts[0] if len(p.parts) > 1 else "" for p in paths],
        "caption": "",
        "split": "train",
    })
    dup = table.image_id[table.image_id.duplicated()]
    if len(dup):
        raise ValueError(f"duplicate pretraining image ids (same path, other extension): {sorted(set(dup))[:10]}")
    return table


def build_pretraining_table(root: str | os.PathLike | None, image_list: str | os.PathLike | None,
                            out: str | os.PathLike) -> pd.DataFrame:
    """Rule entry point: index the pretraining images (:func:`pretraining_table`) and write the Parquet table."""
    from brainprop.utils import save_parquet_atomic

    table = pretraining_table(root, image_list)
    save_parquet_atomic(table, out)
    log.info("pretraining table: %d images in %d classes under %s", len(table), table.concept.nunique(), root)
    return table


def build_stimulus_table(dataset: str, root: str | os.PathLike, out: str | os.PathLike,
                         captions: str | os.PathLike | None = None, subjects: list[int] | None = None,
                         sample_attributes=None) -> pd.DataFrame:
    """Rule entry point: index ``dataset`` (``things`` or ``nsd``) under ``root`` and write the Parquet table.

    For THINGS, ``sample_attributes`` (THINGS-MEG CSVs, optional) select the images
    THINGS-MEG shows in either image layout (:func:`things_stimulus_table`).

    For NSD, ``root`` holds ``nsd_stimuli.hdf5``; its stim-info CSV is taken from the demo folder
    or, for real data, from ``<nsd root>/nsddata/experiments/nsd/`` (``root`` is then
    ``<nsd root>/nsddata_stimuli/stimuli/nsd``).
    """
    from brainprop.utils import save_parquet_atomic

    root = Path(root)
    if dataset == "things":
        table = things_stimulus_table(root, captions, sample_attributes or None)
    elif dataset == "nsd":
        info = root / "nsd_stim_info_merged.csv"
        if not info.exists():  # real layout: nsddata_stimuli/stimuli/nsd -> nsddata/experiments/nsd
            info = root.parents[2] / "nsddata" / "experiments" / "nsd" / "nsd_stim_info_merged.csv"
        table = nsd_stimulus_table(root / "nsd_stimuli.hdf5", info, captions, subjects)
    else:
        raise ValueError(f"unknown dataset {dataset!r} (expected 'things' or 'nsd')")
    save_parquet_atomic(table, out)
    log.info("stimulus table %s: %d images (%s)", dataset, len(table), table.split.value_counts().to_dict())
    return table
