"""The one seam every int8 model is built through: three backends with the same two verbs.

    backend = BACKENDS["pt2e"]
    cal = backend.calibrate(model, loader, device, "histogram", reduce_range=True)   # once per observer/subset
    for variant in backend.variants(("per_channel",), alphas=(1.0,), centers=("min",)):
        built = backend.build(cal, variant)          # Built: the CPU int8 model, and how to ship it

- ``manual``: the hand-written path (own statistics, pure qparams with the alpha shrink, a q/dq
  ``QDQResNet``); the built-in ResNets only (``refuses`` says so for any other model);
- ``fx``: FX graph mode (``torch.ao.quantization``, deprecated upstream, kept while torch ships it
  as a calibration backend) for any model FX traces; a built-in ResNet gets FX's qparams on the same
  ``QDQResNet``; other models keep FX's converted model, measured, with no file (pt2e ships them);
- ``pt2e``: torchao's PT2E flow with the x86 inductor quantizer, for any model ``torch.export`` traces.

Every model that ships is a ``torch.export`` q/dq program: the ``.pt2`` and its packed form
(``.pt2pack``: sparse weights, no graph metadata), which load with torch and torchao alone and
compile with inductor to oneDNN int8 kernels. No backend ships ``torch.ao.nn.quantized`` modules.

What a backend cannot express is listed in ``compress/catalog.py`` (torch-free, so the PTQ spec
refuses those combinations before anything is imported or runs). Calibration runs on the job's
device; building and the int8 models run on the CPU.
"""

from __future__ import annotations

import functools
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
from compress.quant.int8 import derive_qparams
from compress.quant.packed import pack_program
from compress.quant.qdq import build_qdq, export_qdq
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
    """A CPU int8 model and what ships it (None where it has no file): its ``torch.export`` program, the
    program's ``.pt2`` bytes and its ``.pt2pack`` bytes, each made once, when first asked for."""

    model: nn.Module
    program: Callable[[], torch.export.ExportedProgram] | None
    pt2: Callable[[], bytes] | None
    packed: Callable[[], bytes] | None
    seconds: float


def shipped(model: nn.Module, export: Callable[[nn.Module], torch.export.ExportedProgram], t0: float) -> Built:
    """``Built`` of an int8 ``model`` whose files come from ``export(model)``."""

    @functools.cache
    def program() -> torch.export.ExportedProgram:
        return export(model)

    @functools.cache
    def pt2() -> bytes:
        return pt2e.program_bytes(program())

    @functools.cache
    def packed() -> bytes:
        return pack_program(pt2())

    return Built(model, program, pt2, packed, time.perf_counter() - t0)


class Backend:
    """A way of building int8 models; subclasses fill ``calibrate`` and ``build``.

    What it can express (weight schemes, engines, the alpha/center shrink) is its ``catalog.BACKENDS`` entry.
    """

    name = ""

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
        return Calibrated((folded, ranges), time.perf_counter() - t0, reduce_range, engine)

    def build(self, cal, variant):
        folded, ranges = cal.state
        t0 = time.perf_counter()
        qr = activation_range(cal.reduce_range)
        q = build_qdq(folded, derive_qparams(ranges, variant.alpha, variant.center, qr), qr, variant.weight_observer)
        return shipped(q, export_qdq, t0)


class FX(Backend):
    name = "fx"

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
        if resnet_family(model):  # FX's qparams on the q/dq model, which ships
            qr = activation_range(cal.reduce_range)
            return shipped(build_qdq(model, fx.observed_qparams(prepared), qr, variant.weight_observer), export_qdq, t0)
        # other models have no q/dq form here: their FX int8 model is measured, and pt2e is what ships them
        return Built(fx.convert(prepared), None, None, None, time.perf_counter() - t0)


class PT2E(Backend):
    name = "pt2e"

    def calibrate(self, model, loader, device, observer, reduce_range, engine, weight_observers=("per_channel",)):
        t0 = time.perf_counter()
        prepared = pt2e.prepare(model, observer, reduce_range)
        pt2e.calibrate(prepared, loader, device)
        return Calibrated(prepared, time.perf_counter() - t0, reduce_range, engine)

    def build(self, cal, variant):
        t0 = time.perf_counter()
        return shipped(pt2e.convert(cal.state), pt2e.export_program, t0)


BACKENDS: dict[str, Backend] = {b.name: b for b in (Manual(), FX(), PT2E())}  # catalog.BACKENDS' order
