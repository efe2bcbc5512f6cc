"""What a job reads before it runs: the spec's data and model, checked against each other.

The launcher calls these before it submits anything (a bad model string, a factory that raises,
weights that do not fit, a class count the model does not output: one line, exit 2); the job calls
them again where it runs (a SLURM node imports a user's model module there). The device is the one
thing checked where the job runs only: a login node without a GPU submits ``--device cuda`` jobs
(``check_device``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from compress import registry
from compress.datasets import ImageData, load_data
from compress.loops import pick_device
from compress.models import WeightsError
from compress.prune import check_budget
from jobs.slurm_options import ExecutorOptions
from jobs.specs import PruneSpec, PTQSpec, check


def load_stored_data(fields: Mapping[str, Any], data_root: str = "", download: bool = False) -> ImageData:
    """The data named by a spec's fields as stored (``spec.json``, a manifest's spec, ``dataclasses.asdict``):
    ``data``, ``data_root`` (unless ``data_root`` is given), ``image_size``, ``data_mean``, ``data_std``."""
    return load_data(fields.get("data") or "cifar10", data_root or fields.get("data_root") or None,
                     image_size=int(fields.get("image_size") or 0), mean=tuple(fields.get("data_mean") or ()),
                     std=tuple(fields.get("data_std") or ()), download=download)


def load_run_data(spec: Any, download: bool = False) -> ImageData:
    """The data of a spec (``--data``, ``--data-root``, ``--image-size``, ``--data-mean/std``), its sizes checked."""
    data = load_stored_data(dataclasses.asdict(spec), download=download)
    for name, size, split in (("train_size", getattr(spec, "train_size", 0), data.train),
                              ("test_size", getattr(spec, "test_size", 0), data.test)):
        if size > len(split):
            raise ValueError(f"{name}={size} is invalid: the data has {len(split):,} images in that split")
    return data


def load_run_model(spec: Any, data: ImageData, weights: str | None = None) -> torch.nn.Module:
    """The spec's model with ``weights`` (default: the spec's), its output width checked against the data's classes."""
    model = registry.load(spec.model, spec.model_args, spec.weights if weights is None else weights, data.mean,
                          data.std)
    registry.check_classes(model, data.image_shape, data.num_classes, spec.model)
    model.input_shape = data.image_shape  # the example input of tracing and export (PTQ, artifacts)
    return model


def check_device(device: str, executor: ExecutorOptions | None = None) -> None:
    """The spec's ``--device`` against where the job runs: ``ValueError`` with one line if it cannot be had.

    Here (no ``executor``, or one without a partition): this process must see it (``pick_device``:
    ``cuda`` on a machine without a GPU is refused). On SLURM the node checks it when the job starts
    (the submitting machine, a login node, may have no GPU at all); here only that the job gets the
    GPUs it names: ``cuda`` with ``--gpus 0`` would get none, ``cuda:1`` needs ``--gpus 2`` (SLURM
    numbers a job's GPUs from 0).
    """
    if executor is None or executor.local:
        pick_device(device)
        return
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return
    check(index.isdigit() or not index, "device", device, "use auto, cpu, cuda or cuda:N")
    need, have = int(index or 0) + 1, executor.job_gpus
    check(have >= need, "device", device,
          "the SLURM job gets no GPU (--gpus 0); ask for one with --gpus 1, or use --device auto or cpu" if not have
          else f"the SLURM job gets {have} GPU(s), numbered from 0; ask for --gpus {need}, or use "
          + ("cuda" if have == 1 else f"cuda:0 to cuda:{have - 1}"))


def check_job(spec: Any, download: bool = False,
              executor: ExecutorOptions | None = None) -> tuple[ImageData, torch.nn.Module]:
    """Everything a job will load, loaded and checked here first: (data, model).

    The data and the model (output width against the classes), the starting weights a kind needs,
    a teacher, a prune spec's kept-dense names and sparsity budget against the model's layers, and a
    PTQ spec's methods against the model (``jobs.ptq.preflight``). The device against where the
    job runs (``executor``: its options; None runs here; ``check_device``). Any problem is a
    ``ValueError`` line; the launcher and the searches call it before anything is submitted or written.
    """
    check_device(spec.device, executor)
    data = load_run_data(spec, download=download)
    if spec.needs_weights() and not spec.weights:
        what = "weights to quantize" if isinstance(spec, PTQSpec) else "starting weights"
        raise WeightsError(f"{spec.kind()} needs {what}: pass --weights FILE or set COMPRESS_WEIGHTS")
    model = load_run_model(spec, data)
    if getattr(spec, "teacher", ""):
        load_run_model(spec, data, spec.teacher)
    if isinstance(spec, PruneSpec):
        check_prunable(spec, model, tuple(data.image_shape))
    if isinstance(spec, PTQSpec):
        preflight(spec, data, model.eval(), executor=executor)
    return data, model


def check_prunable(spec: PruneSpec, model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
    """The kept-dense names and the target against the model: the sparsity budget, or for channels whether
    Torch-Pruning can remove channels of it and reach the MACs (or parameter) target with the layers kept."""
    if spec.structure != "channels":
        check_budget(model, spec.final_sparsity, spec.keep_dense, spec.max_layer_sparsity)
        return
    from compress import channels

    by, target = spec.channel_target()
    keep = spec.keep_dense or channels.default_keep(model)
    # the floor depends on which layers can shrink, not on how channels are ranked: l1 needs no gradients
    floor = channels.reachable(model, input_shape, channels.count(model, input_shape), by, keep,
                               global_=spec.global_channels)
    check(floor <= target, f"target_{by}", target,
          f"cannot be met with the layers kept ({', '.join(channels.fixed_layers(model, keep))}): channel pruning "
          f"reaches {floor:.3f} of the dense model's {by} at most; keep fewer layers dense or aim higher")


def preflight(spec: Any, data: ImageData, model: torch.nn.Module, trace: bool = True,
              executor: ExecutorOptions | None = None) -> None:
    """What the spec alone cannot check: the data's size, whether each method takes this model, this
    machine's quantized engines and the device (``check_device``: where the job runs, ``executor``).
    With ``trace`` (before submitting), ``pt2e`` exports and ``fx`` traces the model once (seconds),
    so one they cannot trace is one line before anything is submitted; the job itself leaves that to
    its backends, which raise the same line."""
    from compress.quant import quiet  # torchao: loaded by PTQ specs only
    from compress.quant.backends import BACKENDS

    check_device(spec.device, executor)
    train_images = len(data.train)
    for n in spec.calib_sizes:
        check(n <= train_images, "calib_sizes", n, f"larger than the training set ({train_images} images)")
    check(spec.test_size <= len(data.test), "test_size", spec.test_size,
          f"larger than the test set ({len(data.test)} images)")
    available = torch.backends.quantized.supported_engines
    check(spec.engine in available, "engine", spec.engine,
          f"not available on this machine; available: {', '.join(e for e in available if e != 'none')}")
    for method in spec.methods:
        why = BACKENDS[method].refuses(model)
        check(not why, "methods", ",".join(spec.methods), why)
    if not trace:
        return
    with quiet():
        if "pt2e" in spec.methods:
            from compress.quant.pt2e import export_float

            export_float(model)
        if "fx" in spec.methods:
            from compress.quant import fx

            fx.prepare(model, spec.observers[0], spec.weight_observers[0], spec.reduce_range, spec.engine)
