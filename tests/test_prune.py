"""Pruning: exact global magnitude masks, BN-gamma filter masks, phase schedules, masks held by training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compress.loops import build_optimizer, train_one_epoch
from compress.models import build_model, conv_bn_pairs, prunable
from compress.prune import (
    MaskSet,
    bn_gamma_filter_masks,
    global_magnitude_masks,
    global_sparsity,
    lamp_scores,
    make_permanent,
    module_table,
    nonzero_counts,
)
from compress.schedule import phase_targets
from jobs.text import format_modules
from tests.conftest import count_prunable, is_close_to

N_A = 268_336  # conv+linear weights of resnet20a


def _model(seed: int = 0, name: str = "resnet20a") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name)


def _zeros(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(int((m.weight == 0).sum()) for n, m in prunable(model) if n not in skip)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.92, 0.999])
def test_global_magnitude_hits_exactly_round_s_n_zeros(sparsity: float) -> None:
    model = _model()
    masks = global_magnitude_masks(model, sparsity)
    masks.apply(model)
    assert _zeros(model) == round(sparsity * N_A)
    assert is_close_to(global_sparsity(model), sparsity, N_A)


def test_global_magnitude_removes_the_smallest_weights() -> None:
    model = _model()
    flat = torch.cat([m.weight.detach().abs().flatten() for _, m in prunable(model)])
    k = round(0.3 * N_A)
    threshold = flat.kthvalue(k).values
    global_magnitude_masks(model, 0.3).apply(model)
    kept = torch.cat([m.weight.detach().abs().flatten() for _, m in prunable(model)])
    assert float(kept[kept > 0].min()) >= float(threshold)


def test_ties_still_give_the_exact_count() -> None:
    model = _model()
    with torch.no_grad():
        for _, m in prunable(model):
            m.weight.fill_(0.5)  # every weight ties with every other
    global_magnitude_masks(model, 0.37).apply(model)
    assert _zeros(model) == round(0.37 * N_A)


def test_earlier_zeros_are_kept_when_pruning_further() -> None:
    model = _model()
    with torch.no_grad():
        model.layer3[2].conv2.weight[:10].zero_()  # 5,760 weights zero before any pruning
    pre_zero = model.layer3[2].conv2.weight == 0
    first = global_magnitude_masks(model, 0.2)
    first.apply(model)
    assert bool((model.layer3[2].conv2.weight[pre_zero] == 0).all())
    assert _zeros(model) == round(0.2 * N_A)
    zero_after_first = {n: m.weight == 0 for n, m in prunable(model)}
    masks = first.merge(global_magnitude_masks(model, 0.6))
    masks.apply(model)
    assert _zeros(model) == round(0.6 * N_A)
    for n, m in prunable(model):
        assert bool((m.weight[zero_after_first[n]] == 0).all()), n


def test_keep_dense_layers_are_untouched() -> None:
    model = _model()
    skip = ("conv1", "linear")
    before = {n: model.get_submodule(n).weight.clone() for n in skip}
    masks = global_magnitude_masks(model, 0.8, exclude=skip)
    assert not {f"{n}.weight" for n in skip} & masks.masks.keys()
    masks.apply(model)
    for n in skip:
        assert torch.equal(model.get_submodule(n).weight, before[n]), n
    assert _zeros(model, skip) == round(0.8 * N_A)  # the target is global: the other layers make up for them
    assert _zeros(model) == round(0.8 * N_A)


def test_keep_dense_counts_zeros_already_in_the_kept_layers_and_refuses_an_unreachable_target() -> None:
    model = _model()
    with torch.no_grad():
        model.conv1.weight[:4] = 0  # e.g. filters removed by BN-gamma pruning
    zeros_conv1 = 4 * model.conv1.weight[0].numel()
    global_magnitude_masks(model, 0.5, exclude=("conv1",)).apply(model)
    assert _zeros(model) == round(0.5 * N_A) and _zeros(model, ("conv1",)) == round(0.5 * N_A) - zeros_conv1
    big = ("layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2", "layer3.2.conv1", "layer3.2.conv2")
    with pytest.raises(ValueError, match="only .* weights are outside the kept-dense layers"):
        global_magnitude_masks(_model(), 0.5, exclude=big)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_magnitude_sparsity_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        global_magnitude_masks(_model(), bad)


# --- BN-gamma filter pruning -------------------------------------------------------------------

def _set_gammas(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.rand(m.num_features, generator=g) + 0.1)


def test_bn_gamma_removes_the_smallest_gamma_filters_and_their_bn() -> None:
    model = _model()
    _set_gammas(model)
    small = {("layer1.1.bn2", 3): 0.01, ("layer2.0.bn1", 30): 0.02, ("layer3.2.bn2", 0): -0.03,
             ("layer3.1.bn1", 63): 0.04}
    with torch.no_grad():
        for (bn, c), v in small.items():
            model.get_submodule(bn).weight[c] = v
    n_channels = sum(model.get_submodule(b).num_features for _, b in conv_bn_pairs(model))
    assert n_channels == 688
    fraction = len(small) / n_channels  # round(fraction * 688) = 4 filters
    masks = bn_gamma_filter_masks(model, fraction)
    masks.apply(model)
    pairs = dict((b, c) for c, b in conv_bn_pairs(model))
    removed = set()
    for conv, bn in conv_bn_pairs(model):
        w, b = model.get_submodule(conv).weight, model.get_submodule(bn)
        for c in range(b.num_features):
            if bool((w[c] == 0).all()):
                assert b.weight[c] == 0 and b.bias[c] == 0
                removed.add((bn, c))
            else:
                assert b.weight[c] != 0 and b.bias[c] != 0
    assert removed == set(small)
    for bn, c in small:
        assert bool((model.get_submodule(pairs[bn]).weight[c] == 0).all())


def test_bn_gamma_counts_filters_globally() -> None:
    model = _model()
    _set_gammas(model, seed=1)
    bn_gamma_filter_masks(model, 0.1).apply(model)
    removed = sum(int((model.get_submodule(b).weight == 0).sum()) for _, b in conv_bn_pairs(model))
    assert removed == round(0.1 * 688) == 69


def test_bn_gamma_keeps_at_least_one_filter_per_layer() -> None:
    model = _model()
    _set_gammas(model)
    with torch.no_grad():
        model.bn1.weight.copy_(torch.linspace(1e-4, 1e-3, 16))  # the stem's 16 filters rank first
    bn_gamma_filter_masks(model, 0.05).apply(model)  # round(0.05 * 688) = 34 > 16
    kept = (model.bn1.weight != 0).nonzero().flatten().tolist()
    assert kept == [15]  # the largest |gamma| of the stem survives
    removed = sum(int((model.get_submodule(b).weight == 0).sum()) for _, b in conv_bn_pairs(model))
    assert removed == 34


def test_removed_filter_outputs_exactly_zero() -> None:
    model = _model()
    _set_gammas(model)
    with torch.no_grad():
        model.layer2[1].bn1.weight[5] = 1e-6
        model.layer2[1].bn1.running_mean.fill_(0.3)  # a channel whose statistics would leak a bias
    bn_gamma_filter_masks(model, 1 / 688).apply(model)
    seen = {}
    model.layer2[1].bn1.register_forward_hook(lambda m, i, o: seen.update(out=o.detach()))
    for mode in (model.train, model.eval):
        mode()
        model(torch.rand(4, 3, 32, 32))
        assert bool((seen["out"][:, 5] == 0).all())
        assert bool((seen["out"][:, 4] != 0).any())


def test_bn_gamma_fraction_zero_and_out_of_range() -> None:
    assert len(bn_gamma_filter_masks(_model(), 0.0)) == 0
    with pytest.raises(ValueError, match="filter fraction"):
        bn_gamma_filter_masks(_model(), 1.0)


def test_option_b_shortcut_bn_takes_part_in_filter_pruning() -> None:
    model = _model(name="resnet20b")
    _set_gammas(model)
    with torch.no_grad():
        model.layer3[0].downsample[1].weight[7] = 0.001
    masks = bn_gamma_filter_masks(model, 1 / 720)  # 688 + 32 shortcut channels
    assert not masks.masks["layer3.0.downsample.0.weight"][7].any()
    assert int((~masks.masks["layer3.0.downsample.1.weight"]).sum()) == 1


# --- schedules -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("schedule", "expected"), [
    ("linear", [0.25, 0.5]),
    ("geometric", [1 - math.sqrt(0.5), 0.5]),  # keep 1 -> 0.7071 -> 0.5
    ("cubic", [0.5 - 0.5 * 0.5**3, 0.5]),       # 0.4375
])
def test_phase_targets_worked_values(schedule: str, expected: list[float]) -> None:
    assert phase_targets(0.5, 2, schedule) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "geometric", "cubic"])
@pytest.mark.parametrize(("final", "phases", "initial"), [(0.92, 12, 0.0), (0.5, 1, 0.0), (0.9, 5, 0.3)])
def test_phase_targets_end_exactly_at_final_and_grow(schedule: str, final: float, phases: int,
                                                     initial: float) -> None:
    t = phase_targets(final, phases, schedule, initial)
    assert len(t) == phases and t[-1] == final
    assert all(a < b for a, b in zip([initial, *t], t, strict=False))


def test_geometric_shrinks_the_kept_fraction_by_one_factor() -> None:
    keep = [1 - s for s in [0.0, *phase_targets(0.92, 12, "geometric")]]
    ratios = [b / a for a, b in zip(keep, keep[1:], strict=False)]
    assert ratios == pytest.approx([0.08 ** (1 / 12)] * 12)  # 0.81 a phase


@pytest.mark.parametrize(("args", "message"), [
    ((1.0, 3, "linear"), "final"), ((-0.1, 3, "linear"), "initial"), ((0.5, 0, "linear"), "phases must be >= 1"),
    ((0.5, 3, "exponential"), "known: linear, geometric, cubic"), ((0.3, 3, "linear", 0.5), "initial"),
])
def test_phase_targets_bad_input(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        phase_targets(*args)


# --- masks through training --------------------------------------------------------------------

def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def test_masks_hold_through_adamw_with_weight_decay(device: torch.device) -> None:
    model = _model().to(device)
    _set_gammas(model)
    masks = bn_gamma_filter_masks(model, 0.05).merge(global_magnitude_masks(model, 0.5))
    masks.apply(model)
    zero = {n: p == 0 for n, p in model.named_parameters() if n in masks.masks}
    opt = build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.1)
    train_one_epoch(model, _batches(4), opt, None, device, after_step=lambda: masks.apply(model), progress=False)
    params = dict(model.named_parameters())
    for n, z in zero.items():
        assert bool((params[n][z] == 0).all()), n
    assert _zeros(model) == int(sum((~m).sum() for k, m in masks.masks.items() if k.endswith("weight")
                                    and not k.split(".")[-2].startswith("bn")))

    # without the masks the same steps revive pruned weights: the check above can fail
    opt = build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.1)
    train_one_epoch(model, _batches(1), opt, None, device, progress=False)
    assert _zeros(model) < round(0.5 * N_A)


def test_mask_state_round_trip_and_make_permanent() -> None:
    model = _model()
    masks = global_magnitude_masks(model, 0.4)
    again = MaskSet.from_state_dict({k: v.to(torch.uint8) for k, v in masks.state_dict().items()})
    assert masks.masks.keys() == again.masks.keys()
    assert all(torch.equal(masks.masks[k], again.masks[k]) for k in masks.masks)
    make_permanent(model, again)
    assert len(again) == 0 and _zeros(model) == round(0.4 * N_A)


def test_module_table_counts_and_total_line() -> None:
    model = _model()
    before = nonzero_counts(model)
    global_magnitude_masks(model, 0.5).apply(model)
    rows = module_table(before, nonzero_counts(model))
    assert [r.module for r in rows] == [n for n, _ in prunable(model)]
    assert sum(r.params for r in rows) == count_prunable(model)
    assert sum(r.removed for r in rows) == round(0.5 * N_A)
    text = format_modules(rows)  # the text a prune run prints (jobs layer) over the library's rows
    total = text.splitlines()[-1].split()
    assert total[:5] == ["total", "268,336", "268,336", "134,168", "134,168"] and total[5] == "50.00%"


def test_layer_cap_holds_and_the_other_layers_make_up_the_global_count() -> None:
    model = _model()
    sizes = {f"{n}.weight": m.weight.numel() for n, m in prunable(model)}
    uncapped = global_magnitude_masks(model, 0.9)
    assert max(1 - int(k.sum()) / k.numel() for k in uncapped.masks.values()) > 0.93  # the cap below binds
    masks = global_magnitude_masks(model, 0.9, max_layer_sparsity=0.93)
    zeros = {n: int((~k).sum()) for n, k in masks.masks.items()}
    assert sum(zeros.values()) == round(0.9 * N_A)
    assert all(zeros[n] <= math.floor(0.93 * sizes[n]) for n in zeros)
    # water-filling: a layer under its cap loses exactly its smallest weights, below one global threshold
    # that every capped layer's kept weights also pass
    under = [n for n in zeros if zeros[n] < math.floor(0.93 * sizes[n])]
    capped = [n for n in zeros if zeros[n] == math.floor(0.93 * sizes[n])]
    assert under and capped
    w = dict((f"{n}.weight", m.weight.detach().abs()) for n, m in prunable(model))
    cut = max(float(w[n][~masks.masks[n]].max()) for n in under)
    assert all(float(w[n][masks.masks[n]].min()) >= cut for n in under)
    assert all(float(w[n][~masks.masks[n]].max()) <= float(w[n][masks.masks[n]].min()) for n in capped)
    # with the cap off, the same call is plain global magnitude pruning
    off = global_magnitude_masks(model, 0.9, max_layer_sparsity=1.0)
    assert all(torch.equal(off.masks[n], uncapped.masks[n]) for n in off.masks)


def test_layer_cap_keeps_earlier_zeros_and_refuses_a_target_it_cannot_reach() -> None:
    model = _model()
    with torch.no_grad():
        model.get_submodule("layer1.0.conv1").weight[:15] = 0  # 15 of 16 filters: past a 0.9 cap already
    masks = global_magnitude_masks(model, 0.5, max_layer_sparsity=0.9)
    first = masks.masks["layer1.0.conv1.weight"]
    assert not bool(first[:15].any()) and bool(first[15:].all())  # kept its zeros, took no more
    assert sum(int((~k).sum()) for k in masks.masks.values()) == round(0.5 * N_A)
    with pytest.raises(ValueError, match="per-layer cap of 0.5 allows only"):
        global_magnitude_masks(_model(), 0.6, max_layer_sparsity=0.5)
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match=r"max_layer_sparsity must be in \(0, 1\]"):
            global_magnitude_masks(_model(), 0.5, max_layer_sparsity=bad)


def test_lamp_scores_match_a_hand_computed_layer() -> None:
    # squares sorted: 0, 1, 4, 9 (sum of the tail from each: 14, 14, 13, 9)
    scores = lamp_scores(torch.tensor([[3.0, -1.0], [0.0, 2.0]]))
    assert torch.allclose(scores, torch.tensor([9 / 9, 1 / 14, 0.0, 4 / 13]))
    assert torch.equal(lamp_scores(torch.zeros(3)), torch.zeros(3))  # an emptied layer: no 0/0


def test_lamp_spares_a_layer_of_small_weights_that_one_global_threshold_empties() -> None:
    model = _model()
    small = "layer1.0.conv1"
    before = global_magnitude_masks(model, 0.5, scoring="lamp")
    with torch.no_grad():
        model.get_submodule(small).weight.mul_(1e-3)  # a layer on a smaller scale than the rest
    plain = global_magnitude_masks(model, 0.5)
    lamp = global_magnitude_masks(model, 0.5, scoring="lamp")
    for masks in (plain, lamp):  # same count either way
        assert sum(int((~k).sum()) for k in masks.masks.values()) == round(0.5 * N_A)
    assert not bool(plain.masks[f"{small}.weight"].any())  # magnitude: the whole layer goes
    # LAMP scores are scale-free per layer: rescaling one layer changes no mask at all
    assert all(torch.equal(lamp.masks[n], before.masks[n]) for n in lamp.masks)
    assert bool(lamp.masks[f"{small}.weight"].any())
    # within each layer LAMP still removes the smallest weights
    w = {f"{n}.weight": m.weight.detach().abs() for n, m in prunable(model)}
    for n, k in lamp.masks.items():
        if (~k).any() and k.any():
            assert float(w[n][~k].max()) <= float(w[n][k].min())


def test_lamp_keeps_every_layer_alive_at_extreme_sparsity_and_works_with_the_cap() -> None:
    model = _model()
    masks = global_magnitude_masks(model, 0.999, scoring="lamp")
    assert sum(int((~k).sum()) for k in masks.masks.values()) == round(0.999 * N_A)
    assert all(bool(k.any()) for k in masks.masks.values())  # each layer's largest weight scores 1
    capped = global_magnitude_masks(model, 0.9, max_layer_sparsity=0.93, scoring="lamp")
    sizes = {f"{n}.weight": m.weight.numel() for n, m in prunable(model)}
    assert all(int((~k).sum()) <= math.floor(0.93 * sizes[n]) for n, k in capped.masks.items())
    with pytest.raises(ValueError, match="unknown scoring 'erk'"):
        global_magnitude_masks(model, 0.5, scoring="erk")
