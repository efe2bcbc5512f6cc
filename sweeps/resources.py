"""What each trial of a search asks Ray for, and what a search job asks SLURM for.

Each trial gets a share of what Ray has (``trial_resources``), so ``--max-concurrent`` trials run at
once: 1 CPU and 2 trials -> 0.5 CPU each; 1 GPU and 2 trials -> 0.5 GPU each. A trial that asks Ray
for no GPU sees none (Ray empties ``CUDA_VISIBLE_DEVICES``), so unless ``--device cpu`` the default
share of GPUs is never 0 where Ray has GPUs. Pure functions of the spec and Ray's per-node resources
(``ray.nodes()``), so they are checked without Ray.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from jobs.specs import TuneSpec, check

log = logging.getLogger(__name__)


def check_devices(device: str, tune_spec: TuneSpec) -> None:
    """The run's ``--device`` against ``--gpus-per-trial``, before anything starts.

    A trial sees only the GPUs Ray gives it, renumbered from ``cuda:0``: ``cuda`` with 0 GPUs per
    trial could never run, ``cuda:1`` never exists, and ``cpu`` with GPUs per trial holds GPUs idle.
    """
    kind, _, index = device.partition(":")
    gpus = tune_spec.gpus_per_trial
    check(kind != "cuda" or index in ("", "0"), "device", device,
          "a trial sees only the GPU(s) Ray gives it, from cuda:0; use --device cuda (or auto)")
    check(kind != "cuda" or gpus != 0, "gpus_per_trial", gpus,
          f"--device {device} trials need GPUs, and Ray hides every GPU from a trial that asks for none; "
          f"give a share (e.g. 0.5) or leave it out")
    check(kind != "cpu" or not gpus, "gpus_per_trial", gpus,
          "--device cpu trials use no GPU; leave it out, or use --device auto or cuda")



# Ray counts a resource in units of 1/10,000 (0.3333 GPU: 3 trials fit on one, 0.33333 is refused)
_UNIT = 10_000


def _units(amount: float) -> int:
    return round(amount * _UNIT)


def fits(nodes: Sequence[dict[str, float]], need: dict[str, float]) -> int:
    """How many trials that each ``need`` (e.g. {"CPU": 0.5, "GPU": 0}) fit at once on ``nodes`` (Ray's
    per-node resources); a trial runs on one node. E.g. one node {CPU: 1}, 0.5 CPU -> 2; {CPU: 4, GPU: 1},
    1 CPU and 0.5 GPU -> 2."""
    total = 0
    for node in nodes:
        counts = [_units(node.get(name, 0.0)) // _units(each) for name, each in need.items() if each > 0]
        total += min(counts) if counts else 0
    return total


def share(nodes: Sequence[dict[str, float]], resource: str, trials: int, most: int | None = None) -> float:
    """The largest amount of ``resource`` per trial with which ``trials`` trials fit at once on ``nodes``.

    Whole units down from the biggest node's (at most ``most``), then 1/2, 1/3... of one unit (to
    Ray's precision); 0.0 when no node has any. E.g. CPUs of one 16-CPU node, 3 trials -> 5.0; one
    1-CPU node, 2 trials -> 0.5; one node with 1 GPU, 3 trials -> 0.3333.
    """
    top = max((node.get(resource, 0.0) for node in nodes), default=0.0)
    if top <= 0:
        return 0.0
    for whole in range(min(int(top), most or int(top)), 0, -1):
        if fits(nodes, {resource: whole}) >= trials:
            return float(whole)
    for k in range(2, _UNIT + 1):
        each = (_UNIT // k) / _UNIT
        if fits(nodes, {resource: each}) >= trials:
            return each
    return 1 / _UNIT


@dataclass(frozen=True)
class TrialResources:
    """What each trial asks Ray for, and how many trials that lets run at once (at most --max-concurrent)."""

    cpus: float
    gpus: float
    at_once: int


def trial_resources(tune_spec: TuneSpec, device: str, nodes: Sequence[dict[str, float]]) -> TrialResources:
    """Each trial's CPUs and GPUs on the Ray cluster ``nodes`` (per-node resources, ``ray.nodes()``).

    Defaults share the cluster among ``--max-concurrent`` trials (``share``): CPUs always, GPUs unless
    ``--device cpu`` (a trial that asks for no GPU sees none). E.g. one node of 1 CPU and 1 GPU,
    2 trials, device auto: 0.5 CPU and 0.5 GPU each, 2 at once. ``ValueError`` (one line) for what
    could never run: ``--device cuda`` where Ray has no GPU, more CPUs or GPUs per trial than any
    node has (Ray would wait for them for ever).
    """
    device_kind = device.split(":")[0]
    conc = tune_spec.max_concurrent
    gpus = tune_spec.gpus_per_trial
    if gpus is None:
        gpus = 0.0 if device_kind == "cpu" else share(nodes, "GPU", conc, most=1)
    have_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    if device_kind == "cuda" and not have_gpus:
        raise ValueError(f"device={device!r} is invalid here: Ray has no GPU (the search's node(s) have none, or a "
                         f"SLURM job got none: see --gpus); use --device auto or cpu")
    check(gpus <= have_gpus, "gpus_per_trial", gpus, f"more than a node of Ray's has ({have_gpus:g} GPU(s))")
    cpus = tune_spec.cpus_per_trial or share(nodes, "CPU", conc)
    have_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    check(cpus <= have_cpus, "cpus_per_trial", cpus, f"more than a node of Ray's has ({have_cpus:g} CPU(s))")
    at_once = min(conc, fits(nodes, {"CPU": cpus, "GPU": gpus}))
    if at_once < conc:
        log.warning("%g CPU and %g GPU per trial: %d trial(s) at once, not --max-concurrent %d", cpus, gpus, at_once,
                    conc)
    return TrialResources(cpus, gpus, at_once)


def job_gpus(tune_spec: TuneSpec, device: str, nodes: int = 1) -> int:
    """GPUs per node for a search job given no ``--gpus``: enough for its trials' share at once.

    ``--gpus-per-trial`` as given, else 1 with ``--device cuda`` and 0 otherwise (``auto`` and ``cpu``
    run on what the job gets, as every job does). The ``--max-concurrent`` trials spread evenly over
    the nodes. E.g. 0.25 GPU x 4 trials -> 1; 0.4 x 5 -> 3 (two trials per GPU); 1 x 4 on 2 nodes -> 2.
    """
    gpus = tune_spec.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if device.split(":")[0] == "cuda" else 0.0
    if not gpus:
        return 0
    per_node = math.ceil(tune_spec.max_concurrent / nodes)
    if gpus >= 1:
        return per_node * int(gpus)
    return math.ceil(per_node / (_UNIT // _units(gpus)))


def check_job_gpus(tune_spec: TuneSpec, device: str, gpus: int, nodes: int = 1) -> str:
    """A search job's ``--gpus`` (per node) against its trials' GPUs: ``ValueError`` when no trial could
    start; a warning line ("" for none) when fewer than ``--max-concurrent`` fit at once."""
    want = tune_spec.gpus_per_trial
    check(not want or want <= gpus, "gpus_per_trial", want, f"more than the job's --gpus {gpus} per node")
    if not want:
        return ""
    at_once = fits([{"GPU": float(gpus)}] * nodes, {"GPU": want})
    if at_once >= tune_spec.max_concurrent:
        return ""
    return (f"--gpus {gpus} on {nodes} node(s) holds {at_once} trial(s) of {want:g} GPU at once, "
            f"not --max-concurrent {tune_spec.max_concurrent}")
