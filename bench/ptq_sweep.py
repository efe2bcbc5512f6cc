"""What the alpha table costs: one calibration shared by 12 configurations, against 12 independent runs.

    COMPRESS_DATA=../shared/data COMPRESS_WEIGHTS=../shared/weights/resnet20-12fca82f.th \\
        nice -n 5 .venv/bin/python bench/ptq_sweep.py --calib-size 10000

Runs the PTQ job function (``jobs.ptq.run_ptq``, hand-written path, MinMax) two ways over the grid
alphas 0.95..1.00 step 0.01 x centers {min, zero} (12 configurations):

- ``sweep``: one task holding all 12: one float evaluation, one calibration, 12 int8 builds and
  evaluations (what ``python -m jobs.launch ptq --alphas 0.95:1.0:0.01 --centers min,zero`` runs);
- ``independent``: 12 tasks of one configuration each, every one calibrating on its own.

Prints both wall times and their ratio, e.g. 60 s against 290 s is 4.8x, with the time split of
the sweep (calibration vs int8 evaluation), and checks that both ways give the same int8 top-1 for
every configuration (the statistics are the same; only the work is shared). ``--independent 3``
times 3 of the 12 and scales by 4 (the runs cost the same), to save time. Also prints the alpha table.
Where it runs: calibration and the float evaluation on ``--device``; int8 evaluation on the CPU.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import click

from jobs.ptq import format_rows, run_ptq
from jobs.specs import PTQSpec, expand_ranges


@click.command()
@click.option("--weights", envvar="COMPRESS_WEIGHTS", default="", help="float weights; default $COMPRESS_WEIGHTS")
@click.option("--data-root", envvar="COMPRESS_DATA", default="", help="CIFAR-10 root; default $COMPRESS_DATA")
@click.option("--calib-size", default=10_000, show_default=True)
@click.option("--test-size", default=0, show_default=True, help="first N test images (0: all 10,000)")
@click.option("--observer", default="minmax", show_default=True)
@click.option("--alphas", default="0.95:1.0:0.01", show_default=True)
@click.option("--centers", default="min,zero", show_default=True)
@click.option("--independent", default=0, show_default=True,
              help="independent runs to time (0: one per configuration); the total is scaled to all")
@click.option("--device", default="auto", show_default=True)
def main(weights: str, data_root: str, calib_size: int, test_size: int, observer: str, alphas: str, centers: str,
         independent: int, device: str) -> None:
    grid_alphas = tuple(float(a) for a in expand_ranges(alphas).split(","))
    grid_centers = tuple(c for c in centers.split(",") if c)
    configs = [(a, c) for a in grid_alphas for c in grid_centers]
    with tempfile.TemporaryDirectory(prefix="ptq-bench-") as tmp:
        spec = PTQSpec(weights=weights, data_root=data_root, results=tmp, run_id="sweep", device=device,
                       methods=("manual",), observers=(observer,), calib_sizes=(calib_size,), alphas=grid_alphas,
                       centers=grid_centers, test_size=test_size)
        t0 = time.perf_counter()
        sweep = run_ptq(spec)
        sweep_s = time.perf_counter() - t0
        rows = sweep["rows"]
        calib_s = rows[0]["calib_seconds"]
        eval_s = sum(r["eval_seconds"] for r in rows)

        n = independent or len(configs)
        picked = configs[:: max(1, len(configs) // n)][:n]
        single: dict[tuple[float, str], float] = {}
        t0 = time.perf_counter()
        for i, (a, c) in enumerate(picked):
            one = dataclasses.replace(spec, run_id=f"single{i}", alphas=(a,), centers=(c,))
            single[(a, c)] = run_ptq(one)["rows"][0]["int8_top1"]
        indep_s = (time.perf_counter() - t0) * len(configs) / len(picked)

    same = all(single[(r["alpha"], r["center"])] == r["int8_top1"] for r in rows if (r["alpha"], r["center"]) in single)
    click.echo(format_rows(rows))
    click.echo("")
    click.echo(f"{len(configs)} configurations, calibration {calib_size:,} images ({observer}), "
               f"{rows[0]['float_top1']:.2f}% float on {test_size or 10_000:,} test images")
    click.echo(f"sweep (1 calibration):        {sweep_s:7.1f} s  (calibration {calib_s:.1f} s, "
               f"{len(rows)} int8 evaluations {eval_s:.1f} s)")
    scaled = "" if len(picked) == len(configs) else f"  ({len(picked)} timed, scaled to {len(configs)})"
    click.echo(f"independent ({len(configs)} calibrations): {indep_s:7.1f} s{scaled}")
    click.echo(f"ratio: {indep_s / sweep_s:.1f}x; same int8 top-1 per configuration: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
