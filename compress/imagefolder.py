"""Image folders (``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``) read as datasets; CIFAR-10 written as one.

``--data imagefolder:ROOT`` (``compress.datasets``) reads through ``image_folder``: any format PIL
reads, decoded to RGB and resized to ``size`` squares as each item is read (in DataLoader workers).
``write_imagefolder`` writes the first CIFAR-10 images as PNGs (``bench/make_imagefolder.py``), a
folder whose pixels read back equal CIFAR-10's.

torch is imported inside the functions that use it, as in ``compress.datasets``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.stream import first_line

if TYPE_CHECKING:
    import torch


class DecodedImages:
    """The images of an image folder split as (uint8 CxHxW tensor, label), RGB, resized to ``size`` squares.

    A plain map-style dataset (no torch import needed to build it); ``targets`` gives the labels
    without decoding a pixel. An unreadable file raises ``DataError`` naming it.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], size: int) -> None:
        self.samples = samples
        self.classes = classes
        self.targets = [t for _, t in samples]
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import numpy as np
        import torch
        from PIL import Image

        from compress.data import DataError

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
                if img.size != (self.size, self.size):
                    img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except Exception as e:  # PIL raises OSError, UnidentifiedImageError, ValueError, SyntaxError...
            raise DataError(f"cannot read image {path}: {first_line(e)}") from e
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), label


def _class_folders(split: Path, root: Path) -> list[str]:
    from compress.data import DataError

    if not split.is_dir():
        raise DataError(f"image folder {root} has no {split.name}/ folder: put each class's images in "
                        f"{root}/{split.name}/<class>/")
    classes = sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{split} has no class folders: put each class's images in {split}/<class>/")
    return classes


def _image_folder_split(split: Path, root: Path, size: int) -> DecodedImages:
    """One split's files and labels (nothing decoded yet); a class folder without images is an error."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from compress.data import DataError

    _class_folders(split, root)
    folder = ImageFolder(str(split), allow_empty=True)
    counts = [0] * len(folder.classes)
    for _, t in folder.samples:
        counts[t] += 1
    empty = [c for c, k in zip(folder.classes, counts, strict=True) if not k]
    if empty:
        raise DataError(f"class folder {split / empty[0]} has no images "
                        f"({len(empty)} of {len(counts)} classes empty; extensions read: {', '.join(IMG_EXTENSIONS)})")
    return DecodedImages(folder.samples, folder.classes, size)


def image_folder(arg: str, size: int) -> tuple[DecodedImages, DecodedImages]:
    """The train and val splits of ``imagefolder:ROOT`` (``arg`` is ROOT); both must hold the same classes."""
    from compress.data import DataError

    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (imagefolder:ROOT reads ROOT/train/<class>/ and "
                        f"ROOT/val/<class>/)")
    train_classes, val_classes = _class_folders(root / "train", root), _class_folders(root / "val", root)
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"{root}/train and {root}/val must hold the same class folders: only in train: "
                        f"{', '.join(only_t) or '-'}; only in val: {', '.join(only_v) or '-'}")
    return _image_folder_split(root / "train", root, size), _image_folder_split(root / "val", root, size)


def write_imagefolder(out: Path, data_root: str | os.PathLike | None, n_train: int, n_val: int) -> dict[str, Any]:
    """Write the first ``n_train`` CIFAR-10 training and ``n_val`` test images as PNGs: a demo image folder.

    ``out/train/<class>/<index>.png`` and ``out/val/<class>/<index>.png``, the index zero-padded to
    five digits, so the folder reads back (classes sorted, files sorted) in CIFAR order within each
    class. PNG is lossless: at image_size 32 the pixels read back equal CIFAR-10's.
    """
    from PIL import Image

    from compress.data import CIFAR_CLASSES, load_cifar10

    if n_train < 1 or n_val < 1:
        raise ValueError(f"image counts must be >= 1, got {n_train} training and {n_val} val")
    c = load_cifar10(data_root)
    out = Path(out)
    written: dict[str, Any] = {"out": str(out)}
    for split, x, y, n in (("train", c.train_x, c.train_y, n_train), ("val", c.test_x, c.test_y, n_val)):
        if not 1 <= n <= len(x):
            raise ValueError(f"{split} image count {n} must be in [1, {len(x)}]")
        for name in CIFAR_CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        pixels = x[:n].permute(0, 2, 3, 1).numpy()
        for i in range(n):
            Image.fromarray(pixels[i]).save(out / split / CIFAR_CLASSES[int(y[i])] / f"{i:05d}.png")
        written[split] = n
    written["classes"] = len(CIFAR_CLASSES)
    return written
