"""The names of what the library offers, and what each int8 backend can express, without torch.

Specs validate against these and the CLI lists them in its help before torch is imported (torch
and torchao take seconds to import; ``--help`` and a bad option should not). The registries that
implement them (``quant.observe.OBSERVERS``, ``quant.backends.BACKENDS``...) hold the same names;
``tests/test_catalog.py`` checks that they agree. Models and data are not listed here: any model
string and any data source is checked by building it (``compress.registry``, ``compress.datasets``)
when a command runs, before anything is submitted or written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

OBSERVERS = ("minmax", "moving_average", "histogram")
ENGINES = ("x86", "fbgemm", "qnnpack")
WEIGHT_SCHEMES = ("per_channel", "per_tensor")
CENTERS = ("min", "zero")
# how magnitude pruning ranks weights across layers (compress/prune.py)
SCORINGS = ("magnitude", "lamp")
COMPILE_CHOICES = ("auto", "on", "off")
# structured pruning (compress/channels.py): what a step removes, how channels are ranked, what a target counts
STRUCTURES = ("weights", "channels")
CHANNEL_IMPORTANCES = ("l1", "l2", "bn", "taylor")
CHANNEL_TARGETS = ("macs", "params")  # torch.compile of a training run (compress.loops.compile_decision)


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


def sparsity_budget_error(sizes: dict[str, int], sparsity: float, exclude: Iterable[str] = (),
                          max_layer_sparsity: float = 1.0, zeros: dict[str, int] | None = None) -> str:
    """Why ``round(sparsity * N)`` zeros cannot be placed in the layers ``sizes`` ("" when they can).

    The rule global magnitude pruning applies: kept-dense layers (``exclude``) count in N but take no
    new zeros; each other layer holds at most ``floor(cap * n)`` zeros (or the zeros it already has).
    ``zeros`` are the zeros already there (none on a fresh model); ``sizes`` come from the built model
    (``compress.prune.check_budget``). E.g. resnet20a at 0.99 with
    layer3 kept dense needs 265,653 zeros but only 65,584 weights are outside it.
    """
    zeros = zeros or {}
    skip = set(exclude)
    k = round(sparsity * sum(sizes.values())) - sum(zeros.get(n, 0) for n in sizes if n in skip)
    outside = sum(n for name, n in sizes.items() if name not in skip)
    if k >= outside:
        return (f"sparsity {sparsity} needs {k:,} zeros but only {outside:,} weights are outside "
                f"the kept-dense layers {sorted(skip)}")
    allowed = sum(max(math.floor(max_layer_sparsity * n), zeros.get(name, 0))
                  for name, n in sizes.items() if name not in skip)
    if k > allowed:
        return (f"sparsity {sparsity} needs {k:,} zeros but a per-layer cap of {max_layer_sparsity} "
                f"allows only {allowed:,}")
    return ""
