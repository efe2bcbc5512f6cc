"""The int8 ResNet as a quantize/dequantize program: what ``manual`` and ``fx`` rows run and ship.

    q = build_qdq(folded, qparams, activation_range(True), "per_channel")   # an eager QDQResNet, CPU
    program = export_qdq(q)                # torch.export program, the op set PT2E's programs use

The hand-written int8 model once stood on ``torch.ao.nn.quantized`` modules and quantized-dtype
tensors, an API deprecated upstream. Here the same int8 model (the same sites, the same qparams,
the same symmetric int8 weights) is written with the ops PT2E's converted programs call,
``quantized_decomposed.quantize_per_tensor`` / ``dequantize_per_tensor`` / ``dequantize_per_channel``
on plain int8/uint8 tensors:

- every site (``observe.quant_sites``: the input, each conv(+BN)(+ReLU) output, each block's add and
  its ReLU, the classifier) rounds its float output to its uint8 grid and back;
- weights are int8 buffers with float32 scales (per output channel or per tensor, zero point 0),
  dequantized in the graph, so inductor folds them into oneDNN int8 kernels when compiled (x86);
- the global average pool keeps its input's grid, as the integer kernels do; an option-A shortcut
  pads with real zeros (requantized only when its site has qparams, as FX converts it).

It computes the q/dq reference: int8 values, float arithmetic between them. Against the integer
kernels of ``torch.ao.nn.quantized`` (``int8.py``, kept to compare against) a few activations round
the other way. Rows are measured on this model, so a row and its file give the same predictions.
Everything here runs on the CPU.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from compress.catalog import WEIGHT_SCHEMES
from compress.models import CifarResNet, PadShortcut
from compress.quant import quiet
from compress.quant.fold import fold_model
from compress.quant.observe import quant_sites
from compress.quant.qparams import INT8, QRange, symmetric_qparams

with quiet():
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

QParams = tuple[float, int]
_Q = torch.ops.quantized_decomposed


class Site(nn.Module):
    """Round a float tensor to a uint8 grid (scale, zero point, range) and back."""

    def __init__(self, qp: QParams, qr: QRange) -> None:
        super().__init__()
        self.scale, self.zero_point = float(qp[0]), int(qp[1])
        self.qmin, self.qmax = qr.qmin, qr.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = _Q.quantize_per_tensor(x, self.scale, self.zero_point, self.qmin, self.qmax, torch.uint8)
        return _Q.dequantize_per_tensor(q, self.scale, self.zero_point, self.qmin, self.qmax, torch.uint8)


def int8_weight(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales) of a float weight: symmetric, per output channel or per tensor."""
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"weight scheme {scheme!r} is unknown; known: {', '.join(WEIGHT_SCHEMES)}")
    w = weight.detach().float().cpu()
    if scheme == "per_channel":
        lo, hi = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)
        s, _ = symmetric_qparams(lo, hi, INT8)
        s = s.float()
        q = _Q.quantize_per_channel(w, s, torch.zeros(len(s), dtype=torch.int64), 0, INT8.qmin, INT8.qmax, torch.int8)
        return q, s
    s, _ = symmetric_qparams(*torch.aminmax(w), INT8)
    s = s.float().reshape(1)
    return _Q.quantize_per_tensor(w, float(s), 0, INT8.qmin, INT8.qmax, torch.int8), s


class QDQLayer(nn.Module):
    """A folded conv or linear with int8 weights, an optional ReLU, and its output site."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, qweight: tuple[torch.Tensor, torch.Tensor], relu: bool,
                 site: Site) -> None:
        super().__init__()
        q, scale = qweight
        self.register_buffer("weight_int8", q.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.float().contiguous())
        self.register_buffer("weight_zero_point", torch.zeros(len(scale), dtype=torch.int64))
        self.tensor_scale = float(scale[0]) if len(scale) == 1 else None  # per tensor: a constant of the graph
        self.register_buffer("bias", layer.bias.detach().float().cpu().clone() if layer.bias is not None else None)
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding, layer.dilation,
                                                                     layer.groups)
        self.relu = relu
        self.site = site

    def weight(self) -> torch.Tensor:
        if self.tensor_scale is None:
            return _Q.dequantize_per_channel(self.weight_int8, self.weight_scale, self.weight_zero_point, 0,
                                             INT8.qmin, INT8.qmax, torch.int8)
        return _Q.dequantize_per_tensor(self.weight_int8, self.tensor_scale, 0, INT8.qmin, INT8.qmax, torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            y = F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = F.linear(x, self.weight(), self.bias)
        return self.site(F.relu(y) if self.relu else y)


class QDQShortcut(nn.Module):
    """Option-A shortcut on grid values: padding adds real zeros; requantized when its site has qparams."""

    def __init__(self, pad: int, site: Site | None) -> None:
        super().__init__()
        self.pad = pad
        self.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return self.site(y) if self.site is not None else y


class QDQBlock(nn.Module):
    """site(relu(conv2(conv1(x)) + shortcut(x))), each conv with its own output site."""

    def __init__(self, conv1: QDQLayer, conv2: QDQLayer, downsample: nn.Module, add: Site) -> None:
        super().__init__()
        self.conv1, self.conv2, self.downsample, self.add = conv1, conv2, downsample, add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(F.relu(self.conv2(self.conv1(x)) + self.downsample(x)))


class QDQResNet(nn.Module):
    """float [0, 1] images in, float logits out; int8 weights and uint8 activation grids in between."""

    def __init__(self, normalize: nn.Module, input_site: Site, conv1: QDQLayer, layers: list[nn.Sequential],
                 classifier: QDQLayer, classifier_name: str, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.normalize = normalize
        self.input_site = input_site
        self.conv1 = conv1
        self.layers = nn.Sequential(*layers)
        self.classifier_name = classifier_name
        self.add_module(classifier_name, classifier)
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.conv1(self.input_site(self.normalize(x))))
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        last = self.layers[-1][-1].add
        return getattr(self, self.classifier_name)(last(pooled))  # the pool keeps its input's grid


def folded_for(model: CifarResNet, qparams: dict[str, QParams]) -> CifarResNet:
    """``model`` with BN folded (if it still has BN), on the CPU, in eval mode; ``KeyError`` naming the sites
    of ``observe.quant_sites`` that ``qparams`` lacks."""
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model = fold_model(model)
    model = model.cpu().eval()
    missing = [s.name for s in quant_sites(model) if s.name not in qparams]
    if missing:
        raise KeyError(f"no qparams for site(s) {missing}")
    return model


@torch.no_grad()
def build_qdq(model: CifarResNet, qparams: dict[str, QParams], qr: QRange, weights: str = "per_channel",
              qweights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> QDQResNet:
    """The q/dq int8 model of a built-in ResNet (BN folded here if it still has it) and its sites' qparams.

    ``qparams``: (scale, zero point) of every site of ``observe.quant_sites``, on the grid ``qr``; an
    option-A shortcut site (``layerI.J.shortcut``) is optional and makes that shortcut requantize.
    ``qweights`` (layer name -> (int8 values, float32 scales)) replaces quantizing the float weights:
    the packed-file reader passes the weights it read.
    """
    model = folded_for(model, qparams)
    modules = dict(model.named_modules())

    def layer(name: str, relu: bool) -> QDQLayer:
        qw = qweights[name] if qweights is not None else int8_weight(modules[name].weight, weights)
        return QDQLayer(modules[name], qw, relu, Site(qparams[name], qr))

    def block(name: str, b: nn.Module) -> QDQBlock:
        shortcut: nn.Module = nn.Identity()
        if isinstance(b.downsample, PadShortcut):  # requantized only where its site has qparams (FX's)
            sc = qparams.get(f"{name}.shortcut")
            shortcut = QDQShortcut(b.downsample.pad, Site(sc, qr) if sc is not None else None)
        elif isinstance(b.downsample, nn.Sequential):
            shortcut = layer(f"{name}.downsample.0", False)
        return QDQBlock(layer(f"{name}.conv1", True), layer(f"{name}.conv2", False), shortcut,
                        Site(qparams[f"{name}.add"], qr))

    layers = [nn.Sequential(*(block(f"layer{i}.{j}", b) for j, b in enumerate(getattr(model, f"layer{i}"))))
              for i in range(1, 4)]
    return QDQResNet(copy.deepcopy(model.normalize), Site(qparams["input"], qr), layer("conv1", True), layers,
                     layer(model.classifier_name, False), model.classifier_name,
                     tuple(getattr(model, "input_shape", (3, 32, 32)))).eval()


def export_qdq(model: QDQResNet) -> torch.export.ExportedProgram:
    """The q/dq model as a ``torch.export`` program with a dynamic batch, like PT2E's."""
    from compress.quant.pt2e import export_program

    return export_program(model)
