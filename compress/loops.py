"""The one training loop and the one evaluation loop.

Baseline training, prune/retrain phases and PTQ calibration all go through ``train_one_epoch`` and
``evaluate`` (calibration is evaluation over a subset with observers attached). Both take a device:
CUDA when the job has one, else the CPU. On CUDA the forward runs under bf16 autocast; on the CPU
in float32 with channels_last activations, or under bf16 autocast when asked (``cpu_amp``: about
1.6x faster training on CPUs with AVX512-BF16 or AMX; weights and optimizer stay float32).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when this process can see a GPU, else CPU; or an explicit torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def autocast(device: torch.device, enabled: bool = True, cpu: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); on the CPU only when ``cpu`` is set."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16_kernels() -> bool | None:
    """Whether oneDNN has bf16 kernels for this CPU (torch's own probe, as inductor uses it); None: unknown."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def cpu_bf16_warning(device: torch.device) -> str:
    """Why bf16 autocast would be slow on ``device`` ('' when it is not a CPU or the CPU has bf16 kernels).

    oneDNN runs CPU bf16 convolutions natively only with AVX512 (BF16/AMX for the full gain); on an
    AVX2-only CPU they are emulated and training runs about ten times slower than in float32 (9
    against 95 images/s a thread for resnet20a at batch 128, AMD EPYC with AVX2).
    """
    if device.type != "cpu" or cpu_has_bf16_kernels() is not False:
        return ""
    return (f"--cpu-bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no bf16 kernels) trains about "
            f"ten times slower than float32: drop --cpu-bf16 on this machine")


def cosine_lr(step: int, total_steps: int, warmup_steps: int = 0, floor: float = 0.0) -> float:
    """LR multiplier at ``step``: linear warm-up, then cosine from 1 down to ``floor``.

    E.g. total 100, no warm-up: step 0 -> 1.0, step 50 -> 0.5, step 100 -> 0.0.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum); an unknown name lists the known ones."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd")


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float  # percent, on the augmented training batches
    images: int
    seconds: float


@dataclass(frozen=True)
class EvalStats:
    top1: float  # percent
    loss: float
    images: int
    seconds: float
    predictions: torch.Tensor | None = None  # predicted class per image (uint8, CPU), when asked for


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool | None) -> Iterable:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
                      weight: float, temperature: float) -> torch.Tensor:
    """(1 - weight) * CE(logits, targets) + weight * T^2 * KL(teacher_T || student_T)."""
    ce = F.cross_entropy(logits, targets)
    kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                  reduction="batchmean", log_target=True) * temperature**2
    return (1 - weight) * ce + weight * kd


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    device: torch.device,
    *,
    after_step: Callable[[], None] | None = None,
    teacher: nn.Module | None = None,
    kd_weight: float = 0.0,
    kd_temperature: float = 4.0,
    amp: bool = True,
    cpu_amp: bool = False,
    progress: bool | None = None,
    desc: str = "train",
) -> EpochStats:
    """One pass over ``loader``; ``after_step`` runs after every optimizer step (pruning masks).

    With a ``teacher`` and ``kd_weight`` > 0 the loss is ``distillation_loss``. ``amp``: bf16 autocast
    on CUDA; ``cpu_amp``: bf16 autocast on the CPU as well.
    """
    model.train()
    t0 = time.perf_counter()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    total = len(loader) if hasattr(loader, "__len__") else 0
    for x, y in _progress(loader, total, desc, progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp, cpu_amp):
            logits = model(x)
            if teacher is not None and kd_weight > 0:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = distillation_loss(logits.float(), y, t_logits.float(), kd_weight, kd_temperature)
            else:
                loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    n = max(n, 1)
    return EpochStats(total_loss.item() / n, 100.0 * correct.item() / n, n, time.perf_counter() - t0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    amp: bool = True,
    progress: bool | None = None,
    desc: str = "eval",
    keep_predictions: bool = False,
) -> EvalStats:
    """Top-1 and mean cross-entropy over ``loader``, in eval mode.

    Also the calibration pass of PTQ: run it over a training subset with observers attached.
    ``keep_predictions`` returns the predicted class of every image too (uint8: 10,000 bytes for the
    CIFAR-10 test set; int16 for a model of more than 256 classes), so two models, or a model and its
    exported file, can be compared image by image.
    """
    model.eval()
    t0 = time.perf_counter()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    kept: list[torch.Tensor] = []
    total = len(loader) if hasattr(loader, "__len__") else 0
    for x, y in _progress(loader, total, desc, progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum")
        pred = logits.argmax(1)
        correct += (pred == y).sum()
        n += len(y)
        if keep_predictions:  # one byte a class index up to 256 classes, else two (int16, little-endian)
            kept.append(pred.to(torch.uint8 if logits.shape[1] <= 256 else torch.int16))
    n = max(n, 1)
    preds = torch.cat(kept).cpu() if kept else None
    return EvalStats(100.0 * correct.item() / n, total_loss.item() / n, n, time.perf_counter() - t0, preds)


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  batches: int = 50) -> None:
    """Recompute BatchNorm running statistics over ``batches`` training batches (cumulative mean).

    After a pruning step the activations' statistics shift; refreshing them costs forward passes
    only and recovers much of the accuracy that pruning took.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.to(device))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()
