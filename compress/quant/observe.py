"""Range statistics at every quantized site of a float ResNet, collected in one calibration pass.

A *site* is a tensor the int8 model stores quantized, named after what it is:

    input              the normalised image (after the float ``Normalize``)
    conv1              stem conv + BN + ReLU            (observed at the ``relu`` module's output)
    layerI.J.conv1     block conv + BN + ReLU           (``layerI.J.relu1``)
    layerI.J.conv2     block conv + BN, before the add  (``layerI.J.bn2``)
    layerI.J.downsample.0   option-B shortcut conv + BN (``layerI.J.downsample``)
    layerI.J.add       residual add + ReLU              (``layerI.J.relu_out``, the block's own module)
    linear / fc        the classifier's logits

Every block owns its ``add`` and ``relu_out`` modules, so the add of each block is observed by a
hook on that block's module, never by counting calls of a shared ReLU. The int8 block computes the
add and its ReLU in one kernel (``quantized.add_relu``, as FX does), so the add's quantized output is
the ReLU'd sum and the hook sits on ``relu_out``. The option-A shortcut (``layerI.J.shortcut``,
subsample + zero channels) needs no site of its own: it runs on int8 values and keeps its input's
qparams. Pooling and flattening keep their input's qparams as well.

Statistics (``OBSERVERS``) are per-tensor ranges: ``minmax`` (running min/max, what
``MinMaxObserver`` keeps), ``moving_average`` (exponential average of per-batch min/max, constant
0.01, as ``MovingAverageMinMaxObserver``) and ``histogram`` (2,048 bins, range chosen by the least
squared quantization error, ``qparams.mse_range``; torch's HistogramObserver searches differently, so
the two paths' histogram ranges differ). ``minmax`` gives FX's qparams bit for bit. FX's moving
average differs at sites that feed an identity shortcut: FX shares one observer between the site and
the shortcut, so it averages each batch in twice. Calibration is evaluation over a training subset
with forward hooks attached (``compress.loops.evaluate``); it runs on the job's device, in float32.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from compress.loops import evaluate
from compress.models import BasicBlock, CifarResNet, PadShortcut
from compress.quant.qparams import UINT8, QRange, mse_range


@dataclass(frozen=True)
class Site:
    """One quantized tensor: its name, what computes it, and the module whose output it is."""

    name: str
    kind: str  # input | conv_relu | conv | add_relu | linear | shortcut
    module: str


def quant_sites(model: CifarResNet, shortcut: bool = False) -> list[Site]:
    """Every quantized site of ``model`` in forward order (see the module docstring).

    ``shortcut=True`` adds the option-A shortcut outputs as sites of their own (FX graph mode
    requantizes there; the int8 builder accepts qparams for them to reproduce FX exactly).
    """
    sites = [Site("input", "input", "normalize"), Site("conv1", "conv_relu", "relu")]
    for name, block in model.named_modules():
        if not isinstance(block, BasicBlock):
            continue
        sites.append(Site(f"{name}.conv1", "conv_relu", f"{name}.relu1"))
        sites.append(Site(f"{name}.conv2", "conv", f"{name}.bn2"))
        if isinstance(block.downsample, nn.Sequential):
            sites.append(Site(f"{name}.downsample.0", "conv", f"{name}.downsample"))
        elif shortcut and isinstance(block.downsample, PadShortcut):
            sites.append(Site(f"{name}.shortcut", "shortcut", f"{name}.downsample"))
        sites.append(Site(f"{name}.add", "add_relu", f"{name}.relu_out"))
    sites.append(Site(model.classifier_name, "linear", model.classifier_name))
    return sites


class RangeStat:
    """Running statistics of one site; ``range()`` gives the (lo, hi) the qparams are computed from."""

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self, qr: QRange = UINT8) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _check(self, lo: torch.Tensor | None) -> None:
        if lo is None:
            raise ValueError(f"{type(self).__name__} saw no data: calibrate over at least one batch")


class MinMaxStat(RangeStat):
    """Smallest and largest value over all calibration batches."""

    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        self.lo = lo if self.lo is None else torch.min(self.lo, lo)
        self.hi = hi if self.hi is None else torch.max(self.hi, hi)

    def range(self, qr: QRange = UINT8) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(self.lo)
        return self.lo.cpu(), self.hi.cpu()


class MovingAverageStat(MinMaxStat):
    """Per-batch min/max averaged with ``lo += c * (batch_lo - lo)``, c = 0.01; the first batch sets it.

    Less sensitive to one outlier batch than ``minmax``; with few batches it stays near the first.
    """

    def __init__(self, constant: float = 0.01) -> None:
        super().__init__()
        self.constant = constant

    def update(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.constant * (lo - self.lo)
            self.hi = self.hi + self.constant * (hi - self.hi)


class HistogramStat(RangeStat):
    """A 2,048-bin histogram over the range seen so far; the range is the least-error clip of it.

    When a batch widens the range, the old counts move to the new bin holding their old bin's centre
    (a smear of at most one new bin). The histogram stays on the calibration device.
    """

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.counts: torch.Tensor | None = None
        self.lo = 0.0
        self.hi = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        lo, hi = (float(v) for v in torch.aminmax(x))
        if self.counts is None:
            self.lo, self.hi = lo, hi if hi > lo else lo + 1e-8
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
        elif lo < self.lo or hi > self.hi:
            new_lo, new_hi = min(lo, self.lo), max(hi, self.hi)
            width = (self.hi - self.lo) / self.bins
            centres = self.lo + width * (torch.arange(self.bins, device=x.device, dtype=torch.float64) + 0.5)
            idx = ((centres - new_lo) / (new_hi - new_lo) * self.bins).long().clamp_(0, self.bins - 1)
            self.counts = torch.zeros_like(self.counts).index_add_(0, idx, self.counts)
            self.lo, self.hi = new_lo, new_hi
        self.counts += torch.histc(x, self.bins, self.lo, self.hi).double()

    def range(self, qr: QRange = UINT8) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(self.counts)
        lo, hi = mse_range(self.counts, self.lo, self.hi, qr)
        return torch.tensor(lo), torch.tensor(hi)


OBSERVERS: dict[str, type[RangeStat]] = {
    "minmax": MinMaxStat,
    "moving_average": MovingAverageStat,
    "histogram": HistogramStat,
}


def make_stat(observer: str) -> RangeStat:
    """A fresh statistic by registry name; an unknown name lists the known ones."""
    if observer not in OBSERVERS:
        raise ValueError(f"observer={observer!r} is unknown; known: {', '.join(OBSERVERS)}")
    return OBSERVERS[observer]()



@dataclass
class Calibration:
    """The statistics of one calibration pass: one ``RangeStat`` per site name."""

    observer: str
    stats: dict[str, RangeStat]
    images: int
    seconds: float

    def ranges(self, qr: QRange = UINT8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(lo, hi) per site on the CPU; ``qr`` matters to ``histogram`` only (the error it minimises)."""
        return {name: stat.range(qr) for name, stat in self.stats.items()}


def calibrate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
              observer: str, sites: list[Site]) -> Calibration:
    """Run ``model`` over ``loader`` once with a statistic hooked onto every site's module.

    Runs on ``device`` in float32 (no autocast or TF32: they would shift the ranges). The hooks are
    removed afterwards, also when the pass fails.
    """
    modules = dict(model.named_modules())
    stats = {s.name: make_stat(observer) for s in sites}
    handles = []
    for s in sites:
        stat = stats[s.name]
        handles.append(modules[s.module].register_forward_hook(lambda _m, _i, out, stat=stat: stat.update(out)))
    model.to(device)
    t0 = time.perf_counter()
    try:
        ev = evaluate(model, loader, device, desc=f"calibrate {observer}")  # float32, TF32 off
    finally:
        for h in handles:
            h.remove()
    return Calibration(observer, stats, ev.images, time.perf_counter() - t0)
