"""Training throughput: the real data pipeline against pre-made batches, and what the pipeline costs.

    COMPRESS_DATA=../shared/data nice -n 5 .venv/bin/python bench/train_throughput.py --batches 100

Runs ``compress.loops.train_one_epoch`` (the one training loop) over ``--batches`` batches of the
real CIFAR-10 training set, fed three ways:

- ``bare``: pre-made float batches already on the device (no indexing, augmentation or conversion);
- ``crop+flip``: ``BatchLoader`` as the jobs use it (shuffle, 4-pixel crop, flip, uint8 -> float);
- ``crop+flip+randaugment``: the same plus RandAugment on whole batches, each image its own ops (the
  ``--randaugment`` default).

and prints images/s of each and the pipeline overhead, ``(bare rate / pipeline rate - 1) * 100``:
e.g. 520 img/s bare and 480 img/s with crop+flip is 8.3%. The loaders alone (no training) are timed
too: their "share" is the loader's time per batch over a bare training step (e.g. 4 ms against
340 ms is 1.2%), which says what the pipeline costs even when other processes make the end-to-end
figures jump. Every mode runs ``--repeats`` times, interleaved, and the best run counts.
Where it runs: everything on ``--device`` (``auto``: CUDA when visible, else CPU).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable

import click
import torch

from compress.data import BatchLoader, load_cifar10
from compress.loops import build_optimizer, pick_device, train_one_epoch
from compress.models import build_model

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loader_rate(make: Callable[[], Batches], device: torch.device, images: int) -> float:
    """Images/s of iterating the batches alone (no model)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in make():
        pass
    _sync(device)
    return images / (time.perf_counter() - t0)


@click.command()
@click.option("--data-root", default="", help="CIFAR-10 root; default $COMPRESS_DATA")
@click.option("--batches", default=100, show_default=True, help="batches per timed run (0: a whole epoch, 782)")
@click.option("--batch-size", default=64, show_default=True, help="training batch size (the spec default)")
@click.option("--device", "device_name", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--repeats", default=1, show_default=True, help="timed runs per mode, interleaved; the best counts")
@click.option("--randaugment/--no-randaugment", default=True, show_default=True, help="also time RandAugment")
@click.option("--threads", default=0, show_default=True, help="torch intra-op threads (0: torch's default)")
def main(data_root: str, batches: int, batch_size: int, device_name: str, repeats: int, randaugment: bool,
         threads: int) -> None:
    """Print images/s of training with and without the data pipeline, and its overhead in percent."""
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(device_name)
    data = load_cifar10(data_root or None)
    n_batches = batches or -(-len(data.train_x) // batch_size)
    images = min(n_batches * batch_size, len(data.train_x))
    torch.manual_seed(0)
    model = build_model("resnet20a").to(device, memory_format=torch.channels_last)
    opt = build_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=5e-4)

    x = data.train_x[:images].to(device)
    premade = [(xb.float().div(255).contiguous(memory_format=torch.channels_last), yb)
               for xb, yb in zip(x.split(batch_size), data.train_y[:images].to(device).split(batch_size),
                                 strict=True)]

    def loader(ra: bool) -> Callable[[], Batches]:
        ld = BatchLoader(data.train_x, data.train_y, batch_size, device, train=True, randaugment=ra, seed=0)
        epochs = itertools.count()

        def make() -> Batches:
            ld.set_epoch(next(epochs))
            return itertools.islice(ld, n_batches)

        return make

    modes: dict[str, Callable[[], Batches]] = {"bare": lambda: premade, "crop+flip": loader(False)}
    if randaugment:
        modes["crop+flip+randaugment"] = loader(True)

    click.echo(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
               f"batch {batch_size}, {n_batches} batches ({images:,} images) per run, {repeats} run(s) per mode")
    train_one_epoch(model, premade[:3], opt, None, device, progress=False)  # warm-up: allocator, kernels
    rates: dict[str, list[float]] = {m: [] for m in modes}
    loader_only: dict[str, float] = {}
    for _ in range(repeats):
        for mode, make in modes.items():
            st = train_one_epoch(model, make(), opt, None, device, progress=False, desc=mode)
            rates[mode].append(st.images / st.seconds)
    for mode, make in modes.items():
        if mode != "bare":
            loader_only[mode] = _loader_rate(make, device, images)

    bare = max(rates["bare"])
    click.echo(f"{'mode':<24} {'img/s':>8} {'ms/batch':>9} {'overhead':>9} {'loader img/s':>13} "
               f"{'loader ms/batch':>16} {'loader share':>13}")
    for mode, r in rates.items():
        best = max(r)
        line = f"{mode:<24} {best:>8.0f} {1000 * batch_size / best:>9.1f}"
        if mode != "bare":
            # share: the loader's own time per batch over a bare training step; immune to load bursts
            line += (f" {100 * (bare / best - 1):>8.1f}% {loader_only[mode]:>13,.0f} "
                     f"{1000 * batch_size / loader_only[mode]:>16.1f} {100 * bare / loader_only[mode]:>12.1f}%")
        if len(r) > 1:
            line += f"  (median {statistics.median(r):.0f} img/s)"
        click.echo(line)
    click.echo(f"pipeline overhead (crop+flip): {100 * (bare / max(rates['crop+flip']) - 1):.1f}% end to end, "
               f"{100 * bare / loader_only['crop+flip']:.1f}% loader share (goal: <= 10%)")


if __name__ == "__main__":
    main()
