"""PT2E int8 (torchao): ``torch.export`` -> ``prepare_pt2e`` (x86 inductor quantizer) -> calibrate -> ``convert_pt2e``.

    prepared = prepare(model, "histogram", reduce_range=True)   # exported graph, conv+BN folded, observers in
    calibrate(prepared, loader, device)                         # observers see a training subset
    int8 = convert(prepared)                                    # q/dq graph (CPU), int8 weights folded in
    program = export_program(int8)                              # torch.export program with a dynamic batch
    torch.export.save(program, "model.pt2")                     # loads with torch + torchao, no project code
    fast = torch.compile(int8)                                  # inductor lowers q/dq to oneDNN int8 kernels

This is the current upstream path for int8 on x86 (``torch.ao.quantization`` is deprecated). The
quantizer is torchao's ``X86InductorQuantizer`` with its default annotation (which ops are
quantized, which share qparams) and the observer swapped in: ``minmax``, ``histogram`` or
``moving_average``, the same names as the other backends, as torchao's observer classes. Weights
are symmetric int8 per output channel (the only scheme the quantizer's inductor lowering takes);
activations uint8 in 0..127 with ``reduce_range`` (see ``int8.py`` for why), else 0..255.

The quantizer places its sites differently from FX and the hand-written model: a block's second
conv feeds the residual add unquantized (oneDNN fuses conv + add + ReLU), and the logits stay float.

Where it runs: export and conversion on the CPU; calibration on the job's device (float32); the
converted model runs its q/dq reference ops anywhere, its compiled form on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
from collections.abc import Iterable

import torch
from torch import nn

from compress.loops import evaluate
from compress.quant import quiet
from compress.quant.qparams import activation_range

with quiet():
    import torchao.quantization.pt2e as ao_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

PT2E_OBSERVERS = {
    "minmax": ao_pt2e.MinMaxObserver,
    "histogram": ao_pt2e.HistogramObserver,
    "moving_average": ao_pt2e.MovingAverageMinMaxObserver,
}
MAX_BATCH = 65_536


def _example(shape: tuple[int, ...]) -> tuple[torch.Tensor]:
    return (torch.rand(2, *shape),)


def _dynamic_batch() -> tuple[dict[int, torch.export.Dim]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def quantizer(observer: str, reduce_range: bool) -> xiq.X86InductorQuantizer:
    """The x86 inductor quantizer with its default config, activations observed by ``observer``."""
    if observer not in PT2E_OBSERVERS:
        raise ValueError(f"observer={observer!r} is unknown; known: {', '.join(PT2E_OBSERVERS)}")
    default = xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    qr = activation_range(reduce_range)
    ctr = PT2E_OBSERVERS[observer].with_args(eps=2**-12)  # the default config's eps
    act = xiq.QuantizationSpec(dtype=torch.uint8, quant_min=qr.qmin, quant_max=qr.qmax,
                               qscheme=torch.per_tensor_affine, is_dynamic=False, observer_or_fake_quant_ctr=ctr)
    config = xiq.QuantizationConfig(act, act, default.weight, default.bias, False)
    return xiq.X86InductorQuantizer().set_global(config)


class ExportError(ValueError):
    """A model ``torch.export`` cannot trace: one line with the first line of its error."""


def export_float(model: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` of the float ``model`` (eval, CPU) on inputs of its ``input_shape``, with a dynamic batch."""
    # a failing trace logs, and prints on stderr, the partial graph before it raises: the line below says it instead
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(copy.deepcopy(model).cpu().eval(), _example(tuple(model.input_shape)),
                                       dynamic_shapes=_dynamic_batch())
    except Exception as e:  # torch.export raises many types (UserError, Unsupported, TypeError...)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"pt2e needs a model torch.export can trace, and "
                          f"{getattr(model, 'model_ref', type(model).__name__)} fails: {type(e).__name__}: "
                          f"{first[:300]}") from None
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def prepare(model: nn.Module, observer: str, reduce_range: bool = True) -> torch.fx.GraphModule:
    """An exported copy of the float ``model`` (eval, CPU, dynamic batch) with observers inserted."""
    with quiet():
        graph = export_float(model).module()
        prepared = prepare_pt2e(graph, quantizer(observer, reduce_range))
        ao_pt2e.allow_exported_model_train_eval(prepared)  # so the shared evaluate() can call .eval()
    prepared.input_shape = tuple(model.input_shape)
    return prepared


def calibrate(prepared: torch.fx.GraphModule, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
              device: torch.device) -> float:
    """One float32 pass over ``loader`` on ``device``; returns seconds, the model back on the CPU."""
    t0 = time.perf_counter()
    with quiet():
        evaluate(prepared.to(device), loader, device, desc="calibrate pt2e")  # float32, TF32 off
    prepared.cpu()
    return time.perf_counter() - t0


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The int8 q/dq model (CPU) of a calibrated ``prepared`` model, which is left as it was."""
    with quiet():
        int8 = convert_pt2e(copy.deepcopy(prepared).cpu())
        ao_pt2e.allow_exported_model_train_eval(int8)
    int8.input_shape = prepared.input_shape
    _drop_unused_tensors(int8)
    return int8


def _drop_unused_tensors(gm: torch.fx.GraphModule) -> None:
    """Delete the parameters and buffers no node reads: conversion leaves the float weights beside their int8
    copies, which would make the exported program four times larger (1.7 MB instead of about 0.4 MB)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]


def export_program(int8: torch.fx.GraphModule) -> torch.export.ExportedProgram:
    """The converted model as a ``torch.export`` program with a dynamic batch (save with ``torch.export.save``)."""
    with quiet():
        return torch.export.export(int8, _example(tuple(int8.input_shape)), dynamic_shapes=_dynamic_batch())


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    """The ``.pt2`` file of an exported program, as ``torch.export.save`` writes it."""
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()
