"""analysis.stats: McNemar against hand counts and scipy's binomial test, the bootstrap against scipy's."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from analysis.stats import bootstrap_interval, mcnemar


def pair(b: int, c: int, both: int = 0, neither: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of two models: ``b`` images only a gets right, ``c`` only b, then agreements."""
    a = np.r_[np.ones(b, bool), np.zeros(c, bool), np.ones(both, bool), np.zeros(neither, bool)]
    bb = np.r_[np.zeros(b, bool), np.ones(c, bool), np.ones(both, bool), np.zeros(neither, bool)]
    return a, bb


def with_accuracy(n: int, right: int, seed: int = 0) -> np.ndarray:
    correct = np.zeros(n, bool)
    correct[:right] = True
    return np.random.default_rng(seed).permutation(correct)


def test_mcnemar_hand_computed_case() -> None:
    # b=10, c=2: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * (1 + 12 + 66) / 4096 = 2 * 79 / 4096
    a, b = pair(10, 2, both=8_000, neither=1_000)
    assert mcnemar(a, b) == (10, 2, pytest.approx(2 * 79 / 4096, rel=1e-12))
    assert mcnemar(a, b)[2] == pytest.approx(0.0385742, abs=1e-7)
    assert mcnemar(b, a) == (2, 10, pytest.approx(2 * 79 / 4096, rel=1e-12))  # two-sided: symmetric


def test_mcnemar_without_discordant_images_is_p_1() -> None:
    a, b = pair(0, 0, both=90, neither=10)
    assert mcnemar(a, b) == (0, 0, 1.0)
    assert mcnemar(a, a) == (0, 0, 1.0)


@pytest.mark.parametrize(("b", "c"), [(1, 0), (0, 5), (3, 3), (7, 5), (10, 2), (25, 9), (60, 40), (400, 455),
                                      (1000, 900)])
def test_mcnemar_agrees_with_scipy_binomtest(b: int, c: int) -> None:
    a, bb = pair(b, c, both=50, neither=5)
    got = mcnemar(a, bb)
    assert got[:2] == (b, c)
    assert got[2] == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-15)
    assert got[2] == pytest.approx(min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)),
                                   rel=1e-9)


def test_mcnemar_pools_paired_runs() -> None:
    """Two seeds each: the pooled test is the test of the concatenated images."""
    a0, b0 = pair(6, 1, both=20)
    a1, b1 = pair(4, 1, both=22)
    got = mcnemar(np.stack([a0, a1]), np.stack([b0, b1]))
    assert got == mcnemar(np.r_[a0, a1], np.r_[b0, b1])
    assert got[:2] == (10, 2)
    with pytest.raises(ValueError, match="pair up"):
        mcnemar(a0, b0[:-1])
    with pytest.raises(ValueError, match="boolean"):
        mcnemar(a0.astype(int) * 2, b0)


def test_bootstrap_contains_the_point_estimate_and_is_deterministic() -> None:
    correct = with_accuracy(10_000, 9_027)
    lo, hi = bootstrap_interval(correct)
    assert lo < 90.27 < hi
    assert bootstrap_interval(correct) == (lo, hi)
    assert bootstrap_interval(correct, seed=0) == (lo, hi)
    few = [bootstrap_interval(correct, resamples=50, seed=s) for s in (0, 0, 1)]
    assert few[0] == few[1] != few[2]  # another seed, other resamples (visible when they are few)
    assert bootstrap_interval(correct.astype(np.uint8)) == (lo, hi)


def test_bootstrap_matches_the_normal_approximation_at_10000_images() -> None:
    """n = 10,000 at 90%: the standard error is sqrt(0.9 * 0.1 / 10,000) = 0.3 points, 1.96 x 0.3 = 0.588."""
    lo, hi = bootstrap_interval(with_accuracy(10_000, 9_000))
    half = 1.96 * math.sqrt(0.9 * 0.1 / 10_000) * 100
    assert half == pytest.approx(0.588, abs=1e-3)
    assert (hi - lo) / 2 == pytest.approx(half, abs=0.03)
    assert (lo + hi) / 2 == pytest.approx(90.0, abs=0.03)


def test_bootstrap_shrinks_with_more_images() -> None:
    widths = []
    for n in (1_000, 10_000):
        lo, hi = bootstrap_interval(with_accuracy(n, int(0.9 * n)))
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5  # 1/sqrt(10) = 0.32
    assert bootstrap_interval(with_accuracy(10_000, 9_000), level=0.9) < (89.6, 100)


def test_bootstrap_of_all_right_or_all_wrong_is_a_point() -> None:
    assert bootstrap_interval(np.ones(10_000, bool)) == (100.0, 100.0)
    assert bootstrap_interval(np.zeros(50, bool)) == (0.0, 0.0)


def test_bootstrap_agrees_with_scipy_bootstrap() -> None:
    """The multinomial shortcut draws the same distribution as resampling indices (scipy's percentile method)."""
    correct = with_accuracy(500, 400, seed=3)
    ours = bootstrap_interval(correct, resamples=20_000)
    ref = sps.bootstrap((correct.astype(float),), np.mean, n_resamples=20_000, method="percentile",
                        confidence_level=0.95, random_state=np.random.default_rng(7)).confidence_interval
    assert ours == pytest.approx((100 * ref.low, 100 * ref.high), abs=0.25)  # one image is 0.2 points


def test_bootstrap_of_several_runs_keeps_each_images_runs_together() -> None:
    one = with_accuracy(2_000, 1_800)
    assert bootstrap_interval(np.stack([one, one])) == bootstrap_interval(one)
    two = np.stack([one, with_accuracy(2_000, 1_700, seed=5)])
    ours = bootstrap_interval(two, resamples=20_000)
    rng = np.random.default_rng(11)
    idx = rng.integers(0, 2_000, size=(4_000, 2_000))
    brute = 100 * two[:, idx].mean(axis=(0, 2))  # resample image indices, both runs of an image together
    assert ours == pytest.approx(tuple(np.percentile(brute, [2.5, 97.5])), abs=0.1)
    assert ours[0] < 100 * two.mean() < ours[1]


@pytest.mark.parametrize(("kwargs", "words"), [({"level": 1.0}, "level=1.0"), ({"level": 0}, "level=0"),
                                               ({"resamples": 0}, "resamples=0")])
def test_bootstrap_bad_arguments_name_themselves(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        bootstrap_interval(np.ones(10, bool), **kwargs)
    with pytest.raises(ValueError, match="no images"):
        bootstrap_interval(np.ones(0, bool))
