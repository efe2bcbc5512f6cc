"""Model files a user keeps: written with a JSON manifest beside them, read back only when the sha256 matches.

    write_artifact(Path("runs/r/export/m.int8.packed"), blob, {"expected_top1": 90.17, ...})
    model = load_artifact("runs/r/export/m.int8.packed")     # checks m.int8.packed.json's sha256 first

Kinds, by suffix:

- ``.packed``: the packed sparse model (``compress.quant.packed``), int8 or float; loads with
  ``load_packed`` (this project's ``compress`` package, a few hundred lines, no training code);
- ``.pt2``: a ``torch.export`` program (the PT2E int8 model); loads with ``torch.export.load``
  in a process that imports only torch and torchao (torchao registers the int8 ops it calls).

The manifest (``<file>.json``) names the file's sha256 and size, the spec and run it came from,
the row it reproduces and its expected top-1, and the versions it was made with. A file whose bytes
no longer match (damaged, truncated, replaced) fails with one ``ArtifactError`` line before any of
it is parsed. Files and manifests are written through a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.quant import quiet
from compress.quant.packed import PackedError, load_packed
from compress.results import atomic_write_bytes

SUFFIXES = (".packed", ".pt2")
LOAD_PACKED = "from compress.artifacts import load_artifact; model = load_artifact(PATH)  # CPU"
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
    if Path(path).suffix == ".packed":
        try:
            return load_packed(data).eval()
        except PackedError as e:
            raise ArtifactError(f"{path}: {e}") from None
    from torchao.quantization.pt2e import allow_exported_model_train_eval  # also registers the int8 ops

    try:
        module = torch.export.load(io.BytesIO(data)).module()
    except Exception as e:  # torch raises several types for an unreadable archive
        raise ArtifactError(f"{path}: not a loadable torch.export program ({type(e).__name__})") from None
    allow_exported_model_train_eval(module)  # .eval() on an exported module is otherwise an error
    return module
