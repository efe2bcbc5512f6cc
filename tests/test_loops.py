"""The training and evaluation loops, the LR schedule, BN re-estimation and distillation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress.data import BatchLoader, load_cifar10
from compress.loops import (
    build_optimizer,
    cosine_lr,
    distillation_loss,
    evaluate,
    full_float32,
    pick_device,
    reestimate_bn,
    train_one_epoch,
)
from compress.models import build_model, load_model


@pytest.mark.parametrize(("args", "expected"), [
    ((0, 100), 1.0), ((50, 100), 0.5), ((100, 100), 0.0), ((25, 100), 0.5 * (1 + math.cos(math.pi / 4))),
    ((150, 100), 0.0),                                    # past the end: stays at the floor
    ((0, 100, 10), 0.1), ((9, 100, 10), 1.0), ((10, 100, 10), 1.0), ((55, 100, 10), 0.5),
    ((100, 100, 0, 0.1), 0.1), ((50, 100, 0, 0.1), 0.55),
])
def test_cosine_lr_worked_values(args: tuple, expected: float) -> None:
    assert cosine_lr(*args) == pytest.approx(expected, abs=1e-12)


def test_unknown_optimizer_and_unavailable_device() -> None:
    with pytest.raises(ValueError, match="known: adamw, sgd"):
        build_optimizer("lamb", build_model("resnet20a").parameters(), 1e-3, 0.0)
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=rf"device 'cuda:99' asked for but torch sees {torch.cuda.device_count()} "):
        pick_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees 0 CUDA device"):
            pick_device("cuda")


@pytest.mark.slow
def test_training_on_synthetic_data_reduces_the_loss(synthetic_cifar: Path, device: torch.device) -> None:
    data = load_cifar10(synthetic_cifar)
    torch.manual_seed(0)
    model = build_model("resnet20a").to(device, memory_format=torch.channels_last)
    train = BatchLoader(data.train_x, data.train_y, 50, device, train=True, seed=0)
    test = BatchLoader(data.test_x, data.test_y, 100, device)
    opt = build_optimizer("adamw", model.parameters(), lr=3e-3, weight_decay=5e-4)
    start = evaluate(model, test, device, progress=False)
    losses = []
    for epoch in range(4):
        train.set_epoch(epoch)
        st = train_one_epoch(model, train, opt, None, device, progress=False)
        assert st.images == 250
        losses.append(st.loss)
    end = evaluate(model, test, device, progress=False)
    assert losses[-1] < 0.5 * losses[0], losses
    assert end.loss < start.loss and end.top1 > start.top1


def test_evaluate_top1_equals_a_hand_count(synthetic_cifar: Path, device: torch.device) -> None:
    data = load_cifar10(synthetic_cifar)
    torch.manual_seed(1)
    model = build_model("resnet20a").to(device).eval()
    with torch.no_grad(), full_float32():  # on CUDA too: evaluate() runs without TF32
        model.linear.bias.copy_(torch.linspace(-0.5, 0.5, 10))  # not one class for every image
        logits = torch.cat([model(x.float().div(255).to(device)) for x in data.test_x.split(30)]).cpu()
    hand = int((logits.argmax(1) == data.test_y).sum())
    assert 0 < hand < 100
    st = evaluate(model, BatchLoader(data.test_x, data.test_y, 30, device), device, progress=False)
    assert st.images == 100
    assert st.top1 == 100.0 * hand / 100
    assert st.loss == pytest.approx(float(F.cross_entropy(logits, data.test_y)), rel=1e-5)


def test_reestimate_bn_sets_the_statistics_of_the_batches() -> None:
    torch.manual_seed(2)
    model = build_model("resnet20a")
    x = torch.rand(16, 3, 32, 32) * 0.5 + 0.25
    stem = model.conv1(model.normalize(x)).detach()
    momentum = model.bn1.momentum
    reestimate_bn(model, [(x, torch.zeros(16, dtype=torch.int64))], torch.device("cpu"))
    assert torch.allclose(model.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, stem.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4)
    assert model.bn1.momentum == momentum and not model.training


def test_reestimate_bn_uses_at_most_the_given_batches() -> None:
    torch.manual_seed(3)
    model = build_model("resnet20a")
    a = [(torch.rand(8, 3, 32, 32), torch.zeros(8, dtype=torch.int64))]
    b = [(torch.rand(8, 3, 32, 32) + 5, torch.zeros(8, dtype=torch.int64))]
    reestimate_bn(model, a, torch.device("cpu"))
    only_a = model.bn1.running_mean.clone()
    reestimate_bn(model, a + b, torch.device("cpu"), batches=1)
    assert torch.equal(model.bn1.running_mean, only_a)
    reestimate_bn(model, a + b, torch.device("cpu"), batches=2)
    assert not torch.allclose(model.bn1.running_mean, only_a)


def test_distillation_loss_limits() -> None:
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    ce = F.cross_entropy(logits, y)
    assert torch.equal(distillation_loss(logits, y, teacher, 0.0, 4.0), ce)
    assert float(distillation_loss(logits, y, logits, 1.0, 4.0)) == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p_t = F.softmax(teacher / t, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits / t, 1))).sum(1).mean() * t**2
    assert float(distillation_loss(logits, y, teacher, 0.3, t)) == pytest.approx(float(0.7 * ce + 0.3 * kl), rel=1e-5)


def test_train_one_epoch_with_a_teacher_runs_the_distillation_loss(device: torch.device) -> None:
    torch.manual_seed(4)
    model, teacher = build_model("resnet20a").to(device), build_model("resnet20a").to(device).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = build_optimizer("sgd", model.parameters(), lr=0.0, weight_decay=0.0)
    # the formula is checked in float32 on every device (on CUDA, bf16 autocast or TF32 would round the loss)
    with full_float32():
        with_kd = train_one_epoch(model, [(x, y)], opt, None, device, teacher=teacher, kd_weight=1.0, amp=False,
                                  progress=False)
    with torch.no_grad(), full_float32():  # lr 0: the step left the weights as they were
        expected = distillation_loss(model(x.to(device)), y.to(device), teacher(x.to(device)), 1.0, 4.0)
    assert with_kd.loss == pytest.approx(float(expected), rel=1e-4)


def test_cpu_amp_runs_the_forward_in_bf16_and_keeps_float32_weights() -> None:
    torch.manual_seed(5)
    cpu = torch.device("cpu")
    model = build_model("resnet20a")
    seen: list[torch.dtype] = []
    model.layer1[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = build_optimizer("sgd", model.parameters(), lr=0.05, weight_decay=0.0)
    train_one_epoch(model, [(x, y)], opt, None, cpu, progress=False)
    first = train_one_epoch(model, [(x, y)], opt, None, cpu, cpu_amp=True, progress=False)
    for _ in range(10):
        last = train_one_epoch(model, [(x, y)], opt, None, cpu, cpu_amp=True, progress=False)
    assert seen[0] == torch.float32 and set(seen[1:]) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert last.loss < first.loss


@pytest.mark.realdata
@pytest.mark.slow
def test_real_option_a_weights_score_91_73_on_the_real_test_set(real_data_root: Path, real_weights: Path,
                                                                device: torch.device, torch_threads: int) -> None:
    data = load_cifar10(real_data_root)
    model = load_model("resnet20a", real_weights).to(device, memory_format=torch.channels_last)
    st = evaluate(model, BatchLoader(data.test_x, data.test_y, 1000, device), device, progress=False)
    assert st.images == 10_000
    assert round(st.top1 * st.images / 100) == 9_173  # 91.73%, float32
