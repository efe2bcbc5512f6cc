"""Scale and zero point as pure functions of an observed range: the arithmetic of int8 PTQ.

Affine quantization maps a real value ``r`` to ``q = clamp(round(r / scale) + zero_point, qmin, qmax)``
and back to ``scale * (q - zero_point)``. Everything here is tensor in, tensor out, with no state;
observers (``compress.quant.observe``) collect ranges and the int8 builder (``compress.quant.int8``)
calls these functions, never re-deriving them. The formulas are those of
``torch.ao.quantization`` observers, operation for operation in float32, so a range gives bit-identical
qparams on both PTQ paths (``tests/test_qparams.py`` checks it with ``torch.equal``).

Worked example, asymmetric uint8 (0..255), observed range [-1.0, 3.0]:
scale = (3.0 - (-1.0)) / 255 = 0.0156863, zero_point = 0 - round(-1.0 / 0.0156863) = round(63.75) = 64.
Real 0.0 is exactly q = 64; real 3.0 is 64 + 191.25 -> 255; real -1.0 is 64 - 63.75 -> 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.catalog import CENTERS

EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QRange:
    """Integer range of one quantized dtype: ``q`` lies in ``[qmin, qmax]``."""

    qmin: int
    qmax: int
    dtype: torch.dtype

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


UINT8 = QRange(0, 255, torch.quint8)
# x86/fbgemm "reduce_range": 7-bit activations, so the u8 x s8 products that AVX2 kernels add in
# pairs into int16 cannot overflow (2 * 127 * 128 = 32,512 < 32,767; 2 * 255 * 128 = 65,280 would).
UINT7 = QRange(0, 127, torch.quint8)
INT8 = QRange(-128, 127, torch.qint8)


def activation_range(reduce_range: bool) -> QRange:
    """uint8 activations, 7-bit (0..127) when ``reduce_range``."""
    return UINT7 if reduce_range else UINT8


def include_zero(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen [lo, hi] to contain 0, so real zero (ReLU output, zero padding) is exact.

    E.g. [0.5, 2.0] -> [0.0, 2.0]; [-1.0, 3.0] is unchanged.
    """
    return torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))


def shrink_range(lo: torch.Tensor, hi: torch.Tensor, alpha: float, center: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale the (zero-including) range by ``alpha``, keeping the minimum or zero fixed.

    ``alpha`` < 1 clips the largest values so the rest gets a finer step; > 1 leaves headroom.
    The scale shrinks by ``alpha`` either way; ``center`` says which real value stays put:

    - ``min``: the minimum stays at qmin: [lo, lo + alpha * (hi - lo)].
      [-1.0, 3.0], alpha 0.9 -> [-1.0, 2.6]: scale 3.6 / 255 = 0.0141176, zero point round(70.83) = 71.
    - ``zero``: zero stays at the zero point: [alpha * lo, alpha * hi].
      [-1.0, 3.0], alpha 0.9 -> [-0.9, 2.7]: scale 0.0141176, zero point round(63.75) = 64, as at alpha 1.

    For a ReLU output (lo = 0) both centers give the same range.
    """
    if not 0.0 < alpha <= 1.5:
        raise ValueError(f"alpha={alpha!r} is invalid: must be in (0, 1.5]")
    if center not in CENTERS:
        raise ValueError(f"center={center!r} is unknown; known: {', '.join(CENTERS)}")
    lo, hi = include_zero(lo, hi)
    if alpha == 1.0:
        return lo, hi  # exactly the observed range (lo + 1.0 * (hi - lo) may round away from hi)
    if center == "min":
        return lo, lo + alpha * (hi - lo)
    return lo * alpha, hi * alpha


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, qr: QRange = UINT8,
                   eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero point of [lo, hi] (per tensor, or per channel for vectors).

    scale = (hi - lo) / (qmax - qmin), at least ``eps`` (an all-zero tensor gets scale eps, zero
    point qmin); zero_point = qmin - round(lo / scale), clamped into [qmin, qmax].
    E.g. [-1.0, 3.0] in uint8 -> (0.0156863, 64); [0.0, 2.55] in uint7 -> (0.0200787, 0).
    """
    lo, hi = include_zero(lo.float(), hi.float())
    scale = (hi - lo) / float(qr.qmax - qr.qmin)
    scale = torch.max(scale, torch.tensor(eps, device=scale.device))
    zero_point = qr.qmin - torch.round(lo / scale).to(torch.int)
    return scale, torch.clamp(zero_point, qr.qmin, qr.qmax).to(torch.int64)


def symmetric_qparams(lo: torch.Tensor, hi: torch.Tensor, qr: QRange = INT8,
                      eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale (zero point 0 for int8, 128 for uint8) of [lo, hi]; used for weights.

    scale = max(|lo|, |hi|) / ((qmax - qmin) / 2). E.g. weights in [-0.51, 0.3] in int8 ->
    scale 0.51 / 127.5 = 0.004, so -0.51 -> -128 and 0.3 -> 75. A zero weight stays exactly 0,
    which keeps a pruned model exactly as sparse after quantization.
    """
    lo, hi = include_zero(lo.float(), hi.float())
    amax = torch.max(-lo, hi)
    scale = amax / (float(qr.qmax - qr.qmin) / 2)
    scale = torch.max(scale, torch.tensor(eps, device=scale.device))
    zp = 0 if qr.dtype == torch.qint8 else 128
    return scale, torch.full_like(scale, zp, dtype=torch.int64)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qr: QRange) -> torch.Tensor:
    """Quantize and dequantize in float: what the int8 grid makes of ``x`` (broadcasting qparams).

    E.g. x = 1.0, scale 0.0156863, zero point 64, uint8 -> q = 64 + round(63.75) = 128 -> 1.0039.
    """
    q = torch.clamp(torch.round(x / scale) + zero_point, qr.qmin, qr.qmax)
    return (q - zero_point) * scale


def mse_range(counts: torch.Tensor, lo: float, hi: float, qr: QRange,
              fractions: torch.Tensor | None = None) -> tuple[float, float]:
    """The clipping range [f * lo, f * hi] of a histogram that minimises the squared quantization error.

    ``counts`` is a histogram with equal bins over [lo, hi]; each bin's count is taken at its centre,
    whose error is what ``fake_quantize`` does to it with the affine qparams of the candidate range
    (rounding inside it, clipping outside). Candidates shrink the zero-including range around zero
    by ``fractions`` (default 0.30, 0.305, ..., 1.0). Clipping a few outliers usually wins: a ReLU
    output with 99.9% of its mass below 2.0 and a tail to 8.0 gets a range near [0, 2.5].
    """
    lo_t, hi_t = include_zero(torch.tensor(float(lo)), torch.tensor(float(hi)))
    lo, hi = float(lo_t), float(hi_t)
    if hi - lo <= 0 or float(counts.sum()) == 0:
        return lo, hi
    if fractions is None:
        fractions = torch.linspace(0.30, 1.0, 141, dtype=torch.float64)
    counts = counts.detach().double().cpu()
    bins = counts.numel()
    width = (hi - lo) / bins
    centres = lo + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    cand_lo = lo * fractions[:, None]
    cand_hi = hi * fractions[:, None]
    scale = ((cand_hi - cand_lo) / qr.levels).clamp_min(EPS)
    zp = torch.clamp(qr.qmin - torch.round(cand_lo / scale), qr.qmin, qr.qmax)
    err = (fake_quantize(centres[None, :], scale, zp, qr) - centres[None, :]) ** 2
    best = int(torch.argmin((err * counts[None, :]).sum(1)))
    return float(cand_lo[best, 0]), float(cand_hi[best, 0])
