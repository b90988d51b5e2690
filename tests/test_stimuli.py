"""Demo stimuli in the real layouts, and the stimulus tables built from them."""

import hashlib

import h5py
import numpy as np
import pandas as pd
import pytest

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
