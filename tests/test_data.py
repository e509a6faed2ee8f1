from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vitcompress.data import (
    collate_skipping,
    hold_out,
    iter_batches,
    load_data,
    load_train_val,
    make_loader,
    random_subset,
    to_rgb,
    train_val_split,
)
from vitcompress.errors import DataError

CFG = {"input_size": [3, 16, 16], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"}


def _rgb(seed: int, size: int = 20) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _odd_images() -> dict[str, Image.Image]:
    base = _rgb(0)
    return {
        "gray.png": base.convert("L"),
        "rgba.png": base.convert("RGBA"),
        "palette.gif": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"),
        "sixteen.png": Image.fromarray((np.arange(400, dtype=np.uint16).reshape(20, 20) * 100)),
        "plain.jpg": base,
    }


def _write_class_folders(root: Path, classes: dict[str, int], broken: int = 0) -> None:
    for c, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            _rgb(10 * c + i).save(folder / f"{i}.png")
    for i in range(broken):
        (root / next(iter(classes)) / f"broken{i}.jpg").write_bytes(b"not an image at all")


def _drain(data) -> tuple[int, list[int]]:
    labels: list[int] = []
    for images, y in data.batches(make_loader(data, 3, num_workers=0)):
        assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
        labels += y.tolist()
    return len(labels), labels


def test_odd_modes_become_rgb() -> None:
    for name, image in _odd_images().items():
        rgb = to_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == (20, 20), name


def test_image_folder_with_odd_and_broken_images(tmp_path: Path) -> None:
    folder = tmp_path / "cls_a"
    folder.mkdir()
    for name, image in _odd_images().items():
        image.save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    buffer = io.BytesIO()
    _rgb(5, 64).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (tmp_path / "cls_b").mkdir()
    _rgb(9).save(tmp_path / "cls_b" / "x.webp")
    (tmp_path / "cls_b" / "notes.txt").write_text("ignored: not an image extension")

    data = load_data(str(tmp_path), data_config=CFG, prefer=("test",))
    assert data.class_names == ["cls_a", "cls_b"] and data.split == "all"
    assert len(data) == 9
    count, labels = _drain(data)
    assert count == 7 and data.skipped == 2  # broken + truncated skipped and counted
    assert sorted(labels) == [0] * 6 + [1]


def test_image_folder_with_workers(tmp_path: Path) -> None:
    _write_class_folders(tmp_path, {"a": 3, "b": 3}, broken=1)
    data = load_data(str(tmp_path), data_config=CFG)
    seen = sum(len(y) for _, y in data.batches(make_loader(data, 2, num_workers=2)))
    assert seen == 6 and data.skipped == 1


def test_split_folders(tmp_path: Path) -> None:
    _write_class_folders(tmp_path / "train", {"a": 2, "b": 2})
    _write_class_folders(tmp_path / "val", {"a": 1, "b": 1})
    data = load_data(str(tmp_path), data_config=CFG)
    assert data.split == "val" and data.splits == ["train", "val"] and len(data) == 2
    assert len(load_data(str(tmp_path), split="train", data_config=CFG)) == 4
    with pytest.raises(DataError, match="no split 'test'; available: train, val"):
        load_data(str(tmp_path), split="test", data_config=CFG)


def test_flat_folder_rejects_split_and_empty_folder(tmp_path: Path) -> None:
    _write_class_folders(tmp_path / "flat", {"a": 1})
    with pytest.raises(DataError, match="no split folders"):
        load_data(str(tmp_path / "flat"), split="train", data_config=CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(str(tmp_path / "empty"), data_config=CFG)


def _hf_table(n: int, image_col: str = "image", label_col: str = "label", names: list[str] | None = None) -> datasets.Dataset:
    features = datasets.Features({image_col: datasets.Image(), label_col: datasets.ClassLabel(names=names or ["x", "y", "z"])})
    return datasets.Dataset.from_dict({image_col: [_rgb(i) for i in range(n)], label_col: [i % 3 for i in range(n)]}, features=features)


def test_parquet_folder_with_splits(tmp_path: Path) -> None:
    _hf_table(6).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    _hf_table(4).to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    data = load_data(str(tmp_path), data_config=CFG)
    assert data.split == "test" and set(data.splits) == {"train", "test"}
    assert data.class_names == ["x", "y", "z"] and data.num_classes == 3
    count, labels = _drain(data)
    assert count == 4 and labels == [0, 1, 2, 0]
    assert len(load_data(str(tmp_path), split="train", data_config=CFG)) == 6


def test_single_parquet_file_with_custom_columns_and_string_labels(tmp_path: Path) -> None:
    buffers = []
    for i in range(5):
        b = io.BytesIO()
        _rgb(i).save(b, format="PNG")
        buffers.append({"bytes": b.getvalue(), "path": None})
    buffers[2] = {"bytes": b"broken", "path": None}
    table = datasets.Dataset.from_dict({"pic": buffers, "kind": ["cat", "dog", "cat", "cat", "dog"]})
    path = tmp_path / "data.parquet"
    table.to_parquet(str(path))
    detected = load_data(str(path), data_config=CFG)  # a {bytes, path} struct column is an image column
    assert detected.extra["image_column"] == "pic" and not detected.has_labels
    data = load_data(str(path), data_config=CFG, image_column="pic", label_column="kind")
    assert data.class_names == ["cat", "dog"]
    count, labels = _drain(data)
    assert count == 4 and data.skipped == 1 and labels == [0, 1, 0, 1]
    with pytest.raises(DataError, match="no column 'nope'"):
        load_data(str(path), data_config=CFG, image_column="nope")


def test_table_without_images(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": [0, 1]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match="no image column found among x, label; name it with --image-column"):
        load_data(str(tmp_path / "t.parquet"), data_config=CFG)


def test_save_to_disk_folder(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": _hf_table(3), "validation": _hf_table(2)}).save_to_disk(str(tmp_path / "ds"))
    data = load_data(str(tmp_path / "ds"), data_config=CFG)
    assert data.split == "validation" and len(data) == 2
    assert _drain(data)[0] == 2


def test_hub_id_offline_error() -> None:
    with pytest.raises(DataError, match="cannot be downloaded: offline mode is on.*--data demo"):
        load_data("someorg/some-dataset", data_config=CFG)


def test_missing_path_that_is_not_a_hub_id() -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_data("./does/not/exist/", data_config=CFG)


def test_demo_data_splits_and_limit() -> None:
    test = load_data("demo", data_config=CFG)
    train = load_data("demo", split="train", data_config=CFG)
    assert test.split == "test" and len(test) + len(train) == 1797 and len(test) == 359
    small = load_data("demo", split="train", data_config=CFG, limit=50)
    again = load_data("demo", split="train", data_config=CFG, limit=50)
    assert len(small) == 50
    x1, y1 = small.dataset[7]
    x2, y2 = again.dataset[7]
    assert torch.equal(x1, x2) and y1 == y2  # the subset is fixed
    assert len({small.dataset[i][1] for i in range(50)}) > 5  # random subset covers many classes


def test_transform_follows_data_config() -> None:
    cfg = {**CFG, "input_size": [3, 24, 24], "mean": [0.0] * 3, "std": [1.0] * 3}
    image, _ = load_data("demo", data_config=cfg).dataset[0]
    assert image.shape == (3, 24, 24) and 0.0 <= image.min() and image.max() <= 1.0


def test_collate_all_broken_batch() -> None:
    images, labels, skipped = collate_skipping([(None, 1), (None, 2)])
    assert images.numel() == 0 and labels.numel() == 0 and skipped == 2


# ---- splits, hold-outs, subsets --------------------------------------------------------------
def quiet(message: str) -> None:
    pass


def test_train_and_test_splits_of_demo() -> None:
    train, val = load_train_val("demo", CFG, log=quiet)
    assert (train.split, val.split) == ("train", "test")
    with pytest.raises(DataError, match="training split"):
        load_train_val("demo", CFG, val_split="train", log=quiet)


def test_single_split_folder_holds_out_a_fixed_part(tmp_path: Path) -> None:
    _write_class_folders(tmp_path, {"cat": 10, "dog": 10})
    messages: list[str] = []
    train, val = load_train_val(str(tmp_path), CFG, log=messages.append)
    assert (len(train), len(val)) == (18, 2)
    assert (train.split, val.split) == ("all[holdout-rest]", "all[holdout]")
    assert set(train.dataset.indices).isdisjoint(val.dataset.indices)
    again, _ = load_train_val(str(tmp_path), CFG, log=quiet)
    assert again.dataset.indices == train.dataset.indices
    assert any("holding out 2" in m for m in messages)
    with pytest.raises(DataError, match="too few"):
        hold_out(random_subset(train, 1), quiet)


def test_train_val_split_is_a_fixed_slice_of_the_training_split() -> None:
    train = load_data("demo", split="train", data_config=CFG, limit=40)
    part, val = train_val_split(train, 0.25)
    assert (len(part), len(val)) == (30, 10)
    assert (part.split, val.split) == ("train[train-part]", "train[val-part]")
    assert sorted(part.dataset.indices + val.dataset.indices) == list(range(40))
    assert part.dataset.indices == sorted(part.dataset.indices)  # original order kept
    assert train_val_split(train, 0.25)[1].dataset.indices == val.dataset.indices  # same seed, same slice
    assert train_val_split(train, 0.25, seed=1)[1].dataset.indices != val.dataset.indices
    assert len(train_val_split(train, 7)[1]) == 7  # a count works too
    for bad in (0.0, 1.0, 0, 40):
        with pytest.raises(DataError):
            train_val_split(train, bad)


def test_random_subset() -> None:
    data = load_data("demo", split="test", data_config=CFG)
    subset = random_subset(data, 12)
    assert len(subset) == 12 and subset.dataset.indices == sorted(subset.dataset.indices)
    assert random_subset(data, 12).dataset.indices == subset.dataset.indices
    assert random_subset(data, len(data) + 1) is data


# ---- the one batch iterator ------------------------------------------------------------------
def test_iter_batches_reads_every_kind_of_data() -> None:
    x = torch.randn(5, 3, 16, 16)
    labels = torch.arange(5)
    batches = list(iter_batches(x, 2))
    assert [b.shape[0] for b, _ in batches] == [2, 2, 1] and all((lab == -1).all() for _, lab in batches)
    (one, lab), = iter_batches(x[0], 2)
    assert one.shape == (1, 3, 16, 16) and lab.tolist() == [-1]
    pairs = list(iter_batches([(x[:3], labels[:3]), (x[3:], [3, 4])]))
    assert torch.equal(torch.cat([lab for _, lab in pairs]), labels)
    images_only = list(iter_batches([x[:2], x[2]]))
    assert [b.shape[0] for b, _ in images_only] == [2, 1]
    empty = [(torch.empty(0), torch.empty(0, dtype=torch.long)), (x[:1], None)]
    kept = list(iter_batches(empty))
    assert len(kept) == 1 and kept[0][1].tolist() == [-1]
    with pytest.raises(DataError, match="cannot read a batch of type str"):
        list(iter_batches(["not an image"]))


def test_iter_batches_of_image_data(tmp_path: Path) -> None:
    _write_class_folders(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    data = load_data(str(tmp_path), data_config=CFG)
    batches = list(iter_batches(data, 4, num_workers=0))
    assert sum(len(lab) for _, lab in batches) == 6 and data.skipped == 1
    picked = list(iter_batches(data, 4, num_workers=0, indices=[5, 0]))
    assert torch.cat([lab for _, lab in picked]).tolist() == [1, 0]
    loader = make_loader(data, 3, num_workers=0)
    assert sum(len(lab) for _, lab in iter_batches(loader)) == 6  # a DataLoader's (images, labels, skipped)
    with pytest.raises(DataError, match="needs an ImageData"):
        list(iter_batches([torch.randn(1, 3, 16, 16)], indices=[0]))
