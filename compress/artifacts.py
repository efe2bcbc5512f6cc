"""Model files a user keeps: written with a JSON manifest beside them, read back only when the sha256 matches.

    write_artifact(Path("runs/r/export/m.int8.pt2pack"), blob, {"expected_top1": 90.17, ...})
    model = load_artifact("runs/r/export/m.int8.pt2pack")    # checks m.int8.pt2pack.json's sha256 first

Kinds, by suffix:

- ``.pt2pack``: an int8 ``torch.export`` program packed small (``compress.quant.pt2pack``: sparse
  weights, no graph metadata); loads with ``pt2pack.load``, a one-file loader that needs torch and
  torchao only and is written beside every exported file;
- ``.pt2``: the same program as ``torch.export.save`` writes it; loads with ``torch.export.load``
  in a process that imports only torch and torchao (torchao registers the int8 ops it calls);
- ``.packed``: the packed sparse float model (``compress.quant.packed``), and the int8 files of
  earlier versions, which load into the q/dq model (``compress.quant.qdq``).

No load path builds ``torch.ao.nn.quantized`` modules or quantized-dtype tensors.

The manifest (``<file>.json``) names the file's sha256 and size, the spec and run it came from,
the row it reproduces and its expected top-1, and the versions it was made with. A file whose bytes
no longer match (damaged, truncated, replaced) fails with one ``ArtifactError`` line before any of
it is parsed. Files and manifests are written through a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.quant import pt2pack, quiet
from compress.quant.packed import PackedError, load_packed
from compress.results import atomic_write_bytes

SUFFIXES = (".pt2pack", ".pt2", ".packed")
LOAD_PACKED = "from compress.artifacts import load_artifact; model = load_artifact(PATH)  # CPU"
LOAD_PT2PACK = ("import pt2pack; model = pt2pack.load(PATH)  # pt2pack.py beside the file; torch + torchao only, "
                "CPU, q/dq reference ops; pt2pack.compile_int8(model) for oneDNN int8 kernels")
LOADER = Path(pt2pack.__file__).name
LOAD_PT2 = "import torch, torchao; model = torch.export.load(PATH).module()  # CPU, q/dq reference ops"
# what makes inductor lower the program's q/dq + conv to oneDNN int8 kernels (else: float convs, half the speed)
COMPILE_PT2 = ("import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer; "
               "torch._inductor.config.freezing = True; model = torch.compile(model)")


class ArtifactError(ValueError):
    """A model file that is missing, damaged, or not one this project writes."""


def manifest_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict[str, str]:
    """The versions a file was made with (a ``.pt2`` needs the same torch/torchao to load)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        with quiet():  # torchao's import logs a notice meant for its developers
            import torchao

        out["torchao"] = torchao.__version__
    except ImportError:  # a float packed file needs no torchao
        pass
    return out


def loader_entry() -> dict[str, str]:
    """The standalone ``.pt2pack`` loader as a manifest names it: its file name and sha256."""
    return {"file": LOADER, "sha256": sha256(Path(pt2pack.__file__).read_bytes())}


def write_loader(folder: Path) -> Path:
    """Write the standalone ``.pt2pack`` loader (``pt2pack.py``, torch and torchao only) into ``folder``."""
    atomic_write_bytes(Path(folder) / LOADER, Path(pt2pack.__file__).read_bytes())
    return Path(folder) / LOADER


def write_artifact(path: Path, data: bytes, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``data`` to ``path`` and its manifest (``manifest`` plus file, bytes, sha256, versions) beside it."""
    full = {"file": Path(path).name, "bytes": len(data), "sha256": sha256(data), **manifest, "versions": versions()}
    full.update(file=Path(path).name, bytes=len(data), sha256=sha256(data))  # never taken from ``manifest``
    atomic_write_bytes(Path(path), data)
    atomic_write_bytes(manifest_path(path), (json.dumps(full, indent=2, default=str) + "\n").encode())
    return full


def read_manifest(path: str | Path) -> dict[str, Any]:
    mpath = manifest_path(path)
    try:
        return json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no manifest {mpath.name} beside it (the sha256 to check it against)") from None
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{mpath}: unreadable manifest ({type(e).__name__})") from None


def read_verified(path: str | Path) -> tuple[bytes, dict[str, Any]]:
    """The bytes of an artifact and its manifest, after checking the sha256 the manifest records."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ArtifactError(f"{path}: unknown artifact kind {path.suffix!r}; known: {', '.join(SUFFIXES)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"artifact not found: {path}") from None
    manifest = read_manifest(path)
    got = sha256(data)
    if got != manifest.get("sha256"):
        raise ArtifactError(f"{path}: sha256 mismatch ({len(data):,} bytes, sha256 {got[:12]}...; the manifest "
                            f"says {manifest.get('bytes', '?'):,} bytes, {str(manifest.get('sha256'))[:12]}...): "
                            f"the file is damaged or truncated; export it again")
    return data, manifest


def load_artifact(path: str | Path) -> nn.Module:
    """The model of a verified artifact, ready to run on the CPU (eval mode)."""
    data, _ = read_verified(path)
    try:
        if Path(path).suffix == ".packed":
            return load_packed(data).eval()
        if Path(path).suffix == ".pt2pack":
            return pt2pack.load(data)  # an exported module is always in eval mode
        return pt2pack.load_pt2(data)
    except (PackedError, pt2pack.PackError) as e:
        raise ArtifactError(f"{path}: {e}") from None
