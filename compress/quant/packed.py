"""The packed model file: sparse int8 (or float) weights in the smallest of three encodings, and its loader.

    blob = pack_int8(int8_model, "resnet20a", engine="x86")    # bytes; len(blob) is the size tables report
    model = load_packed(blob)                                   # an Int8ResNet computing exactly the same outputs
    blob = pack_float(pruned_model, "resnet20a")                # the pruned float model, sparse weights
    model = load_packed(blob)                                   # a CifarResNet with the same state dict

Layout (little-endian)::

    b"CCPACK1\\n"                magic and format version
    uint32                      length of the header
    header                      zlib-compressed JSON: model name, kind, engine, activation qparams,
                                and per tensor its name, shape, dtype, encoding, offset and length
    data                        the tensors' bytes, one after another

Each conv/linear weight is stored in the smallest of (``size.py`` has the arithmetic):

- ``bitmask``: one bit per weight (``numpy.packbits``, whole bytes) + the nonzero values;
- ``rel4`` / ``rel8``: relative indexing, per entry a 4-bit (two per byte) or 8-bit gap code and
  one value; a gap longer than the code can say takes zero-valued fillers (Deep Compression);
- ``dense``: every value (when the weight is not sparse enough for the others to win).

An int8 file holds int8 weights with their symmetric per-channel (or per-tensor) float32 scales,
float32 biases (BN folded), the activation (scale, zero point) of every quantized site, and the
float normalisation; a float file holds every floating tensor of the state dict (conv/linear
weights sparse, BN and the rest dense). Nothing is pickled: the file is read with ``json``,
``zlib`` and ``numpy``, so a damaged file fails with ``PackedError``, not with code execution.
The int8 model runs on the CPU with the engine it was packed for (weights are repacked for it).

Worked number: the 93%-sparse resnet20a of the README (18,784 nonzero of 268,336 conv+linear
weights) packs into about 45 KB as int8, against 1,084,416 bytes of float32 tensors.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from compress import registry
from compress.models import build_model, prunable
from compress.quant import quiet
from compress.quant.fold import fold_model
from compress.quant.int8 import Int8PadShortcut, Int8ResNet, QParams, build_int8, set_engine
from compress.quant.size import pack_relative, unpack_relative

MAGIC = b"CCPACK1\n"
ENCODINGS = ("dense", "bitmask", "rel4", "rel8")
_DTYPES = {"int8": (torch.int8, np.int8), "float32": (torch.float32, np.float32), "int32": (torch.int32, np.int32)}


class PackedError(ValueError):
    """A packed file that is not one, is truncated, or does not describe a model this project builds."""


def _np(t: torch.Tensor, dtype: str) -> np.ndarray:
    return t.detach().cpu().contiguous().to(_DTYPES[dtype][0]).numpy()


def encode(values: torch.Tensor, dtype: str, sparse: bool) -> tuple[str, bytes]:
    """(encoding, bytes) of one tensor: the smallest of the sparse encodings when ``sparse``, else dense."""
    return min(candidates(values, dtype, sparse), key=lambda o: len(o[1]))


def candidates(values: torch.Tensor, dtype: str, sparse: bool) -> list[tuple[str, bytes]]:
    """Every encoding of one tensor as (name, bytes): dense, and bitmask/rel4/rel8 when ``sparse``."""
    flat = _np(values, dtype).reshape(-1)
    options = [("dense", flat.tobytes())]
    if sparse:
        mask = flat != 0
        options.append(("bitmask", np.packbits(mask).tobytes() + flat[mask].tobytes()))
        t = torch.from_numpy(flat.copy())
        for bits in (4, 8):
            codes, stored = pack_relative(t, bits)
            c = codes.numpy().astype(np.uint8)
            if bits == 4:
                c = np.pad(c, (0, len(c) % 2))
                c = (c[0::2] | (c[1::2] << 4)).astype(np.uint8)
            # the entry count goes first: the last nibble of an odd count is padding
            options.append((f"rel{bits}", struct.pack("<I", len(codes)) + c.tobytes() + stored.numpy().tobytes()))
    return options


def decode(data: bytes, encoding: str, dtype: str, shape: list[int]) -> torch.Tensor:
    """The tensor back from ``encode``'s bytes."""
    np_dtype = _DTYPES[dtype][1]
    numel = int(np.prod(shape)) if shape else 1
    itemsize = np.dtype(np_dtype).itemsize
    if encoding == "dense":
        flat = np.frombuffer(data, dtype=np_dtype, count=numel)
    elif encoding == "bitmask":
        n_mask = (numel + 7) // 8
        mask = np.unpackbits(np.frombuffer(data, np.uint8, count=n_mask), count=numel).astype(bool)
        flat = np.zeros(numel, dtype=np_dtype)
        flat[mask] = np.frombuffer(data, np_dtype, count=int(mask.sum()), offset=n_mask)
    elif encoding in ("rel4", "rel8"):
        (n,) = struct.unpack_from("<I", data)
        if encoding == "rel4":
            packed = np.frombuffer(data, np.uint8, count=(n + 1) // 2, offset=4)
            codes = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:n]
            offset = 4 + (n + 1) // 2
        else:
            codes = np.frombuffer(data, np.uint8, count=n, offset=4)
            offset = 4 + n
        stored = np.frombuffer(data, np_dtype, count=n, offset=offset)
        if len(data) != offset + n * itemsize:
            raise PackedError(f"{encoding} tensor of {len(data)} bytes does not hold {n} entries")
        out = unpack_relative(torch.from_numpy(codes.astype(np.uint8)), torch.from_numpy(stored.copy()),
                              torch.Size(shape))
        return out
    else:
        raise PackedError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    return torch.from_numpy(flat.copy()).view(shape)


class _Writer:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.chunks: list[bytes] = []
        self.offset = 0

    def add(self, name: str, t: torch.Tensor, dtype: str, sparse: bool = False) -> None:
        encoding, data = encode(t, dtype, sparse)
        self.entries.append({"name": name, "shape": list(t.shape), "dtype": dtype, "encoding": encoding,
                             "offset": self.offset, "nbytes": len(data)})
        self.chunks.append(data)
        self.offset += len(data)

    def finish(self, header: dict[str, Any]) -> bytes:
        head = zlib.compress(json.dumps({**header, "tensors": self.entries}, separators=(",", ":")).encode(), 9)
        return MAGIC + struct.pack("<I", len(head)) + head + b"".join(self.chunks)


def _weight_modules(model: Int8ResNet) -> list[tuple[str, nn.Module]]:
    """(float-model name, quantized module) of every int8 conv/linear, in forward order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nnq.Conv2d | nnq.Linear):  # ConvReLU2d is a Conv2d
            out.append((name + ".0" if name.endswith(".downsample") else name, m))
    return out


def int8_qparams(model: Int8ResNet) -> dict[str, QParams]:
    """The activation (scale, zero point) of every site of an ``Int8ResNet``, by ``quant_sites`` name."""
    qp: dict[str, QParams] = {"input": (model.input_scale, model.input_zero_point)}
    for name, m in _weight_modules(model):
        qp[name] = (float(m.scale), int(m.zero_point))
    for name, m in model.named_modules():
        if isinstance(m, nnq.QFunctional):
            qp[name] = (float(m.scale), int(m.zero_point))
        elif isinstance(m, Int8PadShortcut) and m.requantize:
            qp[name.removesuffix(".downsample") + ".shortcut"] = (m.scale, m.zero_point)
    return qp


def pack_int8(model: Int8ResNet, model_name: str, engine: str, meta: dict[str, Any] | None = None) -> bytes:
    """The packed file of an int8 model built by ``int8.build_int8`` (from manual or FX qparams)."""
    w = _Writer()
    schemes = set()
    for name, m in _weight_modules(model):
        q = m.weight()
        per_channel = q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        schemes.add("per_channel" if per_channel else "per_tensor")
        zp = q.q_per_channel_zero_points() if per_channel else torch.tensor([q.q_zero_point()])
        if bool((zp != 0).any()):
            raise PackedError(f"{name}: weights are not symmetric (zero point != 0); the packed format stores "
                              "symmetric int8 weights only")
        scale = q.q_per_channel_scales() if per_channel else torch.tensor([q.q_scale()], dtype=torch.float64)
        if not torch.equal(scale.float().double(), scale.double()):
            raise PackedError(f"{name}: weight scales are not float32 values")
        w.add(f"{name}.weight", q.int_repr(), "int8", sparse=True)
        w.add(f"{name}.weight_scale", scale, "float32")
        if m.bias() is not None:
            w.add(f"{name}.bias", m.bias(), "float32")
    if len(schemes) != 1:
        raise PackedError(f"mixed weight schemes {sorted(schemes)}")
    for key in ("mean", "std"):
        w.add(f"normalize.{key}", getattr(model.normalize, key), "float32")
    return w.finish({"format": 1, "kind": "int8", "model": model_name, "engine": engine,
                     "weights": schemes.pop(), "qparams": int8_qparams(model), "meta": meta or {}})


def pack_float(model: nn.Module, model_name: str, meta: dict[str, Any] | None = None, model_args: str = "") -> bytes:
    """The packed file of a float model: conv/linear weights sparse, every other float tensor dense.

    Any model of the registry (``compress.registry``): the header names its model string and
    arguments, and loading builds that architecture again (a user's factory must be importable there).
    """
    w = _Writer()
    sparse = {f"{n}.weight" for n, _ in prunable(model)}
    for key, t in model.state_dict().items():
        if t.is_floating_point():
            w.add(key, t, "float32", sparse=key in sparse)
    return w.finish({"format": 1, "kind": "float", "model": model_name, "model_args": model_args, "meta": meta or {}})


def read_header(blob: bytes) -> tuple[dict[str, Any], int]:
    """(header, offset of the data) of a packed file; ``PackedError`` when it is not one or is cut short."""
    if not blob.startswith(MAGIC):
        raise PackedError("not a packed model file (bad magic)")
    try:
        (n,) = struct.unpack_from("<I", blob, len(MAGIC))
        start = len(MAGIC) + 4
        header = json.loads(zlib.decompress(blob[start:start + n]))
    except (struct.error, zlib.error, ValueError) as e:
        raise PackedError(f"damaged or truncated packed file: header unreadable ({type(e).__name__})") from None
    data = start + n
    need = max((t["offset"] + t["nbytes"] for t in header.get("tensors", [])), default=0)
    if len(blob) - data < need:
        raise PackedError(f"truncated packed file: {len(blob)} bytes, the header describes {data + need}")
    return header, data


def read_tensors(blob: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and every tensor of a packed file, decoded."""
    header, start = read_header(blob)
    tensors = {}
    for t in header["tensors"]:
        chunk = blob[start + t["offset"]:start + t["offset"] + t["nbytes"]]
        try:
            tensors[t["name"]] = decode(chunk, t["encoding"], t["dtype"], t["shape"])
        except (ValueError, RuntimeError) as e:
            raise PackedError(f"damaged packed file: tensor {t['name']} does not decode ({e})") from None
    return header, tensors


def _quantized_weight(q: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    with quiet():
        if scheme == "per_channel":
            zero = torch.zeros(len(scale), dtype=torch.int64)
            return torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        return torch._make_per_tensor_quantized_tensor(q, float(scale[0]), 0)


def load_packed(blob: bytes) -> nn.Module:
    """The model of a packed file: an ``Int8ResNet`` (CPU, the file's engine set) or a float ``CifarResNet``."""
    header, tensors = read_tensors(blob)
    name = header.get("model", "")
    try:
        if header.get("kind") == "float":
            mean, std = (tensors.get(f"normalize.{k}", torch.zeros(0)).flatten().tolist() for k in ("mean", "std"))
            skeleton = registry.build(name, header.get("model_args", ""), mean, std)
        else:
            skeleton = build_model(name)
    except ValueError as e:
        raise PackedError(f"packed file names a model this project does not build: {e}") from None
    if header.get("kind") == "float":
        state = skeleton.state_dict()
        missing = sorted(k for k, v in state.items() if v.is_floating_point() and k not in tensors)
        if missing:
            raise PackedError(f"packed float file lacks {missing[:4]}")
        skeleton.load_state_dict({**state, **{k: v for k, v in tensors.items() if k in state}})
        return skeleton.eval()
    if header.get("kind") != "int8":
        raise PackedError(f"packed file of unknown kind {header.get('kind')!r}; known: int8, float")
    set_engine(header["engine"])
    folded = fold_model(skeleton)
    modules = dict(folded.named_modules())
    qweights = {}
    for mod_name, m in modules.items():
        if isinstance(m, nn.Conv2d | nn.Linear):
            with torch.no_grad():
                m.bias = nn.Parameter(tensors[f"{mod_name}.bias"])
            qweights[mod_name] = _quantized_weight(tensors[f"{mod_name}.weight"], tensors[f"{mod_name}.weight_scale"],
                                                   header["weights"])
    for key in ("mean", "std"):
        getattr(folded.normalize, key).copy_(tensors[f"normalize.{key}"])
    qparams = {k: (float(v[0]), int(v[1])) for k, v in header["qparams"].items()}
    return build_int8(folded, qparams, header["weights"], qweights=qweights)
