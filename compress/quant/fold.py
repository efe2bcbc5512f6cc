"""BatchNorm folded into the preceding convolution: a pure function and the model rewrite that uses it.

In eval mode BN is an affine map per output channel, ``y = gamma * (x - mean) / sqrt(var + eps) + beta``,
so it merges into the conv: ``w' = w * gamma / sqrt(var + eps)`` (per output channel) and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. Worked number: gamma 2, var 3, eps 1, mean 0.5,
beta 0.1, conv weight 0.25 and no bias -> factor 2 / sqrt(4) = 1, w' = 0.25, b' = -0.5 * 1 + 0.1 = -0.4.

The operations and their order are those of ``torch.nn.utils.fusion.fuse_conv_bn_weights`` (what
FX graph mode uses), so the folded weights are bit-identical to FX's and both PTQ paths quantize the
same numbers. A zero weight stays exactly zero: folding keeps a pruned model exactly as sparse.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress.models import conv_bn_pairs


def fold_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(folded weight, folded bias) of a conv weight (out, in, kh, kw) followed by eval-mode BN."""
    if bias is None:
        bias = torch.zeros_like(mean)
    if gamma is None:
        gamma = torch.ones_like(mean)
    if beta is None:
        beta = torch.zeros_like(mean)
    inv_std = torch.rsqrt(var + eps)
    shape = [-1] + [1] * (weight.dim() - 1)
    w = (weight * (gamma * inv_std).reshape(shape)).to(weight.dtype)
    b = ((bias - mean) * inv_std * gamma + beta).to(bias.dtype)
    return w, b


@torch.no_grad()
def fold_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every conv+BN pair folded: the conv gains a bias, the BN becomes Identity.

    The copy computes the same function as the eval-mode original (to float rounding) and keeps
    the module names, so observers attach to it exactly as to the original.
    """
    folded = copy.deepcopy(model).eval()
    modules = dict(folded.named_modules())
    for conv_name, bn_name in conv_bn_pairs(folded):
        conv, bn = modules[conv_name], modules[bn_name]
        w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                       bn.weight if bn.affine else None, bn.bias if bn.affine else None)
        conv.weight = nn.Parameter(w, requires_grad=False)
        conv.bias = nn.Parameter(b, requires_grad=False)
        parent_name, _, child = bn_name.rpartition(".")
        parent = modules[parent_name] if parent_name else folded
        setattr(parent, child, nn.Identity())
    return folded
