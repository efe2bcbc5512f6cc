"""The one training loop and the one evaluation loop.

Baseline training, prune/retrain phases and PTQ calibration all go through ``train_one_epoch`` and
``evaluate`` (calibration is evaluation over a subset with observers attached). Both take a device:
CUDA when the job has one, else the CPU. Training on CUDA runs its forward under bf16 autocast; on
the CPU in float32 with channels_last activations, or under bf16 autocast when asked (``cpu_amp``:
about 1.6x faster training on CPUs with AVX512-BF16 or AMX; weights and optimizer stay float32).
Evaluation is float32 on every device, so a row's top-1, its predictions and an artifact's
``expected_top1`` mean the same wherever the job ran.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.catalog import COMPILE_CHOICES


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


def gpu_bf16_warning(device: torch.device, amp: bool = True) -> str:
    """Why bf16 autocast would be slow on ``device`` ('' when it is not a CUDA GPU or the GPU has bf16 units).

    GPUs before compute capability 8.0 (V100, T4) emulate bf16: training under it runs slower than
    float32 there.
    """
    if not amp or device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False):
        return ""
    return (f"bf16 autocast on {torch.cuda.get_device_name(device)} (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}, no bf16 units) is emulated and "
            f"slower than float32: add --no-amp on this GPU")


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Turn off TF32 inside the block, so CUDA convs keep float32's 24-bit mantissa (TF32 keeps 10).

    Evaluation and calibration on a GPU then see the numbers the CPU would see (to summation order),
    not numbers shifted by TF32 rounding (about 1e-3 relative). A no-op for CPU work.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """On CUDA: cuDNN and cuBLAS pick deterministic kernels while the block runs (a no-op on the CPU).

    What "a resumed run reproduces an uninterrupted one" needs on a GPU: cuDNN's autotuner and its
    atomics-based kernels give different sums from one process to the next. cuBLAS reads
    ``CUBLAS_WORKSPACE_CONFIG`` when its first handle is made, so this is entered before the job's
    first CUDA call. Ops without a deterministic CUDA kernel warn instead of failing (``warn_only``).
    """
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ``auto`` compiles on a CPU when the run trains at least this many images. Measured on a 2-core
# AVX2 EPYC (resnet20a, batch 128, 2 threads, torch 2.14.1; bench/compile_speed.py, median of 5),
# compiling makes a prune training step 1.04x faster (210 -> 218 img/s; 1.07x with a distillation
# teacher, 161 -> 172), saving ~0.18 ms an image, and the compiles of a run (training, its last
# partial batch, evaluation) take ~140 s with a cold cache: they pay back after ~800,000 images.
CPU_COMPILE_PAYS_IMAGES = 1_000_000
COMPILE_SECONDS = {"cpu": 140.0, "cuda": 60.0}  # what the plan line adds for a run that compiles


def cxx_compiler() -> str:
    """The C++ compiler inductor builds CPU kernels with ('' when there is none)."""
    import shutil

    return shutil.which(os.environ.get("CXX") or "g++") or shutil.which("clang++") or ""


def compile_decision(choice: str, device: torch.device, train_images: int) -> tuple[bool, str]:
    """Whether a run compiles its model (``torch.compile``), and why, from ``--compile`` auto/on/off.

    ``auto``: on CUDA always (a small model there is bound by kernel launches, which compiling
    fuses); on a CPU when the run trains ``CPU_COMPILE_PAYS_IMAGES`` or more and a C++ compiler is
    installed. ``on`` without a compiler on a CPU is a ``ValueError`` line.
    """
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile={choice!r} is invalid: use one of {', '.join(COMPILE_CHOICES)}")
    if choice == "off":
        return False, "--compile off"
    if device.type == "cpu" and not cxx_compiler():
        if choice == "on":
            raise ValueError("compile='on' is invalid here: torch.compile on the CPU needs a C++ compiler "
                             "(g++ or clang++, or $CXX) and none is installed; use --compile off")
        return False, "no C++ compiler for torch.compile"
    if choice == "on" or device.type != "cpu":
        return True, f"--compile {choice} on {device.type}"
    if train_images >= CPU_COMPILE_PAYS_IMAGES:
        return True, f"{train_images:,} training images on the CPU (compiling pays from {CPU_COMPILE_PAYS_IMAGES:,})"
    return False, f"{train_images:,} training images on the CPU: too few for compiling to pay"


def compiled(model: nn.Module, on: bool) -> nn.Module:
    """``torch.compile(model)`` when ``on``, else ``model``: the compiled module shares its parameters,
    so masks, optimizers and checkpoints keep working on ``model`` itself."""
    return torch.compile(model) if on else model


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
    progress: bool | None = None,
    desc: str = "eval",
    keep_predictions: bool = False,
) -> EvalStats:
    """Top-1 and mean cross-entropy over ``loader``, in eval mode and float32 on every device.

    No autocast, even on CUDA where training runs under bf16: rows from a GPU and from a CPU, and a
    model and its exported file, are then compared on the same numbers (``verify`` re-evaluates in
    float32 on the CPU).

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
        with full_float32(), torch.autocast(device.type, enabled=False):  # even inside a caller's autocast
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
