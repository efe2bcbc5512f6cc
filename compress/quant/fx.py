"""FX graph-mode PTQ (``torch.ao.quantization.quantize_fx``): the path users compare the hand-written one with.

    prepared = prepare(model, "minmax", "per_channel", reduce_range=True)   # traces, fuses conv+BN(+ReLU)
    calibrate(prepared, loader, device)                                     # observers see a training subset
    int8 = convert(prepared)                                                # CPU int8 GraphModule

The FX backend of ``compress/quant/backends.py``; the int8 modules of the manual path
(``int8.py``) use ``torch.ao.nn.quantized`` as well, and ``pt2e.py`` holds the torchao flow. torch
2.14 marks ``torch.ao.quantization`` deprecated; its notices are silenced in one place (``quiet``).

Observers by name, as in ``observe.OBSERVERS``: ``minmax`` (MinMaxObserver), ``histogram``
(HistogramObserver), ``moving_average`` (MovingAverageMinMaxObserver); uint8 affine activations in
0..127 when ``reduce_range`` (see ``int8.py`` for why), else 0..255; weights symmetric int8 per
channel (PerChannelMinMaxObserver) or per tensor (MinMaxObserver). Activation ranges are given
as quant_min/quant_max rather than ``reduce_range=`` (the same qparams, without torch's per-observer
warning). Calibration runs on the job's device; conversion and the int8 model run on the CPU.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch
from torch import fx, nn

from compress.loops import evaluate
from compress.quant import quiet
from compress.quant.int8 import QParams
from compress.quant.qparams import activation_range

with quiet():
    from torch.ao.quantization import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        PerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

FX_OBSERVERS = {
    "minmax": MinMaxObserver,
    "histogram": HistogramObserver,
    "moving_average": MovingAverageMinMaxObserver,
}


def qconfig_mapping(observer: str, weights: str, reduce_range: bool, engine: str = "x86") -> QConfigMapping:
    """The engine's default mapping with the chosen activation observer and weight scheme as global qconfig."""
    if observer not in FX_OBSERVERS:
        raise ValueError(f"observer={observer!r} is unknown; known: {', '.join(FX_OBSERVERS)}")
    qr = activation_range(reduce_range)
    act = FX_OBSERVERS[observer].with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                           quant_min=qr.qmin, quant_max=qr.qmax)
    if weights == "per_channel":
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    elif weights == "per_tensor":
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    else:
        raise ValueError(f"weight scheme {weights!r} is unknown; known: per_channel, per_tensor")
    with quiet():
        return get_default_qconfig_mapping(engine).set_global(QConfig(activation=act, weight=weight))


def prepare(model: nn.Module, observer: str, weights: str = "per_channel", reduce_range: bool = True,
            engine: str = "x86") -> fx.GraphModule:
    """A traced copy of the float ``model`` (eval mode, CPU) with observers inserted; conv+BN(+ReLU) fused.

    The example input has the model's ``input_shape`` (what its data delivers, set when it was loaded).
    A model FX cannot trace is one ``ValueError`` line with the first line of the tracer's error.
    """
    mapping = qconfig_mapping(observer, weights, reduce_range, engine)
    example = (torch.rand(1, *model.input_shape),)
    with quiet():
        try:
            return prepare_fx(copy.deepcopy(model).cpu().eval(), mapping, example)
        except Exception as e:  # torch.fx raises TraceError, TypeError, NotImplementedError... on untraceable code
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"fx cannot trace {getattr(model, 'model_ref', type(model).__name__)}: "
                             f"{type(e).__name__}: {first}; use --methods pt2e") from None


def calibrate(prepared: fx.GraphModule, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
              device: torch.device) -> float:
    """One float32 pass (no autocast, no TF32) over ``loader`` on ``device`` so the observers see it.

    Returns the seconds taken; the model is back on the CPU afterwards, ready for ``convert``.
    """
    t0 = time.perf_counter()
    with quiet():
        evaluate(prepared.to(device), loader, device, desc="calibrate fx")  # float32, TF32 off
    prepared.cpu()
    return time.perf_counter() - t0


def copy_statistics(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Load the calibrated observers of ``src`` into ``dst`` (same model, another weight scheme).

    Weight observers run at conversion, not in the graph, so the graphs match and one calibration
    serves every weight scheme.
    """
    dst.load_state_dict(src.state_dict())


def convert(prepared: fx.GraphModule) -> fx.GraphModule:
    """The int8 model (CPU) of a calibrated ``prepared`` model, which is left as it was.

    Weights are packed for the quantized engine set now (``int8.set_engine``).
    """
    with quiet():
        return convert_fx(copy.deepcopy(prepared).cpu())


def _site_of(path: str) -> str:
    if path == "normalize":
        return "input"
    if path.endswith(".relu_out"):
        return path.removesuffix(".relu_out") + ".add"
    if path.endswith(".downsample"):
        return path.removesuffix(".downsample") + ".shortcut"
    return path


def observed_qparams(prepared: fx.GraphModule) -> dict[str, QParams]:
    """(scale, zero point) of every activation observer of a calibrated model, by site name.

    Site names are those of ``observe.quant_sites(model, shortcut=True)``: an observer is named by
    the module its input comes from (``layer1.0.relu_out`` -> ``layer1.0.add``, the option-A pad
    inside ``layer2.0.downsample`` -> ``layer2.0.shortcut``). Observers that FX shares with their
    input (identity shortcut, pooling, flatten) are skipped, as they add no qparams.
    """
    out: dict[str, QParams] = {}
    seen: set[int] = set()
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("activation_post_process"):
            continue
        obs = getattr(prepared, node.target)
        if id(obs) in seen:
            continue
        seen.add(id(obs))
        stack = node.args[0].meta.get("nn_module_stack") or {}
        if not stack:
            raise ValueError(f"cannot tell which module feeds {node.target}")
        path = list(stack)[-1]
        with quiet():
            scale, zp = obs.calculate_qparams()
        out[_site_of(path)] = (float(scale), int(zp))
    return out
