"""Inference speed of the int8 model files a user ships against the float model, on this CPU, at several batch sizes.

    COMPRESS_DATA=../shared/data COMPRESS_WEIGHTS=../shared/weights/resnet20-12fca82f.th \\
        nice -n 5 .venv/bin/python bench/int8_speed.py --batch-sizes 1,32,256

    # the files an export job wrote (``python -m jobs.launch export ...``), instead of building new ones
    .venv/bin/python bench/int8_speed.py --run-export-dir results/runs/ptq-gmp93/export

Times, at each batch size, these models, all fed the same float [0, 1] images in channels_last:

- ``float eager``: the float ResNet (``--weights``, or ``model.float.packed`` when the export folder
  has one), float32, ``torch.no_grad``;
- ``float compiled``: ``torch.compile`` of it;
- ``<name> eager`` for each ``*.int8.pt2`` and ``*.int8.pt2pack``: the ``torch.export`` program
  loaded back, which runs torchao's q/dq reference ops (int8 values, float arithmetic: slow, it is
  the portable form); the ``.pt2pack`` holds the same program, packed small;
- ``<name> compiled``: ``torch.compile`` of the loaded program; inductor lowers q/dq to oneDNN int8
  kernels. This is how both files are meant to run;
- ``manual legacy eager`` (built files only): the same manual qparams and int8 weights on the
  ``torch.ao.nn.quantized`` modules that shipped before (``Int8ResNet``), for comparison.

The compiled rows need two things a user's process must do as well, or the ``.pt2`` compiles to
float convolutions on dequantized weights at about half the int8 speed: import
``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer`` (it registers torchao's inductor
passes that lower q/dq + conv to oneDNN int8 kernels; ``import torchao`` alone does not) and set
``torch._inductor.config.freezing`` globally (weights become constants, prepacked for oneDNN; the
``options={"freezing": True}`` form of ``torch.compile`` fails in those passes). The float model
is compiled with freezing too, so the ratio is fair. ``dynamic=False``: each batch size compiles
once, in the warm-up before its timing. A model that fails to compile loses its row, with the reason.

Without ``--run-export-dir`` the int8 files are built from ``--weights`` through the project's own
backends (``--methods``, default ``manual`` and ``pt2e``; MinMax over ``--calib-images`` training
images, per-channel weights, 7-bit activations on x86/fbgemm) and written with their manifests into
a temporary folder (``--keep-dir`` keeps them), then loaded back from there, sha256 checked.

Each figure is the median of ``--repeats`` measurements of at least ``--seconds`` each, the
models interleaved within each repeat, so a burst of load from another process moves one sample
rather than one model; ratios are to float eager measured in the same run, e.g. 2,000 img/s float
and 8,000 img/s int8 at batch 256 is 4.0x. The ratios depend on the CPU: int8 gains most with
VNNI or AMX (about 4x at batch 256 with AVX512-VNNI, about 1.6x on AVX2 only), so the CPU model
and its instruction sets are printed above the table. With CIFAR-10 present each model's top-1
on the first 1,000 test images is printed too (a broken file shows up as about 10%); without it
random images are used (speed does not depend on the pixel values).
Where it runs: everything on the CPU (the int8 kernels are CPU-only; the float model is timed there too).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch._inductor.config
from machine import cpu_line
from torch import nn

from compress.artifacts import load_artifact, read_manifest, write_artifact
from compress.catalog import unsupported
from compress.data import BatchLoader, Cifar10, DataError, load_cifar10
from compress.loops import evaluate
from compress.models import load_model
from compress.quant import quiet
from compress.quant.backends import BACKENDS
from compress.quant.int8 import build_int8, derive_qparams, effective_reduce_range, set_engine
from compress.quant.qparams import activation_range
from compress.quant.size import float_bytes

with quiet():
    # registers torchao's x86 inductor passes (the oneDNN int8 lowering); see the module docstring
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

CPU = torch.device("cpu")
SANITY_IMAGES = 1_000
OBSERVER = "minmax"
WEIGHT_SCHEME = "per_channel"
FLOAT_FILE = "model.float.packed"  # what the export job writes for a float run


@dataclass
class Timed:
    """One row of the table: a model, and where it came from (the file and its size on disk)."""

    name: str
    model: Callable[[torch.Tensor], torch.Tensor]
    source: str
    compiled: bool = False


class _Padded(nn.Module):
    """Runs ``model`` on batches of exactly ``size`` images (the last one padded, its outputs cut off).

    So the sanity check of a compiled model (``dynamic=False``) reuses the graph compiled for the
    largest timed batch size instead of compiling two more for 1,000 = 3 x 256 + 232 images.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], size: int) -> None:
        super().__init__()
        self.inner = model
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if n < self.size:
            x = torch.cat([x, x[:1].expand(self.size - n, *x.shape[1:])]).contiguous(memory_format=torch.channels_last)
        return self.inner(x)[:n]

    def train(self, mode: bool = True) -> _Padded:
        """A no-op: every model here is in eval mode already, and ``eval()`` on a loaded ``.pt2`` module
        re-exports its graph, which resets dynamo and throws away every graph compiled so far."""
        return self


def build_files(model: nn.Module, calib: BatchLoader, engine: str, folder: Path, methods: list[str],
                legacy: list[Timed]) -> list[Path]:
    """Each method's ``.int8.pt2`` and ``.int8.pt2pack``, written with manifests into ``folder``; ``legacy`` gets
    the manual qparams on the ``torch.ao.nn.quantized`` model that shipped before, to compare against."""
    reduce = effective_reduce_range(engine, True)
    paths = []
    for method in methods:
        why = unsupported(method, (WEIGHT_SCHEME,), engine, (1.0,), ("min",))
        if why:
            click.echo(f"skipping {method}: {why}")
            continue
        b = BACKENDS[method]
        t0 = time.perf_counter()
        with quiet():
            cal = b.calibrate(model, calib, CPU, OBSERVER, reduce, engine, (WEIGHT_SCHEME,))
            built = b.build(cal, next(b.variants((WEIGHT_SCHEME,), (1.0,), ("min",))))
            if method == "manual":
                folded, ranges = cal.state
                qparams = derive_qparams(ranges, 1.0, "min", activation_range(reduce))
                legacy.append(Timed("manual legacy eager", build_int8(folded, qparams, WEIGHT_SCHEME),
                                    "torch.ao.nn.quantized modules, in memory"))
        for suffix, data in (("pt2", built.pt2()), ("pt2pack", built.packed())):
            path = folder / f"{method}-{OBSERVER}-{WEIGHT_SCHEME}-c{len(calib.x)}.int8.{suffix}"
            write_artifact(path, data, {"kind": f"int8-{suffix}", "expected_top1": None, "engine": engine,
                                        "activation_bits": 7 if reduce else 8, "written_by": "bench/int8_speed.py"})
            paths.append(path)
        click.echo(f"built {method} ({time.perf_counter() - t0:.1f} s)", err=True)
    return paths


def compiled(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile``, one graph per batch size, built at its first call (under main's freezing patch)."""
    return torch.compile(model, dynamic=False)


def _label(path: Path) -> str:
    """``pt2e-minmax-per_channel-c500 .pt2pack`` of ``pt2e-minmax-per_channel-c500.int8.pt2pack``."""
    return f"{path.name.removesuffix(path.suffix).removesuffix('.int8')} {path.suffix}"


def _rate(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seconds: float) -> float:
    """Images/s of repeated forward passes over ``x`` for at least ``seconds`` (after one untimed pass)."""
    model(x)
    n, t0 = 0, time.perf_counter()
    while True:
        model(x)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n * len(x) / elapsed


def _file(path: Path) -> str:
    return f"{path.name}, {path.stat().st_size / 1000:,.1f} kB"


@click.command()
@click.option("--weights", envvar="COMPRESS_WEIGHTS", default="", help="float weights; default $COMPRESS_WEIGHTS")
@click.option("--data-root", envvar="COMPRESS_DATA", default="", help="CIFAR-10 root; default $COMPRESS_DATA")
@click.option("--model", "model_name", default="resnet20a", show_default=True)
@click.option("--engine", default="x86", show_default=True,
              help="quantized kernels the built files are packed for: x86, fbgemm, qnnpack (a packed file "
                   "loaded from --run-export-dir uses its own)")
@click.option("--batch-sizes", default="1,32,256", show_default=True)
@click.option("--calib-images", default=500, show_default=True, help="training images for the MinMax ranges")
@click.option("--seconds", default=1.0, show_default=True, help="minimum time per measurement")
@click.option("--repeats", default=5, show_default=True, help="measurements per (model, batch size); median counts")
@click.option("--threads", default=0, show_default=True, help="torch intra-op threads (0: torch's default)")
@click.option("--run-export-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="time the *.int8.pt2 and *.int8.pt2pack files in this folder instead of building new ones")
@click.option("--methods", default="manual,pt2e", show_default=True, help="backends whose files are built")
@click.option("--keep-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write the built files here (kept) instead of a temporary folder")
@click.option("--no-compile", is_flag=True, help="skip the torch.compile rows (about 30-60 s of compiling each)")
def main(weights: str, data_root: str, model_name: str, engine: str, batch_sizes: str, calib_images: int,
         seconds: float, repeats: int, threads: int, run_export_dir: Path | None, methods: str, keep_dir: Path | None,
         no_compile: bool) -> None:
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter(f"{batch_sizes!r}: give whole numbers separated by commas",
                                 param_hint="--batch-sizes") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{batch_sizes!r}: batch sizes must be 1 or more", param_hint="--batch-sizes")
    if repeats < 1 or seconds <= 0:
        raise click.UsageError(f"--repeats {repeats} and --seconds {seconds} must be positive")
    if run_export_dir is not None and keep_dir is not None:
        raise click.UsageError("--keep-dir keeps files this script builds; with --run-export-dir it builds none")
    load = os.getloadavg()[0]  # before this script adds its own: other processes' share of the CPUs
    if threads:
        torch.set_num_threads(threads)
    try:
        set_engine(engine)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    files: list[Path] = []
    if run_export_dir is not None:
        files = sorted(run_export_dir.glob("*.int8.pt2")) + sorted(run_export_dir.glob("*.int8.pt2pack"))
        if not files:
            raise click.UsageError(f"{run_export_dir}: no *.int8.pt2 or *.int8.pt2pack files")

    try:
        data = load_cifar10(data_root or None)
        pool = data.test_x
    except DataError:
        click.echo("no CIFAR-10 found: random images, no top-1 check")
        data = None
        pool = (torch.rand(max(calib_images, *sizes), 3, 32, 32) * 255).to(torch.uint8)

    float_file = run_export_dir / FLOAT_FILE if run_export_dir is not None else None
    if float_file is not None and float_file.is_file():
        float_model, float_src = load_artifact(float_file), _file(float_file)
    else:
        float_model = load_model(model_name, weights or None).eval()
        kb = float_bytes(float_model) / 1000  # what its packed file would hold, less the header
        float_src = (f"{model_name} from {Path(weights).name if weights else 'random init (no --weights)'}, "
                     f"in memory ({kb:,.1f} kB of float32 parameters)")

    legacy: list[Timed] = []
    with contextlib.ExitStack() as stack:
        if run_export_dir is None:
            folder = keep_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="int8_speed-")))
            folder.mkdir(parents=True, exist_ok=True)
            if data is not None:
                calib = BatchLoader(data.train_x[:calib_images], data.train_y[:calib_images], 100)
            else:
                calib = BatchLoader(pool[:calib_images], torch.zeros(calib_images, dtype=torch.long), 100)
            files = build_files(float_model, calib, engine, folder, methods.split(","), legacy)
        timed = _load_all(float_model, float_src, files, no_compile) + legacy
        # read when a graph compiles (each model's first call at a batch size), so it spans every call
        stack.enter_context(torch._inductor.config.patch(freezing=True))
        _report(timed, sizes, seconds, repeats, data, pool, engine, load)


def _load_all(float_model: nn.Module, float_src: str, files: list[Path], no_compile: bool) -> list[Timed]:
    """The models to time, every int8 one loaded back from its file (sha256 checked against its manifest)."""
    float_model = float_model.to(memory_format=torch.channels_last)  # oneDNN's preferred layout for float convs
    timed = [Timed("float eager", float_model, float_src)]
    if not no_compile:
        timed.append(Timed("float compiled", compiled(float_model), "torch.compile of float eager", True))
    for path in files:
        with quiet():
            module = load_artifact(path)
        expected = read_manifest(path).get("expected_top1")
        note = f" (its manifest: top-1 {expected:.2f}%)" if expected is not None else ""
        timed.append(Timed(f"{_label(path)} eager", module, _file(path) + note))
        if not no_compile:
            timed.append(Timed(f"{_label(path)} compiled", compiled(module), f"torch.compile of {_file(path)}", True))
    return timed


def _report(timed: list[Timed], sizes: list[int], seconds: float, repeats: int, data: Cifar10 | None,
            pool: torch.Tensor, engine: str, load: float) -> None:
    """Print the machine, the models (file, size, top-1), then the table of medians and ratios."""
    import torchao

    click.echo(cpu_line())
    click.echo(f"torch {torch.__version__}, torchao {torchao.__version__}, {torch.get_num_threads()} thread(s), "
               f"quantized engine {torch.backends.quantized.engine} (built files: {engine}); median of {repeats} "
               f"x >= {seconds:g} s per figure")
    busy = "; other processes are busy: figures will be low and noisy" if load >= 0.5 else ""
    click.echo(f"load average {load:.2f} (1 min, before this run) on {os.cpu_count()} CPU(s){busy}")
    width = max(len(t.name) for t in timed)
    # the sanity batch is the largest timed one, so compiled models reuse a graph they compile anyway
    check = None if data is None else BatchLoader(data.test_x[:SANITY_IMAGES], data.test_y[:SANITY_IMAGES], max(sizes))
    click.echo(f"{'model':<{width}}  {'top-1':>6}  file" if check is None else
               f"{'model':<{width}}  {'top-1':>6}  file (top-1 on the first {SANITY_IMAGES:,} test images)")
    for t in list(timed):
        top1 = "-"
        if check is not None:
            ev = _guarded(t, timed, functools.partial(evaluate, _Padded(t.model, max(sizes)), check, CPU,
                                                      progress=False))
            if ev is None:
                continue
            top1 = f"{ev.top1:.2f}%"
        click.echo(f"{t.name:<{width}}  {top1:>6}  {t.source}")
    click.echo()

    head = f"{'batch':>5}  {'model':<{width}}  {'img/s':>9}  {'vs float eager':>14}"
    lines = [head, "-" * len(head)]
    for bs in sizes:
        x = pool if len(pool) >= bs else torch.randint(0, 256, (bs, 3, 32, 32), dtype=torch.uint8)
        x = x[:bs].float().div(255).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for t in list(timed):  # compiles each compiled model for this batch size, outside the timing
                t0 = time.perf_counter()
                if _guarded(t, timed, functools.partial(t.model, x)) is not None and t.compiled:
                    click.echo(f"batch {bs}: {t.name} ready in {time.perf_counter() - t0:.1f} s", err=True)
            rates: dict[str, list[float]] = {t.name: [] for t in timed}
            with quiet():
                for _ in range(repeats):
                    for t in timed:
                        rates[t.name].append(_rate(t.model, x, seconds))
        base = statistics.median(rates[timed[0].name])
        for t in timed:
            r = statistics.median(rates[t.name])
            lines.append(f"{bs:>5}  {t.name:<{width}}  {r:>9,.0f}  {r / base:>13.2f}x")
        lines.append("")
    click.echo("\n".join(lines).rstrip())


def _guarded(t: Timed, timed: list[Timed], call: Callable[[], object]) -> object | None:
    """``call()``; if a compiled model fails (inductor errors are long), drop its row and say why in one line."""
    # compiling says two irrelevant things (torch 2.14): a CUDA build looking for a CUDA runtime on a CPU-only
    # machine, and inductor's oneDNN lowering warning about its own torch.tensor(tensor) call
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    try:
        cpp_log.setLevel(logging.ERROR)
        with quiet(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            return call()
    except Exception as e:  # any compile failure: the other rows are still worth timing
        if not t.compiled:
            raise
        timed.remove(t)
        click.echo(f"  {t.name}: dropped, it did not compile ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return None
    finally:
        cpp_log.setLevel(level)


if __name__ == "__main__":
    main()
