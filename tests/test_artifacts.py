"""Packed files and artifacts: every encoding round-trips, every artifact kind reloads to identical outputs,
a damaged or truncated file is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.artifacts import ArtifactError, load_artifact, manifest_path, read_verified, write_artifact
from compress.data import BatchLoader, load_cifar10
from compress.models import build_model
from compress.prune import global_magnitude_masks, make_permanent
from compress.quant import quiet
from compress.quant.backends import BACKENDS
from compress.quant.int8 import set_engine
from compress.quant.packed import PackedError, candidates, decode, encode, load_packed, pack_float, read_header
from compress.quant.size import bitmask_bytes, relative_bytes
from jobs.ptq import program_bytes
from tests.test_fold import randomise_bn

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


@pytest.mark.parametrize("method,weights,name", [
    ("manual", "per_channel", "resnet20a"), ("manual", "per_tensor", "resnet20b"), ("fx", "per_channel", "resnet20a"),
    ("fx", "per_tensor", "resnet20b"),
])
def test_packed_int8_file_reloads_to_identical_outputs(calib, tmp_path: Path, method: str, weights: str,
                                                       name: str) -> None:
    loader, x = calib
    set_engine("x86")
    model = _pruned(name)
    backend = BACKENDS[method]
    cal = backend.calibrate(model, loader, CPU, "minmax", True, "x86", (weights,))
    built = backend.build(cal, next(backend.variants((weights,), (0.99,), ("min",))))
    path = tmp_path / "m.int8.packed"
    write_artifact(path, built.packed(), {"kind": "int8-packed"})
    loaded = load_artifact(path)
    with quiet(), torch.no_grad():
        want, got = built.model(x), loaded(x)
    assert torch.equal(want, got) and want.abs().sum() > 0
    # the sparse file is what the table reports, and far below the float model's 4 bytes per value
    assert path.stat().st_size == len(built.packed()) < 0.05 * 4 * sum(p.numel() for p in model.parameters())


def test_pt2e_program_reloads_to_identical_outputs_in_a_process_with_only_torch_and_torchao(
        calib, tmp_path: Path) -> None:
    loader, x = calib
    model = _pruned()
    backend = BACKENDS["pt2e"]
    cal = backend.calibrate(model, loader, CPU, "histogram", True, "x86")
    built = backend.build(cal, next(backend.variants(("per_channel",), (1.0,), ("min",))))
    path = tmp_path / "m.int8.pt2"
    write_artifact(path, program_bytes(built.program()), {"kind": "int8-pt2"})
    with torch.no_grad():
        want = built.model(x)
        assert torch.equal(load_artifact(path)(x), want)
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    script = (
        "import sys, torch, torchao\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(io['x']), io['want'])\n"
        "assert not [k for k in sys.modules if k.split('.')[0] in ('compress', 'jobs', 'sweeps')]\n"
        "print('same')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "same"


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
