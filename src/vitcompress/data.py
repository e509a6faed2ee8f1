"""Datasets the way Hugging Face and torchvision users give them, as a torch DataLoader.

Sources (``--data``): ``demo`` (scikit-learn's digits, offline), a local image folder (one
sub-folder per class, optionally under ``train/``, ``val/`` or ``test/``), local parquet or arrow
files, a ``save_to_disk`` folder, or a Hugging Face hub dataset id. Images are preprocessed with
the model's timm data config. Unreadable images are skipped and counted, never a crash.

Splits: ``load_train_val`` gives the training split and a held-out one for top-1 (the named
validation split, else test/validation, else a fixed share of a single split: ``hold_out``).
Anything *chosen* by measuring accuracy (a plan, a threshold, a setting) is chosen on
``train_val_split(train, ...)``, a fixed random slice of the *training* split, never on the
test split: the test split only reports the final number.

Batches: ``iter_batches`` turns anything the stages accept (an ``ImageData``, an image tensor, a
DataLoader, any iterable of ``(images, labels)`` or of image tensors) into ``(images, labels)``
batches; ``make_loader`` is the one place a DataLoader is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from vitcompress.errors import DataError
from vitcompress.hub import hub_mode, offline_reason

DEMO_DATA = "demo"
# Which split to use when none is named: held-out data first.
SPLIT_PREFERENCE = ("test", "validation", "val", "valid", "train")
# load_train_val: the held-out split for top-1, in this order of preference.
VAL_PREFERENCE = ("test", "validation", "val", "valid")
# When a dataset has a single split, this share of it (at most HOLDOUT_MAX images) is held out for top-1.
HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX = 2000
_SPLIT_DIRS = {"train", "val", "valid", "validation", "test"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
_IMAGE_NAMES = ("image", "img", "images", "picture", "pixel_values")
_LABEL_NAMES = ("label", "labels", "fine_label", "target", "class", "category", "y")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DEMO_TEST_FRACTION = 0.2
_DEMO_SEED = 0


# ---- the dataset we hand to the DataLoader ---------------------------------------------------
class _ImageDataset(Dataset):
    """Items are (image tensor or None when unreadable, label); labels are -1 when unknown."""

    def __init__(self, size: int, get_image: Callable[[int], Image.Image], get_label: Callable[[int], int]):
        self.size = size
        self.get_image = get_image
        self.get_label = get_label
        self.transform: Callable[[Image.Image], torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        label = int(self.get_label(index))
        try:
            image = to_rgb(self.get_image(index))
            tensor = self.transform(image) if self.transform else _to_tensor(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None, label  # counted as skipped by the collate function
        return tensor, label


# Picklable image getters (DataLoader workers may be spawned, and lambdas do not pickle).
class _ArrayImages:
    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels

    def __call__(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index], mode="L")


class _FileImages:
    def __init__(self, files: list[Path]):
        self.files = files

    def __call__(self, index: int) -> Image.Image:
        return Image.open(self.files[index])


class _TableImages:
    def __init__(self, table: Any, column: str):
        self.table, self.column = table, column

    def __call__(self, index: int) -> Image.Image:
        return _decode_image(self.table[index][self.column])


class _Subset(Dataset):
    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.base[self.indices[index]]


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK, 16-bit ... -> 8-bit RGB."""
    image.load()  # decode now, so a truncated file fails here and is skipped
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA") and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.max() > 0 else 1.0
        image = Image.fromarray((array / peak * 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0


def collate_skipping(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack readable images; return how many were skipped as the third element."""
    kept = [(img, label) for img, label in batch if img is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([img for img, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return images, labels, skipped


@dataclass
class ImageData:
    """A dataset split ready for a DataLoader, with what we know about it."""

    dataset: Dataset
    source: str
    split: str
    splits: list[str]
    class_names: list[str] | None = None
    num_classes: int | None = None
    has_labels: bool = True
    skipped: int = 0  # unreadable images met so far by `batches`
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate (images, labels), skipping and counting unreadable images."""
        for images, labels, skipped in loader:
            self.skipped += int(skipped)
            if images.numel() > 0:
                yield images, labels


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def make_loader(
    data: ImageData,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    num_workers: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``data`` whose batches are (images, labels, skipped_count)."""
    workers = default_workers() if num_workers is None else num_workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        data.dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
    )


def iter_batches(
    data: Any,
    batch_size: int = 64,
    num_workers: int | None = None,
    *,
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images [B, C, H, W], labels [B])`` batches from any data the stages accept.

    ``data``: an ``ImageData`` (batched with ``make_loader``; unreadable images are skipped and
    counted in ``data.skipped``; ``indices`` picks which of its images, in that order), one image
    tensor ([B, C, H, W] or [C, H, W], split into ``batch_size`` batches), or a DataLoader or any
    iterable of ``(images, labels)`` batches or of image tensors (used as batched). Labels are
    ``-1`` where unknown. Raises DataError for an item that is neither.
    """
    if isinstance(data, ImageData):
        loader = make_loader(data, batch_size, sampler=list(indices) if indices is not None else None, num_workers=num_workers)
        yield from data.batches(loader)
        return
    if indices is not None:
        raise DataError("iter_batches(indices=...) needs an ImageData")
    if isinstance(data, torch.Tensor):
        images = data if data.dim() == 4 else data.unsqueeze(0)
        for batch in images.split(batch_size):
            yield batch, _unknown_labels(batch)
        return
    for item in data:
        images, labels = _batch_of(item)
        if images.numel() > 0:  # collate_skipping yields empty batches when every image was unreadable
            yield images, labels


def _batch_of(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, torch.Tensor):
        images = item if item.dim() == 4 else item.unsqueeze(0)
        return images, _unknown_labels(images)
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        images = item[0]
        if len(item) < 2 or item[1] is None:
            return images, _unknown_labels(images)
        return images, torch.as_tensor(item[1]).long().reshape(-1)
    raise DataError(f"cannot read a batch of type {type(item).__name__}: expected (images, labels) or an image tensor")


def _unknown_labels(images: torch.Tensor) -> torch.Tensor:
    return torch.full((int(images.shape[0]),), -1, dtype=torch.long)


def build_transform(data_config: dict[str, Any] | None, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval (or light training) transform from a model's data config."""
    from timm.data import create_transform

    cfg = dict(data_config or {})
    kwargs: dict[str, Any] = {
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    }
    if train:
        # Mild augmentation: fine-tuning distils from the teacher on the same view.
        return create_transform(**kwargs, is_training=True, scale=(0.5, 1.0), hflip=0.5)
    return create_transform(**kwargs, crop_pct=cfg.get("crop_pct", 0.875), crop_mode=cfg.get("crop_mode", "center"))


# ---- entry point -----------------------------------------------------------------------------
def load_data(
    source: str = DEMO_DATA,
    *,
    split: str | None = None,
    data_config: dict[str, Any] | None = None,
    train: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
    prefer: Sequence[str] = SPLIT_PREFERENCE,
) -> ImageData:
    """Open ``source`` and pick a split (``split``, else the first of ``prefer`` that exists).

    ``limit`` keeps a fixed random subset (seed 0) of that many images, so that a small sample of
    a class-sorted folder still covers every class.
    """
    if source == DEMO_DATA:
        data = _demo_data(split, prefer)
    else:
        path = Path(source).expanduser()
        if path.exists():
            data = _local_data(path, split, prefer, image_column, label_column)
        elif _HUB_ID.match(source):
            data = _hub_data(source, split, prefer, image_column, label_column)
        else:
            raise DataError(f"--data {source}: no such file or folder, and not a Hugging Face dataset id")
    data.dataset.transform = build_transform(data_config, train=train)  # type: ignore[attr-defined]
    if limit is not None and limit < len(data):
        generator = torch.Generator().manual_seed(0)
        indices = torch.randperm(len(data), generator=generator)[:limit].tolist()
        base = data.dataset
        data.dataset = _Subset(base, indices)
    if len(data) == 0:
        raise DataError(f"--data {source}: split '{data.split}' has no images")
    return data


# ---- splits, hold-outs, subsets --------------------------------------------------------------
def load_train_val(
    source: str,
    data_config: dict[str, Any],
    *,
    split: str | None = None,
    val_split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[ImageData, ImageData]:
    """The training split (``split``, default ``train``) and a held-out split for top-1
    (``val_split``, default test/validation; with a single split, a fixed 10% of it is held out,
    see ``hold_out``).

    Both use the deterministic eval preprocessing: fine-tuning augments batches itself.
    """
    columns = {"image_column": image_column, "label_column": label_column}
    prefer = ("train",) + tuple(s for s in SPLIT_PREFERENCE if s != "train")
    train = load_data(source, split=split, data_config=data_config, prefer=prefer, **columns)
    if val_split is not None:
        if val_split == train.split:
            raise DataError(f"--val-split {val_split} is the training split: hold out another split")
        return train, load_data(source, split=val_split, data_config=data_config, **columns)
    others = [s for s in VAL_PREFERENCE if s in train.splits and s != train.split]
    if others:
        return train, load_data(source, split=others[0], data_config=data_config, **columns)
    return hold_out(train, log)


def check_trainable(data: ImageData, *, num_classes: int, global_batch: int, batch_size: int) -> None:
    """Refuse, before any long work, training data that fine-tuning would fail on: fewer images
    than one global batch, or labels beyond the model's classifier."""
    if len(data) < global_batch:
        raise DataError(
            f"--data {data.source}: the training split '{data.split}' has {len(data)} images, fewer than one global "
            f"batch of {global_batch} (--batch-size {batch_size} x processes x --accum-steps): lower --batch-size"
        )
    if data.num_classes is not None and data.num_classes > num_classes:
        raise DataError(
            f"--data {data.source}: its labels go up to {data.num_classes - 1}, but the model has {num_classes} classes "
            f"(labels 0..{num_classes - 1}): use data labelled for this model, or a model with {data.num_classes} classes"
        )


def hold_out(data: ImageData, log: Callable[[str], None] = print) -> tuple[ImageData, ImageData]:
    """(the rest, the held-out part) of a dataset with a single split: ``HOLDOUT_FRACTION`` of it,
    at most ``HOLDOUT_MAX`` images, a fixed random choice (seed 0), for top-1."""
    n = len(data)
    count = min(HOLDOUT_MAX, max(1, round(n * HOLDOUT_FRACTION)))
    if n - count < 1:
        raise DataError(f"--data {data.source}: {n} image(s) are too few to both train and evaluate")
    rest, held = train_val_split(data, count, seed=0)
    log(f"{data.source} has one split ('{data.split}'): holding out {count} of its {n} images for top-1")
    return (dataclasses.replace(rest, split=f"{data.split}[holdout-rest]"),
            dataclasses.replace(held, split=f"{data.split}[holdout]"))


def train_val_split(data: ImageData, fraction_or_count: Union[float, int], seed: int = 0) -> tuple[ImageData, ImageData]:
    """(train part, validation part) of ``data``: a fixed random slice (``seed``) held out.

    ``fraction_or_count``: a share in (0, 1) or a number of images (at least 1, fewer than all).
    Use it on the *training* split for anything chosen by measuring accuracy (plans, thresholds,
    settings): choosing on the test split would make its accuracy an optimistic estimate. Both
    parts keep the images in their original order; the same seed gives the same parts.
    """
    n = len(data)
    if isinstance(fraction_or_count, float):
        if not 0.0 < fraction_or_count < 1.0:
            raise DataError(f"a validation share must lie strictly between 0 and 1, got {fraction_or_count}")
        count = max(1, round(n * fraction_or_count))
    else:
        count = int(fraction_or_count)
    if not 1 <= count < n:
        raise DataError(f"cannot hold out {count} of {n} image(s): keep at least one on each side")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = sorted(order[:count]), sorted(order[count:])
    return _subset(data, train_idx, f"{data.split}[train-part]"), _subset(data, val_idx, f"{data.split}[val-part]")


def random_subset(data: ImageData, count: int, seed: int = 0) -> ImageData:
    """A fixed random subset (``seed``) of ``count`` images of ``data``, in their original order
    (all of it when ``count`` covers it): a class-sorted folder's first images would be one class."""
    if count >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return _subset(data, sorted(order), data.split)


def _subset(data: ImageData, indices: Sequence[int], split: str) -> ImageData:
    from torch.utils.data import Subset

    return dataclasses.replace(data, dataset=Subset(data.dataset, list(indices)), split=split)


def _choose_split(available: Sequence[str], split: str | None, prefer: Sequence[str], source: str) -> str:
    if split is not None:
        if split not in available:
            raise DataError(f"--data {source}: no split '{split}'; available: {', '.join(available)}")
        return split
    for name in prefer:
        if name in available:
            return name
    return available[0]


# ---- demo: scikit-learn's digits -------------------------------------------------------------
def demo_split_indices() -> dict[str, np.ndarray]:
    """The fixed train/test split of the 1,797 digits images that the demo model was trained on."""
    from sklearn.datasets import load_digits

    count = len(load_digits().target)
    order = np.random.default_rng(_DEMO_SEED).permutation(count)
    n_test = int(round(count * _DEMO_TEST_FRACTION))
    return {"train": np.sort(order[n_test:]), "test": np.sort(order[:n_test])}


def _demo_data(split: str | None, prefer: Sequence[str]) -> ImageData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    split_name = _choose_split(["train", "test"], split, prefer, DEMO_DATA)
    indices = demo_split_indices()[split_name]
    # 8x8 images with values 0..16 -> 8-bit grayscale; the transform resizes them.
    pixels = (digits.images[indices] * (255.0 / 16.0)).round().astype(np.uint8)
    labels = digits.target[indices].astype(int)
    dataset = _ImageDataset(len(indices), _ArrayImages(pixels), labels.__getitem__)
    return ImageData(
        dataset=dataset,
        source=DEMO_DATA,
        split=split_name,
        splits=["train", "test"],
        class_names=[str(d) for d in range(10)],
        num_classes=10,
        description="demo: scikit-learn digits (8x8 grayscale, 10 classes)",
    )


# ---- local files -----------------------------------------------------------------------------
def _local_data(path: Path, split: str | None, prefer: Sequence[str], image_column: str | None, label_column: str | None) -> ImageData:
    if path.is_file():
        if path.suffix in (".parquet", ".arrow"):
            builder = path.suffix[1:]
            return _from_hf(_load_dataset(builder, data_files={"train": str(path)}), str(path), split, prefer, image_column, label_column)
        raise DataError(f"--data {path}: expected a folder, a .parquet or an .arrow file")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        import datasets

        try:
            with _quiet_datasets():
                loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"--data {path}: could not read this save_to_disk folder ({exc})") from None
        return _from_hf(loaded, str(path), split, prefer, image_column, label_column)
    for builder in ("parquet", "arrow"):
        if any(path.rglob(f"*.{builder}")):
            return _from_hf(_load_dataset(builder, data_dir=str(path)), str(path), split, prefer, image_column, label_column)
    return _image_folder(path, split, prefer)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Generating train split" bars from datasets on stderr: our stderr is notes and one-line errors."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _no_remote_code() -> dict[str, Any]:
    """Never run a hub dataset's own Python script: datasets 4+ runs none; older versions are told not to."""
    import inspect

    import datasets

    return {"trust_remote_code": False} if "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters else {}


def _load_dataset(builder: str, **kwargs: Any) -> Any:
    import datasets

    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, **kwargs, **_no_remote_code())
    except Exception as exc:
        where = kwargs.get("data_dir") or kwargs.get("data_files")
        raise DataError(f"--data {where}: could not read the {builder} files ({type(exc).__name__}: {exc})") from None


def _image_folder(path: Path, split: str | None, prefer: Sequence[str]) -> ImageData:
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = {p.name: p for p in subdirs if p.name.lower() in _SPLIT_DIRS}
    if split_dirs:
        name = _choose_split(sorted(split_dirs), split, prefer, str(path))
        root = split_dirs[name]
        splits = sorted(split_dirs)
    else:
        if split is not None:
            raise DataError(f"--data {path}: this image folder has no split folders (train/, val/, test/); omit --split")
        name, root, splits = "all", path, ["all"]
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"--data {path}: no class sub-folders found in {root}; expected ImageFolder layout "
            "(ROOT/CLASS/image.jpg, optionally ROOT/train/CLASS/image.jpg)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, cls in enumerate(classes):
        for file in sorted((root / cls).rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(file)
                labels.append(index)
    if not files:
        raise DataError(f"--data {path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    dataset = _ImageDataset(len(files), _FileImages(files), labels.__getitem__)
    return ImageData(
        dataset=dataset,
        source=str(path),
        split=name,
        splits=splits,
        class_names=classes,
        num_classes=len(classes),
        description=f"image folder {path} ({len(classes)} classes)",
    )


# ---- Hugging Face datasets -------------------------------------------------------------------
def _hub_data(dataset_id: str, split: str | None, prefer: Sequence[str], image_column: str | None, label_column: str | None) -> ImageData:
    import datasets

    with hub_mode() as online:
        try:
            with _quiet_datasets():
                loaded = datasets.load_dataset(dataset_id, **_no_remote_code())
        except Exception as exc:
            if online:
                raise DataError(f"--data {dataset_id}: could not load this hub dataset ({type(exc).__name__}: {exc})") from None
            raise DataError(
                f"--data {dataset_id}: not a local folder, and as a Hugging Face dataset it cannot be "
                f"downloaded: {offline_reason()} and it is not in the local datasets cache. "
                "Download it on a machine with network and pass a local copy (save_to_disk folder, "
                "parquet files or an image folder), or use --data demo."
            ) from None
    return _from_hf(loaded, dataset_id, split, prefer, image_column, label_column)


def _from_hf(loaded: Any, source: str, split: str | None, prefer: Sequence[str], image_column: str | None, label_column: str | None) -> ImageData:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        available = list(loaded.keys())
        name = _choose_split(available, split, prefer, source)
        table = loaded[name]
    else:
        available = [str(loaded.split) if loaded.split else "train"]
        name = _choose_split(available, split, prefer, source)
        table = loaded
    image_col = image_column or _detect_image_column(table, source)
    if image_col not in table.column_names:
        raise DataError(f"--data {source}: no column '{image_col}'; columns: {', '.join(table.column_names)}")
    label_col = label_column if label_column is not None else _detect_label_column(table)
    if label_col is not None and label_col not in table.column_names:
        raise DataError(f"--data {source}: no column '{label_col}'; columns: {', '.join(table.column_names)}")

    if isinstance(table.features[image_col], datasets.Image):
        # Decode ourselves, so that a broken image is skipped instead of raising in the loader.
        table = table.cast_column(image_col, datasets.Image(decode=False))
    class_names, labels = _labels(table, label_col)
    images = table.select_columns([image_col])
    dataset = _ImageDataset(len(table), _TableImages(images, image_col), labels.__getitem__)
    return ImageData(
        dataset=dataset,
        source=source,
        split=name,
        splits=available,
        class_names=class_names,
        num_classes=len(class_names) if class_names else None,
        has_labels=label_col is not None,
        description=f"{source} [{name}] image column '{image_col}', label column '{label_col}'",
        extra={"image_column": image_col, "label_column": label_col},
    )


def _detect_image_column(table: Any, source: str) -> str:
    import datasets

    for name, feature in table.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in _IMAGE_NAMES:
        if name in table.column_names:
            return name
    for name, feature in table.features.items():
        if isinstance(feature, dict) and "bytes" in feature or getattr(feature, "dtype", None) == "binary":
            return name
    raise DataError(
        f"--data {source}: no image column found among {', '.join(table.column_names)}; name it with --image-column"
    )


def _detect_label_column(table: Any) -> str | None:
    import datasets

    for name, feature in table.features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    for name in _LABEL_NAMES:
        if name in table.column_names:
            return name
    return None


def _labels(table: Any, label_col: str | None) -> tuple[list[str] | None, list[int]]:
    """Class names (if known) and one integer label per row (-1 when there are no labels)."""
    import datasets

    if label_col is None:
        return None, [-1] * len(table)
    feature = table.features[label_col]
    values = table[label_col]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), [int(v) for v in values]
    if values and isinstance(values[0], str):
        names = sorted(set(values))
        lookup = {n: i for i, n in enumerate(names)}
        return names, [lookup[v] for v in values]
    ints = [-1 if v is None else int(v) for v in values]
    bad = next((v for v in ints if v < -1), None)
    if bad is not None:
        raise DataError(f"label column '{label_col}' holds the label {bad}: labels must be class numbers 0, 1, ... "
                        "(or -1 for an unlabelled image); fix the column or name another with --label-column")
    known = [v for v in ints if v >= 0]
    return [str(i) for i in range(max(known) + 1)] if known else None, ints


def _decode_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    raise ValueError(f"cannot read an image from a {type(value).__name__}")
