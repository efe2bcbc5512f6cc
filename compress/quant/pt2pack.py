"""Load a packed int8 program (``.pt2pack``) with torch and torchao only: this file is its whole loader.

    import pt2pack                                    # this file, copied beside every exported .pt2pack
    model = pt2pack.load("m.int8.pt2pack")            # the torch.export program's module, CPU, q/dq reference ops
    fast = pt2pack.compile_int8(model)                # inductor lowers q/dq + conv/linear to oneDNN int8 kernels

    python pt2pack.py m.int8.pt2pack                  # checks the file (and its manifest's sha256 when beside it)

A ``.pt2pack`` is a ``torch.export`` archive (``.pt2``) made small: the graph without its node metadata
(stack traces, module paths and provenance, most of the archive) and every tensor file of the
archive (int8 weights, scales, zero points, biases) in the smallest of four encodings:

- ``dense``: the bytes as they are;
- ``bitmask``: one bit per element (most significant bit first), then the nonzero elements;
- ``rel4`` / ``rel8``: a uint32 entry count, then per entry a 4-bit (two per byte, low nibble first)
  or 8-bit code ``gap - 1`` to the next stored element, then the stored elements; a gap longer
  than a code can say takes zero-valued fillers (Deep Compression's relative indexing).

Layout: ``MAGIC`` (8 bytes), then an xz stream (``lzma``, CRC64-checked) holding a uint32 header
length, the header (JSON: the archive's text files, its file order, and per tensor file its element
size, element count, encoding, offset and length) and the encoded tensors one after another.
Loading rebuilds the ``.pt2`` archive in memory, byte for byte what ``torch.export.save`` wrote for
every tensor, and calls ``torch.export.load``: the program is the one that was exported, so it gives
the ``.pt2``'s outputs exactly, eager and compiled. Nothing in the file is pickled.

Standalone on purpose: it imports only the standard library, torch and (to load) torchao, which
registers the quantize/dequantize ops the program calls. Where it runs: the CPU.
"""

from __future__ import annotations

import io
import json
import lzma
import struct
import sys
import zipfile
from pathlib import Path

import torch

MAGIC = b"CCPT2PK1"
ENCODINGS = ("dense", "bitmask", "rel4", "rel8")
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PackError(ValueError):
    """A file that is not a packed program, or is damaged or truncated."""


def _bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().view(torch.uint8)
    try:
        return t.numpy().tobytes()
    except (ImportError, RuntimeError):  # torch without numpy
        return bytes(t.tolist())


def decode(data: bytes, encoding: str, itemsize: int, count: int) -> bytes:
    """The ``count`` elements of ``itemsize`` bytes that ``data`` encodes, as raw bytes."""
    if itemsize not in _INT:
        raise PackError(f"element size {itemsize} is not one of {sorted(_INT)}")
    if encoding == "dense":
        if len(data) != count * itemsize:
            raise PackError(f"dense tensor of {len(data)} bytes does not hold {count} elements of {itemsize}")
        return bytes(data)
    dt = _INT[itemsize]
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    out = torch.zeros(count, dtype=dt)
    if encoding == "bitmask":
        n_mask = (count + 7) // 8
        if len(buf) < n_mask:
            raise PackError(f"bitmask tensor of {len(buf)} bytes is shorter than its mask ({n_mask})")
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
        mask = ((buf[:n_mask].unsqueeze(1) >> shifts) & 1).flatten()[:count].bool()
        k = int(mask.sum())
        if len(buf) != n_mask + k * itemsize:
            raise PackError(f"bitmask tensor of {len(buf)} bytes does not hold {k} values of {itemsize} bytes")
        out[mask] = buf[n_mask:].clone().view(dt)
    elif encoding in ("rel4", "rel8"):
        if len(buf) < 4:
            raise PackError(f"{encoding} tensor of {len(buf)} bytes has no entry count")
        (n,) = struct.unpack_from("<I", data)
        if encoding == "rel4":
            nibbles = buf[4:4 + (n + 1) // 2]
            codes = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=1).flatten()[:n]
            start = 4 + (n + 1) // 2
        else:
            codes = buf[4:4 + n]
            start = 4 + n
        if len(codes) != n or len(buf) != start + n * itemsize:
            raise PackError(f"{encoding} tensor of {len(buf)} bytes does not hold {n} entries of {itemsize} bytes")
        pos = torch.cumsum(codes.long() + 1, 0) - 1
        if n and int(pos[-1]) >= count:
            raise PackError(f"{encoding} tensor reaches element {int(pos[-1])} of {count}")
        out[pos] = buf[start:].clone().view(dt)
    else:
        raise PackError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    return _bytes(out)


def read(blob: bytes) -> tuple[dict, bytes]:
    """(header, encoded tensor data) of a packed program; ``PackError`` when it is not one or is damaged."""
    if not blob.startswith(MAGIC):
        raise PackError("not a packed program (bad magic)")
    try:
        payload = lzma.decompress(blob[len(MAGIC):], format=lzma.FORMAT_XZ)
        (n,) = struct.unpack_from("<I", payload)
        header = json.loads(payload[4:4 + n])
    except (lzma.LZMAError, EOFError, struct.error, ValueError) as e:
        raise PackError(f"damaged or truncated packed program ({type(e).__name__}: {e})") from None
    return header, payload[4 + n:]


def unpack(blob: bytes) -> bytes:
    """The ``.pt2`` archive a packed program holds, as ``torch.export.load`` reads it."""
    header, data = read(blob)
    files: dict[str, bytes] = {name: text.encode() for name, text in header["files"].items()}
    files.update({name: b"" for name in header.get("empty", [])})
    for t in header["tensors"]:
        chunk = data[t["offset"]:t["offset"] + t["nbytes"]]
        if len(chunk) != t["nbytes"]:
            raise PackError(f"truncated packed program: tensor {t['file']} is cut short")
        files[t["file"]] = decode(chunk, t["encoding"], t["itemsize"], t["count"])
    missing = [name for name in header["order"] if name not in files]
    if missing:
        raise PackError(f"packed program lacks {missing[:3]}")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in header["order"]:
            z.writestr(name, files[name])
    return out.getvalue()


def load(source: str | Path | bytes) -> torch.nn.Module:
    """The program's module (eval-capable, CPU) from a ``.pt2pack`` path or its bytes."""
    blob = source if isinstance(source, bytes) else Path(source).read_bytes()
    return load_pt2(unpack(blob))


def load_pt2(archive: bytes) -> torch.nn.Module:
    """The module of a ``.pt2`` archive's bytes (eval-capable, CPU)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval  # also registers the q/dq ops

    try:
        module = torch.export.load(io.BytesIO(archive)).module()
    except Exception as e:  # torch raises several types for an archive it cannot read
        raise PackError(f"not a loadable torch.export program ({type(e).__name__})") from None
    allow_exported_model_train_eval(module)  # .eval() on an exported module is otherwise an error
    return module


def compile_int8(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` that lowers the q/dq graph to oneDNN int8 kernels (x86 CPUs).

    Importing torchao's x86 inductor quantizer registers that lowering and freezing lets inductor prepack
    the weights; without both, the program compiles to float convolutions at about half the speed.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

    torch._inductor.config.freezing = True
    return torch.compile(module)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python pt2pack.py FILE.pt2pack", file=sys.stderr)
        return 2
    path = Path(argv[0])
    blob = path.read_bytes()
    manifest = Path(f"{path}.json")
    if manifest.is_file():
        import hashlib

        want = json.loads(manifest.read_text()).get("sha256")
        if hashlib.sha256(blob).hexdigest() != want:
            print(f"{path}: sha256 differs from {manifest.name}: damaged or truncated", file=sys.stderr)
            return 1
    try:
        module = load(blob)
    except PackError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 1
    n = sum(1 for _ in module.graph.nodes)
    print(f"{path}: {len(blob):,} bytes, a torch.export program of {n} nodes; loads with torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
