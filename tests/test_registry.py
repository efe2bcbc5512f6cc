"""The model registry: built-ins, timm:, torchvision: and a user's module:function, and what breaks them."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from compress import registry
from compress.models import WeightsError, _named_pairs, build_model, conv_bn_pairs, prunable
from compress.prune import bn_gamma_filter_masks, check_budget
from compress.registry import ModelError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

MYNETS = '''
import torch
from torch import nn


def small_cnn(num_classes=10, in_chans=3, width=8):
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def no_bn(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


def broken():
    raise RuntimeError("width must be even\\nsecond line")


def not_a_module():
    return {"conv": 1}


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def branchy():
    return Branchy()
'''


@pytest.fixture
def mynets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's model module outside the repository, importable as ``mynets``."""
    path = tmp_path / "mynets.py"
    path.write_text(textwrap.dedent(MYNETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_model_strings_are_parsed_without_building() -> None:
    assert registry.parse_model("resnet20a").builtin
    assert registry.parse_model("timm:resnet18").kind == "timm"
    assert registry.parse_model("torchvision:mobilenet_v3_small").name == "mobilenet_v3_small"
    assert registry.parse_model("pkg.mynets:small_cnn").kind == "factory"
    for bad in ("resnet21", "timm:", "a b", "pkg.mod:"):
        with pytest.raises(ModelError, match="model="):
            registry.parse_model(bad)
    assert registry.parse_args("num_classes=10,in_chans=1,drop_rate=0.1,act=relu,k=(3,3)") == {
        "num_classes": 10, "in_chans": 1, "drop_rate": 0.1, "act": "relu", "k": (3, 3)}
    with pytest.raises(ModelError, match="key=value"):
        registry.parse_args("num_classes")


def test_library_models_build_with_their_arguments_and_unknown_names_get_the_closest() -> None:
    m = registry.build("timm:mobilenetv3_small_100", "num_classes=7", MEAN, STD)
    assert registry.output_width(m, (3, 32, 32)) == 7
    assert torch.allclose(m.normalize.mean.flatten(), torch.tensor(MEAN))
    assert m.model_ref == "timm:mobilenetv3_small_100"
    g = registry.build("timm:resnet18", "num_classes=10,in_chans=1", (0.5,), (0.25,))
    assert registry.output_width(g, (1, 16, 16)) == 10
    with pytest.raises(ModelError, match="closest: resnet18"):
        registry.build("timm:resnet81", "", MEAN, STD)
    with pytest.raises(ModelError, match="closest: resnet18"):
        registry.build("torchvision:resnet81", "", MEAN, STD)
    with pytest.raises(ModelError, match="raised TypeError"):
        registry.build("torchvision:resnet18", "no_such_arg=1", MEAN, STD)


def test_a_users_factory_builds_and_its_source_is_recorded(mynets: Path) -> None:
    m = registry.build("mynets:small_cnn", "num_classes=4,width=6", MEAN, STD)
    assert registry.output_width(m, (3, 8, 8)) == 4
    info = registry.describe(m, "mynets:small_cnn")
    assert info["model_source_sha256"] == hashlib.sha256(mynets.read_bytes()).hexdigest()
    assert info["model_params"] == sum(p.numel() for p in m.parameters())
    assert info["data_mean"] == "0.5,0.5,0.5" and info["data_std"] == "0.25,0.25,0.25"
    builtin = registry.describe(build_model("resnet20a"), "resnet20a")
    assert builtin["model_source_sha256"] == "" and builtin["data_mean"] == "0.485,0.456,0.406"  # its own


@pytest.mark.parametrize(("text", "message"), [
    ("mynets:broken", "raised RuntimeError: width must be even$"),
    ("mynets:not_a_module", "returned dict, not a torch.nn.Module"),
    ("mynets:nothing", "mynets has no function nothing"),
    ("nomodule_here:fn", "cannot import nomodule_here .*PYTHONPATH"),
])
def test_a_factory_that_fails_is_one_line(mynets: Path, text: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as e:
        registry.build(text, "", MEAN, STD)
    assert "\n" not in str(e.value)


def test_weights_load_from_a_state_dict_or_a_checkpoint_and_a_misfit_names_keys_and_shapes(
        mynets: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = registry.build("mynets:small_cnn", "", MEAN, STD).net
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, ckpt)
    for path in (bare, ckpt):
        loaded = registry.load("mynets:small_cnn", "", path, MEAN, STD)
        assert torch.equal(loaded.net[0].weight, net[0].weight)
    wide = tmp_path / "wide.pt"
    torch.save(registry.build("mynets:small_cnn", "width=16", MEAN, STD).net.state_dict(), wide)
    with pytest.raises(WeightsError, match=r"shape mismatch .*0.weight \(16, 3, 3, 3\) != \(8, 3, 3, 3\)"):
        registry.load("mynets:small_cnn", "", wide, MEAN, STD)
    other = tmp_path / "other.pt"
    torch.save(registry.build("mynets:no_bn", "", MEAN, STD).net.state_dict(), other)
    with pytest.raises(WeightsError, match=r"missing keys \['net.1.weight', 'net.1.bias', 'net.1.running_mean'\]"):
        registry.load("mynets:small_cnn", "", other, MEAN, STD)


def test_the_class_count_must_be_the_models_output(mynets: Path) -> None:
    m = registry.build("mynets:small_cnn", "num_classes=4", MEAN, STD)
    registry.check_classes(m, (3, 8, 8), 4, "mynets:small_cnn")
    with pytest.raises(ModelError, match="has 4 outputs but the data has 10 classes: pass --model-args num_classes=10"):
        registry.check_classes(m, (3, 8, 8), 10, "mynets:small_cnn")
    with pytest.raises(ModelError, match="does not take images of shape 1x8x8"):
        registry.output_width(m, (1, 8, 8))


def test_pruning_sees_every_conv_of_any_model(mynets: Path) -> None:
    """Depthwise and grouped convs count the weights they store; BN pairs are found in the traced graph."""
    m = registry.build("timm:mobilenetv3_small_100", "num_classes=10", MEAN, STD)
    layers = dict(prunable(m))
    dw = layers["net.blocks.0.0.conv_dw"]
    assert dw.groups == dw.out_channels and dw.weight.numel() == dw.out_channels * 9
    pairs = conv_bn_pairs(m)
    assert ("net.conv_stem", "net.bn1") in pairs and ("net.blocks.0.0.conv_dw", "net.blocks.0.0.bn1") in pairs
    masks = bn_gamma_filter_masks(m, 0.1)
    assert len(masks) == 3 * len(pairs)
    for name in ("resnet20a", "resnet20b"):  # the built-ins: the same pairs, in the same order, as by name
        b = build_model(name)
        assert conv_bn_pairs(b) == _named_pairs(b)
    assert conv_bn_pairs(registry.build("mynets:no_bn", "", MEAN, STD)) == []
    assert len(bn_gamma_filter_masks(registry.build("mynets:no_bn", "", MEAN, STD), 0.1)) == 0


def test_kept_dense_names_and_the_budget_are_checked_on_the_built_model(mynets: Path) -> None:
    m = registry.build("mynets:small_cnn", "", MEAN, STD)
    check_budget(m, 0.5, ("net.8",))
    with pytest.raises(ValueError, match=r"unknown module\(s\) \['conv1'\]; .*net.0, net.3, net.8"):
        check_budget(m, 0.5, ("conv1",))
    with pytest.raises(ValueError, match="final_sparsity=0.9 is invalid: .*outside the kept-dense"):
        check_budget(m, 0.9, ("net.0", "net.8"))


def test_manual_refuses_other_models_and_pt2e_one_that_does_not_export(mynets: Path) -> None:
    from compress.quant.backends import BACKENDS
    from compress.quant.pt2e import ExportError, export_float

    assert BACKENDS["manual"].refuses(build_model("resnet20a")) == ""
    m = registry.build("mynets:small_cnn", "", MEAN, STD)
    assert "built-in ResNets only" in BACKENDS["manual"].refuses(m)
    assert BACKENDS["pt2e"].refuses(m) == ""
    b = registry.build("mynets:branchy", "", MEAN, STD)
    b.input_shape = (3, 8, 8)
    with pytest.raises(ExportError, match="pt2e needs a model torch.export can trace") as e:
        export_float(b)
    assert "\n" not in str(e.value)
    m.input_shape = (3, 8, 8)
    assert isinstance(export_float(m), torch.export.ExportedProgram)


def test_a_wrapped_model_carries_its_normalisation_in_its_state_dict() -> None:
    m = registry.build("torchvision:resnet18", "num_classes=10", MEAN, STD)
    sd = m.state_dict()
    assert torch.equal(sd["normalize.std"].flatten(), torch.tensor(STD))
    assert isinstance(m.net, nn.Module) and "net.conv1.weight" in sd
