"""CIFAR-10 ResNet-20 in both shortcut variants, with the normalisation that belongs to the weights.

Two variants, by name (see ``MODELS``):

- ``resnet20a``: option-A shortcut (stride-2 subsampling plus zero-padded channels, no weights),
  classifier ``linear``; the layout of ``resnet20-12fca82f.th`` (268,336 conv+linear weights).
- ``resnet20b``: option-B shortcut (1x1 conv + BN downsample), classifier ``fc``; the layout of
  ``cifar10_resnet20-4118986f.pt`` (270,896 conv+linear weights).

The input normalisation is a ``Normalize`` module inside the model (its mean and std are buffers),
so a checkpoint carries the statistics its weights were trained with and every loader feeds plain
[0, 1] pixels. Every quantizable site is a module of its own (``relu1``, ``add``, ``relu_out``) so
observers can attach to the residual add as what it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers so they travel with the state dict."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Normalized(nn.Module):
    """Any classifier with the data's input normalisation in front: modules ``normalize`` and ``net``.

    How a model from outside the built-ins (timm, torchvision, a user's factory) takes plain [0, 1]
    pixels like the built-ins and keeps its normalisation in its state dict and exported files.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


class Add(nn.Module):
    """The residual add as a module, so observers and the int8 rewrite can address it by name."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every second pixel and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.add = Add()
        self.relu_out = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = PadShortcut(planes // 4)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(self.add(out, self.downsample(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, global average pool, linear classifier."""

    input_shape = (3, 32, 32)  # what example inputs of export and tracing take; other models get their data's

    def __init__(
        self,
        depth: int,
        shortcut: str,
        classifier: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.classifier_name = classifier
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.add_module(classifier, nn.Linear(64, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    @property
    def classifier(self) -> nn.Linear:
        return getattr(self, self.classifier_name)

    def fixed_width_layers(self) -> list[str]:
        """Layers whose output channels channel pruning must keep (``compress/channels.py``).

        Option A: every block's second conv writes the residual stream, whose width the parameter-free,
        zero-padded shortcuts tie from block to block; only the channels inside blocks can go. Option B's
        1x1 conv shortcuts leave the stream to the dependency graph.
        """
        blocks = [(n, m) for n, m in self.named_modules() if isinstance(m, BasicBlock)]
        if any(isinstance(m.downsample, PadShortcut) for _, m in blocks):
            return [f"{n}.conv2" for n, _ in blocks]
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for every conv whose output feeds a BatchNorm directly, in module order.

    Found in the traced graph (``torch.fx``, convs and BatchNorms kept as leaves), so any model's
    naming works (timm's ``conv_stem`` -> ``bn1``, a Sequential, a block's ``conv2`` -> ``bn2``); a
    BN of another width than the conv's output is not a pair. A model FX cannot trace falls back to
    the names: a ``convN``/``bnN`` pair in one parent, or a conv directly followed by a BN in a
    Sequential. Used by BN folding and BN-gamma filter pruning.
    """
    try:
        pairs = _traced_pairs(model)
    except Exception:  # FX cannot trace every model (data-dependent control flow): fall back to the names
        pairs = _named_pairs(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(pairs, key=lambda p: order[p[0]])


class _LeafTracer(torch.fx.Tracer):
    """Keeps convs and BatchNorms (timm's BatchNormAct2d too) as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if isinstance(m, nn.modules.conv._ConvNd | nn.modules.batchnorm._BatchNorm):
            return True
        return super().is_leaf_module(m, qualified_name)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if isinstance(conv, nn.Conv2d) and conv.out_channels == bn.num_features:
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _named_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (cn, c), (bn, b) in zip(children, children[1:], strict=False):
                if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    pairs.append((prefix + cn, prefix + bn))
            continue
        names = dict(children)
        for cn, c in children:
            if isinstance(c, nn.Conv2d) and cn.startswith("conv"):
                bn = "bn" + cn[len("conv"):]
                if isinstance(names.get(bn), nn.BatchNorm2d):
                    pairs.append((prefix + cn, prefix + bn))
    return pairs


@dataclass(frozen=True)
class ModelInfo:
    """One registered architecture: how to build it and where its published weights live."""

    build: Callable[..., CifarResNet]
    weights_url: str | None
    weights_sha256_prefix: str | None
    key_prefix: str  # stripped from published state-dict keys (DataParallel's "module.")
    about: str


def _resnet20a(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, "A", "linear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       num_classes=num_classes)


def _resnet20b(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, "B", "fc", mean=CIFAR_MEAN, std=(0.2023, 0.1994, 0.2010), num_classes=num_classes)


MODELS: dict[str, ModelInfo] = {
    "resnet20a": ModelInfo(
        _resnet20a,
        "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th",
        "12fca82f",
        "module.",
        "ResNet-20, option-A (zero-pad) shortcut, 268,336 conv+linear weights",
    ),
    "resnet20b": ModelInfo(
        _resnet20b,
        "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/cifar10_resnet20-4118986f.pt",
        "4118986f",
        "",
        "ResNet-20, option-B (1x1 conv+BN) shortcut, 270,896 conv+linear weights",
    ),
}


class WeightsError(ValueError):
    """A weights file that cannot be loaded into the requested model."""


def build_model(name: str, **kwargs: Any) -> CifarResNet:
    """A freshly initialised built-in model by name (``num_classes`` may be given); an unknown name lists them.

    Any other model is built through ``compress.registry``, which calls this for the built-ins.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[name].build(**kwargs)
    model.model_name = name  # what an exported artifact names, so its loader builds the same architecture
    return model


def _download(url: str, sha_prefix: str | None, cache: Path) -> Path:
    """The published weights in torch.hub's cache: downloaded once, the sha256 prefix checked by torch.hub."""
    dest = cache / url.rsplit("/", 1)[-1]
    if not dest.exists():
        cache.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s", url)
        try:
            torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha_prefix, progress=False)
        except (OSError, RuntimeError) as e:  # unreachable, or the file is not the published one
            raise WeightsError(f"cannot download {url}: {str(e).splitlines()[0]}; pass a local file instead") from e
    return dest


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model weights in any checkpoint this project meets (``read_checkpoint``'s state dict)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """(weights, widths) of any checkpoint this project meets, with pruning made permanent.

    ``widths``: the layers a channel-pruned run resized (``compress.channels.widths``), empty for
    any other checkpoint; the model is resized to them (``channels.resize_to``) before the weights load.

    Reads plain state dicts (``{"state_dict": ...}`` too), project checkpoints (``{"model": ...}``; a
    prune run's ``state.pt`` also carries ``masks``, which are multiplied in) and
    ``torch.nn.utils.prune`` state dicts (``weight_orig`` x ``weight_mask`` becomes ``weight``).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsError(f"weights file not found: {path}") from e
    except Exception as e:  # torch raises many types for a damaged file (pickle, zip, EOF)
        raise WeightsError(f"cannot read weights file {path}: not a PyTorch checkpoint, or damaged "
                           f"({type(e).__name__})") from e
    masks = obj.get("masks") if isinstance(obj, dict) else None
    shapes = obj.get("widths") or {} if isinstance(obj, dict) else {}
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors (nor one under 'state_dict' or 'model')")
    if any(k.endswith("_orig") for k in obj):
        merged = {k: v for k, v in obj.items() if not k.endswith(("_orig", "_mask"))}
        for k, v in obj.items():
            if k.endswith("_orig"):
                mask = obj.get(k.removesuffix("_orig") + "_mask")
                merged[k.removesuffix("_orig")] = v * mask if mask is not None else v
        obj = merged
    if isinstance(masks, dict):
        obj = {k: v * masks[k].to(v.dtype) if k in masks else v for k, v in obj.items()}
    return obj, shapes


def load_state(model: nn.Module, state: dict[str, torch.Tensor], key_prefix: str = "", source: str = "") -> None:
    """Load a state dict strictly, tolerating only absent BN ``num_batches_tracked`` counters.

    Buffers of ``Normalize`` are taken from the model when the state dict lacks them (published
    weights do not carry their normalisation; the registry entry does).
    """
    state = {k.removeprefix(key_prefix): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and not k.startswith("normalize.")]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}"
                         f"{f' and {len(unexpected) - 3} more' if len(unexpected) > 3 else ''}")
        if shape:
            parts.append(f"shape mismatch {shape[:3]}")
        what = getattr(model, "model_ref", "") or type(model).__name__
        raise WeightsError(f"{source or 'state dict'} does not fit {what}: " + "; ".join(parts))
    merged = {**own, **state}
    model.load_state_dict(merged)


def load_model(name: str, weights: str | Path | None = None, **kwargs: Any) -> CifarResNet:
    """Build built-in ``name`` and load ``weights``: a path, ``"pretrained"`` (download, hash-checked) or None.

    The one checkpoint reader: any file ``read_state_dict`` reads, pruning masks made permanent.
    """
    model = build_model(name, **kwargs)
    if weights is None:
        return model
    info = MODELS[name]
    if str(weights) == "pretrained":
        if not info.weights_url:
            raise WeightsError(f"model {name!r} has no published weights")
        path = _download(info.weights_url, info.weights_sha256_prefix, Path(torch.hub.get_dir()) / "checkpoints")
    else:
        path = Path(weights)
    state, shapes = read_checkpoint(path)
    if shapes:
        from compress.channels import resize_to

        resize_to(model, shapes)
    try:
        load_state(model, state, _prefix(name, state), source=str(path))
    except WeightsError as e:
        fits = [other for other in MODELS if other != name and _fits(other, state)]
        if fits:
            raise WeightsError(f"{path} holds {fits[0]} weights ({MODELS[fits[0]].about}), not {name}: "
                               f"pass --model {fits[0]}") from e
        raise
    return model


def _prefix(name: str, state: dict[str, torch.Tensor]) -> str:
    p = MODELS[name].key_prefix
    return p if p and any(k.startswith(p) for k in state) else ""


def _fits(name: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` loads into model ``name`` (same keys and shapes, up to what ``load_state`` tolerates)."""
    try:
        load_state(build_model(name), state, _prefix(name, state))
    except WeightsError:
        return False
    return True


def prunable(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every conv (1-3D, grouped and depthwise too) and linear layer: the weights pruning ranks and counts.

    A layer counts the weights it stores: a grouped conv's weight is (out, in / groups, k, k), so a
    depthwise 3x3 conv over 64 channels counts 64 * 1 * 9 = 576 weights. Transposed convs are left out.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and not getattr(m, "transposed", False):
            yield name, m
