"""Throughput of channel-pruned models against the dense one, float eager, float compiled and pt2e int8 compiled.

    COMPRESS_WEIGHTS=../shared/weights/resnet20-12fca82f.th nice -n 5 .venv/bin/python bench/channel_speed.py \\
        --targets 0.5,0.333 --batch-sizes 1,32,256
    # the finished runs' own models instead (a channel-pruned run's final.pt rebuilds its widths)
    .venv/bin/python bench/channel_speed.py --checkpoint results/runs/ch50-s0/final.pt ...

Speed depends on the widths, not on the weights' values, so by default each target model is made here
from ``--weights`` by one channel-pruning step (``compress.channels``, l1 importance, the model's default
kept layers), without retraining; ``--checkpoint`` (repeatable) times the models a run saved instead.
Every model is timed as:

- ``float eager``: float32, channels_last, ``torch.no_grad``;
- ``float compiled``: ``torch.compile`` (inductor, freezing on);
- ``int8 compiled``: the model quantized by the pt2e backend (MinMax over ``--calib-images`` training
  images, or random images) and compiled with the oneDNN int8 lowering (``pt2pack.compile_int8``).

With ``--device cuda`` the same models run on the GPU in bf16 autocast, eager and compiled (no int8
rows: the int8 kernels are CPU-only); ``bench/gpu_check.sh`` runs it so when a GPU is lent.

Each figure is the median of ``--repeats`` measurements of at least ``--seconds`` each, models
interleaved within a repeat; ratios are to the dense eager model measured in the same run. The
CPU's instruction sets and the load average are printed first: a CPU without VNNI gains less from int8.
Where it runs: the CPU, or ``--device``.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch
from machine import cpu_line

from compress import channels, registry
from compress.data import BatchLoader, DataError, load_cifar10
from compress.quant import pt2pack, quiet
from compress.quant.backends import BACKENDS

CPU = torch.device("cpu")


def _rate(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seconds: float) -> float:
    model(x)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        model(x)
        n += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n * len(x) / elapsed


def _int8(model: torch.nn.Module, calib: BatchLoader) -> torch.nn.Module:
    backend = BACKENDS["pt2e"]
    with quiet():
        cal = backend.calibrate(model, calib, CPU, "minmax", True, "x86")
        built = backend.build(cal, next(backend.variants(("per_channel",), (1.0,), ("min",))))
        return pt2pack.compile_int8(pt2pack.load(built.packed()))


def _autocast(model: Callable[[torch.Tensor], torch.Tensor], on: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on):
            return model(x)
    return run


@click.command()
@click.option("--weights", envvar="COMPRESS_WEIGHTS", default="", help="dense weights; default $COMPRESS_WEIGHTS")
@click.option("--data-root", envvar="COMPRESS_DATA", default="", help="CIFAR-10 root for calibration images")
@click.option("--model", "model_name", default="resnet20a", show_default=True)
@click.option("--targets", default="0.5,0.333", show_default=True,
              help="MACs fractions of the dense model to prune to, one model each")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="a run's final.pt to time instead of pruning here (repeatable)")
@click.option("--batch-sizes", default="1,32,256", show_default=True)
@click.option("--calib-images", default=500, show_default=True)
@click.option("--seconds", default=1.0, show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--no-int8", is_flag=True, help="skip the int8 rows")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda: bf16 autocast, no int8 rows")
def main(weights: str, data_root: str, model_name: str, targets: str, checkpoints: tuple[Path, ...],
         batch_sizes: str, calib_images: int, seconds: float, repeats: int, no_int8: bool, device: str) -> None:
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    load = os.getloadavg()[0]
    sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    dense = registry.load(model_name, "", weights or None).eval()
    shape = tuple(dense.input_shape)
    base = channels.count(dense, shape)
    models = [("dense", dense)]
    if checkpoints:
        for path in checkpoints:
            models.append((path.parent.name, registry.load(model_name, "", path).eval()))
    else:
        for t in (float(v) for v in targets.split(",") if v.strip()):
            m = copy.deepcopy(dense)
            channels.prune_channels(m, shape, t, base, "l1", keep=channels.default_keep(m))
            models.append((f"channels {t:g}", m))
    try:
        data = load_cifar10(data_root or None)
        calib = BatchLoader(data.train_x[:calib_images], data.train_y[:calib_images], 100)
    except DataError:
        x = (torch.rand(calib_images, *shape) * 255).to(torch.uint8)
        calib = BatchLoader(x, torch.zeros(calib_images, dtype=torch.long), 100)

    torch._inductor.config.freezing = True
    timed: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = []
    click.echo(cpu_line())
    where = torch.cuda.get_device_name(dev) + ", bf16 autocast" if gpu else f"{torch.get_num_threads()} thread(s)"
    click.echo(f"torch {torch.__version__}, {where}; load average {load:.2f} before this run; median of {repeats} "
               f"x >= {seconds:g} s per figure")
    for name, m in models:
        c = channels.count(m, shape)
        click.echo(f"{name:<16} {c.macs / 1e6:7.2f} M MACs ({c.macs / base.macs:.3f} of dense), "
                   f"{c.params:,} params")
        if not (no_int8 or gpu):  # from the CPU model, before it moves
            timed_int8 = (name, "int8 compiled", _int8(m, calib))
        m = m.to(dev, memory_format=torch.channels_last)
        label = "bf16" if gpu else "float"
        timed.append((name, f"{label} eager", _autocast(m, gpu)))
        timed.append((name, f"{label} compiled", _autocast(torch.compile(m, dynamic=False), gpu)))
        if not (no_int8 or gpu):
            timed.append(timed_int8)
    lines = [f"{'batch':>5}  {'model':<16} {'runs as':<15} {'img/s':>9}  {'vs dense eager':>20}"]
    for bs in sizes:
        x = torch.rand(bs, *shape, device=dev).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), quiet():
            for _, _, f in timed:  # compiles each for this batch size, outside the timing
                f(x)
            rates: dict[int, list[float]] = {i: [] for i in range(len(timed))}
            for _ in range(repeats):
                for i, (_, _, f) in enumerate(timed):
                    rates[i].append(_rate(f, x, seconds))
        ref = statistics.median(rates[0])
        for i, (name, how, _) in enumerate(timed):
            r = statistics.median(rates[i])
            lines.append(f"{bs:>5}  {name:<16} {how:<15} {r:>9,.0f}  {r / ref:>19.2f}x")
        lines.append("")
    click.echo("\n".join(lines).rstrip())


if __name__ == "__main__":
    main()
