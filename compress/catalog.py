"""The names of what the library offers, and what each int8 backend can express, without torch.

Specs validate against these and the CLI lists them in its help before torch is imported (torch
and torchao take seconds to import; ``--help`` and a bad option should not). The registries that
implement them (``models.MODELS``, ``quant.observe.OBSERVERS``, ``quant.backends.BACKENDS``...)
hold the same names; ``tests/test_catalog.py`` checks that they agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MODELS = ("resnet20a", "resnet20b")
TRAIN_IMAGES = 50_000
TEST_IMAGES = 10_000

OBSERVERS = ("minmax", "moving_average", "histogram")
ENGINES = ("x86", "fbgemm", "qnnpack")
WEIGHT_SCHEMES = ("per_channel", "per_tensor")
CENTERS = ("min", "zero")


@dataclass(frozen=True)
class BackendInfo:
    """What one int8 backend can build."""

    weight_schemes: tuple[str, ...] = WEIGHT_SCHEMES
    engines: tuple[str, ...] = ENGINES
    shrink: bool = False  # expresses alpha/center (the range shrink of the hand-written path)


# in the order a sweep writes its rows
BACKENDS: dict[str, BackendInfo] = {
    "manual": BackendInfo(shrink=True),
    "fx": BackendInfo(),
    "pt2e": BackendInfo(weight_schemes=("per_channel",), engines=("x86", "fbgemm")),
}


def unsupported(method: str, weight_observers: Iterable[str], engine: str, alphas: Iterable[float],
                centers: Iterable[str]) -> str:
    """Why ``method`` cannot run this configuration, or "" when it can (the spec turns it into an error)."""
    b = BACKENDS[method]
    bad_w = sorted(set(weight_observers) - set(b.weight_schemes))
    if bad_w:
        return f"{method} builds weights {', '.join(b.weight_schemes)} only, not {', '.join(bad_w)}"
    if engine not in b.engines:
        return f"{method} runs on engines {', '.join(b.engines)} only, not {engine}"
    return ""


def shrinks(alphas: Iterable[float], centers: Iterable[str]) -> bool:
    """Whether a sweep asks for any alpha/center other than the plain observed range."""
    return set(alphas) != {1.0} or set(centers) != {"min"}
