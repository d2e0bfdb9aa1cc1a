"""Evaluation reads an image folder as pre-training does (m3ae.data.sources.ImageFolderSource)."""
import pytest
import torch

from m3ae.data import DataError, EvalTransform, ShapesDataset
from m3ae.evaluation import load_labelled, make_loader


def test_image_folder_nested_other_suffixes_captions_and_bad_files(tmp_path):
    root, shapes = tmp_path / "folder", ShapesDataset(3, seed=0)
    (root / "a" / "nested").mkdir(parents=True)
    (root / "b").mkdir()
    # Evaluation's own reader used to miss all of these: a sub-folder, .bmp and .tif.
    shapes[0]["image"].save(root / "a" / "nested" / "0.png")
    shapes[1]["image"].save(root / "a" / "1.bmp")
    shapes[2]["image"].save(root / "b" / "2.tif")
    (root / "b" / "2.txt").write_text("  a caption\n  beside it ")
    (root / "b" / "3.jpg").write_bytes(b"not a jpeg")  # counted and skipped, not a crash
    data = load_labelled(str(root), 32)
    assert data.class_names == ["a", "b"]
    assert [data.dataset[i]["caption"] for i in range(3)] == [None, None, "a caption beside it"]
    loader = make_loader(data, batch_size=8)
    (batch,) = list(loader)
    assert batch["key"] == ["a/1.bmp", "a/nested/0.png", "b/2.tif"]
    assert batch["label"].tolist() == [0, 0, 1]
    assert dict(loader.skips.skipped) == {"bad_image": 1} and loader.skips.seen == 4
    # The pixels are those of the evaluation transform on the original picture.
    want = torch.stack([EvalTransform(32)({"image": shapes[i]["image"]})["image"] for i in (1, 0, 2)])
    torch.testing.assert_close(batch["image"], want)
    # --limit takes an even stride over the classes (first and last file here).
    limited = load_labelled(str(root), 32, limit=2).dataset
    assert [limited[i]["key"] for i in range(len(limited))] == ["a/1.bmp", "b/3.jpg"]


def test_image_folder_without_classes_and_all_bad(tmp_path):
    ShapesDataset(1, seed=0)[0]["image"].save(tmp_path / "x.png")
    flat = load_labelled(str(tmp_path), 32)
    assert flat.class_names is None and next(iter(make_loader(flat)))["label"].tolist() == [-1]
    bad = tmp_path / "bad" / "c"
    bad.mkdir(parents=True)
    (bad / "y.png").write_bytes(b"")
    with pytest.raises(DataError, match="every sample read was skipped"):
        list(make_loader(load_labelled(str(tmp_path / "bad"), 32)))
