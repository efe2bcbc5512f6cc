"""Channel pruning: a pruned model computes what the masked model computes, its saved form reloads exactly,
a channels run writes its counts, resumes, and feeds PTQ; bad input is one line with nothing written."""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import jobs.training
from cli.main import cli
from compress import channels, registry
from compress.models import build_model, load_model
from compress.quant.packed import load_packed, pack_float
from jobs.specs import PruneSpec
from tests.helpers import interrupt_phase, randomise_bn

SHAPE = (3, 32, 32)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(build_model(name)).eval()


def _zero_like_removed(group, masked: nn.Module) -> None:
    """In ``masked``, zero what the group removes: each producer's output channels (conv/linear weight and
    bias, BatchNorm gamma and beta), so those channels carry exactly 0 to every consumer."""
    modules = dict(masked.named_modules())
    names = {m: n for n, m in group._DG.model.named_modules()}
    with torch.no_grad():
        for dep, idxs in group:
            if dep.target.module not in names or dep.handler.__name__ != "prune_out_channels":
                continue  # a functional op (the add, a ReLU), or a consumer (its input channels read zeros)
            m = modules[names[dep.target.module]]
            m.weight[idxs] = 0
            if m.bias is not None:
                m.bias[idxs] = 0


@pytest.mark.parametrize("name,layer", [("resnet20a", "layer2.1.conv1"), ("resnet20b", "layer2.0.conv2")],
                         ids=["inside-a-block", "the-residual-stream-of-option-b"])
def test_a_channel_pruned_model_computes_what_the_masked_model_computes(name: str, layer: str) -> None:
    """Removing channels (and every layer coupled to them, across the residual adds) = zeroing them."""
    import torch_pruning as tp

    pruned = _model(name)
    masked = copy.deepcopy(pruned)
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=torch.rand(1, *SHAPE))
    conv = dict(pruned.named_modules())[layer]
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0, 3, 5, 9])
    _zero_like_removed(group, masked)
    group.prune()
    assert conv.out_channels == dict(masked.named_modules())[layer].out_channels - 4
    x = torch.rand(8, *SHAPE)
    with torch.no_grad():
        want, got = masked(x), pruned(x)
    # to float32 rounding: the pruned convs sum fewer terms, in another order
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())) and want.abs().sum() > 0


def test_option_a_keeps_the_residual_stream_and_reaches_half_the_macs() -> None:
    model = _model("resnet20a")
    dense = channels.count(model, SHAPE)
    step = channels.prune_channels(model, SHAPE, 0.5, dense, "l1", keep=channels.default_keep(model))
    assert step.after.macs <= 0.5 * dense.macs and step.after.macs > 0.45 * dense.macs
    shapes = channels.widths(model)
    # the stem, each block's second conv (the residual stream) and the classifier keep their output channels
    assert shapes["conv1"][0] == 16 and shapes["linear"][0] == 10
    assert all(shapes[f"layer{i}.{j}.conv2"][0] == 16 * 2 ** (i - 1) for i in (1, 2, 3) for j in range(3))
    assert shapes["layer3.0.conv1"][0] < 64


def test_the_saved_form_reloads_to_identical_outputs(tmp_path: Path) -> None:
    model = _model("resnet20a")
    dense_shapes = channels.widths(model)
    channels.prune_channels(model, SHAPE, 0.6, channels.count(model, SHAPE), "bn", keep=("conv1", "linear"))
    shapes = channels.changed(model, dense_shapes)
    torch.save({"model": model.state_dict(), "widths": shapes}, tmp_path / "final.pt")
    reloaded = load_model("resnet20a", tmp_path / "final.pt").eval()
    unpacked = load_packed(pack_float(model, "resnet20a", widths=shapes))
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(reloaded(x), want) and torch.equal(unpacked(x), want)
    # without its widths the pruned state dict does not fit the architecture: one line naming the shapes
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model("resnet20a", tmp_path / "bare.pt")


@pytest.mark.slow
def test_a_timm_model_loses_channels_and_reloads(tmp_path: Path) -> None:
    model = registry.build("timm:resnet18", "num_classes=10", (0.5,) * 3, (0.25,) * 3).eval()
    dense_shapes = channels.widths(model)
    dense = channels.count(model, SHAPE)
    step = channels.prune_channels(model, SHAPE, 0.5, dense, "l2", global_=True, keep=channels.default_keep(model))
    assert step.after.macs <= 0.5 * dense.macs and step.after.params < dense.params
    torch.save({"model": model.state_dict(), "widths": channels.changed(model, dense_shapes)}, tmp_path / "m.pt")
    reloaded = registry.load("timm:resnet18", "num_classes=10", tmp_path / "m.pt", (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_an_unreachable_target_and_unknown_names_are_one_line() -> None:
    model = _model("resnet20a")
    dense = channels.count(model, SHAPE)
    keep = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:-3]  # nearly everything kept
    with pytest.raises(channels.ChannelError, match="cannot be met with the layers kept") as err:
        channels.prune_channels(model, SHAPE, 0.5, dense, "l1", keep=keep)
    assert "\n" not in str(err.value)
    with pytest.raises(channels.ChannelError, match="importance='fisher' is unknown"):
        channels.importance("fisher")
    with pytest.raises(channels.ChannelError, match="not modules of the model"):
        channels.fixed_layers(model, ["layer9.conv"])


def test_the_spec_takes_one_target_and_plans_the_macs_removed_per_phase() -> None:
    spec = PruneSpec(structure="channels", target_macs=0.5, phases=2, schedule="linear", epochs=1)
    assert [round(p.target, 6) for p in spec.plan()] == [0.25, 0.5] and spec.channel_target() == ("macs", 0.5)
    for bad, match in [({"structure": "channels"}, "needs one target"),
                       ({"structure": "channels", "target_macs": 0.5, "target_params": 0.5}, "needs one target"),
                       ({"target_macs": 0.5}, "is for --structure channels"),
                       ({"structure": "channels", "target_macs": 1.5}, "must be a fraction"),
                       ({"structure": "channels", "target_macs": 0.5, "importance": "fisher"}, "unknown")]:
        with pytest.raises(ValueError, match=match):
            PruneSpec(**bad)


def _invoke(*args: str):
    out = CliRunner().invoke(cli, list(args))
    return out.exit_code, out.stdout, out.stderr


def _channels_args(data: Path, weights: Path, results: Path, run_id: str, *extra: str) -> list[str]:
    return ["prune", "--data-root", str(data), "--weights", str(weights), "--results", str(results),
            "--run-id", run_id, "--structure", "channels", "--target-macs", "0.5", "--phases", "2", "--epochs", "1",
            "--batch-size", "50", "--eval-batch-size", "100", "--no-randaugment", *extra]


@pytest.mark.slow
def test_a_channels_run_writes_its_counts_and_ships_a_model_ptq_takes(synthetic_cifar: Path, synthetic_weights: Path,
                                                                    tmp_path: Path) -> None:
    results = tmp_path / "results"
    code, out, err = _invoke(*_channels_args(synthetic_cifar, synthetic_weights, results, "ch", "--importance",
                                             "taylor", "--kd-weight", "0.5"))
    assert code == 0, err
    assert "channels" in out.splitlines()[next(i for i, ln in enumerate(out.splitlines()) if ln.startswith("module"))]
    phases = pq.read_table(results / "phases").to_pandas().sort_values("phase")
    dense_macs = phases.macs.iloc[0]
    assert (phases.dense_macs == dense_macs).all()
    for ph in PruneSpec(structure="channels", target_macs=0.5, phases=2).plan():  # each phase at or below its target
        assert (1 - ph.target - 0.1) * dense_macs < phases.macs.iloc[ph.index] <= (1 - ph.target) * dense_macs
    assert phases.params.is_monotonic_decreasing and phases.sparsity.iloc[2] > 0.3  # weights left the layers
    modules = pq.read_table(results / "modules").to_pandas().set_index("module")
    assert modules.loc["layer1.0.conv1", "channels_after"] < modules.loc["layer1.0.conv1", "channels_before"] == 16
    assert modules.loc["layer1.0.conv2", "channels_after"] == 16  # option A: the residual stream stays

    final = results / "runs" / "ch" / "final.pt"
    saved = torch.load(final, weights_only=True)
    assert saved["widths"]["layer1.0.conv1"][0] < 16
    code, out, err = _invoke("verify", str(results / "runs" / "ch" / "export" / "model.float.packed"))
    assert code == 0, err
    code, out, err = _invoke("ptq", "--weights", str(final), "--data-root", str(synthetic_cifar), "--results",
                             str(results), "--run-id", "chq", "--methods", "manual,pt2e", "--calib-sizes", "50",
                             "--calib-batch-size", "25")
    assert code == 0, err
    rows = pq.read_table(results / "ptq").to_pandas()
    assert set(rows.method) == {"manual", "pt2e"} and (rows.int8_packed_bytes > 0).all()
    # sparsity on top of the channels: the next run's checkpoint keeps the widths
    code, out, err = _invoke("prune", "--run", "ch", "--results", str(results), "--run-id", "ch-sparse",
                             "--final-sparsity", "0.5", "--phases", "1", "--epochs", "0", "--filter-fraction", "0",
                             "--eval-batch-size", "100")
    assert code == 0, err
    sparse = torch.load(results / "runs" / "ch-sparse" / "final.pt", weights_only=True)
    assert sparse["widths"] == saved["widths"]
    assert load_model("resnet20a", results / "runs" / "ch-sparse" / "final.pt") is not None


@pytest.mark.slow
def test_a_channels_run_killed_mid_way_resumes_to_the_same_rows(synthetic_cifar: Path, synthetic_weights: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    straight = tmp_path / "straight"
    assert _invoke(*_channels_args(synthetic_cifar, synthetic_weights, straight, "r"))[0] == 0
    resumed = tmp_path / "resumed"
    interrupt_phase(monkeypatch, 2)
    assert _invoke(*_channels_args(synthetic_cifar, synthetic_weights, resumed, "r"))[0] != 0
    state = torch.load(resumed / "runs" / "r" / "state.pt", weights_only=False)
    assert state["phase"] == 2 and state["widths"]
    monkeypatch.undo()
    code, _, err = _invoke("prune", "--resume", "r", "--results", str(resumed))  # the spec is stored
    assert code == 0, err
    keys = ["phase", "top1", "macs", "params", "sparsity", "test_loss"]
    want = pq.read_table(straight / "phases").to_pandas().sort_values("phase")[keys].reset_index(drop=True)
    got = pq.read_table(resumed / "phases").to_pandas().sort_values("phase")[keys].reset_index(drop=True)
    assert got.equals(want)
    a = torch.load(straight / "runs" / "r" / "final.pt", weights_only=True)
    b = torch.load(resumed / "runs" / "r" / "final.pt", weights_only=True)
    assert a["widths"] == b["widths"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_train_fine_tunes_a_channels_run_at_its_widths_distilled_from_the_dense_model(
        synthetic_cifar: Path, synthetic_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results"
    code, _, err = _invoke(*_channels_args(synthetic_cifar, synthetic_weights, results, "ch", "--phases", "1",
                                           "--epochs", "0"))
    assert code == 0, err
    pruned = torch.load(results / "runs" / "ch" / "final.pt", weights_only=True)
    seen: list[tuple[int, int | None, float]] = []  # per epoch: the student's and the teacher's layer1.0.conv1 width
    real = jobs.training.train_one_epoch

    def width(m: nn.Module) -> int:
        return dict(m.named_modules())["layer1.0.conv1"].out_channels

    def spy(model, *args, teacher=None, kd_weight=0.0, **kwargs):
        seen.append((width(model), None if teacher is None else width(teacher), kd_weight))
        return real(model, *args, teacher=teacher, kd_weight=kd_weight, **kwargs)

    monkeypatch.setattr(jobs.training, "train_one_epoch", spy)
    code, out, err = _invoke("train", "--run", "ch", "--results", str(results), "--run-id", "ft", "--epochs", "1",
                             "--kd-weight", "0.5", "--teacher", str(synthetic_weights), "--batch-size", "50",
                             "--eval-batch-size", "100", "--no-randaugment")
    assert code == 0, err
    student = pruned["widths"]["layer1.0.conv1"][0]
    assert student < 16 and seen == [(student, 16, 0.5)]  # the pruned model learns from the dense one
    tuned = torch.load(results / "runs" / "ft" / "final.pt", weights_only=True)
    assert tuned["widths"] == pruned["widths"]
    assert any(not torch.equal(tuned["model"][k], pruned["model"][k]) for k in pruned["model"])
    rows = pq.read_table(results / "phases").to_pandas().query("run_id == 'ft'")
    assert rows.spec_kd_weight.eq(0.5).all() and rows.spec_teacher.eq(str(synthetic_weights)).all()
    # distillation with nothing to learn from: one line, nothing written
    code, _, err = _invoke("train", "--data-root", str(synthetic_cifar), "--results", str(tmp_path / "none"),
                           "--kd-weight", "0.5")
    assert code == 2 and "--teacher" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "none").exists()


def test_bad_channel_requests_are_one_line_and_write_nothing(synthetic_cifar: Path, synthetic_weights: Path,
                                                             tmp_path: Path) -> None:
    results = tmp_path / "results"
    cases = [
        (["--keep-dense", ",".join(f"layer{i}.{j}.conv1" for i in (1, 2, 3) for j in range(3))], "cannot be met"),
        (["--importance", "fisher"], "fisher"),
        (["--keep-dense", "layer9.conv"], "not modules of the model"),
    ]
    for extra, match in cases:
        code, out, err = _invoke(*_channels_args(synthetic_cifar, synthetic_weights, results, "bad", *extra))
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not results.exists(), extra


def test_target_and_importance_are_searchable_spec_fields() -> None:
    from sweeps.space import apply_config, parse_space

    dims = parse_space(["target_macs=choice:0.5,0.4", "importance=choice:l1,taylor"], PruneSpec)
    assert [(d.field, d.args) for d in dims] == [("target_macs", (0.5, 0.4)), ("importance", ("l1", "taylor"))]
    base = PruneSpec(structure="channels", target_macs=0.5)
    trial = apply_config(base, {"target_macs": 0.4, "importance": "taylor"})
    assert (trial.target_macs, trial.importance) == (0.4, "taylor") and trial.plan()[-1].target == pytest.approx(0.6)
    with pytest.raises(ValueError, match="importance='fisher' is unknown"):
        apply_config(base, {"importance": "fisher"})
