"""qparams math and range statistics against torch.ao.quantization's observers, exactly."""

from __future__ import annotations

import pytest
import torch
from torch.ao.quantization import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
)

from compress.quant import quiet
from compress.quant.observe import HistogramStat, MinMaxStat, MovingAverageStat, make_stat
from compress.quant.qparams import (
    INT8,
    UINT7,
    UINT8,
    affine_qparams,
    fake_quantize,
    include_zero,
    mse_range,
    shrink_range,
    symmetric_qparams,
)

CASES = {
    "normal": lambda: torch.randn(4, 8, 5, 5) * 3 + 0.5,
    "relu": lambda: torch.relu(torch.randn(4, 8, 5, 5)),
    "all_zero": lambda: torch.zeros(2, 3, 4, 4),
    "constant_pos": lambda: torch.full((2, 3, 4, 4), 0.7),
    "constant_neg": lambda: torch.full((2, 3, 4, 4), -2.5),
    "tiny": lambda: torch.randn(2, 3, 4, 4) * 1e-9,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("qr", [UINT8, UINT7], ids=["uint8", "uint7"])
def test_affine_matches_minmax_observer(case: str, qr) -> None:
    torch.manual_seed(0)
    x = CASES[case]()
    obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=qr.qmin, quant_max=qr.qmax)
    obs(x)
    ref_s, ref_z = obs.calculate_qparams()
    s, z = affine_qparams(*torch.aminmax(x), qr)
    assert torch.equal(s.reshape(1), ref_s)
    assert torch.equal(z.reshape(1), ref_z)


@pytest.mark.parametrize("case", list(CASES))
def test_symmetric_matches_weight_observers(case: str) -> None:
    torch.manual_seed(1)
    w = CASES[case]()
    per_channel = PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    per_channel(w)
    ref_s, ref_z = per_channel.calculate_qparams()
    s, z = symmetric_qparams(*torch.aminmax(w.reshape(w.shape[0], -1), dim=1), INT8)
    assert torch.equal(s, ref_s) and torch.equal(z, ref_z)

    per_tensor = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    per_tensor(w)
    ref_s, ref_z = per_tensor.calculate_qparams()
    s, z = symmetric_qparams(*torch.aminmax(w), INT8)
    assert torch.equal(s.reshape(1), ref_s) and torch.equal(z.reshape(1), ref_z)


def test_worked_examples() -> None:
    s, z = affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), UINT8)
    assert s.item() == pytest.approx(4.0 / 255) and z.item() == 64
    s, z = affine_qparams(torch.tensor(0.0), torch.tensor(2.55), UINT7)
    assert s.item() == pytest.approx(2.55 / 127) and z.item() == 0
    s, z = symmetric_qparams(torch.tensor(-0.51), torch.tensor(0.3), INT8)
    assert s.item() == pytest.approx(0.004)
    with quiet():
        q = torch.quantize_per_tensor(torch.tensor([-0.51, 0.3, 0.0]), s.item(), int(z), torch.qint8).int_repr()
    assert q.tolist() == [-128, 75, 0]


def test_include_zero() -> None:
    lo, hi = include_zero(torch.tensor(0.5), torch.tensor(2.0))
    assert (lo.item(), hi.item()) == (0.0, 2.0)
    lo, hi = include_zero(torch.tensor(-3.0), torch.tensor(-1.0))
    assert (lo.item(), hi.item()) == (-3.0, 0.0)


def test_shrink_range_around_min_and_zero() -> None:
    lo, hi = torch.tensor(-1.0), torch.tensor(3.0)
    a, b = shrink_range(lo, hi, 0.9, "min")
    assert a.item() == -1.0 and b.item() == pytest.approx(2.6)
    s, z = affine_qparams(a, b, UINT8)
    assert s.item() == pytest.approx(3.6 / 255) and z.item() == 71
    a, b = shrink_range(lo, hi, 0.9, "zero")
    assert a.item() == pytest.approx(-0.9) and b.item() == pytest.approx(2.7)
    s, z = affine_qparams(a, b, UINT8)
    assert s.item() == pytest.approx(3.6 / 255) and z.item() == 64  # zero kept at the alpha-1 zero point
    # alpha 1 is the observed range bit for bit, for either center
    for center in ("min", "zero"):
        a, b = shrink_range(torch.tensor(-0.1234567), torch.tensor(7.654321), 1.0, center)
        assert a.item() == torch.tensor(-0.1234567).item() and b.item() == torch.tensor(7.654321).item()
    # a ReLU range: both centers agree; alpha > 1 widens
    assert torch.equal(torch.stack(shrink_range(torch.tensor(0.0), hi, 0.95, "min")),
                       torch.stack(shrink_range(torch.tensor(0.0), hi, 0.95, "zero")))
    assert shrink_range(torch.tensor(0.0), hi, 1.2, "min")[1].item() == pytest.approx(3.6)


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.51])
def test_shrink_range_rejects_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        shrink_range(torch.tensor(0.0), torch.tensor(1.0), alpha, "min")


def test_shrink_range_rejects_center() -> None:
    with pytest.raises(ValueError, match="center='max' is unknown; known: min, zero"):
        shrink_range(torch.tensor(0.0), torch.tensor(1.0), 0.9, "max")


def test_fake_quantize_matches_torch() -> None:
    torch.manual_seed(2)
    x = torch.randn(1000) * 2
    s, z = affine_qparams(*torch.aminmax(x), UINT8)
    with quiet():
        ref = torch.quantize_per_tensor(x, s.item(), int(z), torch.quint8).dequantize()
    assert torch.equal(fake_quantize(x, s, z, UINT8), ref)
    assert (fake_quantize(x, s, z, UINT8) - x).abs().max() <= s.item() / 2 + 1e-6


def test_mse_range_clips_a_thin_tail_and_keeps_a_flat_histogram() -> None:
    counts = torch.zeros(2048, dtype=torch.float64)
    counts[:512] = 1000.0  # the mass in [0, 2)
    counts[-1] = 1.0  # one outlier near 8
    lo, hi = mse_range(counts, 0.0, 8.0, UINT8)
    assert lo == 0.0 and 2.0 <= hi < 6.0  # clips the outlier, keeps the mass
    flat = torch.ones(2048, dtype=torch.float64)
    lo, hi = mse_range(flat, -1.0, 1.0, UINT8)
    assert lo <= -0.95 and hi >= 0.95
    assert mse_range(torch.zeros(2048), 0.0, 1.0, UINT8) == (0.0, 1.0)


def test_minmax_and_moving_average_stats_match_torch_observers() -> None:
    torch.manual_seed(3)
    batches = [torch.randn(16, 4, 6, 6) * (1 + i) + i * 0.3 for i in range(5)]
    for stat, obs in [(MinMaxStat(), MinMaxObserver(dtype=torch.quint8)),
                      (MovingAverageStat(), MovingAverageMinMaxObserver(dtype=torch.quint8))]:
        for b in batches:
            stat.update(b)
            obs(b)
        lo, hi = stat.range()
        assert torch.equal(lo, obs.min_val) and torch.equal(hi, obs.max_val)


def test_histogram_stat_keeps_counts_when_the_range_grows() -> None:
    torch.manual_seed(4)
    stat = HistogramStat(bins=256)
    first, second = torch.rand(1000), torch.rand(1000) * 4 - 1
    stat.update(first)
    stat.update(second)  # widens both ends
    assert stat.counts.sum().item() == 2000
    assert stat.lo <= second.min().item() < first.min().item() and stat.hi >= second.max().item() > first.max().item()
    lo, hi = stat.range(UINT8)
    assert stat.lo <= lo.item() <= 0.0 < hi.item() <= stat.hi


def test_unknown_observer_lists_known() -> None:
    with pytest.raises(ValueError, match="known: minmax, moving_average, histogram"):
        make_stat("percentile")


def test_stat_without_data_says_so() -> None:
    with pytest.raises(ValueError, match="saw no data"):
        MinMaxStat().range()
