"""Ray Tune's cost around a job: Ray start-up and per-trial overhead against the bare job time.

    python bench/tune_overhead.py --data-root ../shared/data --weights ../shared/weights/resnet20-12fca82f.th

Runs one small PTQ task (hand-written path, a 1,000-image calibration, 2,000 test images) bare,
N times in this process, then as an N-trial Ray search with one trial at a time, and prints the
Ray start time, the search's wall time and (search - N x bare) / N as the per-trial overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

from jobs.ptq import run_ptq_sweep
from jobs.specs import PTQSpec, TuneSpec
from sweeps.search import run_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--trials", type=int, default=4)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="tune-overhead-")
    base = PTQSpec(weights=args.weights, data_root=args.data_root, results=root, methods=("manual",),
                   calib_sizes=(1000,), test_size=2000).with_defaults()
    alphas = [round(0.96 + 0.01 * i, 2) for i in range(args.trials)]
    bare = []
    for i, a in enumerate(alphas):
        t0 = time.perf_counter()
        run_ptq_sweep(dataclasses.replace(base, alphas=(a,), run_id=f"bare-{i}"))
        bare.append(time.perf_counter() - t0)
    tune_spec = TuneSpec(space=(f"alphas=grid:{','.join(map(str, alphas))}",), num_samples=1, max_concurrent=1,
                         searcher="grid", scheduler="fifo", search_id="overhead")
    t0 = time.perf_counter()
    summary = run_search("ptq", base, tune_spec)
    total = time.perf_counter() - t0
    per_bare = statistics.median(bare)
    print(f"bare job: median {per_bare:.1f} s over {len(bare)} runs ({', '.join(f'{b:.1f}' for b in bare)})")
    print(f"ray start: {summary['ray_start_seconds']:.1f} s")
    print(f"search of {args.trials} trials, one at a time: {summary['search_seconds']:.1f} s "
          f"(whole call {total:.1f} s)")
    print(f"per-trial overhead: {(summary['search_seconds'] - args.trials * per_bare) / args.trials:.1f} s "
          f"on a {per_bare:.1f} s job")


if __name__ == "__main__":
    main()
