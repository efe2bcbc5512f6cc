"""The one seam every int8 model is built through: three backends with the same two verbs.

    backend = BACKENDS["pt2e"]
    cal = backend.calibrate(model, loader, device, "histogram", reduce_range=True)   # once per observer/subset
    for variant in backend.variants(("per_channel",), alphas=(1.0,), centers=("min",)):
        built = backend.build(cal, variant)          # Built: the CPU int8 model, and how to ship it

- ``manual``: the hand-written path (own statistics, pure qparams with the alpha shrink, an
  ``Int8ResNet`` of ``torch.ao.nn.quantized`` modules); the built-in ResNets only (``refuses``
  says so for any other model); ships as the packed file.
- ``fx``: FX graph mode (``torch.ao.quantization``, deprecated upstream, kept while torch ships
  it) for any model FX traces; a built-in ResNet ships as the packed file of the ``Int8ResNet`` with
  FX's qparams, which computes exactly FX's outputs (``tests/test_int8.py``); other models have no
  FX artifact (an FX ``GraphModule`` of quantized modules does not ``torch.export``).
- ``pt2e``: torchao's PT2E flow with the x86 inductor quantizer, for any model ``torch.export``
  traces; ships as a ``torch.export`` program (``.pt2``), which loads with torch and torchao alone
  and compiles with inductor.

What a backend cannot express is listed in ``compress/catalog.py`` (torch-free, so the PTQ spec
refuses those combinations before anything is imported or runs). Calibration runs on the job's
device; building and the int8 models run on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress import catalog
from compress.models import CifarResNet
from compress.quant import fx, observe, pt2e
from compress.quant.fold import fold_model
from compress.quant.int8 import build_int8, derive_qparams
from compress.quant.packed import pack_int8
from compress.quant.qparams import activation_range


@dataclass(frozen=True)
class Variant:
    """One int8 configuration derived from a calibration: weight scheme, and alpha/center (manual only)."""

    weight_observer: str
    alpha: float | None = None
    center: str | None = None


@dataclass
class Calibrated:
    """A backend's calibrated state for one (model, observer, subset), and what it cost."""

    state: Any
    seconds: float
    reduce_range: bool
    engine: str


@dataclass
class Built:
    """A CPU int8 model and its artifacts: ``packed()`` bytes and/or ``program()`` (None: not this kind)."""

    model: nn.Module
    packed: Callable[[], bytes] | None
    program: Callable[[], torch.export.ExportedProgram] | None
    seconds: float


class Backend:
    """A way of building int8 models; subclasses fill ``calibrate`` and ``build``.

    What it can express (weight schemes, engines, the alpha/center shrink) is its ``catalog.BACKENDS`` entry.
    """

    name = ""
    artifact = ""

    @property
    def info(self) -> catalog.BackendInfo:
        return catalog.BACKENDS[self.name]

    @property
    def weight_schemes(self) -> tuple[str, ...]:
        return self.info.weight_schemes

    @property
    def engines(self) -> tuple[str, ...]:
        return self.info.engines

    def variants(self, weight_observers: Iterable[str], alphas: Iterable[float],
                 centers: Iterable[str]) -> Iterator[Variant]:
        """Every configuration of one calibration; alpha/center only where the backend has them."""
        for w in weight_observers:
            if self.info.shrink:
                for a in alphas:
                    for c in centers:
                        yield Variant(w, a, c)
            else:
                yield Variant(w)

    def refuses(self, model: nn.Module) -> str:
        """Why this backend cannot quantize ``model`` ("" when it can), checked before a sweep runs."""
        return ""

    def calibrate(self, model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device, observer: str, reduce_range: bool, engine: str,
                  weight_observers: tuple[str, ...] = ("per_channel",)) -> Calibrated:
        raise NotImplementedError

    def build(self, cal: Calibrated, variant: Variant) -> Built:
        raise NotImplementedError


def resnet_family(model: nn.Module) -> bool:
    """Whether ``model`` is one of the built-in CIFAR ResNets, the one family the hand-written int8 model builds."""
    return isinstance(model, CifarResNet)


class Manual(Backend):
    name = "manual"
    artifact = "packed"

    def refuses(self, model: nn.Module) -> str:
        if resnet_family(model):
            return ""
        return (f"manual (the hand-written int8 model) builds the built-in ResNets only, not "
                f"{getattr(model, 'model_ref', type(model).__name__)}: use --methods pt2e (or fx)")

    def calibrate(self, model, loader, device, observer, reduce_range, engine, weight_observers=("per_channel",)):
        folded = fold_model(model)
        t0 = time.perf_counter()
        cal = observe.calibrate(folded, loader, device, observer, observe.quant_sites(folded))
        ranges = cal.ranges(activation_range(reduce_range))  # every variant derives from these statistics
        folded.cpu()
        return Calibrated((folded, ranges, model.model_name), time.perf_counter() - t0, reduce_range, engine)

    def build(self, cal, variant):
        folded, ranges, name = cal.state
        t0 = time.perf_counter()
        qr = activation_range(cal.reduce_range)
        q = build_int8(folded, derive_qparams(ranges, variant.alpha, variant.center, qr), variant.weight_observer)
        return Built(q, lambda: pack_int8(q, name, cal.engine), None, time.perf_counter() - t0)


class FX(Backend):
    name = "fx"
    artifact = "packed"

    def calibrate(self, model, loader, device, observer, reduce_range, engine, weight_observers=("per_channel",)):
        t0 = time.perf_counter()
        prepared = fx.prepare(model, observer, weight_observers[0], reduce_range, engine)
        fx.calibrate(prepared, loader, device)
        return Calibrated((model, prepared, observer), time.perf_counter() - t0, reduce_range, engine)

    def build(self, cal, variant):
        model, calibrated, observer = cal.state
        t0 = time.perf_counter()
        prepared = fx.prepare(model, observer, variant.weight_observer, cal.reduce_range, cal.engine)
        fx.copy_statistics(calibrated, prepared)  # weight observers run at conversion: one calibration serves all
        q = fx.convert(prepared)
        qparams = fx.observed_qparams(prepared)

        def packed() -> bytes:
            # the Int8ResNet with FX's qparams computes exactly FX's outputs, so it is what ships
            return pack_int8(build_int8(model, qparams, variant.weight_observer), model.model_name, cal.engine)

        # other models have no packed form: their FX int8 model is measured, and pt2e is what ships them
        return Built(q, packed if resnet_family(model) else None, None, time.perf_counter() - t0)


class PT2E(Backend):
    name = "pt2e"
    artifact = "program"

    def calibrate(self, model, loader, device, observer, reduce_range, engine, weight_observers=("per_channel",)):
        t0 = time.perf_counter()
        prepared = pt2e.prepare(model, observer, reduce_range)
        pt2e.calibrate(prepared, loader, device)
        return Calibrated(prepared, time.perf_counter() - t0, reduce_range, engine)

    def build(self, cal, variant):
        t0 = time.perf_counter()
        q = pt2e.convert(cal.state)
        return Built(q, None, lambda: pt2e.export_program(q), time.perf_counter() - t0)


BACKENDS: dict[str, Backend] = {b.name: b for b in (Manual(), FX(), PT2E())}  # catalog.BACKENDS' order
