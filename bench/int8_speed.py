"""Inference speed of the int8 ResNet against the float one on this CPU, at several batch sizes.

    COMPRESS_DATA=../shared/data COMPRESS_WEIGHTS=../shared/weights/resnet20-12fca82f.th \\
        nice -n 5 .venv/bin/python bench/int8_speed.py --batch-sizes 1,32,256

Builds the hand-written int8 model (``compress.quant.int8``, MinMax calibration over
``--calib-images`` training images) and times, for each batch size, a forward pass of the float
model (float32, channels_last, ``torch.no_grad``) and of the int8 model (uint8 activations, int8
weights, ``--engine`` kernels) on the same batch. Prints images/s of each and the ratio, e.g.
2,000 img/s float and 9,000 img/s int8 at batch 256 is 4.5x. Each measurement is the best of
``--repeats`` runs of at least ``--seconds`` seconds, interleaved, so a burst of load from another
process does not decide it. Weights and data only set realistic activation ranges (the speed does
not depend on them): without them, a fresh model and random images are used.
Where it runs: everything on the CPU (int8 kernels are CPU-only; the float model is timed there too).
"""

from __future__ import annotations

import time

import click
import torch

from compress.data import BatchLoader, DataError, load_cifar10
from compress.loops import evaluate
from compress.models import load_model
from compress.quant import quiet
from compress.quant.fold import fold_model
from compress.quant.int8 import build_int8, derive_qparams, effective_reduce_range, set_engine
from compress.quant.observe import calibrate, quant_sites
from compress.quant.qparams import activation_range

CPU = torch.device("cpu")


@torch.no_grad()
def _rate(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> float:
    """Images/s of repeated forward passes over ``x`` for at least ``seconds`` (after one warm-up pass)."""
    model(x)
    n, t0 = 0, time.perf_counter()
    while True:
        model(x)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n * len(x) / elapsed


@click.command()
@click.option("--weights", envvar="COMPRESS_WEIGHTS", default="", help="float weights; default $COMPRESS_WEIGHTS")
@click.option("--data-root", envvar="COMPRESS_DATA", default="", help="CIFAR-10 root; default $COMPRESS_DATA")
@click.option("--model", "model_name", default="resnet20a", show_default=True)
@click.option("--engine", default="x86", show_default=True, help="quantized kernels: x86, fbgemm, qnnpack")
@click.option("--batch-sizes", default="1,32,256", show_default=True)
@click.option("--calib-images", default=500, show_default=True, help="training images for the MinMax ranges")
@click.option("--seconds", default=2.0, show_default=True, help="minimum time per measurement")
@click.option("--repeats", default=3, show_default=True, help="measurements per (model, batch size); best counts")
@click.option("--threads", default=0, show_default=True, help="torch intra-op threads (0: torch's default)")
def main(weights: str, data_root: str, model_name: str, engine: str, batch_sizes: str, calib_images: int,
         seconds: float, repeats: int, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    set_engine(engine)
    sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    model = load_model(model_name, weights or None).eval()
    try:
        data = load_cifar10(data_root or None)
        calib_x, calib_y, pool = data.train_x[:calib_images], data.train_y[:calib_images], data.test_x
    except DataError:
        click.echo("no CIFAR-10 found: random images")
        data = None
        calib_x = (torch.rand(max(calib_images, max(sizes)), 3, 32, 32) * 255).to(torch.uint8)
        calib_y, pool = torch.zeros(len(calib_x), dtype=torch.long), calib_x
    folded = fold_model(model)
    qr = activation_range(effective_reduce_range(engine, True))
    cal = calibrate(folded, BatchLoader(calib_x, calib_y, 100), CPU, "minmax", quant_sites(folded))
    int8_model = build_int8(folded, derive_qparams(cal.ranges(qr), qr=qr))
    float_model = model.to(memory_format=torch.channels_last)
    sanity = ""
    if weights and data is not None:
        with quiet():
            ev = evaluate(int8_model, BatchLoader(data.test_x[:1000], data.test_y[:1000], 500), CPU)
        sanity = f"; int8 top-1 on 1,000 test images {ev.top1:.2f}% (sanity check)"
    click.echo(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), engine {engine}, "
               f"{7 if qr.qmax == 127 else 8}-bit activations{sanity}")
    click.echo(f"{'batch':>6} {'float img/s':>12} {'int8 img/s':>11} {'int8/float':>11}")
    for bs in sizes:
        x = pool[:bs].float().div(255).contiguous(memory_format=torch.channels_last)
        best_f = best_q = 0.0
        with quiet():
            for _ in range(repeats):
                best_f = max(best_f, _rate(float_model, x, seconds))
                best_q = max(best_q, _rate(int8_model, x, seconds))
        click.echo(f"{bs:>6} {best_f:>12,.0f} {best_q:>11,.0f} {best_q / best_f:>10.2f}x")


if __name__ == "__main__":
    main()
