"""Packed files and artifacts: every encoding round-trips, every artifact kind reloads to identical outputs,
a damaged or truncated file is one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.artifacts import ArtifactError, load_artifact, manifest_path, read_verified, write_artifact, write_loader
from compress.data import BatchLoader, load_cifar10
from compress.models import build_model
from compress.prune import global_magnitude_masks, make_permanent
from compress.quant import pt2pack, quiet
from compress.quant.backends import BACKENDS
from compress.quant.int8 import build_int8, derive_qparams, pack_int8, set_engine
from compress.quant.packed import (
    PackedError,
    candidates,
    decode,
    encode,
    load_packed,
    pack_float,
    pack_program,
    read_header,
)
from compress.quant.pt2e import program_bytes
from compress.quant.qdq import QDQResNet
from compress.quant.qparams import activation_range
from compress.quant.size import bitmask_bytes, relative_bytes
from tests.helpers import randomise_bn

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_engine():
    saved = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = saved


def _sparse(numel: int, every: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    t = torch.zeros(numel, dtype=dtype)
    t[::every] = torch.arange(1, len(t[::every]) + 1, dtype=torch.int64).remainder(100).add(1).to(dtype)
    return t


@pytest.mark.parametrize("values", [
    _sparse(1000, 10), _sparse(1000, 17), _sparse(4096, 300), _sparse(777, 1), torch.zeros(333, dtype=torch.int8),
    _sparse(2000, 40, torch.float32) * 0.01,
], ids=["every10", "gap17>16", "gap300>256", "dense", "all-zero", "float"])
@pytest.mark.parametrize("encoding", ["dense", "bitmask", "rel4", "rel8"])
def test_every_encoding_round_trips(values: torch.Tensor, encoding: str) -> None:
    dtype = "int8" if values.dtype == torch.int8 else "float32"
    forced = dict(candidates(values, dtype, sparse=True))
    assert set(forced) == {"dense", "bitmask", "rel4", "rel8"}
    out = decode(forced[encoding], encoding, dtype, list(values.shape))
    assert torch.equal(out, values)


def test_encode_keeps_the_smallest_and_matches_the_size_arithmetic() -> None:
    values = _sparse(1000, 10)
    encoding, data = encode(values, "int8", sparse=True)
    # 100 nonzeros, gaps of 10: 4-bit relative indexing = 100 x 12 bits = 150 bytes (+ a 4-byte entry count);
    # the bitmask needs 125 + 100 = 225
    assert encoding == "rel4" and len(data) == relative_bytes(values != 0, 4) + 4
    assert bitmask_bytes(1000, 100) == 225
    assert encode(_sparse(64, 1), "int8", sparse=True)[0] == "dense"
    assert encode(values, "int8", sparse=False)[0] == "dense"


@pytest.fixture(scope="module")
def calib(synthetic_cifar) -> tuple[BatchLoader, torch.Tensor]:
    data = load_cifar10(synthetic_cifar)
    return BatchLoader(data.train_x[:100], data.train_y[:100], 50), data.test_x[:16].float() / 255


def _pruned(name: str = "resnet20a", sparsity: float = 0.9) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomise_bn(build_model(name))
    make_permanent(model, global_magnitude_masks(model, sparsity))
    return model


def _build(method: str, calib, name: str = "resnet20a", weights: str = "per_channel", sparsity: float = 0.9):
    loader, _ = calib
    model = _pruned(name, sparsity)
    backend = BACKENDS[method]
    cal = backend.calibrate(model, loader, CPU, "minmax", True, "x86", (weights,))
    return model, backend.build(cal, next(backend.variants((weights,), (0.99,), ("min",))))


@pytest.mark.parametrize("method,weights,name", [
    ("manual", "per_channel", "resnet20a"), ("manual", "per_tensor", "resnet20b"), ("fx", "per_channel", "resnet20a"),
    ("fx", "per_tensor", "resnet20b"), ("pt2e", "per_channel", "resnet20a"),
])
def test_every_backend_ships_a_packed_program_that_reloads_to_identical_outputs(
        calib, tmp_path: Path, method: str, weights: str, name: str) -> None:
    _, x = calib
    model, built = _build(method, calib, name, weights)
    path = tmp_path / "m.int8.pt2pack"
    write_artifact(path, built.packed(), {"kind": "int8-pt2pack"})
    loaded = load_artifact(path)
    with quiet(), torch.no_grad():
        want, got = built.model(x), loaded(x)
        assert torch.equal(want, got) and want.abs().sum() > 0
        assert torch.equal(load_artifact(_write(tmp_path / "m.int8.pt2", built.pt2()))(x), want)
    # sparse weights and no graph metadata: far below the .pt2 and the float model's 4 bytes per value
    assert path.stat().st_size == len(built.packed()) < 0.05 * 4 * sum(p.numel() for p in model.parameters())
    assert len(built.packed()) < len(built.pt2()) / 8


def _write(path: Path, blob: bytes) -> Path:
    write_artifact(path, blob, {"kind": path.suffix})
    return path


def test_a_packed_program_is_the_same_bytes_each_time(calib) -> None:
    _, built = _build("manual", calib)
    again = pack_program(program_bytes(built.program()))
    assert again == built.packed() and again[:8] == pt2pack.MAGIC


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16,
                                   torch.float32, torch.float64])
def test_the_standalone_decoder_round_trips_every_element_size(dtype: torch.dtype) -> None:
    values = _sparse(1000, 7, torch.int64).to(dtype) * (-1 if dtype != torch.uint8 else 1)
    raw = values.view(torch.uint8).numpy().tobytes() if dtype != torch.uint8 else values.numpy().tobytes()
    for encoding, data in candidates(values, None, sparse=True):
        assert pt2pack.decode(data, encoding, values.element_size(), len(values)) == raw, encoding


def test_an_int8_file_of_an_earlier_version_loads_into_the_qdq_model(calib, tmp_path: Path) -> None:
    """The legacy packed int8 file (torch.ao.nn.quantized modules) loads without them, to nearly its outputs."""
    loader, x = calib
    set_engine("x86")
    model = _pruned()
    cal = BACKENDS["manual"].calibrate(model, loader, CPU, "minmax", True, "x86")
    folded, ranges = cal.state
    legacy = build_int8(folded, derive_qparams(ranges, 1.0, "min", activation_range(True)))
    path = _write(tmp_path / "old.int8.packed", pack_int8(legacy, "resnet20a", "x86"))
    loaded = load_artifact(path)
    assert isinstance(loaded, QDQResNet)
    assert not [m for m in loaded.modules() if type(m).__module__.startswith("torch.ao.nn")]
    with quiet(), torch.no_grad():
        want, got = legacy(x), loaded(x)
    # the same int8 weights and qparams; float arithmetic between int8 values rounds a few activations the
    # other way from the integer kernels: within a few steps of the logits' grid, never more
    step = getattr(loaded, loaded.classifier_name).site.scale
    assert (want - got).abs().max() <= 4 * step and (want - got).abs().mean() <= step


def test_the_standalone_loader_runs_in_a_process_that_has_only_torch_and_torchao(calib, tmp_path: Path) -> None:
    _, x = calib
    _, built = _build("manual", calib)
    path = _write(tmp_path / "m.int8.pt2pack", built.packed())
    _write(tmp_path / "m.int8.pt2", built.pt2())
    loader = write_loader(tmp_path)
    with torch.no_grad():
        torch.save({"x": x, "want": built.model(x)}, tmp_path / "io.pt")
    script = (
        "import sys, torch, pt2pack\n"
        "io = torch.load('io.pt')\n"
        "m = pt2pack.load('m.int8.pt2pack')\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(io['x']), io['want'])\n"
        "    assert torch.equal(torch.export.load('m.int8.pt2').module()(io['x']), io['want'])\n"
        "assert not [k for k in sys.modules if k.split('.')[0] in ('compress', 'jobs', 'sweeps')]\n"
        "print('same')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "same", proc.stderr[-2000:]
    cli = subprocess.run([sys.executable, str(loader), path.name], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert cli.returncode == 0 and f"{path.stat().st_size:,} bytes" in cli.stdout, cli.stderr[-2000:]
    path.write_bytes(path.read_bytes()[:-100])
    cli = subprocess.run([sys.executable, str(loader), path.name], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert cli.returncode == 1 and cli.stderr.strip().count("\n") == 0 and "sha256 differs" in cli.stderr


@pytest.mark.parametrize("damage,message", [
    (lambda b: b"PK" + b[2:], "bad magic"), (lambda b: b[:-50], "damaged or truncated packed program"),
    (lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1:], "damaged or truncated"),
], ids=["magic", "truncated", "flipped"])
def test_a_damaged_packed_program_is_one_line(calib, damage, message: str) -> None:
    _, built = _build("pt2e", calib)
    with pytest.raises(pt2pack.PackError, match=message) as err:
        pt2pack.load(damage(built.packed()))
    assert "\n" not in str(err.value)


def test_loading_any_artifact_builds_nothing_of_the_deprecated_quantized_api(calib, tmp_path: Path) -> None:
    """No load path imports torch.ao.nn.quantized beyond what torch and torchao import themselves, builds a
    module of it, or makes a quantized-dtype tensor (watched on every op while loading and running)."""
    loader, _ = calib
    _, built = _build("manual", calib)
    cal = BACKENDS["manual"].calibrate(_pruned(), loader, CPU, "minmax", True, "x86")
    folded, ranges = cal.state
    set_engine("x86")
    legacy = pack_int8(build_int8(folded, derive_qparams(ranges, 1.0, "min", activation_range(True))), "resnet20a",
                       "x86")
    paths = [_write(tmp_path / "m.int8.pt2pack", built.packed()), _write(tmp_path / "m.int8.pt2", built.pt2()),
             _write(tmp_path / "old.int8.packed", legacy),
             _write(tmp_path / "model.float.packed", pack_float(_pruned(), "resnet20a"))]
    script = (
        "import json, sys, torch, torchao\n"
        "from torch.utils._python_dispatch import TorchDispatchMode\n"
        "from torch.utils._pytree import tree_leaves\n"
        "Q = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}\n"
        "base = {k for k in sys.modules if k.startswith('torch.ao.nn.quantized')}\n"
        "seen = []\n"
        "class Watch(TorchDispatchMode):\n"
        "    def __torch_dispatch__(self, func, types, args=(), kwargs=None):\n"
        "        out = func(*args, **(kwargs or {}))\n"
        "        seen.extend(str(func) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype in Q)\n"
        "        return out\n"
        "modules = []\n"
        "with Watch():\n"
        "    from compress.artifacts import load_artifact\n"
        "    for path in sys.argv[1:]:\n"
        "        m = load_artifact(path)\n"
        "        with torch.no_grad():\n"
        "            m(torch.rand(2, 3, 32, 32))\n"
        "        seen.extend(k for k, t in m.state_dict().items() if t.dtype in Q)\n"
        "        modules.extend(type(x).__module__ for x in m.modules() if type(x).__module__.startswith('torch.ao'))\n"
        "now = {k for k in sys.modules if k.startswith('torch.ao.nn.quantized')}\n"
        "legacy = [k for k in ('compress.quant.int8', 'compress.quant.fx') if k in sys.modules]\n"
        "print(json.dumps({'quantized_tensors': seen, 'modules': modules, 'imported': sorted(now - base),\n"
        "                  'legacy': legacy}))\n")
    proc = subprocess.run([sys.executable, "-c", script, *map(str, paths)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"quantized_tensors": [], "modules": [], "imported": [], "legacy": []}


def test_packed_float_file_reloads_the_same_model_and_is_small(tmp_path: Path) -> None:
    model = _pruned(sparsity=0.93)
    blob = pack_float(model, "resnet20a")
    path = tmp_path / "model.float.packed"
    write_artifact(path, blob, {"kind": "float-packed"})
    loaded = load_artifact(path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(loaded.state_dict()[k], v), k
    # 7% of 268,336 weights at 4 bytes plus their index, against 1,084,416 bytes of float32 tensors
    assert len(blob) < 1_084_416 / 8


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "model.float.packed"
    write_artifact(path, pack_float(_pruned(), "resnet20a"), {"kind": "float-packed", "expected_top1": 50.0})
    return path


def test_manifest_names_sha256_size_and_versions(artifact: Path) -> None:
    manifest = json.loads(manifest_path(artifact).read_text())
    data, read = read_verified(artifact)
    assert manifest == read and manifest["bytes"] == len(data) == artifact.stat().st_size
    assert manifest["file"] == artifact.name and manifest["versions"]["torch"] == torch.__version__
    assert manifest["expected_top1"] == 50.0 and len(manifest["sha256"]) == 64


@pytest.mark.parametrize("damage", ["truncate", "flip", "append"])
def test_damaged_artifact_is_a_sha256_mismatch(artifact: Path, damage: str) -> None:
    data = artifact.read_bytes()
    if damage == "truncate":
        artifact.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        artifact.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        artifact.write_bytes(data + b"\0")
    with pytest.raises(ArtifactError, match="sha256 mismatch") as err:
        load_artifact(artifact)
    assert "\n" not in str(err.value) and "damaged or truncated" in str(err.value)


def test_missing_manifest_file_or_kind(artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="artifact not found"):
        load_artifact(tmp_path / "nope.packed")
    with pytest.raises(ArtifactError, match="unknown artifact kind '.pt'"):
        load_artifact(tmp_path / "model.pt")
    manifest_path(artifact).unlink()
    with pytest.raises(ArtifactError, match="no manifest model.float.packed.json beside it"):
        load_artifact(artifact)


def test_packed_reader_refuses_what_it_cannot_read() -> None:
    blob = pack_float(_pruned(), "resnet20a")
    with pytest.raises(PackedError, match="bad magic"):
        read_header(b"PK" + blob)
    with pytest.raises(PackedError, match="truncated packed file"):
        read_header(blob[:-10])
    with pytest.raises(PackedError, match="header unreadable"):
        read_header(blob[:20])
    with pytest.raises(PackedError, match="does not build"):
        load_packed(pack_float(_pruned(), "resnet56"))
