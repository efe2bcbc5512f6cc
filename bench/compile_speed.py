"""Training images/s eager against ``torch.compile``, with and without a distillation teacher.

    nice -n 5 .venv/bin/python bench/compile_speed.py --batches 30 --repeats 5

Times ``compress.loops.train_one_epoch`` (the loop every prune/train job runs) over ``--batches``
pre-made random batches of 3x32x32 images already on the device, so only the model's steps are
measured: forward, backward, AdamW step and the pruning masks' multiply after each step (a 50%-sparse
mask set, as in a prune phase). Four modes: eager, compiled (``compress.loops.compiled``, what
``--compile on`` runs), and both with a teacher (``--kd-weight``: a second resnet20a forward per step).
Each mode's compile and first step (warm-up) are timed apart and not counted; then ``--repeats``
timed runs, interleaved, and the median counts. Prints the CPU's instruction sets (speed depends on
them). Where it runs: ``--device`` (``auto``: CUDA when visible, else CPU).
"""

from __future__ import annotations

import statistics
import time

import click
import torch
from machine import cpu_line

from compress.loops import build_optimizer, compiled, pick_device, train_one_epoch
from compress.models import build_model
from compress.prune import global_magnitude_masks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@click.command()
@click.option("--batches", default=30, show_default=True, help="training batches per timed run")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--repeats", default=5, show_default=True, help="timed runs per mode, interleaved; the median counts")
@click.option("--device", "device_name", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--threads", default=0, show_default=True, help="torch intra-op threads (0: torch's default)")
def main(batches: int, batch_size: int, repeats: int, device_name: str, threads: int) -> None:
    """Print images/s of training steps eager and compiled, with and without a teacher, and the speed-up."""
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(device_name)
    torch.manual_seed(0)
    x = torch.rand(batches * batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batches * batch_size,), device=device)
    data = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
    modes = {}
    for compile_on in (False, True):
        for kd in (False, True):
            model = build_model("resnet20a").to(device, memory_format=torch.channels_last)
            masks = global_magnitude_masks(model, 0.5)
            teacher = build_model("resnet20a").to(device, memory_format=torch.channels_last).eval() if kd else None
            net = compiled(model, compile_on)
            teacher_net = compiled(teacher, compile_on) if teacher is not None else None
            opt = build_optimizer("adamw", model.parameters(), 1e-3, 5e-4)

            def run(batches_: list, net=net, model=model, masks=masks, teacher_net=teacher_net, opt=opt) -> float:
                _sync(device)
                t0 = time.perf_counter()
                train_one_epoch(net, batches_, opt, None, device, after_step=lambda: masks.apply(model),
                                teacher=teacher_net, kd_weight=0.5 if teacher_net is not None else 0.0,
                                progress=False)
                _sync(device)
                return time.perf_counter() - t0

            first = run(data[:1])
            name = ("compiled" if compile_on else "eager") + (" + teacher" if kd else "")
            modes[name] = (run, first)
            print(f"{name}: first step (compile included) {first:.1f} s", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, (run, _) in modes.items():
            rates[name].append(len(x) / run(data))
    print(cpu_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, batch {batch_size}, "
          f"{batches} batches a run, median of {repeats}")
    med = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in med.items():
        print(f"  {name:<20} {rate:8.1f} img/s   (runs: {', '.join(f'{r:.0f}' for r in rates[name])})")
    print(f"speed-up: {med['compiled'] / med['eager']:.2f}x without a teacher, "
          f"{med['compiled + teacher'] / med['eager + teacher']:.2f}x with one")


if __name__ == "__main__":
    main()
