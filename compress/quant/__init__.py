"""Post-training int8 quantization of CIFAR ResNets, by hand and through FX graph mode.

    qparams.py   scale / zero point / alpha shrink as pure functions (no state)
    fold.py      BatchNorm folded into conv weights (pure function + model rewrite)
    observe.py   range statistics at every quantized site, one calibration pass
    int8.py      the int8 model from ``torch.ao.nn.quantized`` modules, built from qparams
    fx.py        FX graph-mode PTQ (``torch.ao.quantization.quantize_fx``, deprecated upstream)
    pt2e.py      torchao's PT2E flow: torch.export, x86 inductor quantizer, a .pt2 program
    backends.py  the seam: manual, fx and pt2e behind the same calibrate/build verbs
    packed.py    the packed sparse int8 (or float) file and its loader
    size.py      storage arithmetic of the float and int8 models, dense and packed sparse

Calibration runs on the job's device (CUDA when there is one); int8 kernels run on the CPU only.
The PTQ job that sweeps observers, calibration sizes and alphas is ``jobs/ptq.py``; the export
job that writes the chosen model's files is ``jobs/export.py``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# torch 2.14 marks torch.ao.quantization and quantized-tensor creation as deprecated; the FX path is
# what users compare with, so it stays, and these two messages are silenced where PTQ runs.
_DEPRECATIONS = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation",
    r"Please use quant_min and quant_max to specify the range for observers",
)


# importing torchao 0.18 under torch 2.14 logs (not warns) that an enum it registers with pytree is
# natively supported now: a notice for torchao's developers, printed on stderr of every command
_NOISY_LOGGERS = ("torch.utils._pytree",)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch's deprecation notices about ``torch.ao`` quantization inside the block only.

    The one place the project silences them: every use of ``torch.ao`` and torchao runs inside it.
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    saved = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for pattern in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=pattern)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, saved, strict=True):
                lg.setLevel(level)
