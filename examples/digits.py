"""A data factory: scikit-learn's bundled digits, 1,797 8x8 grayscale images of 0..9, no download.

The smallest real dataset to try the toolkit on your own data; any ``module:function`` returning
``(train, test)`` datasets of ``(image tensor CxHxW, int label)`` works the same way::

    PYTHONPATH=examples python -m jobs.launch train --data digits:load --model ...

Pixels are 0..16 in the source and become float32 in [0, 1] (divided by 16), shape (1, 8, 8). The
split is fixed: a permutation seeded with 0, its first 1,437 images for training and the other 360
for testing, so every run and every machine sees the same test set.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

TRAIN_IMAGES = 1_437
CLASSES = [str(d) for d in range(10)]


def load() -> tuple[TensorDataset, TensorDataset]:
    """The (train, test) digits, each a TensorDataset with ``classes`` "0".."9"."""
    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    train, test = order[:TRAIN_IMAGES], order[TRAIN_IMAGES:]
    out = TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])
    for ds in out:
        ds.classes = CLASSES
    return out
