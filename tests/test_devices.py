"""What the GPU path needs, checked on the CPU: masks on their weights' device, float32 evaluation,
deterministic CUDA kernels, when the model compiles. (Only ``gpu`` tests need a CUDA device; the
``meta`` device stands in for a second device here: a tensor on it is on another device than the CPU.)
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from compress import loops
from compress.loops import evaluate
from compress.models import build_model
from compress.prune import MaskSet, global_magnitude_masks

CPU, OTHER = torch.device("cpu"), torch.device("meta")


def _mask(device: torch.device, *values: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool).to(device)


def test_masks_read_back_from_a_checkpoint_go_to_the_run_device() -> None:
    state = MaskSet({"w": _mask(CPU, True, False)}).state_dict()  # a checkpoint holds them on the CPU
    assert all(v.device == CPU for v in state.values())
    restored = MaskSet.from_state_dict(state, OTHER)
    assert restored.masks["w"].device == OTHER and restored.masks["w"].dtype == torch.bool
    assert MaskSet.from_state_dict(state).masks["w"].device == CPU


def test_masks_merge_onto_the_device_of_the_masks_already_held() -> None:
    """A run resumed on a GPU holds its restored masks there; a new step's masks join them there."""
    held = MaskSet({"w": _mask(OTHER, True, True, False)})
    merged = held.merge(MaskSet({"w": _mask(CPU, True, False, True), "v": _mask(CPU, True)}))
    assert merged.masks["w"].device == OTHER and merged.masks["v"].device == CPU
    on_cpu = MaskSet({"w": _mask(CPU, True, True, False)}).merge(MaskSet({"w": _mask(CPU, True, False, True)}))
    assert on_cpu.masks["w"].tolist() == [True, False, False]


def test_masks_bind_to_a_model_once_and_again_when_its_weights_move() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    masks = global_magnitude_masks(model, 0.5)
    params, mults = masks.multipliers(model)
    again = masks.multipliers(model)
    assert again[1][0] is mults[0], "the multipliers were rebuilt for the same model"
    assert all(m.dtype == p.dtype == torch.float32 and m.device == p.device for p, m in zip(params, mults, strict=True))
    model.double()
    params, mults = masks.multipliers(model)
    assert all(m.dtype == torch.float64 for m in mults), "moved weights kept the old multipliers"
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    masks.apply(model)
    zeros = sum(int((m.weight == 0).sum()) for m in model)
    assert zeros == sum(int((~v).sum()) for v in masks.masks.values()) == round(0.5 * (64 + 16))


def test_evaluation_is_float32_inside_an_autocast_block() -> None:
    """Rows mean the same on every device: evaluation never computes in bf16, whatever the caller set."""
    torch.manual_seed(0)
    model = build_model("resnet20a").eval()
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    plain = evaluate(model, [(x, y)], CPU, keep_predictions=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = evaluate(model, [(x, y)], CPU, keep_predictions=True)
    assert inside.loss == plain.loss and torch.equal(inside.predictions, plain.predictions)


def test_deterministic_kernels_on_cuda_are_set_and_restored() -> None:
    """Entered for a CUDA job (no GPU needed to set the flags); a no-op for a CPU job."""
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    with loops.deterministic(CPU):
        assert not torch.are_deterministic_algorithms_enabled()
    with loops.deterministic(torch.device("cuda")):
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    after = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    assert after == before


def test_compile_auto_compiles_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "cxx_compiler", lambda: "/usr/bin/g++")
    pays = loops.CPU_COMPILE_PAYS_IMAGES
    assert loops.compile_decision("auto", CPU, pays - 1)[0] is False
    assert loops.compile_decision("auto", CPU, pays)[0] is True
    assert loops.compile_decision("auto", torch.device("cuda"), 1)[0] is True
    assert loops.compile_decision("off", torch.device("cuda"), 10**9)[0] is False
    assert loops.compile_decision("on", CPU, 1)[0] is True
    monkeypatch.setattr(loops, "cxx_compiler", lambda: "")
    assert loops.compile_decision("auto", CPU, 10**9) == (False, "no C++ compiler for torch.compile")
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        loops.compile_decision("on", CPU, 1)
    with pytest.raises(ValueError, match="compile='sometimes' is invalid"):
        loops.compile_decision("sometimes", CPU, 1)


@pytest.mark.gpu
def test_bf16_warning_on_a_gpu_without_bf16_units(cuda: torch.device) -> None:
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    warning = loops.gpu_bf16_warning(cuda)
    assert (warning == "") == native and loops.gpu_bf16_warning(cuda, amp=False) == ""


@pytest.mark.gpu
def test_masks_restored_on_a_gpu_run_merge_and_apply_there(cuda: torch.device) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20a").to(cuda)
    restored = MaskSet.from_state_dict(global_magnitude_masks(model, 0.3).state_dict(), cuda)
    merged = restored.merge(global_magnitude_masks(model, 0.5))
    merged.apply(model)
    assert all(m.device.type == "cuda" for m in merged.masks.values())
    assert all(m.device == p.device for p, m in zip(*merged.multipliers(model), strict=True))
