"""Packed model files: sparse weights in the smallest of four encodings, nothing pickled.

    blob = pack_program(pt2_bytes)                  # an int8 torch.export program -> .pt2pack (see pt2pack.py)
    model = pt2pack.load(blob)                      # the same program: the .pt2's outputs exactly
    blob = pack_float(pruned_model, "resnet20a")    # the pruned float model, sparse weights (.packed)
    model = load_packed(blob)                       # a model of the registry with the same state dict

Every int8 model ships as a ``.pt2pack`` (``pack_program``): the program's graph without node
metadata and every tensor of the archive encoded, the whole xz-compressed (``pt2pack.py`` holds
the layout and the one decoder, which the standalone loader and this module share).

The ``.packed`` layout (little-endian), for float models and the int8 files of earlier versions::

    b"CCPACK1\\n"                magic and format version
    uint32                      length of the header
    header                      zlib-compressed JSON: model name, kind, (int8: engine, activation
                                qparams), and per tensor its name, shape, dtype, encoding, offset, length
    data                        the tensors' bytes, one after another

Each sparse tensor is stored in the smallest of (``size.py`` has the arithmetic):

- ``bitmask``: one bit per element (most significant first, whole bytes) + the nonzero elements;
- ``rel4`` / ``rel8``: relative indexing, per entry a 4-bit (two per byte) or 8-bit gap code and
  one element; a gap longer than the code can say takes zero-valued fillers (Deep Compression);
- ``dense``: every element (when the tensor is not sparse enough for the others to win).

A float file holds every floating tensor of the state dict (conv/linear weights sparse, BN and the
rest dense). An int8 ``.packed`` of an earlier version (int8 weights with float32 scales, float32
biases, each site's activation qparams) loads into the q/dq model (``qdq.py``), not the
``torch.ao.nn.quantized`` modules it was written from. Nothing is pickled: a damaged file fails
with ``PackedError``, not with code execution. Loading runs on the CPU.

Worked number: a 93%-sparse resnet20a (18,7xx nonzero of 268,336 conv+linear weights) packs into
about 40 KB as an int8 ``.pt2pack``, against 626 KB as a ``.pt2`` and 1,084,416 bytes of float32.
"""

from __future__ import annotations

import io
import json
import lzma
import math
import struct
import zipfile
import zlib
from typing import Any

import torch
from torch import nn

from compress import registry
from compress.channels import resize_to
from compress.models import build_model, prunable
from compress.quant import pt2pack
from compress.quant.fold import fold_model
from compress.quant.pt2pack import _INT, _bytes
from compress.quant.qdq import build_qdq
from compress.quant.qparams import UINT8
from compress.quant.size import pack_relative

MAGIC = b"CCPACK1\n"
_DTYPES = {"int8": torch.int8, "float32": torch.float32, "int32": torch.int32}


class PackedError(ValueError):
    """A packed file that is not one, is truncated, or does not describe a model this project builds."""


def _bits(mask: torch.Tensor) -> bytes:
    """``numpy.packbits`` of a bool tensor: eight flags a byte, the first in the most significant bit."""
    padded = torch.cat([mask.to(torch.uint8), torch.zeros((-len(mask)) % 8, dtype=torch.uint8)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)
    return _bytes((padded.int() * weights).sum(1).to(torch.uint8))


def _as_ints(values: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """The flat tensor viewed as integers of its element size: bit for bit when ``dtype`` is None; converted to
    ``dtype`` first otherwise, a float's -0.0 (a pruned weight) stored as the zero it is."""
    t = values.detach().cpu()
    if dtype is not None:
        t = t.to(_DTYPES[dtype])
        if t.is_floating_point():
            t = torch.where(t == 0, torch.zeros((), dtype=t.dtype), t)
    t = t.contiguous().view(-1)
    return t.view(_INT[t.element_size()])


def encode(values: torch.Tensor, dtype: str | None, sparse: bool) -> tuple[str, bytes]:
    """(encoding, bytes) of one tensor: the smallest of the sparse encodings when ``sparse``, else dense."""
    return min(candidates(values, dtype, sparse), key=lambda o: len(o[1]))


def candidates(values: torch.Tensor, dtype: str | None, sparse: bool) -> list[tuple[str, bytes]]:
    """Every encoding of one tensor as (name, bytes): dense, and bitmask/rel4/rel8 when ``sparse``.

    ``dtype``: the stored element type (``int8``, ``float32``, ``int32``), or None for the tensor's own.
    The encodings see elements as integers of their size, so any dtype round-trips bit for bit.
    """
    flat = _as_ints(values, dtype)
    options = [("dense", _bytes(flat))]
    if sparse:
        mask = flat != 0
        options.append(("bitmask", _bits(mask) + _bytes(flat[mask])))
        for bits in (4, 8):
            codes, stored = pack_relative(flat, bits)
            c = codes.to(torch.uint8)
            if bits == 4:
                c = torch.cat([c, torch.zeros(len(c) % 2, dtype=torch.uint8)])
                c = c[0::2] | (c[1::2] << 4)
            # the entry count goes first: the last nibble of an odd count is padding
            options.append((f"rel{bits}", struct.pack("<I", len(codes)) + _bytes(c) + _bytes(stored)))
    return options


def decode(data: bytes, encoding: str, dtype: str, shape: list[int]) -> torch.Tensor:
    """The tensor back from ``encode``'s bytes (the one decoder is the standalone loader's)."""
    torch_dtype = _DTYPES[dtype]
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    try:
        raw = pt2pack.decode(data, encoding, itemsize, numel)
    except pt2pack.PackError as e:
        raise PackedError(str(e)) from None
    if not raw:
        return torch.zeros(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype).view(shape).clone()


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


def pack_float(model: nn.Module, model_name: str, meta: dict[str, Any] | None = None, model_args: str = "",
               widths: dict[str, list[int]] | None = None) -> bytes:
    """The packed file of a float model: conv/linear weights sparse, every other float tensor dense.

    Any model of the registry (``compress.registry``): the header names its model string and
    arguments, and loading builds that architecture again (a user's factory must be importable there),
    resized to ``widths`` for a channel-pruned model (``compress.channels``).
    """
    w = _Writer()
    sparse = {f"{n}.weight" for n, _ in prunable(model)}
    for key, t in model.state_dict().items():
        if t.is_floating_point():
            w.add(key, t, "float32", sparse=key in sparse)
    return w.finish({"format": 1, "kind": "float", "model": model_name, "model_args": model_args,
                     "widths": widths or {}, "meta": meta or {}})


# element sizes of torch.export's serialized ScalarType codes (torch/_export/serde/schema.py); others are bytes
_SCALAR_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 12: 1, 13: 2, 28: 2, 29: 1, 30: 1, 31: 1, 32: 1,
                 33: 1, 34: 4, 35: 8}


def _strip_metadata(model_json: bytes) -> bytes:
    """A serialized program without its nodes' metadata (stack traces, module paths, provenance: most of it)."""
    program = json.loads(model_json)
    for node in program["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    return json.dumps(program, separators=(",", ":")).encode()


def pack_program(pt2: bytes, meta: dict[str, Any] | None = None) -> bytes:
    """The ``.pt2pack`` of a ``.pt2`` archive (``torch.export.save``'s bytes): see ``pt2pack`` for the layout.

    Every tensor file of the archive is stored in its smallest encoding, the graph without node metadata
    and the example inputs as absent (``torch.export.load`` then sets none). ``PackedError`` for an archive
    holding pickled objects or binary files this format does not describe.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(pt2))
        files = {name: archive.read(name) for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError) as e:
        raise PackedError(f"not a .pt2 archive ({type(e).__name__})") from None
    tensors: dict[str, int] = {}  # archive file -> element size
    for name, data in files.items():
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            folder = name.rpartition("/")[0]
            for key, entry in json.loads(data).get("config", {}).items():
                if entry.get("use_pickle"):
                    raise PackedError(f"the program stores {key} pickled; a packed program holds tensors only")
                dtype = entry.get("tensor_meta", {}).get("dtype")
                tensors[f"{folder}/{entry['path_name']}"] = _SCALAR_BYTES.get(dtype, 1)
    text: dict[str, str] = {}
    empty = []
    w = _Writer()
    for name, data in files.items():
        if name.endswith("/serialization_id"):  # a random id per save: left out, so the same program packs the same
            continue
        if name in tensors:
            itemsize = tensors[name] if len(data) % tensors[name] == 0 else 1
            values = torch.frombuffer(bytearray(data), dtype=_INT[itemsize]) if data else torch.zeros(0, dtype=_INT[1])
            encoding, blob = encode(values, None, sparse=True)
            w.entries.append({"file": name, "itemsize": itemsize, "count": len(data) // itemsize,
                              "encoding": encoding, "offset": w.offset, "nbytes": len(blob)})
            w.chunks.append(blob)
            w.offset += len(blob)
        elif "/sample_inputs/" in name:
            empty.append(name)
        else:
            if name.startswith("archive/models/") and name.endswith(".json"):
                data = _strip_metadata(data)
            try:
                text[name] = data.decode()
            except UnicodeDecodeError:
                raise PackedError(f"the program archive holds a binary file {name} that is not a tensor") from None
    order = [n for n in files if not n.endswith("/serialization_id")]
    header = json.dumps({"format": 1, "order": order, "files": text, "empty": empty, "tensors": w.entries,
                         "meta": meta or {}}, separators=(",", ":")).encode()
    payload = struct.pack("<I", len(header)) + header + b"".join(w.chunks)
    return pt2pack.MAGIC + lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                         preset=9 | lzma.PRESET_EXTREME)


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
        if header.get("widths"):
            resize_to(skeleton, header["widths"])
        state = skeleton.state_dict()
        missing = sorted(k for k, v in state.items() if v.is_floating_point() and k not in tensors)
        if missing:
            raise PackedError(f"packed float file lacks {missing[:4]}")
        skeleton.load_state_dict({**state, **{k: v for k, v in tensors.items() if k in state}})
        return skeleton.eval()
    if header.get("kind") != "int8":
        raise PackedError(f"packed file of unknown kind {header.get('kind')!r}; known: int8, float")
    # an int8 file of an earlier version: its int8 weights, biases and qparams on the q/dq model, whose
    # activations use the whole uint8 range as the integer kernels it was written for did
    folded = fold_model(skeleton)
    qweights = {}
    for mod_name, m in folded.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            with torch.no_grad():
                m.bias = nn.Parameter(tensors[f"{mod_name}.bias"])
            qweights[mod_name] = (tensors[f"{mod_name}.weight"], tensors[f"{mod_name}.weight_scale"])
    for key in ("mean", "std"):
        getattr(folded.normalize, key).copy_(tensors[f"normalize.{key}"])
    qparams = {k: (float(v[0]), int(v[1])) for k, v in header["qparams"].items()}
    return build_qdq(folded, qparams, UINT8, header["weights"], qweights=qweights)
