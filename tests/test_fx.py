"""FX graph-mode path: observer choice, site naming, one calibration for every weight scheme, no warning flood."""

from __future__ import annotations

import warnings

import pytest
import torch

from compress.data import BatchLoader, load_cifar10
from compress.models import build_model
from compress.quant import fx, quiet
from compress.quant.int8 import set_engine
from compress.quant.observe import quant_sites
from tests.helpers import randomise_bn

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _x86_engine():
    saved = torch.backends.quantized.engine
    set_engine("x86")
    yield
    torch.backends.quantized.engine = saved


@pytest.fixture(scope="module")
def calib(synthetic_cifar) -> BatchLoader:
    data = load_cifar10(synthetic_cifar)
    return BatchLoader(data.train_x[:60], data.train_y[:60], 30)


@pytest.mark.parametrize("name", ["resnet20a", "resnet20b"])
def test_observers_are_named_by_site(calib, name: str) -> None:
    model = randomise_bn(build_model(name))
    prepared = fx.prepare(model, "minmax")
    fx.calibrate(prepared, calib, CPU)
    got = fx.observed_qparams(prepared)
    assert sorted(got) == sorted(s.name for s in quant_sites(model, shortcut=True))
    assert got["layer1.0.add"][1] == 0  # a ReLU'd sum: zero point at the bottom of the range
    assert all(0 <= zp <= 127 for _, zp in got.values())


@pytest.mark.parametrize("observer,reduce_range,cls,qmax", [
    ("minmax", True, "MinMaxObserver", 127),
    ("histogram", True, "HistogramObserver", 127),
    ("moving_average", False, "MovingAverageMinMaxObserver", 255),
])
def test_observer_choice_and_activation_range(observer: str, reduce_range: bool, cls: str, qmax: int) -> None:
    prepared = fx.prepare(build_model("resnet20a").eval(), observer, "per_channel", reduce_range)
    observers = [m for n, m in prepared.named_modules() if n.startswith("activation_post_process")]
    assert observers and all(type(o).__name__ == cls for o in observers)
    assert all(o.quant_min == 0 and o.quant_max == qmax and o.dtype == torch.quint8 for o in observers)


@pytest.mark.parametrize("weights,qscheme", [("per_channel", torch.per_channel_affine),
                                             ("per_tensor", torch.per_tensor_affine)])
def test_weight_scheme(calib, weights: str, qscheme: torch.qscheme) -> None:
    prepared = fx.prepare(randomise_bn(build_model("resnet20a")), "minmax", weights)
    fx.calibrate(prepared, calib, CPU)
    q = fx.convert(prepared)
    w = q.get_submodule("layer1.0.conv1").weight()
    assert w.dtype == torch.qint8 and w.qscheme() == qscheme
    if weights == "per_tensor":
        assert w.q_zero_point() == 0
    else:
        assert torch.all(w.q_per_channel_zero_points() == 0)


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
def test_one_calibration_serves_another_weight_scheme(calib, observer: str) -> None:
    model = randomise_bn(build_model("resnet20a"))
    calibrated = fx.prepare(model, observer, "per_tensor")
    fx.calibrate(calibrated, calib, CPU)
    reference = fx.prepare(model, observer, "per_channel")
    fx.calibrate(reference, calib, CPU)
    copied = fx.prepare(model, observer, "per_channel")
    fx.copy_statistics(calibrated, copied)
    x = torch.rand(8, 3, 32, 32)
    with quiet(), torch.no_grad():
        assert torch.equal(fx.convert(copied)(x), fx.convert(reference)(x))
    assert fx.observed_qparams(copied) == fx.observed_qparams(reference)


def test_convert_leaves_the_calibrated_model_reusable(calib) -> None:
    prepared = fx.prepare(randomise_bn(build_model("resnet20a")), "minmax")
    fx.calibrate(prepared, calib, CPU)
    x = torch.rand(4, 3, 32, 32)
    with quiet(), torch.no_grad():
        assert torch.equal(fx.convert(prepared)(x), fx.convert(prepared)(x))


def test_no_deprecation_flood(calib) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        prepared = fx.prepare(randomise_bn(build_model("resnet20a")), "histogram")
        fx.calibrate(prepared, calib, CPU)
        fx.observed_qparams(prepared)
        fx.convert(prepared)
    noisy = [str(w.message)[:80] for w in seen if "deprecat" in str(w.message).lower()]
    assert noisy == []


def test_unknown_observer_and_weight_scheme() -> None:
    with pytest.raises(ValueError, match="observer='percentile' is unknown; known: minmax, histogram"):
        fx.qconfig_mapping("percentile", "per_channel", True)
    with pytest.raises(ValueError, match="weight scheme 'per_row' is unknown"):
        fx.qconfig_mapping("minmax", "per_row", True)
