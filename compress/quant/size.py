"""Storage of a model: float32, int8 dense, and int8 packed for sparse weights.

Sizes count the bytes of the tensors a deployment has to store, in one fixed format, so dense and
pruned models compare on equal terms (serialisation overhead such as pickle headers is left out):

- float: every floating tensor of the state dict (conv/linear weights and biases, BN parameters
  and running statistics, the normalisation), 4 bytes per value.
- int8 dense: 1 byte per int8 weight; per weight tensor one (scale, zero point) pair per channel or
  per tensor at 8 bytes a pair (float32 + int32); float32 biases; 8 bytes per activation site's
  qparams; the float normalisation.
- int8 packed: as dense, but each weight tensor in the smallest of three sparse formats:
  a bitmask (1 bit per weight, whole bytes) plus the nonzero int8 values; or relative indexing with
  4-bit or 8-bit gaps (each nonzero value stored with the distance from the previous one; a gap
  longer than the index can say takes zero-valued filler entries, as in Deep Compression). The
  relative format is real: ``pack_relative``/``unpack_relative`` round-trip it exactly.

Worked number, resnet20a: 268,336 conv+linear weights -> 268,336 bytes of int8 values dense. At
90% sparsity spread at random the weights pack into 60,413 bytes as bitmasks (about 26,800 values and
33,542 mask bytes), 49,425 with 4-bit gaps and 53,742 with 8-bit gaps; the
93%-sparse pruned model of the recipe (docs/pruning.md): 52,326 / 43,462 / 37,714 bytes, 35,679 taking the best per
tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

QPARAM_BYTES = 8  # float32 scale + int32 zero point
FLOAT_BYTES = 4


@dataclass(frozen=True)
class Int8Size:
    """Bytes of an int8 model, dense and packed, and how many of its int8 weights are zero."""

    dense: int
    packed: int
    weights: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0


def float_bytes(model: nn.Module) -> int:
    """Bytes of the float32 model: every floating tensor in its state dict (BN counters excluded).

    E.g. resnet20a: 268,336 weights + 10 classifier biases + 4 x 688 BN values + 6 normalisation
    values = 271,104 floats = 1,084,416 bytes.
    """
    return sum(t.numel() * FLOAT_BYTES for t in model.state_dict().values() if t.is_floating_point())


def bitmask_bytes(numel: int, nonzero: int) -> int:
    """Bitmask (one bit per weight, whole bytes) plus one byte per nonzero value: 1,000 at 10% -> 225."""
    return (numel + 7) // 8 + nonzero


def _relative_entries(mask: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions of the nonzeros, their gaps, and entries per nonzero (1 + fillers) with ``bits``-bit gaps."""
    pos = torch.nonzero(mask.flatten()).flatten()
    gaps = torch.diff(pos, prepend=torch.tensor([-1], dtype=pos.dtype))
    span = 2 ** bits
    return pos, gaps, (gaps + span - 1) // span


def relative_bytes(mask: torch.Tensor, bits: int) -> int:
    """Bytes of relative indexing: per entry ``bits`` of gap plus 8 bits of value, whole bytes at the end.

    A gap g (1 = the next weight) takes ceil(g / 2**bits) entries. E.g. 1,000 weights with every
    10th nonzero, 4-bit gaps: 100 entries x 12 bits = 150 bytes (the bitmask format needs 225).
    """
    _, _, n = _relative_entries(mask, bits)
    return (int(n.sum()) * (bits + 8) + 7) // 8


def pack_relative(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse int8 tensor as (gap codes in [0, 2**bits), int8 values), fillers included."""
    flat = values.flatten()
    pos, gaps, n = _relative_entries(flat != 0, bits)
    span = 2 ** bits
    owner = torch.repeat_interleave(torch.arange(len(pos)), n)
    first = torch.cumsum(n, 0) - n
    last = torch.arange(len(owner)) - first[owner] == n[owner] - 1
    gap = torch.where(last, gaps[owner] - (n[owner] - 1) * span, torch.full_like(owner, span))
    stored = torch.where(last, flat[pos[owner]], torch.zeros((), dtype=flat.dtype))
    return (gap - 1).to(torch.uint8), stored


def unpack_relative(codes: torch.Tensor, stored: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The dense tensor back from ``pack_relative``'s codes and values."""
    out = torch.zeros(shape.numel(), dtype=stored.dtype)
    out[torch.cumsum(codes.long() + 1, 0) - 1] = stored
    return out.view(shape)


def packed_weight_bytes(mask: torch.Tensor) -> int:
    """The smallest of the bitmask and the 4-/8-bit relative formats for one weight tensor's nonzero mask."""
    return min(bitmask_bytes(mask.numel(), int(mask.sum())), relative_bytes(mask, 4), relative_bytes(mask, 8))


def program_size(program: torch.export.ExportedProgram) -> Int8Size:
    """Storage of an int8 ``torch.export`` program: every tensor it holds, dense (``packed`` is left 0: the
    packed program's length is measured on the file), and how many of its int8 values are zero."""
    tensors = [*program.state_dict.values(), *(t for t in program.constants.values() if isinstance(t, torch.Tensor))]
    int8 = [t for t in tensors if t.dtype == torch.int8]
    return Int8Size(sum(t.numel() * t.element_size() for t in tensors), 0, sum(t.numel() for t in int8),
                    sum(int((t == 0).sum()) for t in int8))
