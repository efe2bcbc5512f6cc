"""Structured pruning: remove whole channels with Torch-Pruning's dependency graph: a smaller, faster model.

    dense = count(model, (3, 32, 32))                                  # Count(macs=41.1M, params=0.27M)
    step = prune_channels(model, (3, 32, 32), 0.5, dense, "l1")        # half the dense MACs, in place
    widths(model)                                                      # {"layer1.0.conv1": (8, 16), ...}
    resize_to(build_model("resnet20a"), widths(model))                 # a fresh model in the pruned shapes

Unstructured sparsity (``prune.py``) zeroes weights: the file shrinks, the convolutions stay dense.
Removing channels leaves a smaller dense network, which is faster on any hardware. Torch-Pruning
(DepGraph) finds the layers coupled to each channel (the BatchNorm after a conv, the conv that
reads it, residual adds that tie widths together) and removes them as a group, for any model.

A step reaches a target in MACs or parameters as a fraction of the dense model's: Torch-Pruning
removes a *ratio* of each layer's channels (or, with ``global_``, of all of them ranked together), so
the ratio that lands on the target is found by bisection on copies of the model, then applied
to the model itself. Importance (what ranks channels): ``l1``/``l2`` norms of the weights of the
whole coupled group, ``bn`` |BatchNorm gamma| (the seed's criterion, now removing the filters),
``taylor`` |weight x gradient| summed over a few training batches.

What can go: ``keep`` names layers whose *output* channels stay (by default the stem and the
classifier, whose output is the classes); a model may name more with ``fixed_width_layers()``.
ResNet-20 option A does: its shortcuts are parameter-free zero padding, so every block's second
conv writes the residual stream, whose width the padding ties across blocks; Torch-Pruning cannot
shrink it (the classifier would get the wrong input width). The channels inside each block (its
first conv's output) can always go. Option B (1x1 conv shortcuts) has no such limit.

The pruned model is saved as a state dict plus its layers' widths (``widths``), and rebuilt by
building the dense architecture and resizing those layers (``resize_to``) before loading the
weights: no pickled modules. Where it runs: the job's device; counting and the bisection on CPU
copies when the model is small.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.catalog import CHANNEL_IMPORTANCES

# bisection steps over the pruning ratio: 2^-14 of the range, finer than one channel of any layer here
_STEPS = 10
# the largest fraction of any one layer's channels a step may remove
MAX_RATIO = 0.95
# ratios tried before the bisection: the count is not monotone near the top, where Torch-Pruning skips a
# layer that would lose every channel (16 channels at 0.95) and leaves it whole
_GRID = (0.25, 0.5, 0.75, 0.85, 0.9, MAX_RATIO)


class ChannelError(ValueError):
    """A channel-pruning request that cannot be met: one line saying why."""


@dataclass(frozen=True)
class Count:
    """Multiply-accumulates of one forward pass of one image, and parameters."""

    macs: int
    params: int

    def of(self, by: str) -> int:
        return self.macs if by == "macs" else self.params


@dataclass(frozen=True)
class Step:
    """What one channel-pruning step did: the ratio it applied and the model's count before and after."""

    ratio: float
    before: Count
    after: Count


def count(model: nn.Module, input_shape: tuple[int, ...]) -> Count:
    """MACs and parameters of ``model`` for one input of ``input_shape`` (Torch-Pruning's counter)."""
    import torch_pruning as tp

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return Count(int(macs), int(params))


def importance(name: str):
    """Torch-Pruning's importance criterion for ``name`` (one of ``CHANNEL_IMPORTANCES``)."""
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ChannelError(f"importance={name!r} is unknown; known: {', '.join(CHANNEL_IMPORTANCES)}")


def fixed_layers(model: nn.Module, keep: Iterable[str]) -> list[str]:
    """Names of the layers whose output channels stay: ``keep``, and what the model itself says cannot change."""
    names = dict(model.named_modules())
    unknown = [k for k in keep if k not in names]
    if unknown:
        close = [n for n in names if n.split(".")[-1] in {u.split(".")[-1] for u in unknown}][:4]
        raise ChannelError(f"keep-dense names {unknown} that are not modules of the model"
                           f"{'; modules like ' + ', '.join(close) if close else ''}")
    own = getattr(model, "fixed_width_layers", None)
    return sorted(set(keep) | set(own() if callable(own) else ()))


def default_keep(model: nn.Module) -> tuple[str, ...]:
    """The stem (the first conv) and the classifier (the last linear or conv): their widths are the data's."""
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    return tuple(dict.fromkeys([layers[0], layers[-1]])) if layers else ()


def _pruner(model: nn.Module, input_shape: tuple[int, ...], ratio: float, imp, global_: bool, fixed: list[str]):
    import torch_pruning as tp

    names = dict(model.named_modules())
    device = next(model.parameters()).device
    return tp.pruner.MetaPruner(model, torch.zeros(1, *input_shape, device=device), importance=imp,
                                global_pruning=global_, pruning_ratio=ratio, max_pruning_ratio=MAX_RATIO,
                                ignored_layers=[names[n] for n in fixed])


def _apply(model: nn.Module, input_shape: tuple[int, ...], ratio: float, imp, global_: bool,
           fixed: list[str]) -> None:
    was_training = model.training
    model.eval()
    try:
        _pruner(model, input_shape, ratio, imp, global_, fixed).step()
    except (RuntimeError, ValueError, IndexError) as e:  # a dependency Torch-Pruning cannot follow
        raise ChannelError(f"Torch-Pruning cannot remove channels of this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); keep the layers that fail dense with --keep-dense"
                           ) from None
    model.train(was_training)


def _trial(model: nn.Module, input_shape: tuple[int, ...], ratio: float, imp, global_: bool, fixed: list[str],
           by: str) -> int:
    """The count ``by`` that pruning a copy of ``model`` at ``ratio`` leaves."""
    trial = copy.deepcopy(model)
    for p, q in zip(model.parameters(), trial.parameters(), strict=True):  # Taylor importance reads gradients
        q.grad = None if p.grad is None else p.grad.clone()
    _apply(trial, input_shape, ratio, imp, global_, fixed)
    return count(trial, input_shape).of(by)


def prune_channels(model: nn.Module, input_shape: tuple[int, ...], target: float, dense: Count, importance_: str,
                   by: str = "macs", global_: bool = False, keep: Iterable[str] = ()) -> Step:
    """Remove channels of ``model`` (in place) until its MACs (or params) are at most ``target`` of ``dense``'s.

    Gradients must already be on the parameters for ``taylor``. ``ChannelError`` (one line) when the kept
    layers leave too little to remove, or the model has a dependency Torch-Pruning cannot follow.
    """
    if by not in ("macs", "params"):
        raise ChannelError(f"by={by!r}: count macs or params")
    imp = importance(importance_)
    fixed = fixed_layers(model, keep)
    before = count(model, input_shape)
    goal = target * dense.of(by)
    if before.of(by) <= goal:
        return Step(0.0, before, before)
    grid = [(r, _trial(model, input_shape, r, imp, global_, fixed, by)) for r in _GRID]
    meets = [r for r, n in grid if n <= goal]
    if not meets:
        floor = min(n for _, n in grid) / dense.of(by)
        raise ChannelError(f"a {by} target of {target:g} of the starting model cannot be met with the layers kept "
                           f"({', '.join(fixed) or 'none'}): at most {1 - floor:.1%} of its {by} can go "
                           f"(down to {floor:.3f})")
    lo, hi = max([0.0, *(r for r in _GRID if r < meets[0])]), meets[0]
    for _ in range(_STEPS):  # the smallest ratio that reaches the goal, below the first grid ratio that does
        mid = (lo + hi) / 2
        if _trial(model, input_shape, mid, imp, global_, fixed, by) <= goal:
            hi = mid
        else:
            lo = mid
    _apply(model, input_shape, hi, imp, global_, fixed)
    return Step(hi, before, count(model, input_shape))


def reachable(model: nn.Module, input_shape: tuple[int, ...], dense: Count, by: str, keep: Iterable[str],
              importance_: str = "l1", global_: bool = False) -> float:
    """The smallest fraction of the dense model's MACs (or params) that channel pruning can reach here."""
    fixed = fixed_layers(model, keep)
    imp = importance(importance_)
    return min(_trial(model, input_shape, r, imp, global_, fixed, by) for r in _GRID) / dense.of(by)


def taylor_gradients(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                     batches: int = 8) -> None:
    """Leave on the parameters the gradients of the cross-entropy summed over ``loader``'s first ``batches``
    batches (BatchNorm in eval mode, so its statistics stay): what ``taylor`` importance reads."""
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    for i, (x, y) in enumerate(loader):
        if i == batches:
            break
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.train(was_training)


def widths(model: nn.Module) -> dict[str, list[int]]:
    """(output, input) channels of every conv and linear layer and the features of every BatchNorm, by name."""
    out: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = [m.out_channels, m.in_channels, m.groups]
        elif isinstance(m, nn.Linear):
            out[name] = [m.out_features, m.in_features]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = [m.num_features]
    return out


def resize_to(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """``model`` with every layer ``shapes`` names resized to those widths (fresh, uninitialised tensors).

    The inverse of saving ``widths``: load the pruned state dict into the result. Unknown names or
    layer kinds raise ``ChannelError``.
    """
    modules = dict(model.named_modules())
    for name, dims in shapes.items():
        m = modules.get(name)
        if m is None:
            raise ChannelError(f"the pruned widths name {name!r}, which this model does not have")
        if isinstance(m, nn.modules.conv._ConvNd):
            out_c, in_c, groups = dims
            if (out_c, in_c, groups) == (m.out_channels, m.in_channels, m.groups):
                continue
            m.out_channels, m.in_channels, m.groups = out_c, in_c, groups
            m.weight = nn.Parameter(m.weight.new_empty(out_c, in_c // groups, *m.weight.shape[2:]))
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.new_empty(out_c))
        elif isinstance(m, nn.Linear):
            out_f, in_f = dims
            if (out_f, in_f) == (m.out_features, m.in_features):
                continue
            m.out_features, m.in_features = out_f, in_f
            m.weight = nn.Parameter(m.weight.new_empty(out_f, in_f))
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.new_empty(out_f))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            (n,) = dims
            if n == m.num_features:
                continue
            m.num_features = n
            for attr in ("weight", "bias"):
                if getattr(m, attr) is not None:
                    setattr(m, attr, nn.Parameter(getattr(m, attr).new_empty(n)))
            for attr in ("running_mean", "running_var"):
                if getattr(m, attr) is not None:
                    setattr(m, attr, getattr(m, attr).new_empty(n))
        else:
            raise ChannelError(f"cannot resize {name} ({type(m).__name__}): only conv, linear and BatchNorm layers")
    return model


def changed(model: nn.Module, dense_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The entries of ``widths(model)`` that differ from the dense model's: what a checkpoint records."""
    return {k: v for k, v in widths(model).items() if dense_shapes.get(k) != v}


def channels_kept(model: nn.Module, dense_shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    """(kept, dense) output channels of every conv and linear layer, for the per-module table."""
    now = widths(model)
    return {k: (now[k][0], v[0]) for k, v in dense_shapes.items() if len(v) >= 2 and k in now}


def fraction(step: Step, dense: Count, by: str) -> float:
    """The step's result as a fraction of the dense count."""
    return step.after.of(by) / dense.of(by) if dense.of(by) else math.nan
