"""Reading a dataset through DataLoader workers: once into memory, or batch by batch every epoch.

``compress.datasets`` decides which (a set that fits in memory is read once with ``read_all``; a
larger one is handed to a ``StreamLoader``); both go through ``Batches``, a dataset of whole batches
that each worker decodes, checks and (for training) augments. A worker returns a ``Failure``
instead of raising, so the main process raises one ``DataError`` line naming the item or file.

torch is imported inside the functions that use it, as in ``compress.datasets``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compress.epochs import EpochLoader

if TYPE_CHECKING:
    import torch

    from compress.augment import BatchRandAugment

READ_BATCH = 256        # images a worker decodes per task when data is read or sampled


def default_workers(workers: int | None) -> int:
    return min(4, os.cpu_count() or 1) if workers is None else max(0, workers)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


@dataclass(frozen=True)
class Failure:
    """What a worker returns instead of raising: the one-line message survives the process boundary.

    An exception raised in a DataLoader worker reaches the main process with the worker's traceback
    folded into its message; this carries the message alone.
    """

    message: str


# --- reading items in workers ----------------------------------------------------------------------

def _check_item(item: Any, i: int, name: str) -> tuple[torch.Tensor, int] | Failure:
    """An item as (uint8 or float32 CxHxW tensor, int label), or why it is not one."""
    import torch

    want = "(image tensor CxHxW, int label)"
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        return Failure(f"{name}: item {i} is a {type(item).__name__}, not a pair {want}")
    img, label = item
    if not isinstance(img, torch.Tensor) or img.dim() != 3:
        got = f"a tensor of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else f"a {type(img).__name__}"
        return Failure(f"{name}: item {i} has {got} as its image; items must be {want}")
    if img.dtype != torch.uint8 and not img.is_floating_point():
        return Failure(f"{name}: item {i} has a {img.dtype} image; use uint8 (0..255) or float in [0, 1]")
    try:
        label = int(label)
    except (TypeError, ValueError):
        return Failure(f"{name}: item {i} has label {label!r}; items must be {want}")
    return (img if img.dtype == torch.uint8 else img.to(torch.float32)), label


def _stack(images: list[torch.Tensor], first: int, name: str) -> torch.Tensor | Failure:
    """One (N, C, H, W) batch: uint8 when every image is, else float32 in [0, 1]."""
    import torch

    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        return Failure(f"{name}: images of different shapes {a} and {b} near item {first}; "
                        f"a batch needs one shape (resize them in the dataset)")
    if any(x.dtype != torch.uint8 for x in images):
        images = [x.float() / 255 if x.dtype == torch.uint8 else x for x in images]
    return torch.stack(images)


def _batch_seed(epoch_seed: int, batch: int) -> int:
    """The generator seed of one batch: a hash of (epoch seed, batch number), so no worker count changes it."""
    import numpy as np

    return int(np.random.SeedSequence([epoch_seed, batch]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(eq=False)
class Batches:
    """A dataset of whole batches: key (batch number, indices) -> (images, labels) or a ``Failure``.

    A worker decodes a batch, checks its items and, for training, augments it with a generator
    seeded from (epoch seed, batch number): batches are the same whatever the number of workers.
    """

    dataset: Any
    name: str
    augment: bool = False
    crop_pad: int | None = None
    randaugment: bool = False
    epoch_seed: int = 0
    _ra: BatchRandAugment | None = field(default=None, init=False, repr=False)  # made in the worker, once

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor] | Failure:
        import torch

        from compress.augment import BatchRandAugment, augment, default_crop_pad
        from compress.data import DataError, one_cpu_thread

        batch, indices = key
        images, labels = [], []
        for i in indices:
            try:
                got = _check_item(self.dataset[i], i, self.name)
            except DataError as e:  # DecodedImages: "cannot read image PATH: ..."
                return Failure(str(e))
            except Exception as e:  # a user's dataset may raise anything
                return Failure(f"{self.name}: reading item {i} raised {type(e).__name__}: {first_line(e)}")
            if isinstance(got, Failure):
                return got
            images.append(got[0])
            labels.append(got[1])
        x = _stack(images, indices[0], self.name)
        if isinstance(x, Failure):
            return x
        y = torch.tensor(labels, dtype=torch.int64)
        if self.augment:
            if self._ra is None and self.randaugment:
                self._ra = BatchRandAugment()
            pad = default_crop_pad(x.shape[2]) if self.crop_pad is None else self.crop_pad
            with one_cpu_thread(torch.device("cpu")):
                x = augment(x, pad, self._ra, torch.Generator().manual_seed(_batch_seed(self.epoch_seed, batch)))
        return x, y


def _identity(batch: Any) -> Any:
    return batch


def raw_batches(batches: Batches, order: list[int], batch_size: int, workers: int, epoch_seed: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """CPU batches of ``order`` decoded by ``workers`` processes (0: here); a worker's failure is one DataError."""
    import torch
    from torch.utils.data import DataLoader

    from compress.data import DataError

    keys = [(b, order[s:s + batch_size]) for b, s in enumerate(range(0, len(order), batch_size))]
    loader = DataLoader(batches, batch_size=None, sampler=keys, collate_fn=_identity, num_workers=workers,
                        pin_memory=pin_memory, prefetch_factor=2 if workers else None, persistent_workers=False,
                        generator=torch.Generator().manual_seed(epoch_seed))
    for got in loader:
        if isinstance(got, Failure):
            raise DataError(got.message)
        yield got


def read_all(dataset: Any, name: str, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of ``dataset`` in order, as one (N, C, H, W) tensor (uint8 if all are) and int64 labels."""
    import torch

    n = len(dataset)
    x = y = None
    start = 0
    for xb, yb in raw_batches(Batches(dataset, name), list(range(n)), READ_BATCH, workers):
        if x is None:
            x = torch.empty((n, *xb.shape[1:]), dtype=xb.dtype)
            y = torch.empty(n, dtype=torch.int64)
        elif xb.shape[1:] != x.shape[1:]:
            from compress.data import DataError

            raise DataError(f"{name}: images of different shapes {tuple(x.shape[1:])} and {tuple(xb.shape[1:])} "
                            f"near item {start}; a batch needs one shape (resize them in the dataset)")
        if xb.dtype != x.dtype:  # uint8 so far, float from here: the whole store becomes float in [0, 1]
            if x.dtype == torch.uint8:
                x = x.float().div_(255)
            else:
                xb = xb.float().div_(255)
        x[start:start + len(xb)] = xb
        y[start:start + len(yb)] = yb
        start += len(xb)
    return x, y


def labels_of(dataset: Any, workers: int | None = None) -> torch.Tensor:
    """Labels of a dataset in order: from ``targets`` or a TensorDataset's last tensor when it has them, else read."""
    import torch
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset, workers)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1].to(torch.int64).reshape(-1)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return torch.as_tensor(targets, dtype=torch.int64)
    ys = [yb for _, yb in raw_batches(Batches(dataset, "dataset"), list(range(len(dataset))), READ_BATCH,
                                       default_workers(workers))]
    return torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)


# --- the streamed loader ------------------------------------------------------------------------

class StreamLoader(EpochLoader):
    """``BatchLoader``'s interface over a dataset decoded each epoch in worker processes.

    Order and augmentation are a pure function of (seed, epoch key): the order is a permutation
    drawn from the epoch seed, and each batch is augmented (crop + flip, optional RandAugment, the
    ``compress.augment.augment`` recipe) in its worker with a generator seeded from (epoch seed, batch
    number), so neither the number of workers nor which worker takes a batch changes it. Batches
    leave as float32 in [0, 1], channels_last, on ``device`` (pinned, non-blocking copies on CUDA).
    """

    def __init__(self, dataset: Any, batch_size: int, device: torch.device | str = "cpu", *, train: bool = False,
                 crop_pad: int | None = None, randaugment: bool = False, seed: int = 0,
                 workers: int | None = None, channels_last: bool = True, name: str = "dataset") -> None:
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = train
        self.crop_pad = crop_pad  # None: an eighth of the image height (compress.augment.default_crop_pad)
        self.randaugment = randaugment
        self.seed = seed
        self.workers = default_workers(workers)
        self.channels_last = channels_last
        self.name = name

    def num_images(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        from compress.data import to_unit_float

        seed = self.epoch_seed()
        n = len(self.dataset)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            order = list(range(n))
        batches = Batches(self.dataset, self.name, augment=self.train, crop_pad=self.crop_pad,
                           randaugment=self.randaugment, epoch_seed=seed)
        cuda = self.device.type == "cuda"
        for xb, yb in raw_batches(batches, order, self.batch_size, self.workers, seed, pin_memory=cuda):
            x = to_unit_float(xb.to(self.device, non_blocking=cuda), self.channels_last)
            yield x, yb.to(self.device, non_blocking=cuda)


