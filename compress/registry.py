"""The one registry of models: a built-in name, a library's namespace, or a user's own factory.

    resnet20a                       the built-in CIFAR ResNet-20s (``compress.models``)
    timm:mobilenetv3_small_100      any timm architecture, random init (``--model-args num_classes=10``)
    torchvision:resnet18            any torchvision classifier, random init
    mynets:small_cnn                ``small_cnn(**args)`` from the importable module ``mynets``

Everything after ``build`` asks the built model (its modules, its output width) instead of knowing
it. A model from outside the built-ins is wrapped in ``Normalized``: the data's per-channel mean and
std become buffers in front of it (module ``normalize``), and the architecture is module ``net``, so
every model takes plain [0, 1] pixels and carries its normalisation in its state dict and its
exported files, as the built-ins do. Their layer names are therefore ``net.<name>``.

``parse_model`` and ``parse_args`` need no torch: the CLI checks a model string's form before torch
loads; whether the name exists is checked by ``build`` when the command runs, before anything is
submitted or written.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import exception_line

BUILTINS = ("resnet20a", "resnet20b")
NAMESPACES = ("timm", "torchvision")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ModelError(ValueError):
    """A model string that does not build: unknown name, a factory that fails, or no ``nn.Module``."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``--model``: ``kind`` is builtin, timm, torchvision or factory; ``name`` what follows."""

    text: str
    kind: str
    name: str

    @property
    def builtin(self) -> bool:
        return self.kind == "builtin"


def parse_model(text: str) -> ModelRef:
    """The form of a model string, checked without torch (a bad one is a ``ModelError`` line)."""
    text = (text or "").strip()
    if text in BUILTINS:
        return ModelRef(text, "builtin", text)
    head, sep, tail = text.partition(":")
    if sep and head in NAMESPACES:
        if not re.fullmatch(r"[\w.\-]+", tail):
            raise ModelError(f"model={text!r} is invalid: {head}: takes an architecture name, e.g. {head}:resnet18")
        return ModelRef(text, head, tail)
    if _FACTORY.match(text):
        return ModelRef(text, "factory", text)
    raise ModelError(f"model={text!r} is unknown; use a built-in ({', '.join(BUILTINS)}), timm:NAME, "
                     f"torchvision:NAME or package.module:function (your factory returning an nn.Module)")


def parse_args(text: str) -> dict[str, Any]:
    """``"num_classes=10,in_chans=1,drop_rate=0.1"`` -> ``{"num_classes": 10, "in_chans": 1, "drop_rate": 0.1}``.

    Values are Python literals where they parse as one (numbers, True/False/None, tuples in
    parentheses), else strings.
    """
    out: dict[str, Any] = {}
    for part in _split_top(text or ""):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelError(f"model_args={text!r} is invalid: use key=value pairs separated by commas, "
                             f"e.g. num_classes=10,in_chans=3")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out


def _split_top(text: str) -> list[str]:
    """Split at commas outside parentheses/brackets (``mean=(0.5,0.5),k=3`` is two pairs)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in (q.strip() for q in parts) if p]


def factory_source(ref: ModelRef) -> Path | None:
    """The source file of a factory's module, found without importing it (None: not found or not a factory)."""
    if ref.kind != "factory":
        return None
    module = ref.name.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin != "built-in" else None


def source_sha256(ref: ModelRef) -> str:
    """sha256 of the factory's source file ("" for the built-ins and libraries): which code built a row's model."""
    path = factory_source(ref)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else ""


def _closest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; closest: {', '.join(close)}" if close else ""


def _build_net(ref: ModelRef, args: dict[str, Any]):
    import torch

    if ref.kind == "timm":
        import timm

        if ref.name not in timm.list_models():
            raise ModelError(f"model={ref.text!r}: timm has no architecture {ref.name!r}"
                             f"{_closest(ref.name, timm.list_models())}")
        make = lambda: timm.create_model(ref.name, pretrained=False, **args)  # noqa: E731
    elif ref.kind == "torchvision":
        import torchvision

        known = torchvision.models.list_models()
        if ref.name not in known:
            raise ModelError(f"model={ref.text!r}: torchvision has no model {ref.name!r}{_closest(ref.name, known)}")
        make = lambda: torchvision.models.get_model(ref.name, weights=None, **args)  # noqa: E731
    else:
        module_name, _, fn_name = ref.name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # ImportError, or whatever the module raises at import
            raise ModelError(f"model={ref.text!r}: cannot import {module_name} ({exception_line(e)}); it must be "
                             f"importable where the job runs, e.g. on PYTHONPATH") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ModelError(f"model={ref.text!r}: {module_name} has no function {fn_name}")
        make = lambda: fn(**args)  # noqa: E731
    try:
        net = make()
    except ModelError:
        raise
    except Exception as e:  # the user's factory, or the library's constructor on bad --model-args
        raise ModelError(f"model={ref.text!r} with args {args} raised {exception_line(e)}") from None
    if not isinstance(net, torch.nn.Module):
        raise ModelError(f"model={ref.text!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def build(text: str, args: str = "", mean: Sequence[float] = (), std: Sequence[float] = ()):
    """A freshly initialised model for a model string; non-built-ins wrapped in ``Normalized(mean, std)``.

    ``mean``/``std``: the data's per-channel statistics (the built-ins keep their own, which belong to
    their published weights). The model is tagged with ``model_ref`` and ``model_args`` so an
    exported file names what built it.
    """
    from compress import models

    ref = parse_model(text)
    kwargs = parse_args(args)
    if ref.builtin:
        try:
            model = models.build_model(ref.name, **kwargs)
        except TypeError as e:
            raise ModelError(f"model={text!r} takes num_classes only as --model-args ({e})") from None
    else:
        if not mean or not std:
            raise ModelError(f"model={text!r} needs the data's mean and std for its input normalisation")
        model = models.Normalized(_build_net(ref, kwargs), tuple(mean), tuple(std))
    model.model_ref = text
    model.model_args = args
    return model


def load(text: str, args: str = "", weights: str | Path | None = None, mean: Sequence[float] = (),
         std: Sequence[float] = ()):
    """``build`` and load ``weights`` (a state-dict file, a checkpoint holding one, or ``pretrained`` for the
    built-ins); a file that does not fit is one ``WeightsError`` line (keys missing/unexpected, shapes)."""
    from compress import models

    ref = parse_model(text)
    if ref.builtin:
        model = models.load_model(ref.name, weights or None, **parse_args(args))
        model.model_ref, model.model_args = text, args
        return model
    model = build(text, args, mean, std)
    if weights in (None, ""):
        return model
    if str(weights) == "pretrained":
        raise models.WeightsError(f"model={text!r}: 'pretrained' is for the built-ins; pass a weights file")
    state, shapes = models.read_checkpoint(Path(weights))
    if shapes:
        from compress.channels import resize_to

        resize_to(model, shapes)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("net.") for k in state):  # the bare architecture's own state dict
        state = {f"net.{k}": v for k, v in state.items()}
    models.load_state(model, state, source=str(weights))
    return model


def describe(model, text: str, args: str = "") -> dict[str, Any]:
    """What a row records of its model: the parameter count, the factory's sha256, and the input normalisation
    it applies (``data_mean``/``data_std``: the data's for a wrapped model, a built-in's own for a built-in).

    The model string and its arguments are the row's ``spec_model`` and ``spec_model_args``.
    """
    out: dict[str, Any] = {"model_params": sum(p.numel() for p in model.parameters()),
                           "model_source_sha256": source_sha256(parse_model(text))}
    for key, values in normalisation(model).items():
        out[f"data_{key}"] = ",".join(f"{v:.6g}" for v in values)
    return out


def normalisation(model) -> dict[str, list[float]]:
    """The per-channel ``mean`` and ``std`` of the normalisation inside ``model`` ({} when it has none)."""
    norm = getattr(model, "normalize", None)
    if norm is None:
        return {}
    return {key: [float(v) for v in getattr(norm, key).flatten()] for key in ("mean", "std")}


def output_width(model, image_shape: Sequence[int]) -> int:
    """The number of outputs (classes) of ``model`` for one image of ``image_shape`` (C, H, W), on the CPU.

    A model that cannot take such an image says so in one line (e.g. a 3-channel model on grayscale).
    """
    import torch

    norm = getattr(model, "normalize", None)
    if norm is not None and norm.mean.numel() != image_shape[0]:
        raise ModelError(f"the model does not take images of shape {'x'.join(map(str, image_shape))}: its input "
                         f"normalisation has {norm.mean.numel()} channels (--data-mean/--data-std)")
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            out = model.eval()(torch.rand(2, *image_shape, device=device))
    except Exception as e:  # shape errors come as RuntimeError, ValueError, AssertionError...
        raise ModelError(f"the model does not take images of shape {'x'.join(map(str, image_shape))}: "
                         f"{exception_line(e)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelError(f"the model returns {getattr(out, 'shape', type(out).__name__)} for a batch of images; "
                         f"a classifier returns (batch, classes) logits")
    return int(out.shape[1])


def check_classes(model, image_shape: Sequence[int], num_classes: int, text: str) -> None:
    """The model's output width must be the data's class count (checked before anything trains)."""
    width = output_width(model, image_shape)
    if width != num_classes:
        raise ModelError(f"model={text!r} has {width} outputs but the data has {num_classes} classes: "
                         f"pass --model-args num_classes={num_classes}")
