"""The hand-written int8 model: exactly FX's outputs given the same qparams, sparsity kept, sizes."""

from __future__ import annotations

import pytest
import torch

from compress.data import BatchLoader, load_cifar10
from compress.models import build_model
from compress.prune import global_magnitude_masks
from compress.quant import fx, quiet
from compress.quant.fold import fold_model
from compress.quant.int8 import (
    Int8PadShortcut,
    build_int8,
    derive_qparams,
    effective_reduce_range,
    int8_size,
    set_engine,
)
from compress.quant.observe import calibrate, quant_sites
from compress.quant.qparams import UINT7, activation_range
from compress.quant.size import (
    bitmask_bytes,
    float_bytes,
    pack_relative,
    packed_weight_bytes,
    relative_bytes,
    unpack_relative,
)
from tests.helpers import randomise_bn

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_engine():
    saved = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = saved


@pytest.fixture(scope="module")
def loaders(synthetic_cifar) -> tuple[BatchLoader, torch.Tensor]:
    data = load_cifar10(synthetic_cifar)
    calib = BatchLoader(data.train_x[:100], data.train_y[:100], 50)
    return calib, data.test_x[:32].float() / 255


@pytest.mark.parametrize("name,weights,engine", [
    ("resnet20a", "per_channel", "x86"),
    ("resnet20a", "per_tensor", "fbgemm"),
    ("resnet20b", "per_channel", "qnnpack"),
    ("resnet20b", "per_tensor", "x86"),
])
def test_int8_equals_fx_with_the_same_qparams(loaders, name: str, weights: str, engine: str) -> None:
    calib, x = loaders
    set_engine(engine)
    torch.manual_seed(0)
    model = randomise_bn(build_model(name))
    prepared = fx.prepare(model, "minmax", weights, effective_reduce_range(engine, True), engine)
    fx.calibrate(prepared, calib, CPU)
    qparams = fx.observed_qparams(prepared)
    fx_int8 = fx.convert(prepared)
    mine = build_int8(model, qparams, weights)
    with quiet(), torch.no_grad():
        a, b = fx_int8(x), mine(x)
    assert torch.equal(a, b)
    assert a.abs().sum() > 0


def test_own_minmax_calibration_gives_fx_qparams(loaders) -> None:
    """The hand-written statistics and qparams reproduce FX's MinMax observers bit for bit."""
    calib, x = loaders
    set_engine("x86")
    torch.manual_seed(1)
    model = randomise_bn(build_model("resnet20a"))
    prepared = fx.prepare(model, "minmax", "per_channel", True)
    fx.calibrate(prepared, calib, CPU)
    fx_qp = fx.observed_qparams(prepared)
    folded = fold_model(model)
    cal = calibrate(folded, calib, CPU, "minmax", quant_sites(folded))
    own = derive_qparams(cal.ranges(UINT7), 1.0, "min", UINT7)
    assert cal.images == 100
    assert own == {k: v for k, v in fx_qp.items() if not k.endswith(".shortcut")}
    # without FX's requantized option-A shortcuts (they keep their input's qparams) the model runs too
    with quiet(), torch.no_grad():
        out = build_int8(folded, own)(x)
    assert out.shape == (32, 10) and torch.isfinite(out).all()


def test_pad_shortcut_pads_int8_values_with_real_zero() -> None:
    with quiet():
        x = torch.quantize_per_tensor(torch.rand(2, 4, 8, 8) * 3, 0.05, 10, torch.quint8)
        y = Int8PadShortcut(2)(x)
        ref = Int8PadShortcut(2, (0.05, 10))(x)
    assert y.shape == (2, 8, 4, 4) and y.q_scale() == 0.05 and y.q_zero_point() == 10
    assert torch.all(y.dequantize()[:, :2] == 0) and torch.all(y.dequantize()[:, -2:] == 0)
    assert torch.equal(y.int_repr(), ref.int_repr())


def test_pruned_model_stays_exactly_as_sparse(loaders) -> None:
    calib, _ = loaders
    set_engine("x86")
    torch.manual_seed(2)
    model = randomise_bn(build_model("resnet20a"))
    global_magnitude_masks(model, 0.9).apply(model)
    folded = fold_model(model)
    cal = calibrate(folded, calib, CPU, "minmax", quant_sites(folded))
    q = build_int8(folded, derive_qparams(cal.ranges(UINT7), 1.0, "min", UINT7))
    fmods, qmods = dict(folded.named_modules()), dict(q.named_modules())
    qmods["linear"] = q.linear
    float_zeros = 0
    for name, m in fmods.items():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            zero = m.weight == 0
            float_zeros += int(zero.sum())
            assert torch.all(qmods[name].weight().int_repr()[zero] == 0), name
    size = int8_size(q)
    assert size.zeros >= float_zeros >= round(0.9 * 268_336) - 1
    assert size.packed < size.dense / 3


def test_derive_qparams_alpha_shrinks_scales() -> None:
    ranges = {"a": (torch.tensor(0.0), torch.tensor(2.55)), "b": (torch.tensor(-1.0), torch.tensor(3.0))}
    full = derive_qparams(ranges, 1.0, "min", UINT7)
    shrunk = derive_qparams(ranges, 0.95, "min", UINT7)
    assert full["a"] == (pytest.approx(2.55 / 127), 0)
    assert shrunk["a"][0] == pytest.approx(0.95 * 2.55 / 127)
    assert shrunk["b"][0] < full["b"][0]
    assert derive_qparams(ranges, 0.9, "zero", activation_range(False))["b"][1] == 64


def test_build_int8_names_missing_sites() -> None:
    with pytest.raises(KeyError, match="layer1.0.add"):
        build_int8(build_model("resnet20a").eval(), {"input": (0.1, 0)})


def test_set_engine_rejects_unknown_engine() -> None:
    with pytest.raises(ValueError, match="engine='onednn' is unknown; known: x86, fbgemm, qnnpack"):
        set_engine("onednn")


def test_sizes() -> None:
    assert float_bytes(build_model("resnet20a")) == 1_084_416
    assert bitmask_bytes(1000, 100) == 225
    every_10th = torch.zeros(1000, dtype=torch.bool)
    every_10th[9::10] = True
    assert relative_bytes(every_10th, 4) == 150 and relative_bytes(every_10th, 8) == 200
    assert packed_weight_bytes(every_10th) == 150
    one_far = torch.zeros(1000, dtype=torch.bool)
    one_far[999] = True  # gap 1000: 63 entries of 4-bit gaps (62 fillers), 4 of 8-bit gaps
    assert relative_bytes(one_far, 4) == (63 * 12 + 7) // 8 and relative_bytes(one_far, 8) == 8
    dense = torch.ones(1000, dtype=torch.bool)
    assert packed_weight_bytes(dense) == 1000 + 125


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.07, 0.5, 1.0])
def test_relative_format_round_trips_exactly(bits: int, density: float) -> None:
    g = torch.Generator().manual_seed(int(density * 100) + bits)
    q = torch.randint(-127, 128, (64, 32, 3, 3), generator=g, dtype=torch.int8)
    q[torch.rand(q.shape, generator=g) >= density] = 0
    codes, stored = pack_relative(q, bits)
    assert len(codes) == 0 or int(codes.max()) < 2 ** bits
    assert len(codes) * (bits + 8) <= relative_bytes(q != 0, bits) * 8 < len(codes) * (bits + 8) + 8
    assert torch.equal(unpack_relative(codes, stored, q.shape), q)
    assert effective_reduce_range("qnnpack", True) is False and effective_reduce_range("x86", True) is True


def test_fx_and_manual_models_have_the_same_size(loaders) -> None:
    calib, _ = loaders
    set_engine("x86")
    model = randomise_bn(build_model("resnet20a"))
    prepared = fx.prepare(model, "minmax")
    fx.calibrate(prepared, calib, CPU)
    a, b = int8_size(fx.convert(prepared)), int8_size(build_int8(model, fx.observed_qparams(prepared)))
    assert a == b
    assert a.weights == 268_336 and a.dense < float_bytes(model) / 3.5


@pytest.mark.gpu
def test_calibration_on_the_job_device_matches_the_cpu(loaders, cuda: torch.device) -> None:
    """Calibration runs where the job runs (CUDA) and finds the CPU's ranges."""
    device = cuda
    calib, _ = loaders
    model = randomise_bn(build_model("resnet20a"))
    folded = fold_model(model)
    sites = quant_sites(folded)
    on_cpu = calibrate(folded, calib, CPU, "minmax", sites).ranges()
    on_device = calibrate(fold_model(model).to(device), BatchLoader(calib.x, calib.y, 50, device), device,
                          "minmax", sites).ranges()
    for name, (lo, hi) in on_cpu.items():
        assert lo.device.type == "cpu" == on_device[name][0].device.type
        assert torch.allclose(torch.stack(on_device[name]), torch.stack((lo, hi)), rtol=1e-4, atol=1e-5), name
