"""The int8 ResNet of ``torch.ao.nn.quantized`` modules: kept to compare against, shipped no more.

This is the one place the deprecated quantized-module API lives: the integer-kernel model that the
q/dq model (``qdq.py``, what rows measure and files ship) is checked against, FX's converted model
is compared with, and the int8 ``.packed`` files of earlier versions were written from
(``pack_int8``, kept so a test can write one). Nothing on a load path imports this module.

No graph tracing and no QuantStub: the float ``Normalize`` runs first, then the image is quantized
with ``torch.quantize_per_tensor`` at the ``input`` site's qparams; every conv(+BN)(+ReLU) is one
quantized conv with int8 weights (BN folded, ``fold.py``) and uint8 output; each block ends with
its own ``add`` module (``QFunctional.add_relu``, the add and its ReLU in one kernel); pooling and
flattening keep their input's qparams; the classifier is a quantized linear; the logits are
dequantized. Weights are symmetric int8 (per output channel or per tensor), so zero weights stay
exactly zero. Given the same qparams, this model computes exactly what FX graph mode's converted
model computes (``tests/test_int8.py`` compares them with ``torch.equal``).

Activation range: on x86/fbgemm the default is 7-bit activations (``reduce_range``, 0..127). The
AVX2 kernels multiply u8 activations by s8 weights and add neighbouring pairs into int16, which
saturates for 8-bit activations (2 x 255 x 128 = 65,280 > 32,767); CPUs with AVX512-VNNI
accumulate in int32 and do not. A SLURM job does not know which CPU it lands on, so 7 bits is the
default there (the same int8 outputs on every x86 node); ``reduce_range=False`` gives 8-bit
activations for nodes known to have VNNI. qnnpack (Arm) always uses 8 bits.

Everything here runs on the CPU: quantized kernels have no CUDA implementation.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

from compress.catalog import ENGINES, WEIGHT_SCHEMES
from compress.models import CifarResNet, PadShortcut
from compress.quant import quiet
from compress.quant.packed import PackedError, _Writer
from compress.quant.qdq import folded_for
from compress.quant.qparams import INT8, UINT8, QRange, affine_qparams, shrink_range, symmetric_qparams
from compress.quant.size import FLOAT_BYTES, QPARAM_BYTES, Int8Size, packed_weight_bytes

QParams = tuple[float, int]


def set_engine(engine: str) -> None:
    """Select the quantized kernels (x86, fbgemm or qnnpack); fails naming the ones this machine has.

    Set before building or converting a model: weights are packed for the engine at build time.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is unknown; known: {', '.join(ENGINES)}")
    available = torch.backends.quantized.supported_engines
    if engine not in available:
        raise ValueError(f"quantized engine {engine!r} is not available on this machine; available: "
                         f"{', '.join(e for e in available if e != 'none')}")
    torch.backends.quantized.engine = engine


def effective_reduce_range(engine: str, reduce_range: bool) -> bool:
    """7-bit activations only where the kernels need them: x86/fbgemm, never qnnpack."""
    return reduce_range and engine != "qnnpack"


def derive_qparams(ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float = 1.0, center: str = "min",
                   qr: QRange = UINT8) -> dict[str, QParams]:
    """Activation qparams of every site from its observed range, shrunk by ``alpha`` around ``center``.

    The alpha sweep calls this once per (alpha, center) on the statistics of one calibration.
    E.g. a ReLU site with range [0, 2.55] in uint7 at alpha 1 -> (0.0200787, 0); at 0.95 -> (0.0190748, 0).
    """
    out = {}
    for name, (lo, hi) in ranges.items():
        s, z = affine_qparams(*shrink_range(lo, hi, alpha, center), qr)
        out[name] = (float(s), int(z))
    return out


def quantize_weight(weight: torch.Tensor, scheme: str = "per_channel") -> torch.Tensor:
    """Symmetric int8 weights, one scale per output channel or one per tensor (zero point 0).

    E.g. a channel with weights in [-0.51, 0.3] gets scale 0.004 and values -128..75.
    """
    w = weight.detach().float().cpu()
    if scheme == "per_channel":
        lo, hi = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)
        s, z = symmetric_qparams(lo, hi, INT8)
        return torch.quantize_per_channel(w, s.double(), z, 0, torch.qint8)
    if scheme == "per_tensor":
        s, z = symmetric_qparams(*torch.aminmax(w), INT8)
        return torch.quantize_per_tensor(w, float(s), int(z), torch.qint8)
    raise ValueError(f"weight scheme {scheme!r} is unknown; known: {', '.join(WEIGHT_SCHEMES)}")


def _qconv(conv: nn.Conv2d, relu: bool, qweight: torch.Tensor, qp: QParams) -> nnq.Conv2d:
    cls = nniq.ConvReLU2d if relu else nnq.Conv2d
    q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, True, conv.padding_mode)
    bias = conv.bias.detach().float().cpu() if conv.bias is not None else None
    q.set_weight_bias(qweight, bias)
    q.scale, q.zero_point = float(qp[0]), int(qp[1])
    return q


def _qlinear(linear: nn.Linear, qweight: torch.Tensor, qp: QParams) -> nnq.Linear:
    q = nnq.Linear(linear.in_features, linear.out_features)
    bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
    q.set_weight_bias(qweight, bias)
    q.scale, q.zero_point = float(qp[0]), int(qp[1])
    return q


def _add(qp: QParams) -> nnq.QFunctional:
    add = nnq.QFunctional()
    add.scale, add.zero_point = float(qp[0]), int(qp[1])
    return add


class Int8PadShortcut(nn.Module):
    """Option-A shortcut on uint8 values: keep every second pixel, pad channels with real zeros.

    Padding a quantized tensor writes its zero point, i.e. real 0, so no requantization is needed
    and the output keeps the input's qparams. With ``qparams`` it requantizes in float instead,
    the way FX graph mode does (dequantize, subsample, pad, quantize).
    """

    def __init__(self, pad: int, qparams: QParams | None = None) -> None:
        super().__init__()
        self.pad = pad
        self.requantize = qparams is not None
        self.scale, self.zero_point = (float(qparams[0]), int(qparams[1])) if qparams else (1.0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.requantize:
            y = F.pad(x.dequantize()[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
            return torch.quantize_per_tensor(y, self.scale, self.zero_point, torch.quint8)
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class Int8Block(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)) with two quantized convs and one add_relu."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module, downsample: nn.Module, add: nnq.QFunctional) -> None:
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.downsample = downsample
        self.add = add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add.add_relu(self.conv2(self.conv1(x)), self.downsample(x))


class Int8ResNet(nn.Module):
    """float [0, 1] images in, float logits out; everything between is uint8 activations, int8 weights."""

    def __init__(self, normalize: nn.Module, input_qparams: QParams, conv1: nn.Module, layers: list[nn.Sequential],
                 classifier: nnq.Linear, classifier_name: str) -> None:
        super().__init__()
        self.normalize = normalize
        self.input_scale, self.input_zero_point = float(input_qparams[0]), int(input_qparams[1])
        self.conv1 = conv1
        for i, layer in enumerate(layers):
            self.add_module(f"layer{i + 1}", layer)
        self.n_layers = len(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier_name = classifier_name
        self.add_module(classifier_name, classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.quantize_per_tensor(self.normalize(x), self.input_scale, self.input_zero_point, torch.quint8)
        x = self.conv1(x)
        for i in range(self.n_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        x = getattr(self, self.classifier_name)(torch.flatten(self.pool(x), 1))
        return x.dequantize()


@torch.no_grad()
def build_int8(model: CifarResNet, qparams: dict[str, QParams], weights: str = "per_channel",
               qweights: dict[str, torch.Tensor] | None = None) -> Int8ResNet:
    """The int8 model of a float ResNet (BN folded here if the model still has it) and site qparams.

    ``qparams`` holds (scale, zero point) for every site of ``observe.quant_sites(model)``; an
    option-A shortcut site (``layerI.J.shortcut``) is optional and makes that shortcut requantize.
    Build with the engine the model will run on already set (``set_engine``): weights are packed now.
    ``qweights`` (conv/linear name -> quantized weight) replaces quantizing the model's float weights:
    the packed-file loader (``packed.py``) passes the int8 weights it read. Runs on the CPU.
    """
    if weights not in WEIGHT_SCHEMES:
        raise ValueError(f"weight scheme {weights!r} is unknown; known: {', '.join(WEIGHT_SCHEMES)}")
    model = folded_for(model, qparams)

    def qw(name: str) -> torch.Tensor:
        if qweights is not None:
            return qweights[name]
        return quantize_weight(modules[name].weight, weights)

    modules = dict(model.named_modules())
    with quiet():
        conv1 = _qconv(model.conv1, True, qw("conv1"), qparams["conv1"])
        layers = []
        for li in range(1, 4):
            blocks = []
            for bi, block in enumerate(getattr(model, f"layer{li}")):
                name = f"layer{li}.{bi}"
                ds: nn.Module = nn.Identity()
                if isinstance(block.downsample, PadShortcut):
                    ds = Int8PadShortcut(block.downsample.pad, qparams.get(f"{name}.shortcut"))
                elif isinstance(block.downsample, nn.Sequential):
                    ds = _qconv(block.downsample[0], False, qw(f"{name}.downsample.0"), qparams[f"{name}.downsample.0"])
                blocks.append(Int8Block(_qconv(block.conv1, True, qw(f"{name}.conv1"), qparams[f"{name}.conv1"]),
                                        _qconv(block.conv2, False, qw(f"{name}.conv2"), qparams[f"{name}.conv2"]),
                                        ds, _add(qparams[f"{name}.add"])))
            layers.append(nn.Sequential(*blocks))
        classifier = _qlinear(model.classifier, qw(model.classifier_name), qparams[model.classifier_name])
    return Int8ResNet(copy.deepcopy(model.normalize), qparams["input"], conv1, layers, classifier,
                      model.classifier_name).eval()


def _activation_qparams(model: nn.Module) -> int:
    """How many activation (scale, zero point) pairs live outside the weight modules (input, adds, requants)."""
    # FX keeps them as top-level buffers (``normalize_scale_0``, ``layer1_0_relu_out_scale_0``, ...)
    n = sum(1 for k in model.state_dict() if "." not in k and re.search(r"_scale_\d+$", k))
    for m in model.modules():
        if isinstance(m, Int8ResNet | nnq.QFunctional) or (isinstance(m, Int8PadShortcut) and m.requantize):
            n += 1
    return n


def int8_size(model: nn.Module) -> Int8Size:
    """Storage of an int8 model built by ``int8.build_int8`` or FX ``convert`` (same modules, same size)."""
    dense = packed = weights = zeros = 0
    for m in model.modules():
        if not isinstance(m, nnq.Conv2d | nnq.Linear):  # ConvReLU2d is a Conv2d
            continue
        w = m.weight()
        q = w.int_repr()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            qzero = w.q_per_channel_zero_points().view(-1, *[1] * (q.dim() - 1))
            n_qparams = w.q_per_channel_scales().numel()
        else:
            qzero = torch.tensor(w.q_zero_point())
            n_qparams = 1
        mask = q != qzero
        nz = int(mask.sum())
        bias = m.bias()
        # weight qparams, float bias, and the module's output qparams
        extra = (n_qparams + 1) * QPARAM_BYTES + (bias.numel() * FLOAT_BYTES if bias is not None else 0)
        dense += q.numel() + extra
        packed += packed_weight_bytes(mask) + extra
        weights += q.numel()
        zeros += q.numel() - nz
    rest = _activation_qparams(model) * QPARAM_BYTES + sum(
        t.numel() * FLOAT_BYTES for k, t in model.state_dict().items() if k.startswith("normalize."))
    return Int8Size(dense + rest, packed + rest, weights, zeros)


def _weight_modules(model: Int8ResNet) -> list[tuple[str, nn.Module]]:
    """(float-model name, quantized module) of every int8 conv/linear, in forward order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nnq.Conv2d | nnq.Linear):  # ConvReLU2d is a Conv2d
            out.append((name + ".0" if name.endswith(".downsample") else name, m))
    return out


def int8_qparams(model: Int8ResNet) -> dict[str, QParams]:
    """The activation (scale, zero point) of every site of an ``Int8ResNet``, by ``quant_sites`` name."""
    qp: dict[str, QParams] = {"input": (model.input_scale, model.input_zero_point)}
    for name, m in _weight_modules(model):
        qp[name] = (float(m.scale), int(m.zero_point))
    for name, m in model.named_modules():
        if isinstance(m, nnq.QFunctional):
            qp[name] = (float(m.scale), int(m.zero_point))
        elif isinstance(m, Int8PadShortcut) and m.requantize:
            qp[name.removesuffix(".downsample") + ".shortcut"] = (m.scale, m.zero_point)
    return qp


def pack_int8(model: Int8ResNet, model_name: str, engine: str, meta: dict[str, Any] | None = None) -> bytes:
    """The packed file of an int8 model built by ``int8.build_int8`` (from manual or FX qparams)."""
    w = _Writer()
    schemes = set()
    for name, m in _weight_modules(model):
        q = m.weight()
        per_channel = q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        schemes.add("per_channel" if per_channel else "per_tensor")
        zp = q.q_per_channel_zero_points() if per_channel else torch.tensor([q.q_zero_point()])
        if bool((zp != 0).any()):
            raise PackedError(f"{name}: weights are not symmetric (zero point != 0); the packed format stores "
                              "symmetric int8 weights only")
        scale = q.q_per_channel_scales() if per_channel else torch.tensor([q.q_scale()], dtype=torch.float64)
        if not torch.equal(scale.float().double(), scale.double()):
            raise PackedError(f"{name}: weight scales are not float32 values")
        w.add(f"{name}.weight", q.int_repr(), "int8", sparse=True)
        w.add(f"{name}.weight_scale", scale, "float32")
        if m.bias() is not None:
            w.add(f"{name}.bias", m.bias(), "float32")
    if len(schemes) != 1:
        raise PackedError(f"mixed weight schemes {sorted(schemes)}")
    for key in ("mean", "std"):
        w.add(f"normalize.{key}", getattr(model.normalize, key), "float32")
    return w.finish({"format": 1, "kind": "int8", "model": model_name, "engine": engine,
                     "weights": schemes.pop(), "qparams": int8_qparams(model), "meta": meta or {}})
