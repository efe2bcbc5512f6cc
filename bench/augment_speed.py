"""What RandAugment costs a training run: torchvision image by image (the old loader) against batched.

    COMPRESS_DATA=../shared/data nice -n 5 .venv/bin/python bench/augment_speed.py --seconds 20

Feeds ``compress.loops.train_one_epoch`` (resnet20a, forward, backward and AdamW step; batch 128 of
the real CIFAR-10 training set) from four loaders:

- ``per-image, off``: the loader as it was: crop offsets and flips drawn per batch on the CPU and
  copied to the device three times a batch (kept below, in this script only, for the comparison);
- ``per-image, on``: the same plus torchvision's ``v2.RandAugment()`` image by image (``torch.stack``
  of a Python loop), seeded through ``fork_rng``;
- ``batched, off`` and ``batched, on``: ``compress.data.BatchLoader``, every draw of the epoch made
  once and copied once, RandAugment applied to groups of images that drew the same op.

A run stops after ``--batches`` batches or ``--seconds``, whichever comes first (on a 2-core CPU a
batch of 128 takes about a second, so the budget decides there); runs are interleaved across the
modes and the median of ``--repeats`` runs counts. RandAugment's cost is the throughput it takes
away, ``1 - rate(on) / rate(off)``: e.g. 120 img/s on against 150 off is 20%. Rates are given per
second of wall time and per second of this process's CPU time: on a CPU shared with other work the
wall-time figures follow the neighbours' load, the CPU-time ones much less (on a GPU, read wall
time). Each mode's loader alone (no model) is timed once too, which gives what RandAugment adds to
a batch in milliseconds, steadier than the end-to-end figures under load. The CPU's model and
instruction sets are printed with the figures.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import click
import torch
from machine import cpu_line

from compress.data import BatchLoader, load_cifar10, one_cpu_thread, to_unit_float
from compress.loops import build_optimizer, pick_device, train_one_epoch
from compress.models import build_model

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


# --- the per-image loader, as compress/data.py had it (for this comparison only) ---------------------

def _old_random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    idx = torch.arange(n, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)


def _old_augment(x: torch.Tensor, crop_pad: int, randaugment: Callable[[torch.Tensor], torch.Tensor] | None,
                 generator: torch.Generator) -> torch.Tensor:
    if crop_pad:
        x = _old_random_crop_flip(x, crop_pad, generator)
    if randaugment is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            x = torch.stack([randaugment(img) for img in x])
    return x


def old_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, randaugment: bool, seed: int,
                crop_pad: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One training epoch of the old ``BatchLoader`` over ``x``, ``y`` (already on the device)."""
    from torchvision.transforms import v2

    ra = v2.RandAugment() if randaugment else None
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g).to(x.device)
    for start in range(0, len(x), batch_size):
        with one_cpu_thread(x.device):
            idx = order[start:start + batch_size]
            xb = _old_augment(x[idx], crop_pad, ra, g)
            xf = to_unit_float(xb)
        yield xf, y[idx]


# --- timing ----------------------------------------------------------------------------------------

def _budget(batches: Batches, most: int, seconds: float) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """At most ``most`` batches, and none started after ``seconds``."""
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        if i >= most or time.perf_counter() - t0 > seconds:
            return
        yield batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@click.command()
@click.option("--data-root", default="", help="CIFAR-10 root; default $COMPRESS_DATA")
@click.option("--batches", default=300, show_default=True, help="most batches per timed run")
@click.option("--seconds", default=20.0, show_default=True, help="time budget per timed run")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--repeats", default=5, show_default=True, help="timed runs per mode, interleaved; the median counts")
@click.option("--device", "device_name", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--threads", default=0, show_default=True, help="torch intra-op threads (0: torch's default)")
def main(data_root: str, batches: int, seconds: float, batch_size: int, repeats: int, device_name: str,
         threads: int) -> None:
    """Print training images/s with RandAugment off and on, per image and batched, and what it costs."""
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(device_name)
    data = load_cifar10(data_root or None)
    torch.manual_seed(0)
    model = build_model("resnet20a").to(device, memory_format=torch.channels_last)
    opt = build_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=5e-4)
    x, y = data.train_x.to(device), data.train_y.to(device)
    epochs = itertools.count()

    def per_image(ra: bool) -> Callable[[], Batches]:
        return lambda: old_batches(x, y, batch_size, ra, seed=next(epochs))

    def batched(ra: bool) -> Callable[[], Batches]:
        ld = BatchLoader(x, y, batch_size, device, train=True, randaugment=ra, seed=0)

        def make() -> Batches:
            ld.set_epoch(next(epochs))
            return ld

        return make

    modes = {"per-image, off": per_image(False), "per-image, on": per_image(True),
             "batched, off": batched(False), "batched, on": batched(True)}
    click.echo(cpu_line())
    click.echo(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
               f"resnet20a, batch {batch_size}, runs of at most {batches} batches or {seconds:g} s, "
               f"{repeats} runs per mode (median)")
    warm = [(xb, yb) for xb, yb in itertools.islice(modes["batched, off"](), 2)]
    train_one_epoch(model, warm, opt, None, device, progress=False)  # allocator, kernels
    rates: dict[str, list[float]] = {m: [] for m in modes}       # images per second of wall time
    cpu_rates: dict[str, list[float]] = {m: [] for m in modes}   # images per second of this process's CPU time
    for _ in range(repeats):
        for mode, make in modes.items():
            cpu0 = time.process_time()
            st = train_one_epoch(model, _budget(make(), batches, seconds), opt, None, device, progress=False)
            rates[mode].append(st.images / st.seconds)
            cpu_rates[mode].append(st.images / (time.process_time() - cpu0))
    alone: dict[str, float] = {}
    for mode, make in modes.items():
        _sync(device)
        t0 = time.perf_counter()
        n = sum(len(yb) for _, yb in _budget(make(), batches, seconds))
        _sync(device)
        alone[mode] = n / (time.perf_counter() - t0)

    click.echo(f"{'mode':<16} {'train img/s':>12} {'(min..max)':>14} {'img/CPU-s':>10} {'(min..max)':>14} "
               f"{'loader alone img/s':>19}")
    for mode, r in rates.items():
        c = cpu_rates[mode]
        click.echo(f"{mode:<16} {statistics.median(r):>12.1f} {f'({min(r):.0f}..{max(r):.0f})':>14} "
                   f"{statistics.median(c):>10.1f} {f'({min(c):.0f}..{max(c):.0f})':>14} {alone[mode]:>19,.0f}")
    for method in ("per-image", "batched"):
        cost = []
        for clock, table in (("wall", rates), ("CPU", cpu_rates)):
            off, on = statistics.median(table[f"{method}, off"]), statistics.median(table[f"{method}, on"])
            cost.append(f"{100 * (1 - on / off):.1f}% by {clock} time ({off:.1f} -> {on:.1f})")
        click.echo(f"RandAugment {method} costs training throughput {', '.join(cost)}")
        # the loaders alone: what RandAugment adds to each batch, against a training step of the off mode
        added = batch_size / alone[f"{method}, on"] - batch_size / alone[f"{method}, off"]
        step = batch_size / statistics.median(rates[f"{method}, off"])
        click.echo(f"  loader alone: +{1000 * added:.1f} ms a batch, {100 * added / step:.1f}% of a "
                   f"{1000 * step:.0f} ms training step")


if __name__ == "__main__":
    main()
