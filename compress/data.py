"""CIFAR-10 from either official layout, held as uint8 tensors and batched on the training device.

The data root comes from ``--data-root`` or the ``COMPRESS_DATA`` environment variable and may hold
(or be) ``cifar-10-batches-bin/`` (the binary version, read here with numpy) or
``cifar-10-batches-py/`` (the python version, read through torchvision, which can download it).

The whole set is 150 MB as uint8, so it is moved to the device once; batches are cut, cropped,
flipped and RandAugmented there as whole tensors (the cifar10-airbench approach; the recipe is
``compress/augment.py``), so a GPU is never waiting on per-image Python transforms: every random
number of a training epoch is drawn at its start on the CPU and reaches the device in one copy.

Pixels leave the loader as floats in [0, 1]; the model normalises. ``BatchLoader`` takes any
in-memory (N, C, H, W) images, uint8 or float in [0, 1]; other datasets (image folders, a user's
factory) enter through ``compress.datasets``, whose streamed loader runs ``augment`` (the same
recipe, one batch at a time) in its workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress.augment import BatchRandAugment, Draws, draw_epoch
from compress.epochs import EpochLoader

log = logging.getLogger(__name__)

ENV_DATA = "COMPRESS_DATA"
BIN_DIR = "cifar-10-batches-bin"
PY_DIR = "cifar-10-batches-py"
TRAIN_SIZE = 50_000  # CIFAR-10 training images
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(ValueError):
    """The dataset cannot be found or read; the message says where it looked and how to fix it."""


@dataclass(frozen=True)
class Cifar10:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data root: the argument, else ``$COMPRESS_DATA``; never a fixed path."""
    value = root if root not in (None, "") else os.environ.get(ENV_DATA)
    if not value:
        raise DataError(f"no CIFAR-10 root given: pass --data-root DIR or set {ENV_DATA}=DIR "
                        f"(DIR holds {BIN_DIR}/ or {PY_DIR}/; with --download, it is fetched there)")
    return Path(value).expanduser()


def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of 3,073-byte records")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def _load_bin(folder: Path) -> Cifar10:
    parts = []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        f = folder / name
        if not f.exists():
            raise DataError(f"{folder} is incomplete: {name} is missing")
        parts.append(_read_bin(f))
    tx = np.concatenate([p[0] for p in parts[:5]])
    ty = np.concatenate([p[1] for p in parts[:5]])
    return Cifar10(torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(parts[5][0].copy()),
                   torch.from_numpy(parts[5][1]), str(folder))


def _load_py(root: Path, download: bool) -> Cifar10:
    # torchvision's downloader: the official archive, its md5 checked, then every pickle's md5
    from torchvision.datasets import CIFAR10

    try:
        tr = CIFAR10(str(root), train=True, download=download)
        te = CIFAR10(str(root), train=False, download=download)
    except Exception as e:  # torchvision raises RuntimeError (missing/corrupt) or URLError (offline)
        raise DataError(f"cannot read CIFAR-10 python version under {root}: {e}") from e

    def conv(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    (a, b), (c, d) = conv(tr), conv(te)
    return Cifar10(a, b, c, d, str(root / PY_DIR))


def load_cifar10(root: str | os.PathLike | None = None, download: bool = False) -> Cifar10:
    """Load both splits. ``root`` may be the folder holding a layout or the layout folder itself.

    With ``download``, a root that holds neither layout gets the python version fetched into it.
    """
    base = resolve_root(root)
    if (base / "data_batch_1.bin").exists():
        return _load_bin(base)
    if (base / BIN_DIR).is_dir():
        return _load_bin(base / BIN_DIR)
    if (base / PY_DIR).is_dir() or download:
        return _load_py(base, download)
    if base.name == PY_DIR:
        return _load_py(base.parent, download)
    raise DataError(f"CIFAR-10 not found under {base} (looked for {BIN_DIR}/ and {PY_DIR}/); pass "
                    f"--data-root DIR or set {ENV_DATA}=DIR to the folder that holds one, or add --download "
                    f"to fetch it into {base} (163 MB, checksum-verified)")


def data_probe(root: str | os.PathLike | None = None) -> Path:
    """The test-split file that ``load_cifar10`` reads under ``root`` (either layout), else ``root`` itself.

    What another machine must also have for a job there to load the data, e.g. a compute node.
    """
    base = resolve_root(root)
    for path in (base / "test_batch.bin", base / BIN_DIR / "test_batch.bin", base / PY_DIR / "test_batch",
                 base / "test_batch"):
        if path.exists():
            return path
    return base


def load_test_labels(root: str | os.PathLike | None = None) -> np.ndarray:
    """The test split's labels (int64, 10,000, in the fixed test-set order), e.g. to score stored predictions.

    The binary layout: only ``test_batch.bin`` is read (the label is the first byte of each 3,073-byte
    record); the python layout is read whole through ``load_cifar10``.
    """
    base = resolve_root(root)
    for folder in (base, base / BIN_DIR):
        if (folder / "test_batch.bin").exists():
            return _read_bin(folder / "test_batch.bin")[1]
    return load_cifar10(base).test_y.numpy()


def subset_indices(n: int, size: int, seed: int, how: str = "random") -> torch.Tensor:
    """``size`` indices of ``range(n)``: the first ``size`` or a seeded random choice.

    The random choice is a prefix of one seeded permutation, so subsets of one seed are nested
    (the 1,000-image calibration set is inside the 5,000-image one), which makes sizes comparable.
    """
    if not 1 <= size <= n:
        raise ValueError(f"subset size must be in [1, {n}], got {size}")
    if how == "first":
        return torch.arange(size)
    if how != "random":
        raise ValueError(f"unknown subset selection {how!r}; known: first, random")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size]


def to_unit_float(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """A batch as a new float32 tensor in [0, 1]: uint8 is divided by 255, float is copied as it is."""
    xf = x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
    if channels_last and xf.dim() == 4:
        xf = xf.contiguous(memory_format=torch.channels_last)
    return xf


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU ops on one intra-op thread (a no-op for CUDA tensors).

    Batch preparation is many small ops (a 64-image uint8 batch is 196 KB; RandAugment works on
    groups of a few images). Waking and joining a second thread for each of them costs more than the
    work it takes over, and when the cores are busy with other processes each join waits for a
    descheduled thread: measured on a loaded 2-core machine, zero-padding a 64-image batch took
    13 ms on 2 threads and 0.03 ms on one, and RandAugment (then image by image) 20 ms per image
    against 0.9 ms.
    """
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class BatchLoader(EpochLoader):
    """Batches of (float images in [0, 1], labels) on ``device`` from in-memory (N, C, H, W) images.

    Images are uint8 (0..255, divided by 255 per batch) or float already in [0, 1] (used as they are).

    Order and augmentation are a pure function of (seed, epoch key), so an epoch restarted after a
    preemption sees exactly the batches it would have seen. The key is what ``set_epoch`` was given
    (the training job passes (phase, epoch)); numpy's ``SeedSequence`` hashes seed and key into the
    generator's seed, so no two (seed, phase, epoch) share an order (an arithmetic mix such as
    ``seed * K + phase * P + epoch`` repeats itself once an index passes its stride). A training
    epoch's draws (``epoch_draws``) are made once on the CPU and copied to the device once; RandAugment,
    when on, runs on uint8 images on the device, each image its own ops (``BatchRandAugment``), and
    reorders each batch, its labels with it.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        train: bool = False,
        crop_pad: int = 4,
        randaugment: bool = False,
        seed: int = 0,
        channels_last: bool = True,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.crop_pad = crop_pad
        self.randaugment = randaugment
        self.seed = seed
        self.channels_last = channels_last
        self._ra = BatchRandAugment() if randaugment and train else None
        if self._ra is not None:
            self._ra.prepare(self.x.shape, self.x.dtype, self.x.device)  # its maps and kernel, copied here once

    def num_images(self) -> int:
        return len(self.x)

    def epoch_draws(self) -> Draws:
        """The current epoch's shuffle and augmentation, on the CPU: a pure function of (seed, epoch key)."""
        g = torch.Generator().manual_seed(self.epoch_seed())
        return draw_epoch(len(self.x), self.batch_size, g, shuffle=True, crop_pad=self.crop_pad,
                          randaugment=self._ra)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        draws = self.epoch_draws().to(self.x.device) if self.train else None
        for b, start in enumerate(range(0, len(self.x), self.batch_size)):
            with one_cpu_thread(self.device):
                if draws is None:
                    xb, yb = self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
                else:
                    idx = draws.order[start:start + self.batch_size]
                    xb, yb = draws.augment(b, self.x[idx], self.y[idx])
                xf = to_unit_float(xb, self.channels_last)
            yield xf, yb
