"""Any model, any data, end to end through the CLI: a user's model module and a data factory (scikit-learn's
8x8 grayscale digits) through train, prune, pt2e PTQ and export, the file reloaded where only torch and
torchao are imported; and every bad input one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.conftest import REPO

EXAMPLES = REPO / "examples"

MYNETS = '''
from torch import nn


def small_cnn(num_classes=10, in_chans=3, width=16):
    """Two conv+BN+ReLU blocks (the second depthwise-separable), global pool, linear classifier."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def broken(**kwargs):
    raise RuntimeError("this factory always fails")


def not_a_module(**kwargs):
    return "a string"


class Branchy(nn.Module):
    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        if y.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return self.fc(y)
        return -self.fc(y)


def branchy(**kwargs):
    return Branchy(**kwargs)
'''

# what a deployment node runs: torch and torchao only, nothing of this project
RELOAD = '''
import hashlib, json, sys
import torch, torchao  # torchao registers the int8 ops the program calls
program, images, manifest = sys.argv[1:4]
m = torch.export.load(program).module()
x = torch.load(images)
batch = json.load(open(manifest))["input"]["batch_size"]
with torch.no_grad():
    preds = torch.cat([m(x[i:i + batch].contiguous(memory_format=torch.channels_last)).argmax(1)
                       for i in range(0, len(x), batch)])
ours = sorted(k for k in sys.modules if k.split(".")[0] in ("compress", "jobs", "sweeps", "analysis", "timm"))
print(json.dumps({"sha": hashlib.sha256(preds.to(torch.uint8).numpy().tobytes()).hexdigest(), "ours": ours,
                  "n": len(preds)}))
'''


@pytest.fixture
def user_code(tmp_path: Path) -> dict[str, str]:
    """A model module outside the repository, and the examples' data factory, on PYTHONPATH."""
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "mynets.py").write_text(textwrap.dedent(MYNETS))
    path = os.pathsep.join([str(folder), str(EXAMPLES), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.launch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


DIGITS = ("--model", "mynets:small_cnn", "--model-args", "num_classes=10,in_chans=1", "--data", "digits:load")


@pytest.mark.slow
def test_a_users_model_on_grayscale_digits_trains_prunes_quantizes_and_ships(tmp_path: Path,
                                                                             user_code: dict[str, str]) -> None:
    results = str(tmp_path / "results")
    out = launch(user_code, "train", *DIGITS, "--epochs", "10", "--lr", "0.02", "--no-randaugment",
                 "--results", results, "--run-id", "base")
    assert out.returncode == 0, out.stderr[-3000:]
    out = launch(user_code, "prune", "--run", "base", "--phases", "2", "--epochs", "1", "--final-sparsity", "0.7",
                 "--filter-fraction", "0.05", "--results", results, "--run-id", "pruned")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "net.3" in out.stdout  # the per-module table names the depthwise conv
    phases = pq.read_table(Path(results) / "phases").to_pandas()
    pruned = phases[phases.run_id == "pruned"].sort_values("phase")
    source = Path(user_code["PYTHONPATH"].split(os.pathsep)[0]) / "mynets.py"
    assert set(pruned.spec_model) == {"mynets:small_cnn"} and set(pruned.spec_data) == {"digits:load"}
    assert set(pruned.model_source_sha256) == {hashlib.sha256(source.read_bytes()).hexdigest()}
    assert set(pruned.data_shape) == {"1x8x8"} and set(pruned.data_classes) == {10}
    assert pruned.model_params.iloc[0] > 0
    assert abs(pruned.sparsity.iloc[-1] - 0.7) < 1e-3
    assert all(len(p) == 360 for p in pruned.predictions)  # every test digit
    base_top1 = phases[(phases.run_id == "base") & (phases.phase == 1)].top1.iloc[0]
    assert base_top1 > 50  # 10 epochs on 1,437 digits: far above chance (10%)

    out = launch(user_code, "ptq", "--run", "pruned", "--methods", "pt2e,fx", "--observers", "minmax,histogram",
                 "--calib-sizes", "256", "--results", results, "--run-id", "q")
    assert out.returncode == 0, out.stderr[-3000:]
    ptq = pq.read_table(Path(results) / "ptq").to_pandas()
    assert len(ptq) == 4 and set(ptq.data_shape) == {"1x8x8"}
    pt2e, fx = ptq[ptq.method == "pt2e"], ptq[ptq.method == "fx"]
    assert (pt2e.program_bytes > 0).all() and fx.program_bytes.isna().all() and fx.int8_packed_bytes.isna().all()
    assert (pt2e.int8_packed_bytes < pt2e.program_bytes / 2).all()  # the packed program of any model
    assert (ptq.int8_top1 > ptq.float_top1 - 10).all()

    out = launch(user_code, "export", "q", "--results", results)  # the best row with a file: a pt2e one
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[pt2e " in out.stdout
    (program,) = (Path(results) / "runs" / "q" / "export").glob("*.int8.pt2")
    manifest = json.loads(Path(f"{program}.json").read_text())
    assert manifest["input"]["shape"] == [1, 8, 8] and len(manifest["input"]["normalisation"]["mean"]) == 1
    assert manifest["model"] == {"model": "mynets:small_cnn", "model_args": "num_classes=10,in_chans=1",
                                 "data": "digits:load"}
    # the test images as the job saw them, for a process that has nothing of ours
    images = tmp_path / "digits_test.pt"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); import digits; "
            "torch.save(torch.stack([x for x, _ in digits.load()[1]]), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(images), str(EXAMPLES)], check=True, timeout=120)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", RELOAD, str(program), str(images), f"{program}.json"],
                          cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=300, check=True)
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert reloaded["ours"] == [] and reloaded["n"] == 360
    assert reloaded["sha"] == manifest["predictions_sha256"]

    out = launch(user_code, "verify", str(program))
    assert out.returncode == 0, out.stderr[-3000:]
    (packed,) = program.parent.glob("*.int8.pt2pack")
    out = launch(user_code, "verify", str(packed))
    assert out.returncode == 0 and "same predictions" in out.stdout, out.stderr[-3000:]


def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    import torch

    (tmp_path / "empty_folder" / "train").mkdir(parents=True)
    (tmp_path / "empty_folder" / "val").mkdir(parents=True)
    broken = tmp_path / "broken_folder"
    for split in ("train", "val"):
        (broken / split / "cat").mkdir(parents=True)
        (broken / split / "cat" / "0.png").write_bytes(b"not a png at all")
    wrong = tmp_path / "wrong_weights.pt"
    torch.save({"state_dict": {"0.weight": torch.zeros(16, 3, 3, 3)}}, wrong)
    digits = ["--data", "digits:load", "--model-args", "num_classes=10,in_chans=1"]
    return {
        "unknown timm name": (["--model", "timm:resnet81", *digits],
                              "timm has no architecture 'resnet81'; closest: resnet18"),
        "factory raises": (["--model", "mynets:broken", *digits], "raised RuntimeError: this factory always fails"),
        "factory returns no module": (["--model", "mynets:not_a_module", *digits], "returned str, not a torch.nn"),
        "weights do not fit": (["--model", "mynets:small_cnn", *digits, "--weights", str(wrong)],
                               "does not fit mynets:small_cnn"),
        "class count": (["--model", "mynets:small_cnn", "--data", "digits:load", "--model-args",
                         "num_classes=7,in_chans=1"], "has 7 outputs but the data has 10 classes"),
        "no class folders": (["--model", "mynets:small_cnn", "--data", f"imagefolder:{tmp_path / 'empty_folder'}"],
                             "no class folders"),
        "unreadable image": (["--model", "mynets:small_cnn", "--data", f"imagefolder:{broken}"], "0.png"),
    }


@pytest.mark.parametrize("case", ["unknown timm name", "factory raises", "factory returns no module",
                                  "weights do not fit", "class count", "no class folders", "unreadable image"])
def test_bad_model_or_data_is_one_line_before_anything_is_written(tmp_path: Path, user_code: dict[str, str],
                                                                  monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    from cli.main import cli

    args, message = _bad_cases(tmp_path)[case]
    for p in reversed(user_code["PYTHONPATH"].split(os.pathsep)[:2]):
        monkeypatch.syspath_prepend(p)
    results = tmp_path / "results"
    out = CliRunner().invoke(cli, ["train", *args, "--epochs", "1", "--results", str(results)])
    assert out.exit_code == 2, out.output
    lines = [x for x in out.output.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], out.output
    assert not results.exists()


@pytest.mark.parametrize(("method", "model", "message"), [
    ("pt2e", "mynets:branchy", "pt2e needs a model torch.export can trace"),
    ("fx", "mynets:branchy", "fx cannot trace mynets:branchy"),
    ("manual", "mynets:small_cnn", "manual (the hand-written int8 model) builds the built-in ResNets only"),
])
def test_ptq_refuses_what_its_method_cannot_build_in_one_line(tmp_path: Path, user_code: dict[str, str],
                                                              monkeypatch: pytest.MonkeyPatch, method: str,
                                                              model: str, message: str) -> None:
    import torch

    from cli.main import cli
    from compress import registry

    for p in reversed(user_code["PYTHONPATH"].split(os.pathsep)[:2]):
        monkeypatch.syspath_prepend(p)
    weights = tmp_path / "w.pt"
    torch.save(registry.build(model, "num_classes=10,in_chans=1", (0.5,), (0.25,)).state_dict(), weights)
    results = tmp_path / "results"
    out = CliRunner().invoke(cli, ["ptq", "--model", model, "--model-args", "num_classes=10,in_chans=1", "--data",
                                   "digits:load", "--weights", str(weights), "--methods", method,
                                   "--results", str(results)])
    assert out.exit_code == 2, out.output
    lines = [x for x in out.output.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], out.output
    assert not results.exists()


def test_the_nodes_must_see_the_users_model_and_data_code(tmp_path: Path, user_code: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What the node check looks for before submitting: the model factory's and the data factory's source files
    (a node imports both), an image folder's val/ folder."""
    from cli.options import job_inputs
    from jobs.specs import TrainSpec

    for p in reversed(user_code["PYTHONPATH"].split(os.pathsep)[:2]):
        monkeypatch.syspath_prepend(p)
    spec = TrainSpec(model="mynets:small_cnn", data="digits:load")
    inputs = dict(job_inputs([spec]))
    assert Path(inputs["model"]).name == "mynets.py" and Path(inputs["data"]) == (EXAMPLES / "digits.py").resolve()
    (tmp_path / "imgs" / "val").mkdir(parents=True)
    inputs = dict(job_inputs([TrainSpec(model="timm:resnet18", data=f"imagefolder:{tmp_path / 'imgs'}")]))
    assert inputs == {"data": str((tmp_path / "imgs" / "val").resolve())}
