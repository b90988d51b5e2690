"""Demo stimuli in the real layouts, and the stimulus tables built from them."""

import hashlib

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from brainprop.stimuli import (StimulusDataset, build_stimulus_table, demo_concepts, generate_nsd_demo,
                               generate_things_demo, nsd_stimulus_table, things_stimulus_table)


@pytest.fixture(scope="module")
def things_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("things")
    generate_things_demo(root, n_concepts=5, images_per_concept=3, n_test_concepts=2, n_catch=2, image_size=32, seed=0)
    return root


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_things_demo_layout_and_determinism(things_root, tmp_path):
    files = _digest(things_root)
    concept = demo_concepts(5)[0]
    name = f"{concept[0]}_{concept[2]}_{concept[1]}"
    assert f"images_meg/{name}/{name}_01s.jpg" in files
    assert f"images_test_meg/{name}_04s.jpg" in files
    assert "images_catch_meg/catch002.jpg" in files
    assert sum(k.startswith("images_meg/") for k in files) == 15
    generate_things_demo(tmp_path, n_concepts=5, images_per_concept=3, n_test_concepts=2, n_catch=2,
                         image_size=32, seed=0)
    assert _digest(tmp_path) == files  # same seed, same bytes


def test_things_table(things_root):
    table = things_stimulus_table(things_root, things_root / "captions.csv")
    assert len(table) == 17 and (table.split == "test").sum() == 2
    assert table.image_id.is_unique
    row = table.iloc[0]
    assert row.image_id.rsplit("_", 1)[0] == row.concept  # concepts keep their underscores
    assert "_" in row.concept and row.caption.startswith("a ")
    assert (things_root / row.source).exists() and row.hdf5_row == -1
    default = things_stimulus_table(things_root)
    assert default.caption.iloc[0] == "a photo of a " + default.concept.iloc[0].replace("_", " ")


def test_things_table_errors(tmp_path, things_root):
    with pytest.raises(FileNotFoundError, match="images_meg"):
        things_stimulus_table(tmp_path)
    pd.DataFrame({"image_id": ["x"], "caption": ["c"]}).to_csv(tmp_path / "cap.csv", index=False)
    with pytest.raises(ValueError, match="no caption for 17 images"):
        things_stimulus_table(things_root, tmp_path / "cap.csv")


def test_nsd_demo_and_table(tmp_path):
    info = generate_nsd_demo(tmp_path, n_images=12, n_concepts=4, n_shared=3, image_size=24, seed=1)
    with h5py.File(tmp_path / "nsd_stimuli.hdf5") as fh:
        brick = fh["imgBrick"]
        assert brick.shape == (12, 24, 24, 3) and brick.dtype == np.uint8
    assert list(info.nsdId) == list(range(12))
    table = nsd_stimulus_table(tmp_path / "nsd_stimuli.hdf5", tmp_path / "nsd_stim_info_merged.csv",
                               tmp_path / "captions.csv")
    assert table.image_id.iloc[5] == "nsd00005" and table.hdf5_row.iloc[5] == 5
    assert (table.split == "shared").sum() == 3
    assert table.caption.str.len().min() > 10 and table.concept.str.len().min() > 3
    ds = StimulusDataset(table, tmp_path, image_size=16)
    img, image_id = ds[5]
    assert img.shape == (3, 16, 16) and str(img.dtype) == "torch.uint8" and image_id == "nsd00005"


def test_nsd_table_restricts_to_subjects_and_checks_rows(tmp_path):
    generate_nsd_demo(tmp_path, n_images=6, n_concepts=2, n_shared=1, image_size=8, seed=0)
    info = pd.read_csv(tmp_path / "nsd_stim_info_merged.csv", index_col=0)
    info["subject1"] = [1, 0, 1, 0, 0, 0]
    info["subject2"] = [0, 0, 1, 1, 0, 0]
    info.to_csv(tmp_path / "info.csv")
    table = nsd_stimulus_table(tmp_path / "nsd_stimuli.hdf5", tmp_path / "info.csv", subjects=[1, 2])
    assert table.image_id.tolist() == ["nsd00000", "nsd00002", "nsd00003"]
    info.loc[5, "nsdId"] = 99
    info.to_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="nsdId 99"):
        nsd_stimulus_table(tmp_path / "nsd_stimuli.hdf5", tmp_path / "bad.csv")


def test_build_stimulus_table_writes_parquet(things_root, tmp_path):
    out = tmp_path / "t" / "things.parquet"
    build_stimulus_table("things", things_root, out, captions=things_root / "captions.csv")
    assert pd.read_parquet(out).shape[0] == 17
    with pytest.raises(ValueError, match="unknown dataset"):
        build_stimulus_table("coco", things_root, out)


def test_missing_image_is_named(things_root):
    table = things_stimulus_table(things_root).iloc[:1].copy()
    table["source"] = "images_meg/none/none_01s.jpg"
    with pytest.raises(FileNotFoundError, match="none_01s.jpg"):
        StimulusDataset(table, things_root, 16)[0]


# ----------------------------------------------------------------------------- pretraining images


@pytest.fixture()
def imagefolder(tmp_path):
    """ImageFolder tree: 2 classes, mixed extensions and sizes (one portrait 90 x 60), a non-image file."""
    from PIL import Image

    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    sizes = {"n02/b.PNG": (40, 50), "n01/a.JPEG": (90, 60), "n01/c.jpg": (20, 20), "n02/sub/d.jpeg": (64, 48)}
    for rel, (h, w) in sizes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / rel)
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def test_pretraining_table_scans_sorted_and_reads_as_stimuli(imagefolder):
    from brainprop.stimuli import TABLE_COLUMNS, pretraining_table

    table = pretraining_table(imagefolder)
    assert list(table.columns) == TABLE_COLUMNS
    assert list(table.source) == ["n01/a.JPEG", "n01/c.jpg", "n02/b.PNG", "n02/sub/d.jpeg"]
    assert list(table.image_id) == ["n01/a", "n01/c", "n02/b", "n02/sub/d"]
    assert list(table.concept) == ["n01", "n01", "n02", "n02"] and (table.hdf5_row == -1).all()
    ds = StimulusDataset(table, imagefolder, max_short_side=30)
    shapes = [tuple(ds[i][0].shape) for i in range(len(ds))]
    # shorter side down to 30 with the aspect kept; the 20 x 20 image is not upscaled
    assert shapes == [(3, 45, 30), (3, 20, 20), (3, 30, 38), (3, 40, 30)]
    assert ds[1][1] == "n01/c" and ds[1][0].dtype == torch.uint8
    assert tuple(StimulusDataset(table, imagefolder)[0][0].shape) == (3, 90, 60)  # native size


def test_pretraining_list_overrides_the_scan(imagefolder, tmp_path):
    from brainprop.stimuli import pretraining_table

    listing = tmp_path / "list.txt"
    listing.write_text("# subset\nn02/b.PNG\n\nn01/a.JPEG\n")
    assert list(pretraining_table(imagefolder, listing).source) == ["n02/b.PNG", "n01/a.JPEG"]
    listing.write_text("n01/a.JPEG\nn01/gone.JPEG\n")
    with pytest.raises(FileNotFoundError, match="n01/gone.JPEG"):
        pretraining_table(imagefolder, listing)


def test_pretraining_root_errors_name_the_key(tmp_path):
    from brainprop.stimuli import build_pretraining_table

    with pytest.raises(FileNotFoundError, match=r"data.pretraining_images: .*nowhere does not exist"):
        build_pretraining_table(tmp_path / "nowhere", None, tmp_path / "t.parquet")
    with pytest.raises(FileNotFoundError, match="data.pretraining_images is not set"):
        build_pretraining_table(None, None, tmp_path / "t.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images under"):
        build_pretraining_table(tmp_path / "empty", None, tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


def test_corrupt_image_is_named(imagefolder):
    from brainprop.stimuli import pretraining_table

    table = pretraining_table(imagefolder)
    data = (imagefolder / "n02/b.PNG").read_bytes()
    (imagefolder / "n02/b.PNG").write_bytes(data[: len(data) // 2])  # truncated file
    ds = StimulusDataset(table, imagefolder, max_short_side=30)
    ds[0]
    with pytest.raises(ValueError, match=r"cannot decode image .*n02/b.PNG"):
        ds[2]
