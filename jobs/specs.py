"""Frozen, self-validating specs, all in this module: train, prune and PTQ jobs, searches, exports.

``TrainSpec``, ``PruneSpec`` and ``PTQSpec`` are jobs; ``TuneSpec`` says how a search runs over one
of them; ``ExportSpec`` which row of a run to ship. (``jobs/slurm_options.ExecutorOptions`` says where
a job runs, not what it computes, and stays beside the sbatch rendering.) The CLI options of ``python -m
jobs.launch`` are generated from these fields one to one (the field's ``help`` metadata is the
option's help), and every result row carries the spec flattened to ``spec_<field>`` columns. A
bad value raises ``ValueError`` naming the field, the value and what is allowed, before anything is
submitted or written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress import catalog
from compress.catalog import (
    CENTERS,
    CHANNEL_IMPORTANCES,
    ENGINES,
    OBSERVERS,
    SCORINGS,
    STRUCTURES,
    WEIGHT_SCHEMES,
    shrinks,
    unsupported,
)
from compress.datasets import parse_data
from compress.provenance import spec_value
from compress.registry import BUILTINS, parse_args, parse_model
from compress.results import table_file
from compress.schedule import SCHEDULES, phase_targets
from jobs.selection import parse_selector

OPTIMIZERS = ("adamw", "sgd")
ENV_WEIGHTS = "COMPRESS_WEIGHTS"


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A spec field with CLI help text."""
    return field(default=default, metadata={"help": help, **extra})


def check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def check_choice(name: str, value: str, known: Any) -> None:
    if value not in known:
        raise ValueError(f"{name}={value!r} is unknown; known: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class RunFields:
    """Fields every job has: what model, which data, where results go, and the seed."""

    model: str = opt("resnet20a", f"model: a built-in ({', '.join(BUILTINS)}), timm:NAME, torchvision:NAME or "
                                  "package.module:function (your factory returning an nn.Module, importable "
                                  "where the job runs)")
    model_args: str = opt("", "keyword arguments of the model's constructor, e.g. num_classes=10,in_chans=1")
    weights: str = opt("", "weights file: a state dict or a checkpoint holding one under 'state_dict' or 'model' "
                           "(or 'pretrained' to download a built-in's)", env="COMPRESS_WEIGHTS")
    data: str = opt("cifar10", "data: cifar10 (under --data-root), imagefolder:ROOT (ROOT/train and ROOT/val, "
                               "a folder per class) or package.module:function returning (train, test) datasets")
    data_root: str = opt("", "CIFAR-10 root (holds cifar-10-batches-bin/ or -py/)", env="COMPRESS_DATA")
    image_size: int = opt(0, "imagefolder: images resized to this square size (0: 32)")
    data_mean: tuple[float, ...] = opt((), "per-channel input mean of a non-built-in model's normalisation, e.g. "
                                           "0.5,0.5,0.5 (default: computed once over the training images)")
    data_std: tuple[float, ...] = opt((), "per-channel input std, as --data-mean")
    results: str = opt("results", "results root (Parquet tables and checkpoints)")
    run_id: str = opt("", "run name; default <kind>-<time>-<spec hash>; one that exists is refused (see --resume)")
    seed: int = opt(0, "seed of initialisation, data order, augmentation and subsets")
    device: str = opt("auto", "torch device: auto (CUDA if visible, else CPU), cpu, cuda, cuda:N")

    def __post_init__(self) -> None:
        parse_model(self.model)  # the form only; the name is checked by building it when the command runs
        parse_args(self.model_args)
        parse_data(self.data)
        check(self.image_size >= 0, "image_size", self.image_size, "must be >= 0")
        check(len(self.data_mean) == len(self.data_std), "data_std", ",".join(map(str, self.data_std)),
              "give as many values as --data-mean")
        check(all(s > 0 for s in self.data_std), "data_std", ",".join(map(str, self.data_std)), "must be > 0")
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device", self.device,
              "use auto, cpu, cuda or cuda:N")
        check(bool(self.results), "results", self.results, "must be a folder")

    def kind(self) -> str:
        raise NotImplementedError

    def with_defaults(self) -> RunFields:
        """Fill the run id (and weights/data from the environment) so a requeued job sees one spec."""
        changes: dict[str, Any] = {}
        if not self.weights and os.environ.get(ENV_WEIGHTS) and self.needs_weights():
            changes["weights"] = os.environ[ENV_WEIGHTS]
        if not self.data_root and os.environ.get("COMPRESS_DATA"):
            changes["data_root"] = os.environ["COMPRESS_DATA"]
        spec = dataclasses.replace(self, **changes) if changes else self
        if not spec.run_id:
            digest = hashlib.sha1(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:6]
            spec = dataclasses.replace(spec, run_id=f"{spec.kind()}-{time.strftime('%Y%m%d-%H%M%S')}-{digest}")
        return spec

    def needs_weights(self) -> bool:
        return True


@dataclass(frozen=True)
class TrainFields(RunFields):
    """How one phase of training runs: optimizer, schedule, batch, augmentation."""

    epochs: int = opt(1, "epochs of training (per phase when pruning)")
    optimizer: str = opt("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = opt(1e-3, "peak learning rate (cosine decay to zero over each phase)")
    weight_decay: float = opt(5e-4, "weight decay (decoupled for AdamW)")
    warmup_epochs: float = opt(0.0, "linear warm-up at the start of each phase, in epochs")
    batch_size: int = opt(64, "training batch size")
    randaugment: bool = opt(True, "RandAugment on top of random crop + flip")
    train_size: int = opt(0, "use the first N of a seeded shuffle of the training set (0: all)")
    test_size: int = opt(0, "evaluate on the first N test images (0: all)")
    eval_batch_size: int = opt(500, "evaluation batch size")
    eval_every_epoch: bool = opt(True, "evaluate the test set after every epoch (else once per phase)")
    amp: bool = opt(True, "bf16 autocast for training on CUDA (evaluation is float32; ignored on CPU)")
    cpu_bf16: bool = opt(False, "bf16 autocast for training on the CPU too (~1.6x faster where the CPU has "
                                "AVX512-BF16/AMX); evaluation stays float32")
    compile: str = opt("auto", "torch.compile the model for training and evaluation: auto (on CUDA; on a CPU when "
                               "the run trains 1,000,000 images or more, where ~140 s of compiling pays), on, off",
                       choices=catalog.COMPILE_CHOICES)
    kd_weight: float = opt(0.0, "weight of distillation from the teacher (the starting weights unless --teacher) "
                                "in the training loss (prune: while retraining)")
    kd_temperature: float = opt(4.0, "distillation temperature")
    teacher: str = opt("", "weights of the distillation teacher (default: the starting weights), e.g. the dense "
                           "model when fine-tuning a pruned run's model (--run)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.epochs >= 0, "epochs", self.epochs, "must be >= 0")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check(0 < self.lr <= 10, "lr", self.lr, "must be in (0, 10]")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1")
        # the upper bounds are the data's sizes, checked when the data is loaded (``check_sizes``)
        check(self.train_size >= 0, "train_size", self.train_size, "must be >= 0")
        check(self.test_size >= 0, "test_size", self.test_size, "must be >= 0")
        check_choice("compile", self.compile, catalog.COMPILE_CHOICES)
        check(0.0 <= self.kd_weight <= 1.0, "kd_weight", self.kd_weight, "must be in [0, 1]")
        check(self.kd_temperature > 0, "kd_temperature", self.kd_temperature, "must be > 0")
        check(not self.teacher or self.kd_weight > 0, "teacher", self.teacher,
              "is only used for distillation: give --kd-weight > 0 too")


@dataclass(frozen=True)
class Phase:
    """One step of a plan: prune to ``target`` (None: no pruning), then train ``epochs``."""

    index: int
    target: float | None
    epochs: int
    filter_fraction: float = 0.0


@dataclass(frozen=True)
class TrainSpec(TrainFields):
    """Training without pruning, one phase: from scratch, or fine-tuning given weights or a run's model (``--run``,
    a channel-pruned one at its own widths), distilled from a teacher with ``kd_weight`` > 0."""

    epochs: int = opt(30, "epochs of training")
    lr: float = opt(1e-3, "peak learning rate (cosine decay to zero)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.kd_weight == 0 or bool(self.teacher or self.weights), "kd_weight", self.kd_weight,
              "distils from a teacher: give --teacher FILE (or --weights / --run, whose model then teaches itself)")

    def kind(self) -> str:
        return "train"

    def needs_weights(self) -> bool:
        return False

    def plan(self) -> list[Phase]:
        return [Phase(1, None, self.epochs)]


@dataclass(frozen=True)
class PruneSpec(TrainFields):
    """A prune/retrain schedule: BN-gamma filter pruning once, then global L1 magnitude phases; or, with
    ``structure="channels"``, phases that remove whole channels (``compress.channels``) down to a MACs or
    parameter target."""

    epochs: int = opt(10, "retraining epochs per phase (the reference lab ran up to 150)")
    phases: int = opt(12, "number of prune/retrain phases")
    final_epochs: int = opt(-1, "epochs of the last phase, the fine-tune at the final sparsity (-1: same as --epochs)")
    final_sparsity: float = opt(0.92, "global sparsity over conv+linear weights after the last phase")
    schedule: str = opt("geometric", "how per-phase targets grow", choices=tuple(SCHEDULES))
    filter_fraction: float = opt(0.05, "fraction of conv filters removed by smallest |BN gamma|, phase 1 only")
    keep_dense: tuple[str, ...] = opt((), "comma-separated modules left out of magnitude pruning, e.g. conv1,linear")
    max_layer_sparsity: float = opt(1.0, "cap on any one layer's sparsity in magnitude pruning; the others make up "
                                         "the global target (1.0: no cap)")
    scoring: str = opt("magnitude", "how magnitude pruning ranks weights across layers: magnitude (one global |w| "
                                    "threshold) or lamp (layer-adaptive LAMP scores)", choices=SCORINGS)
    bn_reestimate: bool = opt(False, "recompute BN statistics on training batches right after each pruning step")
    structure: str = opt("weights", "what the phases remove: weights (global magnitude, unstructured: a smaller "
                                    "file) or channels (whole channels through Torch-Pruning's dependency graph: a "
                                    "smaller, faster dense model; --final-sparsity, --filter-fraction, --scoring and "
                                    "--max-layer-sparsity do not apply)", choices=STRUCTURES)
    target_macs: float = opt(0.0, "channels: MACs left after the last phase, a fraction of the starting model's "
                                  "(the dense model; with --run, that run's final model), e.g. 0.5")
    target_params: float = opt(0.0, "channels: parameters left after the last phase, a fraction of the starting "
                                    "model's (instead of --target-macs)")
    importance: str = opt("l1", "channels: how channels are ranked: l1, l2 (norms of the coupled weights), bn "
                                "(|BN gamma|), taylor (|weight x gradient| over 8 training batches)",
                          choices=CHANNEL_IMPORTANCES)
    global_channels: bool = opt(False, "channels: rank channels across layers (else the same fraction of each "
                                       "layer); --keep-dense layers keep their output channels (default: the stem "
                                       "and the classifier)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.phases >= 1, "phases", self.phases, "must be >= 1")
        check(self.final_epochs >= -1, "final_epochs", self.final_epochs, "must be >= 0 (or -1: same as epochs)")
        check(0.0 <= self.final_sparsity < 1.0, "final_sparsity", self.final_sparsity, "must be in [0, 1)")
        check_choice("schedule", self.schedule, SCHEDULES)
        check(0.0 <= self.filter_fraction < 1.0, "filter_fraction", self.filter_fraction, "must be in [0, 1)")
        check_choice("scoring", self.scoring, SCORINGS)
        check(0.0 < self.max_layer_sparsity <= 1.0, "max_layer_sparsity", self.max_layer_sparsity, "must be in (0, 1]")
        check_choice("structure", self.structure, STRUCTURES)
        check_choice("importance", self.importance, CHANNEL_IMPORTANCES)
        for name in ("target_macs", "target_params"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, name, value, "must be a fraction in (0, 1) of the starting model's")
            check(self.structure == "channels" or value == 0.0, name, value, "is for --structure channels")
        if self.structure == "channels":
            check((self.target_macs > 0) != (self.target_params > 0), "target_macs", self.target_macs,
                  "--structure channels needs one target: --target-macs or --target-params (a fraction in (0, 1))")
        # keep_dense names and the sparsity budget are checked on the built model (``compress.prune.check_budget``)

    def kind(self) -> str:
        return "prune"

    def reports_expected(self) -> int:
        """Rows a full run reports to a search: one per phase."""
        return self.phases

    def channel_target(self) -> tuple[str, float]:
        """("macs" or "params", the fraction of the starting model's left at the end) of a channels run."""
        return ("params", self.target_params) if self.target_params > 0 else ("macs", self.target_macs)

    def plan(self) -> list[Phase]:
        """The phases; a target is the fraction removed after that phase: of the weights, or for channels of
        the starting model's MACs (or parameters)."""
        last = self.epochs if self.final_epochs < 0 else self.final_epochs
        if self.structure == "channels":
            targets = phase_targets(1.0 - self.channel_target()[1], self.phases, self.schedule)
            return [Phase(i + 1, t, last if i == self.phases - 1 else self.epochs) for i, t in enumerate(targets)]
        targets = phase_targets(self.final_sparsity, self.phases, self.schedule)
        return [Phase(i + 1, t, last if i == self.phases - 1 else self.epochs,
                      self.filter_fraction if i == 0 else 0.0) for i, t in enumerate(targets)]


# --- post-training quantization ---------------------------------------------------------------

METHODS = tuple(catalog.BACKENDS)  # manual, fx, pt2e: also the order rows are written in
SELECTIONS = ("random", "first")


def _known(name: str, values: tuple, known: tuple | dict) -> None:
    check(len(values) > 0, name, ",".join(map(str, values)), "give at least one value")
    for v in values:
        check_choice(name, v, known)
    check(len(set(values)) == len(values), name, ",".join(map(str, values)), "values must be distinct")


@dataclass(frozen=True)
class PTQSpec(RunFields):
    """A post-training int8 sweep; lists expand into a grid, one array task per (observer, calibration size)."""

    methods: tuple[str, ...] = opt(("fx", "manual"), "PTQ backends: manual (hand-written int8), fx (FX graph mode, "
                                                     "deprecated upstream), pt2e (torchao torch.export flow)")
    observers: tuple[str, ...] = opt(("minmax",), "activation observers: minmax, histogram, moving_average "
                                                  "(one task each)")
    weight_observers: tuple[str, ...] = opt(("per_channel",), "symmetric int8 weights: per_channel, per_tensor")
    engine: str = opt("x86", "quantized kernels (x86, fbgemm: Intel/AMD; qnnpack: Arm)", choices=ENGINES)
    reduce_range: bool = opt(True, "7-bit activations on x86/fbgemm (no int16 overflow on CPUs without VNNI); "
                                   "qnnpack always uses 8 bits")
    calib_sizes: tuple[int, ...] = opt((1000,), "calibration images from the training set (one task each)")
    calib_selection: str = opt("random", "calibration subset: random (seeded; sizes nested) or first",
                               choices=SELECTIONS)
    calib_batch_size: int = opt(100, "calibration batch size")
    alphas: tuple[float, ...] = opt((1.0,), "activation range factors in (0, 1.5], e.g. 0.95,1.0 or a range "
                                            "start:stop:step like 0.95:1.0:0.01 (manual path)")
    centers: tuple[str, ...] = opt(("min",), "what alpha keeps fixed: min, zero (manual path)")
    test_size: int = opt(0, "evaluate on the first N test images (0: all)")
    eval_batch_size: int = opt(500, "evaluation batch size (float and int8)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _known("methods", self.methods, METHODS)
        _known("observers", self.observers, OBSERVERS)
        _known("weight_observers", self.weight_observers, WEIGHT_SCHEMES)
        check_choice("engine", self.engine, ENGINES)
        _known("centers", self.centers, CENTERS)
        check_choice("calib_selection", self.calib_selection, SELECTIONS)
        check(len(self.calib_sizes) > 0, "calib_sizes", "", "give at least one size")
        for n in self.calib_sizes:  # at most the training set: checked when the data is loaded
            check(n >= 1, "calib_sizes", n, "each size must be >= 1 (images of the training set)")
        check(len(set(self.calib_sizes)) == len(self.calib_sizes), "calib_sizes",
              ",".join(map(str, self.calib_sizes)), "values must be distinct")
        check(len(self.alphas) > 0, "alphas", "", "give at least one alpha")
        for a in self.alphas:
            check(0.0 < a <= 1.5, "alphas", a, "each alpha must be in (0, 1.5]")
        check(self.calib_batch_size >= 1, "calib_batch_size", self.calib_batch_size, "must be >= 1")
        check(self.test_size >= 0, "test_size", self.test_size, "must be >= 0")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1")
        for method in self.methods:
            why = unsupported(method, self.weight_observers, self.engine, self.alphas, self.centers)
            check(not why, "methods", ",".join(self.methods), why)
        check("manual" in self.methods or not shrinks(self.alphas, self.centers), "alphas",
              ",".join(map(str, self.alphas)) + " / centers=" + ",".join(self.centers),
              "alpha/center shrink is expressed by the manual method only; add manual to --methods "
              "(fx and pt2e use their observers' qparams)")

    def kind(self) -> str:
        return "ptq"

    def task_name(self) -> str:
        """``<observer>-<calibration size>`` of a one-task spec, e.g. ``minmax-10000``."""
        if len(self.observers) != 1 or len(self.calib_sizes) != 1:
            raise ValueError("a PTQ task has one observer and one calibration size: split the sweep with plan_tasks")
        return f"{self.observers[0]}-{self.calib_sizes[0]}"

    def task_file(self) -> Path:
        """The Parquet file of a one-task spec's rows, e.g. ``results/ptq/<run_id>-minmax-10000.parquet``."""
        return table_file(self.results, "ptq", f"{self.run_id}-{self.task_name()}")


def expand_ranges(text: str) -> str:
    """Comma-separated values where ``start:stop:step`` stands for an inclusive range.

    E.g. ``"0.95:1.0:0.01"`` -> ``"0.95,0.96,0.97,0.98,0.99,1.0"``; ``"0.9,0.98:1.0:0.01"`` ->
    ``"0.9,0.98,0.99,1.0"``. Values are rounded to 10 decimals so 0.95 + 3 * 0.01 is 0.98, not 0.9799999.
    """
    out: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if ":" not in part:
            if part:
                out.append(part)
            continue
        bits = part.split(":")
        try:
            start, stop, step = (float(b) for b in bits) if len(bits) == 3 else (None, None, None)
        except ValueError:
            start = None
        if start is None or step <= 0 or stop < start:
            raise ValueError(f"range {part!r} is invalid: use start:stop:step with step > 0 and stop >= start, "
                             f"e.g. 0.95:1.0:0.01")
        n = math.floor((stop - start) / step + 1e-9) + 1
        if n > 1000:
            raise ValueError(f"range {part!r} has {n} values; at most 1000")
        out.extend(repr(round(start + i * step, 10)) for i in range(n))
    return ",".join(out)


# --- searches and exports --------------------------------------------------------------------------

SEARCHERS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")


@dataclass(frozen=True)
class TuneSpec:
    """How to search: the space, the searcher, the scheduler, the budget and the objective."""

    space: tuple[str, ...] = opt((), "a searched field, FIELD=DIST:ARGS, e.g. lr=loguniform:1e-4:1e-2", multiple=True)
    num_samples: int = opt(4, "trials (per grid point when the space has grid dimensions)")
    max_concurrent: int = opt(2, "trials running at once")
    searcher: str = opt("random", "how configurations are chosen", choices=SEARCHERS)
    scheduler: str = opt("asha", "early stopping of poor trials (asha) or none (fifo)", choices=SCHEDULERS)
    max_drop: float = opt(1.5, "prune objective: allowed top-1 drop from the starting model, in points")
    search_id: str = opt("", "search name; default tune-<kind>-<time>; reuse one with --resume")
    resume: bool = opt(False, "resume the interrupted search --search-id")
    cpus_per_trial: float = opt(0.0, "CPUs per trial (0: a share of the CPUs Ray has, fractional where there are "
                                      "fewer CPUs than --max-concurrent, so that many trials run at once)")
    gpus_per_trial: float | None = opt(None, "GPUs per trial, a fraction shares one GPU (default: 0 with --device cpu, "
                                             "else a share of Ray's GPUs, 1 or 1/k for k trials per GPU; on SLURM "
                                             "without --gpus the job asks for what the trials need)")
    max_failures: int = opt(0, "times a failed trial is retried (e.g. after losing its node); it resumes from "
                               "its own checkpoint")

    def __post_init__(self) -> None:
        check(self.num_samples >= 1, "num_samples", self.num_samples, "must be >= 1")
        check(self.max_concurrent >= 1, "max_concurrent", self.max_concurrent, "must be >= 1")
        check_choice("searcher", self.searcher, SEARCHERS)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check(self.max_drop >= 0, "max_drop", self.max_drop, "must be >= 0")
        check(self.cpus_per_trial >= 0, "cpus_per_trial", self.cpus_per_trial, "must be >= 0")
        gpus = self.gpus_per_trial
        check(gpus is None or gpus >= 0, "gpus_per_trial", gpus, "must be >= 0")
        check(gpus is None or gpus <= 1 or float(gpus).is_integer(), "gpus_per_trial", gpus,
              "a share of one GPU (<= 1) or a whole number of GPUs")
        check(self.max_failures >= 0, "max_failures", self.max_failures, "must be >= 0")
        check(not self.resume or bool(self.search_id), "resume", self.resume, "needs --search-id of the search")


@dataclass(frozen=True)
class ExportSpec:
    """Which run to export, which of its rows, and where the data is (default: the run's own spec)."""

    run: str
    select: str = "best"
    results: str = "results"
    data_root: str = ""
    device: str = "auto"

    def __post_init__(self) -> None:
        check(bool(self.run), "run", self.run, "give a run id")
        check(bool(self.results), "results", self.results, "must be a folder")
        parse_selector(self.select)  # a bad selector fails here, before anything runs


def spec_defaults() -> dict[str, dict[str, Any]]:
    """kind -> ``spec_<field>`` -> default, for every job spec: what a row written before a field existed ran with."""
    return {cls.kind(cls): {f"spec_{f.name}": spec_value(f.default) for f in dataclasses.fields(cls)
                            if f.default is not dataclasses.MISSING}
            for cls in (TrainSpec, PruneSpec, PTQSpec)}


def base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return base_type(next(a for a in typing.get_args(tp) if a is not type(None)))
    return tp


def _split(value: str, item_type: Any) -> tuple:
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    try:
        return tuple(item_type(p) for p in parts)
    except ValueError as e:
        raise ValueError(f"cannot read {value!r} as a list of {item_type.__name__}: {e}") from e


def spec_from_options(spec_cls: type, options: dict[str, Any]) -> Any:
    """Build ``spec_cls`` from parsed options (only its own fields are taken).

    Every command reads a list the same way: comma-separated, and for float lists ``start:stop:step``
    ranges too (``--alphas 0.95:1.0:0.01`` in ``ptq`` and in ``tune ptq`` alike).
    """
    hints = typing.get_type_hints(spec_cls)
    kwargs = {}
    for f in dataclasses.fields(spec_cls):
        if f.name not in options:
            continue
        v = options[f.name]
        tp = base_type(hints[f.name])
        if typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            item = args[0] if args else str
            if isinstance(v, str) and item is float:  # a float list may hold start:stop:step ranges
                v = expand_ranges(v)
            v = _split(v, item) if isinstance(v, str) else tuple(v)
        kwargs[f.name] = v
    return spec_cls(**kwargs)
