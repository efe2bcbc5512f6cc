"""ResNet-20 variants: sizes, the published state-dict layouts, strict loading and conv/BN pairing."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from compress.models import (
    MODELS,
    WeightsError,
    build_model,
    conv_bn_pairs,
    load_model,
    load_state,
)
from tests.conftest import count_prunable

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_weights(shortcut: str) -> int:
    """Conv+linear weights of a CIFAR ResNet-20 counted by hand from its layer shapes."""
    stem = 3 * 16 * 9
    stage1 = 6 * 16 * 16 * 9
    stage2 = 16 * 32 * 9 + 5 * 32 * 32 * 9
    stage3 = 32 * 64 * 9 + 5 * 64 * 64 * 9
    downsample = 16 * 32 + 32 * 64 if shortcut == "B" else 0
    return stem + stage1 + stage2 + stage3 + downsample + 64 * 10


def _chenyaofo_keys() -> list[str]:
    """State-dict keys of chenyaofo's ``cifar10_resnet20``, written out from its published layout."""
    keys = ["conv1.weight", *(f"bn1.{k}" for k in BN_KEYS)]
    for stage in (1, 2, 3):
        for block in range(3):
            p = f"layer{stage}.{block}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{k}" for k in BN_KEYS),
                     f"{p}.conv2.weight", *(f"{p}.bn2.{k}" for k in BN_KEYS)]
            if stage > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{k}" for k in BN_KEYS)]
    return keys + ["fc.weight", "fc.bias"]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "expected"), [("resnet20a", 268_336), ("resnet20b", 270_896)])
def test_both_variants_build_with_the_published_weight_counts(name: str, expected: int) -> None:
    model = build_model(name)
    assert count_prunable(model) == expected == _conv_weights(name[-1].upper())
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="resnet20a, resnet20b"):
        build_model("resnet18")


def test_option_b_state_dict_matches_the_chenyaofo_layout() -> None:
    own = [k for k in build_model("resnet20b").state_dict() if not k.startswith("normalize.")]
    assert own == _chenyaofo_keys()
    sd = build_model("resnet20b").state_dict()
    assert sd["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert sd["layer3.0.downsample.0.weight"].shape == (64, 32, 1, 1)
    assert sd["fc.weight"].shape == (10, 64)


def test_option_b_file_without_normalisation_loads_and_keeps_the_registry_statistics(tmp_path) -> None:
    torch.manual_seed(1)
    published = {k: v for k, v in build_model("resnet20b").state_dict().items()
                 if not k.startswith("normalize.") and not k.endswith("num_batches_tracked")}
    path = tmp_path / "cifar10_resnet20.pt"
    torch.save(published, path)
    model = load_model("resnet20b", path)
    for k, v in published.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor([0.2023, 0.1994, 0.2010]))


def test_option_a_layout_has_no_shortcut_weights_and_a_linear_classifier() -> None:
    keys = build_model("resnet20a").state_dict().keys()
    assert not any("downsample" in k for k in keys)
    assert {"linear.weight", "linear.bias"} <= set(keys)


@pytest.mark.realdata
def test_real_option_a_weights_load_exactly(real_weights) -> None:
    raw = torch.load(real_weights, map_location="cpu", weights_only=True)["state_dict"]
    model = load_model("resnet20a", real_weights)
    sd = model.state_dict()
    for k, v in raw.items():
        assert torch.equal(sd[k.removeprefix("module.")], v), k
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_conv_bn_pairs_follow_the_forward_order() -> None:
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    expected_a = [("conv1", "bn1")]
    expected_b = [("conv1", "bn1")]
    for p in blocks:
        expected_a += [(f"{p}.conv1", f"{p}.bn1"), (f"{p}.conv2", f"{p}.bn2")]
        expected_b += [(f"{p}.conv1", f"{p}.bn1"), (f"{p}.conv2", f"{p}.bn2")]
        if p in ("layer2.0", "layer3.0"):
            expected_b.append((f"{p}.downsample.0", f"{p}.downsample.1"))
    assert conv_bn_pairs(build_model("resnet20a")) == expected_a
    assert conv_bn_pairs(build_model("resnet20b")) == expected_b
    modules = dict(build_model("resnet20b").named_modules())
    for conv, bn in expected_b:
        assert modules[conv].out_channels == modules[bn].num_features


# --- strict loading: every failure is a WeightsError and leaves the model as it was ---------------

def _saved_state(name: str = "resnet20a") -> tuple[dict[str, torch.Tensor], bytes]:
    torch.manual_seed(2)
    sd = build_model(name).state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    return sd, buf.getvalue()


def test_truncated_file_raises_weights_error(tmp_path) -> None:
    _, data = _saved_state()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_model("resnet20a", path)


def test_garbage_bytes_raise_weights_error(tmp_path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_model("resnet20a", path)


def test_missing_file_and_non_state_dict_raise_weights_error(tmp_path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_model("resnet20a", tmp_path / "absent.pt")
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        load_model("resnet20a", path)


def test_wrong_keys_name_missing_and_unexpected_and_load_nothing() -> None:
    torch.manual_seed(3)
    model = build_model("resnet20a")
    before = _params(model)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in before.items()}
    state["classifier.weight"] = state.pop("linear.weight")
    with pytest.raises(WeightsError) as e:
        load_state(model, state, source="renamed.pt")
    msg = str(e.value)
    assert "renamed.pt" in msg
    assert "missing keys ['linear.weight']" in msg
    assert "unexpected keys ['classifier.weight']" in msg
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed the model"


def test_wrong_shapes_are_named_and_load_nothing() -> None:
    torch.manual_seed(4)
    model = build_model("resnet20a")
    before = _params(model)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in before.items()}
    state["linear.weight"] = torch.zeros(10, 32)
    with pytest.raises(WeightsError, match=r"shape mismatch \['linear.weight \(10, 32\) != \(10, 64\)'\]"):
        load_state(model, state)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_option_b_file_into_option_a_model_is_refused(tmp_path) -> None:
    _, data = _saved_state("resnet20b")
    path = tmp_path / "b.pt"
    path.write_bytes(data)
    with pytest.raises(WeightsError) as e:
        load_model("resnet20a", path)
    assert str(e.value).startswith(f"{path} holds resnet20b weights (ResNet-20, option-B")
    assert str(e.value).endswith("not resnet20a: pass --model resnet20b")
    assert "missing keys ['linear.weight', 'linear.bias']" in str(e.value.__cause__)


def test_option_a_file_into_option_b_model_names_the_model_it_fits(tmp_path) -> None:
    """As with the published option-A file, whose keys carry DataParallel's "module." prefix."""
    sd = build_model("resnet20a").state_dict()
    path = tmp_path / "a.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items() if not k.startswith("normalize.")}}, path)
    with pytest.raises(WeightsError, match=r"holds resnet20a weights .*: pass --model resnet20a$"):
        load_model("resnet20b", path)
    torch.save({"x.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="does not fit CifarResNet: missing keys"):
        load_model("resnet20b", path)


def test_project_checkpoint_and_module_prefix_load(tmp_path) -> None:
    torch.manual_seed(5)
    sd = build_model("resnet20a").state_dict()
    torch.save({"model": sd, "arch": "resnet20a"}, tmp_path / "final.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "dp.th")
    for f in ("final.pt", "dp.th"):
        loaded = load_model("resnet20a", tmp_path / f).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in sd.items()), f


def test_registry_entries_are_complete() -> None:
    for name, info in MODELS.items():
        assert info.weights_url and info.weights_sha256_prefix and info.about, name
        assert isinstance(info.build(), nn.Module)


def test_pretrained_weights_download_once_and_are_hash_checked(tmp_path, monkeypatch) -> None:
    """``--weights pretrained`` through torch.hub's downloader, from a server on this machine."""
    import dataclasses
    import functools
    import hashlib
    import http.server
    import threading

    import compress.models as models

    served = tmp_path / "served"
    served.mkdir()
    sd = build_model("resnet20a").state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items() if not k.startswith("normalize.")}},
               served / "r20.th")
    digest = hashlib.sha256((served / "r20.th").read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/r20.th"
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
        info = models.MODELS["resnet20a"]
        monkeypatch.setitem(models.MODELS, "resnet20a", dataclasses.replace(info, weights_url=url,
                                                                             weights_sha256_prefix=digest[:8]))
        loaded = load_model("resnet20a", "pretrained").state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in sd.items())
        assert (tmp_path / "hub" / "checkpoints" / "r20.th").is_file()
        (tmp_path / "hub" / "checkpoints" / "r20.th").unlink()
        bad = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
        monkeypatch.setitem(models.MODELS, "resnet20a", dataclasses.replace(info, weights_url=url,
                                                                             weights_sha256_prefix=bad))
        with pytest.raises(WeightsError, match=r"cannot download .*r20.th: invalid hash value"):
            load_model("resnet20a", "pretrained")
        assert not (tmp_path / "hub" / "checkpoints" / "r20.th").exists()  # nothing kept of a bad download
    finally:
        server.shutdown()
