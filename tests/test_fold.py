"""BN folding against torch.nn.utils.fusion.fuse_conv_bn_eval, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from compress.models import build_model, conv_bn_pairs
from compress.prune import global_magnitude_masks
from compress.quant.fold import fold_bn, fold_model
from tests.helpers import _random_bn, randomise_bn


@pytest.mark.parametrize("bias", [False, True])
def test_fold_bn_equals_fuse_conv_bn_eval(bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, bias=bias).eval()
    bn = nn.BatchNorm2d(16).eval()
    _random_bn(bn, torch.Generator().manual_seed(1))
    ref = fuse_conv_bn_eval(conv, bn)
    w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    assert torch.equal(w, ref.weight)
    assert torch.equal(b, ref.bias)


def test_fold_bn_worked_number() -> None:
    w, b = fold_bn(torch.full((1, 1, 1, 1), 0.25), None, torch.tensor([0.5]), torch.tensor([3.0]), 1.0,
                   torch.tensor([2.0]), torch.tensor([0.1]))
    assert w.item() == 0.25
    assert b.item() == pytest.approx(-0.4)


def test_fold_bn_without_affine() -> None:
    w, b = fold_bn(torch.ones(2, 1, 1, 1), None, torch.zeros(2), torch.full((2,), 3.0), 1.0, None, None)
    assert torch.equal(w, torch.full((2, 1, 1, 1), 0.5))
    assert torch.equal(b, torch.zeros(2))


@pytest.mark.parametrize("name", ["resnet20a", "resnet20b"])
def test_fold_model_computes_the_same_function(name: str) -> None:
    torch.manual_seed(0)
    model = randomise_bn(build_model(name))
    folded = fold_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)
    modules = dict(model.named_modules())
    fmods = dict(folded.named_modules())
    for conv, bn in conv_bn_pairs(model):
        ref = fuse_conv_bn_eval(copy.deepcopy(modules[conv]), modules[bn])
        assert torch.equal(fmods[conv].weight, ref.weight) and torch.equal(fmods[conv].bias, ref.bias)


def test_fold_model_keeps_pruned_weights_zero() -> None:
    torch.manual_seed(0)
    model = randomise_bn(build_model("resnet20a"))
    masks = global_magnitude_masks(model, 0.7)
    masks.apply(model)
    folded = fold_model(model)
    fmods = dict(folded.named_modules())
    for conv, _ in conv_bn_pairs(model):
        zero = dict(model.named_modules())[conv].weight == 0
        assert zero.sum() > 0
        assert torch.all(fmods[conv].weight[zero] == 0)
