"""Global L1 magnitude pruning and BN-gamma filter pruning (the schedules are in ``compress/schedule.py``).

Masks are boolean tensors keyed by parameter name (``MaskSet``). They are applied by multiplying
the parameters after every optimizer step, so pruned weights stay exactly zero through retraining
(AdamW's decoupled decay and momentum cannot revive them) and the model stays a plain ``nn.Module``
that traces, quantizes and saves like any other. ``make_permanent`` zeroes once more and drops the
masks.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from compress import catalog
from compress.models import conv_bn_pairs, prunable


class MaskSet:
    """Named boolean masks (True = kept) over a model's parameters, each on its parameter's device.

    ``apply`` multiplies the parameters by the masks after every optimizer step. The masks are bound
    once per model: the multipliers (the masks in each parameter's dtype, on its device) are built on
    the first call and reused, and one fused ``torch._foreach_mul_`` zeroes every masked weight; a
    parameter moved to another device or dtype since is bound again.
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self.masks: dict[str, torch.Tensor] = dict(masks or {})
        self._bound: tuple[weakref.ref, list[torch.Tensor], list[torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.masks)

    def to(self, device: torch.device | str) -> MaskSet:
        """The same masks on ``device`` (a resumed run's masks go where its weights are)."""
        return MaskSet({k: v.to(device) for k, v in self.masks.items()})

    def multipliers(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(parameters, masks in their dtype on their device), built once per model and reused."""
        bound = self._bound
        if bound is not None and bound[0]() is model and all(
                p.device == m.device and p.dtype == m.dtype for p, m in zip(bound[1], bound[2], strict=True)):
            return bound[1], bound[2]
        named = dict(model.named_parameters())
        params = [named[name] for name in self.masks]
        mults = [m.to(device=p.device, dtype=p.dtype) for p, m in zip(params, self.masks.values(), strict=True)]
        self._bound = (weakref.ref(model), params, mults)
        return params, mults

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        if self.masks:
            torch._foreach_mul_(*self.multipliers(model))

    def merge(self, other: MaskSet) -> MaskSet:
        """Both sets' masks, ANDed where both have one, each on the device of this set's mask (or the other's)."""
        out = dict(self.masks)
        for k, v in other.masks.items():
            out[k] = out[k] & v.to(out[k].device) if k in out else v
        return MaskSet(out)

    def clear(self) -> None:
        self.masks.clear()
        self._bound = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.masks.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> MaskSet:
        """Masks read back from a checkpoint, on ``device`` (the run's: a checkpoint is read to the CPU)."""
        return cls({k: v.to(device=device, dtype=torch.bool) for k, v in state.items()})


def make_permanent(model: nn.Module, masks: MaskSet) -> None:
    """Zero every masked weight for good; the model needs no masks afterwards."""
    masks.apply(model)
    masks.clear()


def check_budget(model: nn.Module, sparsity: float, keep_dense: Iterable[str] = (),
                 max_layer_sparsity: float = 1.0) -> None:
    """One ``ValueError`` line when ``keep_dense`` names no conv/linear layer of ``model`` or the final
    ``sparsity`` cannot be placed (``catalog.sparsity_budget_error``); checked on the built model
    before a run starts. E.g. a timm resnet18 wrapped for its normalisation names its stem ``net.conv1``.
    """
    import difflib

    sizes = {n: m.weight.numel() for n, m in prunable(model)}
    if not sizes:
        raise ValueError(f"the model has no conv or linear layer to prune ({type(model).__name__})")
    unknown = [n for n in keep_dense if n not in sizes]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(sizes), n=3, cutoff=0.5)
        names = list(sizes)
        raise ValueError(f"keep_dense={','.join(keep_dense)!r} is invalid: unknown module(s) {unknown}; "
                         + (f"closest: {', '.join(close)}; " if close else "")
                         + f"the model's {len(names)} conv/linear modules are {', '.join(names[:3])}, ..., {names[-1]}")
    error = catalog.sparsity_budget_error(sizes, sparsity, keep_dense, max_layer_sparsity)
    if error:
        raise ValueError(f"final_sparsity={sparsity!r} is invalid: {error}")


def prunable_weights(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, weight) of every conv/linear layer not in ``exclude`` (module names)."""
    skip = set(exclude)
    return [(f"{n}.weight", m.weight) for n, m in prunable(model) if n not in skip]


@torch.no_grad()
def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one layer's weights (Lee et al., ICLR 2021), flat, in the weight's order.

    With the layer's squared weights sorted ascending, u_1 <= ... <= u_n, weight i scores
    ``u_i / (u_i + ... + u_n)``: its share of what is left of the layer once every smaller weight is
    gone. Pruning the globally smallest scores then sets a per-layer budget without a hyperparameter;
    every layer's largest weight scores 1, so no layer is emptied. Zero weights score 0 and rank
    first (earlier pruning is kept). E.g. [3, -1, 2] -> [9/9, 1/14, 4/13]. Hand-written: neither
    torch.nn.utils.prune nor torchao's sparsifiers offer layer-adaptive scores.
    """
    sq = weight.detach().flatten().float().cpu() ** 2
    order = torch.argsort(sq, stable=True)
    ranked = sq[order]
    tail = torch.flip(torch.cumsum(torch.flip(ranked, [0]), 0), [0])  # u_i + ... + u_n
    scores = torch.empty_like(sq)
    scores[order] = torch.where(tail > 0, ranked / tail.clamp_min(torch.finfo(tail.dtype).tiny), 0.0)
    return scores


@torch.no_grad()
def global_magnitude_masks(model: nn.Module, sparsity: float, exclude: Iterable[str] = (),
                           max_layer_sparsity: float = 1.0, scoring: str = "magnitude") -> MaskSet:
    """Masks that zero the smallest-|w| weights so that ``round(sparsity * N)`` of all N prunable weights are zero.

    ``sparsity`` is global over every conv/linear weight, kept-dense layers (``exclude``) included:
    those are never pruned, so the others make up for them. E.g. resnet20a's 268,336 weights at 0.5
    -> exactly 134,168 zeros; with conv1 and linear (1,072 weights) kept dense, still 134,168 zeros,
    all outside them. Ranks by exact order (not a threshold), so ties don't change the count;
    weights already zero rank first, so earlier pruning is kept.

    ``max_layer_sparsity`` caps each pruned layer at ``floor(cap * n)`` zeros (layers already past it
    keep their zeros and take no more); the global count is then filled from the smallest weights of
    the layers under the cap (water-filling). E.g. at 0.93 global magnitude alone leaves resnet20a's
    layer3.2.conv2 about 98.8% sparse; a 0.97 cap stops it at 35,758 of 36,864 zeros.

    ``scoring`` is what is ranked: ``magnitude`` (|w|, one global threshold) or ``lamp``
    (``lamp_scores``: layer-adaptive budgets that spare the small layers). The count, the cap and
    the already-zero-first rule are the same for both.
    """
    if scoring not in catalog.SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; known: {', '.join(catalog.SCORINGS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 < max_layer_sparsity <= 1.0:
        raise ValueError(f"max_layer_sparsity must be in (0, 1], got {max_layer_sparsity}")
    every = [(n, m.weight) for n, m in prunable(model)]  # by module name, as ``exclude`` names them
    skip = set(exclude)
    weights = [(n, w) for n, w in every if n not in skip]
    sizes = {n: w.numel() for n, w in every}
    zeros = {n: int((w == 0).sum()) for n, w in every}
    # the budget rule is the catalog's, so a spec checks it without building the model
    error = catalog.sparsity_budget_error(sizes, sparsity, skip, max_layer_sparsity, zeros)
    if error:
        raise ValueError(error)
    score = lamp_scores if scoring == "lamp" else (lambda w: w.detach().abs().flatten().float().cpu())
    flat = torch.cat([score(w) for _, w in weights])
    k = max(round(sparsity * sum(sizes.values())) - sum(zeros[n] for n in skip), 0)
    caps = [max(math.floor(max_layer_sparsity * w.numel()), zeros[n]) for n, w in weights]
    layer = torch.cat([torch.full((w.numel(),), i) for i, (_, w) in enumerate(weights)])
    keep = torch.ones_like(flat, dtype=torch.bool)
    capped: set[int] = set()
    while True:  # prune globally over the uncapped layers; any layer past its cap is fixed at it; repeat
        # (no cap, or none binding: one pass, the plain global smallest-k)
        left = k - sum(caps[i] for i in capped)
        free = ~torch.isin(layer, torch.tensor(sorted(capped), dtype=layer.dtype))
        idx = free.nonzero().flatten()
        chosen = idx[torch.topk(flat[idx], left, largest=False, sorted=False).indices] if left else idx[:0]
        counts = torch.bincount(layer[chosen], minlength=len(weights))
        over = {i for i in range(len(weights)) if i not in capped and counts[i] > caps[i]}
        if not over:
            break
        capped |= over
    keep[chosen] = False
    start = 0
    for i, (_, w) in enumerate(weights):
        if i in capped:
            seg = flat[start:start + w.numel()]
            keep[start + torch.topk(seg, caps[i], largest=False, sorted=False).indices] = False
        start += w.numel()
    return _split(keep, [(f"{n}.weight", w) for n, w in weights])


def _split(keep: torch.Tensor, weights: list[tuple[str, torch.Tensor]]) -> MaskSet:
    """A flat keep-vector cut back into one mask per weight."""
    masks, start = {}, 0
    for name, w in weights:
        masks[name] = keep[start:start + w.numel()].view_as(w).to(w.device)
        start += w.numel()
    return MaskSet(masks)


@torch.no_grad()
def bn_gamma_filter_masks(model: nn.Module, fraction: float) -> MaskSet:
    """Masks that remove the ``fraction`` of conv filters whose following BN has the smallest |gamma|.

    Ranked globally over all conv+BN pairs (as in network slimming); every layer keeps at least one
    filter. A removed filter zeroes the conv's output channel and the BN's gamma and beta, so the
    channel outputs exactly zero. E.g. 0.1 of resnet20a's 688 BN channels -> 69 filters.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"filter fraction must be in [0, 1), got {fraction}")
    modules = dict(model.named_modules())
    pairs = conv_bn_pairs(model)
    if fraction == 0.0 or not pairs:
        return MaskSet()
    gammas = torch.cat([modules[b].weight.detach().abs().float().cpu() for _, b in pairs])
    owner = torch.cat([torch.full((modules[b].num_features,), i) for i, (_, b) in enumerate(pairs)])
    order = torch.argsort(gammas, stable=True)
    k = round(fraction * gammas.numel())
    removed = torch.zeros_like(gammas, dtype=torch.bool)
    left = torch.tensor([modules[b].num_features for _, b in pairs])
    for idx in order.tolist():
        if k == 0:
            break
        if left[owner[idx]] > 1:
            removed[idx] = True
            left[owner[idx]] -= 1
            k -= 1
    masks, start = {}, 0
    for conv, bn in pairs:
        c = modules[conv].out_channels
        keep = ~removed[start:start + c]
        start += c
        dev = modules[conv].weight.device
        masks[f"{conv}.weight"] = keep.view(-1, 1, 1, 1).expand_as(modules[conv].weight).clone().to(dev)
        masks[f"{bn}.weight"] = keep.clone().to(dev)
        masks[f"{bn}.bias"] = keep.clone().to(dev)
    return MaskSet(masks)


@dataclass(frozen=True)
class ModuleRow:
    """One line of the per-module table: conv/linear weights before and after pruning."""

    module: str
    kind: str
    params: int
    nonzero_before: int
    nonzero_after: int
    channels_before: int | None = None  # output channels, for a channel-pruned run
    channels_after: int | None = None

    @property
    def removed(self) -> int:
        return self.nonzero_before - self.nonzero_after

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzero_after / self.params


def nonzero_counts(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """module name -> (kind, weights, nonzero weights) for every conv/linear layer."""
    return {n: (type(m).__name__, m.weight.numel(), int(torch.count_nonzero(m.weight)))
            for n, m in prunable(model)}


def module_table(before: dict[str, tuple[str, int, int]], after: dict[str, tuple[str, int, int]],
                 channels: dict[str, tuple[int, int]] | None = None) -> list[ModuleRow]:
    """The per-module before/after table from two ``nonzero_counts`` snapshots.

    ``params`` are the weights the layer had before (a channel-pruned layer has fewer after); ``channels``
    (layer -> (kept, dense) output channels, ``compress.channels.channels_kept``) fills the channel columns.
    """
    ch = channels or {}
    return [ModuleRow(n, k, before[n][1], before[n][2], after[n][2],
                      ch[n][1] if n in ch else None, ch[n][0] if n in ch else None) for n, (k, _, _) in after.items()]


def global_sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over all conv+linear weights."""
    counts = nonzero_counts(model).values()
    total = sum(c[1] for c in counts)
    return 1 - sum(c[2] for c in counts) / total if total else 0.0
