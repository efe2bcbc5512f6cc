"""Post-training int8 quantization of CIFAR ResNets, by hand and through FX graph mode.

    qparams.py   scale / zero point / alpha shrink as pure functions (no state)
    fold.py      BatchNorm folded into conv weights (pure function + model rewrite)
    observe.py   range statistics at every quantized site, one calibration pass
    int8.py      the int8 model from ``torch.ao.nn.quantized`` modules, built from qparams
    fx.py        FX graph-mode PTQ (``torch.ao.quantization.quantize_fx``), the path users compare with
    size.py      storage of the float and int8 models, dense and packed sparse

Calibration runs on the job's device (CUDA when there is one); int8 kernels run on the CPU only.
The PTQ job that sweeps observers, calibration sizes and alphas is ``jobs/ptq.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

# torch 2.14 marks torch.ao.quantization and quantized-tensor creation as deprecated; the FX path is
# what users compare with, so it stays, and these two messages are silenced where PTQ runs.
_DEPRECATIONS = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation",
    r"Please use quant_min and quant_max to specify the range for observers",
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch's deprecation notices about ``torch.ao`` quantization inside the block only."""
    with warnings.catch_warnings():
        for pattern in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=pattern)
        yield
