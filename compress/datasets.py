"""Any image classification data: CIFAR-10, a folder of class folders, or a user's dataset factory.

One spec string names the data (``--data``), in one of three forms:

- ``cifar10``: the built-in set under ``--data-root`` / ``$COMPRESS_DATA`` (``compress.data``);
- ``imagefolder:ROOT``: ``ROOT/train/<class>/*.png`` and ``ROOT/val/<class>/*.png`` (any format PIL
  reads), decoded to RGB and resized to ``image_size`` squares in DataLoader workers
  (``compress.imagefolder``);
- ``pkg.module:function``: ``function()`` returns ``(train, test)`` datasets whose items are
  ``(image tensor CxHxW, int label)``, uint8 0..255 or float in [0, 1], e.g. ``examples/digits.py``::

      PYTHONPATH=examples python -m jobs.launch train --data digits:load --model ...

Data that fits ``max_memory_bytes`` once decoded is read once into tensors and batched on the
device by ``compress.data.BatchLoader`` (the CIFAR-10 path); larger data streams: a ``StreamLoader``
decodes and augments each epoch in worker processes. Either way, order and augmentation are a pure
function of (seed, epoch key), and evaluation runs in dataset order (stored predictions are in
test-set order).

torch is imported inside the functions that use it, so ``parse_data`` checks a spec in the CLI
before torch loads (about a second).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.imagefolder import image_folder
from compress.stream import (
    READ_BATCH,
    Batches,
    Failure,
    StreamLoader,
    default_workers,
    first_line,
    labels_of,
    raw_batches,
    read_all,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from compress.data import BatchLoader

log = logging.getLogger(__name__)

KINDS = ("cifar10", "imagefolder", "factory")
FORMS = "cifar10, imagefolder:ROOT (ROOT/train and ROOT/val, a folder per class) or package.module:function"
CIFAR_STD = (0.2470, 0.2435, 0.2616)  # of the 50,000 training images in [0, 1]
DEFAULT_IMAGE_SIZE = 32
STATS_SAMPLE = 10_000   # streamed data: training images the mean and std are computed over


def parse_data(text: str) -> tuple[str, str]:
    """The kind and argument of a data spec: ``cifar10``, ``imagefolder:ROOT`` or ``pkg.module:function``.

    Only the form is checked (no file or module is touched), so the CLI refuses a typo before it
    imports torch. E.g. ``'imagefolder:/data/pets'`` -> ``('imagefolder', '/data/pets')``.
    """
    text = text.strip()
    if text == "cifar10":
        return "cifar10", ""
    head, sep, tail = text.partition(":")
    if sep and head == "imagefolder" and tail:
        return "imagefolder", tail
    if sep and head != "imagefolder" and tail.isidentifier() and all(p.isidentifier() for p in head.split(".")):
        return "factory", text
    raise ValueError(f"data {text!r} is not a data spec: use {FORMS}")


def _parse(text: str) -> tuple[str, str]:
    """``parse_data`` for the loaders: a bad spec is a ``DataError`` (the data's one-line error type)."""
    from compress.data import DataError

    try:
        return parse_data(text)
    except ValueError as e:
        raise DataError(str(e)) from e


@dataclass(frozen=True)
class Split:
    """One split: images and labels in memory, or a dataset streamed from (then ``x`` and ``y`` are None).

    In memory, ``x`` is (N, C, H, W) uint8 (0..255) or float32 in [0, 1] and ``y`` int64 (N,); a
    streamed dataset's items are (image tensor CxHxW, int label).
    """

    x: torch.Tensor | None
    y: torch.Tensor | None
    dataset: torch.utils.data.Dataset | None = None
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.x is None or self.y is None):
            raise ValueError("a Split holds either images and labels (x, y) or a dataset, not both or neither")
        if self.x is not None and self.y is not None and len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} images but {len(self.y)} labels")

    @property
    def streamed(self) -> bool:
        return self.dataset is not None

    def __len__(self) -> int:
        return len(self.dataset) if self.streamed else len(self.x)

    def labels(self) -> torch.Tensor:
        """The int64 labels in order; a streamed split reads them once (without decoding when it can)."""
        if not self.streamed:
            return self.y
        if "labels" not in self._cache:
            self._cache["labels"] = labels_of(self.dataset)
        return self._cache["labels"]

    def subset(self, idx: torch.Tensor) -> Split:
        """The rows ``idx``, in that order (a calibration or training subset)."""
        if not self.streamed:
            return Split(self.x[idx], self.y[idx])
        from torch.utils.data import Subset

        return Split(None, None, Subset(self.dataset, [int(i) for i in idx]))


@dataclass(frozen=True)
class ImageData:
    """Both splits and what a model and a result row need to know about them."""

    train: Split
    test: Split
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) as the loaders deliver it
    mean: tuple[float, ...]            # per channel, of the training images in [0, 1]
    std: tuple[float, ...]
    kind: str                          # cifar10 | imagefolder | factory
    source: str                        # the folder or module:function read

    def describe(self) -> dict[str, Any]:
        """The columns a result row records, so a number can be traced back to the data it came from."""
        return {"data_kind": self.kind, "data_source": self.source, "data_classes": self.num_classes,
                "data_shape": "x".join(map(str, self.image_shape)),
                "data_mean": ",".join(f"{v:.6g}" for v in self.mean),
                "data_std": ",".join(f"{v:.6g}" for v in self.std),
                "data_streamed": self.train.streamed or self.test.streamed}


# --- statistics ----------------------------------------------------------------------------------

def channel_stats(batches: Iterable[torch.Tensor], name: str = "data") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of images in [0, 1], accumulated in float64 over batches.

    uint8 batches count as x / 255: a channel of 0s and 255s in equal numbers has mean 0.5, std 0.5.
    Float images outside [0, 1] are refused: a model's normalisation assumes that scale.
    """
    import torch

    from compress.data import DataError

    total = sq = None
    count = 0
    for xb in batches:
        xd = xb.to(torch.float64)
        if xb.dtype == torch.uint8:
            xd /= 255
        elif xd.numel() and (float(xd.min()) < 0 or float(xd.max()) > 1):
            raise DataError(f"{name}: float images must be in [0, 1], found values in "
                            f"[{float(xd.min()):.4g}, {float(xd.max()):.4g}] (give uint8 0..255 or scale them)")
        s, q = xd.sum(dim=(0, 2, 3)), (xd * xd).sum(dim=(0, 2, 3))
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += xd.numel() // xd.shape[1]
    if not count:
        raise DataError(f"{name}: no training images to compute the mean and std from")
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _chunks(x: torch.Tensor, size: int = 1024) -> Iterator[torch.Tensor]:
    for start in range(0, len(x), size):
        yield x[start:start + size]


# --- the three kinds (image folders are read by compress.imagefolder) ---------------------------

def _factory(spec: str) -> tuple[Any, Any]:
    """The (train, test) pair a ``pkg.module:function`` returns, its form checked."""
    from compress.data import DataError

    module_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(f"cannot import data factory module {module_name} ({first_line(e)}): it must be "
                        f"importable where the job runs, e.g. on PYTHONPATH") from e
    except Exception as e:
        raise DataError(f"importing data factory module {module_name} raised {type(e).__name__}: "
                        f"{first_line(e)}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise DataError(f"data factory module {module_name} has no function {fn_name}: it must be importable "
                        f"and define {fn_name}() returning (train, test) datasets")
    try:
        got = fn()
    except Exception as e:
        raise DataError(f"data factory {spec} raised {type(e).__name__}: {first_line(e)}") from e
    want = "a pair (train, test) of datasets whose items are (image tensor CxHxW, int label)"
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        what = f"a {type(got).__name__}" + (f" of {len(got)}" if isinstance(got, (tuple, list)) else "")
        raise DataError(f"data factory {spec} returned {what}; it must return {want}")
    for split, ds in zip(("train", "test"), got, strict=True):
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise DataError(f"data factory {spec} returned a {type(ds).__name__} as its {split} split; "
                            f"it must return {want}")
        if not len(ds):
            raise DataError(f"data factory {spec} returned an empty {split} split")
    return got[0], got[1]


def _first_image(dataset: Any, name: str) -> torch.Tensor:
    """Item 0's image, checked: its shape and dtype size the whole split."""
    from compress.data import DataError

    got = Batches(dataset, name)[(0, [0])]
    if isinstance(got, Failure):
        raise DataError(got.message)
    return got[0][0]


def _check_stats(name: str, values: tuple[float, ...], channels: int) -> None:
    from compress.data import DataError

    if len(values) != channels:
        raise DataError(f"data {name} has {len(values)} values ({','.join(map(str, values))}); the images have "
                        f"{channels} channels")


def load_data(text: str = "cifar10", root: str | os.PathLike | None = None, *, image_size: int = 0,
              mean: tuple[float, ...] = (), std: tuple[float, ...] = (), download: bool = False,
              max_memory_bytes: int = 4 * 2**30, workers: int | None = None) -> ImageData:
    """The data a spec names, checked before anything trains: one ``DataError`` line when it cannot be used.

    ``root`` is the CIFAR-10 root (``cifar10`` only); ``image_size`` the square side image folders are
    resized to (0: 32). Decoded data that fits ``max_memory_bytes`` (both splits, uint8 for image
    folders) is read once into tensors; larger data is streamed. ``mean``/``std`` default to the
    training images' own, computed once (a streamed split: over a seeded sample of 10,000).
    """
    from compress.data import CIFAR_CLASSES, DataError, load_cifar10, subset_indices

    kind, arg = _parse(text)
    if image_size < 0:
        raise DataError(f"image_size {image_size} must be >= 0 (0: {DEFAULT_IMAGE_SIZE})")
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise DataError(f"data mean ({','.join(map(str, mean))}) and std ({','.join(map(str, std))}) must be "
                        f"given together, one value per channel, std > 0")
    workers = default_workers(workers)

    if kind == "cifar10":
        if image_size not in (0, 32):
            raise DataError(f"image_size {image_size} applies to image folders; CIFAR-10 images are 32x32 (use 0)")
        from compress.models import CIFAR_MEAN

        c = load_cifar10(root, download=download)
        if mean:
            _check_stats("mean", mean, 3)
        return ImageData(Split(c.train_x, c.train_y), Split(c.test_x, c.test_y), len(CIFAR_CLASSES), (3, 32, 32),
                         tuple(mean) or CIFAR_MEAN, tuple(std) or CIFAR_STD, kind, c.source)

    if kind == "imagefolder":
        size = image_size or DEFAULT_IMAGE_SIZE
        train_ds, test_ds = image_folder(arg, size)
        shape = (3, size, size)
        per_image = 3 * size * size
        num_classes = len(train_ds.classes)
        source = str(Path(arg).expanduser())
        names = (f"image folder {source}/train", f"image folder {source}/val")
    else:
        train_ds, test_ds = _factory(arg)
        source = arg
        names = (f"data factory {arg} (train)", f"data factory {arg} (test)")
        first = _first_image(train_ds, names[0])
        if image_size and tuple(first.shape[1:]) != (image_size, image_size):
            raise DataError(f"image_size {image_size} applies to image folders; data factory {arg} gives "
                            f"{'x'.join(map(str, first.shape))} images (resize them in the factory, or use 0)")
        shape = tuple(int(s) for s in first.shape)
        per_image = first.numel() * first.element_size()
        classes = getattr(train_ds, "classes", None) or getattr(test_ds, "classes", None)
        num_classes = len(classes) if classes else 0

    in_memory = per_image * (len(train_ds) + len(test_ds)) <= max_memory_bytes
    if in_memory:
        train = Split(*read_all(train_ds, names[0], workers))
        test = Split(*read_all(test_ds, names[1], workers))
        for split, name in ((train, names[0]), (test, names[1])):
            if tuple(split.x.shape[1:]) != shape:
                raise DataError(f"{name}: images are {'x'.join(map(str, split.x.shape[1:]))}, item 0 of the "
                                f"training split is {'x'.join(map(str, shape))}; all images need one shape")
    else:
        train, test = Split(None, None, train_ds), Split(None, None, test_ds)
        log.info("%s: %s bytes decoded exceed max_memory_bytes=%s, streaming", source,
                 f"{per_image * (len(train_ds) + len(test_ds)):,}", f"{max_memory_bytes:,}")

    if not num_classes:
        num_classes = int(max(train.labels().max(), test.labels().max())) + 1
    for split, name in ((train, names[0]), (test, names[1])):
        if in_memory or kind == "imagefolder":
            labels = split.labels()
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise DataError(f"{name}: labels must be in [0, {num_classes - 1}] ({num_classes} classes), "
                                f"found {int(labels.min())}..{int(labels.max())}")

    if mean:
        _check_stats("mean", mean, shape[0])
        mean, std = tuple(mean), tuple(std)
    elif in_memory:
        mean, std = channel_stats(_chunks(train.x), names[0])
    else:
        idx = subset_indices(len(train_ds), min(len(train_ds), STATS_SAMPLE), seed=0)
        sample = raw_batches(Batches(train_ds, names[0]), idx.tolist(), READ_BATCH, workers)
        mean, std = channel_stats((xb for xb, _ in sample), names[0])
    data = ImageData(train, test, num_classes, shape, mean, std, kind, source)
    log.debug("data %s: %s training and %s test images, %s", text, f"{len(train):,}", f"{len(test):,}",
             data.describe())
    return data


# --- loaders ----------------------------------------------------------------------------------

def make_loader(split: Split, batch_size: int, device: torch.device | str = "cpu", *, train: bool = False,
                randaugment: bool = False, seed: int = 0, crop_pad: int | None = None,
                workers: int | None = None) -> BatchLoader | StreamLoader:
    """The loader of a split: ``BatchLoader`` on the device for data in memory, else a ``StreamLoader``.

    ``crop_pad`` (training only) defaults to an eighth of the image height: 4 for 32-pixel images.
    """
    from compress.augment import default_crop_pad
    from compress.data import BatchLoader

    if split.streamed:
        return StreamLoader(split.dataset, batch_size, device, train=train, crop_pad=crop_pad,
                            randaugment=randaugment, seed=seed, workers=workers)
    pad = default_crop_pad(split.x.shape[2]) if crop_pad is None else crop_pad
    return BatchLoader(split.x, split.y, batch_size, device, train=train, crop_pad=pad, randaugment=randaugment,
                       seed=seed)


# --- what a compute node must see; labels for scoring --------------------------------------------

def data_probe_for(text: str, root: str | os.PathLike | None) -> Path:
    """The file or folder a compute node must see for this data to load there.

    cifar10: its test-split file under ``root``; imagefolder: ``ROOT/val``; a factory: its module's
    source file, found without importing the module (a package above it is imported).
    """
    from compress.data import DataError, data_probe

    kind, arg = _parse(text)
    if kind == "cifar10":
        return data_probe(root)
    if kind == "imagefolder":
        return Path(arg).expanduser() / "val"
    module_name = arg.split(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as e:
        found = None
        why = first_line(e)
    else:
        why = "not found"
    if found is None or not found.origin or found.origin in ("built-in", "frozen"):
        raise DataError(f"cannot find data factory module {module_name} ({why}): it must be importable where "
                        f"the job runs, e.g. on PYTHONPATH")
    return Path(found.origin)


def load_test_labels_for(text: str, root: str | os.PathLike | None, image_size: int = 0) -> np.ndarray:
    """The test split's labels (int64, in test-set order), e.g. to score stored predictions.

    cifar10 reads only the labels (``compress.data.load_test_labels``); an image folder reads only its
    file list; a factory is called and its test split's labels read.
    """
    from compress.data import load_test_labels

    kind, arg = _parse(text)
    if kind == "cifar10":
        return load_test_labels(root)
    if kind == "imagefolder":
        return labels_of(image_folder(arg, image_size or DEFAULT_IMAGE_SIZE)[1]).numpy()
    return labels_of(_factory(arg)[1]).numpy()
