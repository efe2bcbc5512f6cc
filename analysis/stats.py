"""How sure a top-1 is, and whether two models differ: pure functions over per-image correctness.

A top-1 on the 10,000 CIFAR-10 test images is itself a sample: at 90% its standard error is
sqrt(0.9 * 0.1 / 10,000) = 0.30 points, so two runs 0.14 points apart may not differ at all. Both
functions take boolean arrays ``correct[i]`` (image ``i`` of the test set classified right), in
test-set order, which the report gets from the predictions stored in the rows and the test labels.

    bootstrap_interval(correct)        percentile bootstrap interval of top-1, in percent
    mcnemar(correct_a, correct_b)      exact two-sided McNemar test of two models on the same images

A 2-D array holds several runs (one per row, e.g. the seeds of one configuration) on the same
images: the bootstrap resamples images, keeping each image's runs together, and McNemar pools the
discordant images of the paired runs (under the null each run pair's count is binomial with p = 1/2,
so their sum is binomial again: the pooled test stays exact).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

DEFAULT_RESAMPLES = 10_000


def _as_runs(correct: np.ndarray, name: str) -> np.ndarray:
    """``correct`` as a 2-D bool array (runs, images); 1-D is one run."""
    a = np.asarray(correct)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D (images) or 2-D (runs, images), not {a.ndim}-D")
    if a.shape[1] == 0:
        raise ValueError(f"{name} holds no images")
    if a.dtype != np.bool_:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got values {np.unique(a)[:5].tolist()}")
        a = a.astype(bool)
    return a


def bootstrap_interval(correct: np.ndarray, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of top-1 (percent) over the test images; ``(lo, hi)``.

    Resamples the images with replacement ``resamples`` times and takes the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` percentiles of the resampled top-1s. E.g. 9,000 of 10,000 images right
    (top-1 90.00%): about (89.41, 90.59), the normal approximation's 90 +- 1.96 x 0.30 = +-0.59 points;
    all right: (100.0, 100.0). A 2-D ``correct`` (runs, images) gives the interval of the runs' mean top-1,
    resampling images with their runs kept together. The same ``seed`` gives the same interval.
    """
    # Hand-written instead of scipy.stats.bootstrap, with the same percentile method: a resample's mean
    # depends only on how often each distinct per-image score is drawn, and those counts are multinomial
    # (binomial for one run). Drawing the counts gives the same distribution as drawing n indices, at
    # O(resamples x distinct scores) instead of O(resamples x n): microseconds instead of about a second
    # and 800 MB per interval at n = 10,000, and a report computes one for every row.
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} is invalid: must be in (0, 1), e.g. 0.95")
    if resamples < 1:
        raise ValueError(f"resamples={resamples!r} is invalid: must be >= 1")
    scores = _as_runs(correct, "correct").mean(axis=0)  # per image: the share of runs that got it right
    n = scores.size
    values, counts = np.unique(scores, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)
    means = 100.0 * (draws @ values) / n
    tail = 50.0 * (1 - level)
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """Exact two-sided McNemar test of models a and b on the same images; ``(b, c, p_value)``.

    ``b``: images a gets right and b wrong; ``c``: the other way round. Under the null (equal top-1)
    each discordant image is a fair coin, so p = min(1, 2 P(X <= min(b, c))) with X ~ Bin(b + c, 1/2),
    and p = 1 when no image is discordant. E.g. b = 10, c = 2: p = 2 (1 + 12 + 66) / 2^12 = 2 x 79 / 4096
    = 0.0386, a difference at the 0.05 level; b = 7, c = 5: p = 0.774, none. 2-D inputs (runs, images)
    pair run i of a with run i of b (the same seed) and pool their discordant images.
    """
    a, b_ = _as_runs(correct_a, "correct_a"), _as_runs(correct_b, "correct_b")
    if a.shape != b_.shape:
        raise ValueError(f"correct_a and correct_b must pair up image by image: shapes {a.shape} and {b_.shape}")
    b = int(np.count_nonzero(a & ~b_))
    c = int(np.count_nonzero(~a & b_))
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(min(1.0, 2.0 * binom.cdf(min(b, c), b + c, 0.5)))
