"""What every batch loader shares: its length in batches, and the epoch key its order and augmentation hash.

``compress.data.BatchLoader`` (images in memory) and ``compress.datasets.StreamLoader`` (decoded by
workers each epoch) both derive order and augmentation from ``epoch_seed`` alone, so one (seed,
phase, epoch) means one order whichever loader a data set gets, and a restarted epoch sees the
batches it would have seen. No torch here: ``compress.datasets`` is imported before torch is.
"""

from __future__ import annotations


class EpochLoader:
    """A loader's epoch bookkeeping; subclasses set ``batch_size`` and ``seed`` and count their images."""

    batch_size: int
    seed: int
    epoch: tuple[int, ...] = (0,)

    def num_images(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return (self.num_images() + self.batch_size - 1) // self.batch_size

    def set_epoch(self, *key: int) -> None:
        """Which epoch comes next: one or more non-negative integers, e.g. ``set_epoch(phase, epoch)``."""
        if not key or any(int(k) < 0 for k in key):
            raise ValueError(f"epoch key {key!r} must be one or more non-negative integers")
        self.epoch = tuple(int(k) for k in key)

    def epoch_seed(self) -> int:
        """The generator seed of the current epoch: numpy's SeedSequence hash of (seed, *key), 63 bits.

        A hash, not an arithmetic mix such as ``seed * K + phase * P + epoch``, which repeats itself
        once an index passes its stride.
        """
        import numpy as np

        entropy = [self.seed + 2**31 if self.seed < 0 else self.seed, *self.epoch]  # SeedSequence takes >= 0
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
