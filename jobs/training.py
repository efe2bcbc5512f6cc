"""The train and prune jobs: one module-level function each, resumable from their own checkpoint.

``run_prune(spec)`` and ``run_train(spec)`` are what the launcher calls in-process, what submitit
pickles for SLURM and what a Ray trial calls. Both run the same engine:

    phase 0: evaluate the starting model (row "phase 0")
    for each phase: [BN-gamma filter pruning, phase 1 only] -> global magnitude pruning to the
                    phase target -> retrain ``epochs`` with the masks held -> one phase row
                    (``--structure channels``: remove channels down to the phase's MACs or parameter
                    target, ``compress.channels``, then retrain the smaller model)

State (model, masks, optimizer, LR schedule, position, the phase's epoch rows) is saved atomically
after every epoch to ``<results>/runs/<run_id>/state.pt``, the one before it kept as
``state.prev.pt``; a job started again with the same spec resumes from the newest that reads (a
damaged ``state.pt`` costs one epoch, with one warning line naming it). Data order and
augmentation depend only on (seed, phase, epoch), so a resumed run ends with the same metrics as
an uninterrupted one. Rows go out once per phase under a fixed file
name, so a requeued job can neither lose nor duplicate them. A phase row keeps the predicted class
of every test image of its evaluation (``predictions``, uint8 bytes in test-set order).

Where it runs: everything here on ``spec.device`` (CUDA if the job has one, else CPU); whatever is
read back from a checkpoint moves there. On CUDA the job runs with deterministic cuDNN/cuBLAS
kernels (``loops.deterministic``), so a resumed run reproduces an uninterrupted one there too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compress import channels, loops, registry
from compress import results as store  # the results root's layout, reading and writing
from compress.artifacts import LOAD_PACKED, write_artifact
from compress.data import BatchLoader, subset_indices
from compress.datasets import ImageData, make_loader
from compress.loops import build_optimizer, cosine_lr, evaluate, pick_device, reestimate_bn, train_one_epoch
from compress.provenance import PROVENANCE_FIELDS, provenance
from compress.prune import (
    MaskSet,
    bn_gamma_filter_masks,
    global_magnitude_masks,
    make_permanent,
    module_table,
    nonzero_counts,
)
from compress.quant.packed import pack_float
from jobs import lease, tables
from jobs.checkpoints import read_state, remove_states, save_state
from jobs.inputs import check_prunable, load_run_data, load_run_model
from jobs.run_state import RunState
from jobs.runs import SpecMismatch, check_run, require_run_id, row_base, run_dir, same_spec
from jobs.specs import Phase, PruneSpec, TrainFields, TrainSpec
from jobs.text import format_modules

log = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, Any]], None]

def _test_split(spec: TrainFields, data: ImageData):
    """The test images a run evaluates: the first ``test_size``, or all."""
    return data.test.subset(torch.arange(spec.test_size)) if spec.test_size else data.test


def _loaders(spec: TrainFields, data: ImageData, device: torch.device):
    train = data.train
    if spec.train_size:
        train = train.subset(subset_indices(len(train), spec.train_size, spec.seed))
    return (make_loader(train, spec.batch_size, device, train=True, randaugment=spec.randaugment, seed=spec.seed),
            make_loader(_test_split(spec, data), spec.eval_batch_size, device))


def _scheduler(spec: TrainFields, opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    total = max(1, epochs * steps_per_epoch)
    warm = round(spec.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warm))


class _Run:
    """Where one run writes (its folder, rows, progress) and what every row of it carries."""

    def __init__(self, spec: TrainFields, report: ReportFn | None, tags: dict[str, str] | None) -> None:
        self.spec = spec
        self.plan = spec.plan()  # the run's phases, computed once
        self.report = report
        self.dir = run_dir(spec)
        self.device = pick_device(spec.device)
        self.base = row_base(spec, torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                             tags)
        self.prov = {k: self.base[k] for k in PROVENANCE_FIELDS}

    def save(self, state: RunState) -> None:
        save_state(state.to_state_dict(), self.dir)
        epochs = next((ph.epochs for ph in self.plan if ph.index == state.phase), 0)
        rows = [r for r in state.epoch_rows if r["top1"] == r["top1"]]  # evaluated epochs
        self.progress(phase=state.phase, epoch=state.epoch, epochs=epochs,
                      top1=rows[-1]["top1"] if rows else state.last_top1, dense_top1=state.dense_top1)

    def progress(self, **fields: Any) -> None:
        """``progress.json``: where the run stands, for ``status`` (a few hundred bytes, no torch to read it)."""
        record = {"run_id": self.spec.run_id, "kind": self.spec.kind(), "search_id": self.base["search_id"],
                  "trial_id": self.base["trial_id"], "job_id": self.prov["job_id"], "host": self.prov["host"],
                  "phases": len(self.plan), "finished": False,
                  "updated_at": provenance()["written_at"].isoformat(timespec="seconds"), **fields}
        store.atomic_write_bytes(self.dir / store.PROGRESS, json.dumps(record).encode())

    def write(self, table: str, name: str, rows: list[dict[str, Any]], schema) -> None:
        prov = provenance(self.prov["device_name"])
        store.write_rows(store.table_file(self.spec.results, table, name),
                   [{**self.base, "written_at": prov["written_at"], **r} for r in rows], schema)


def estimate_seconds(spec: TrainFields, data_sizes: tuple[int, int], image_shape: tuple[int, int, int] = (3, 32, 32),
                     batches: int = 3) -> tuple[float, str]:
    """How long ``spec`` would take here, from a few timed batches of the real loops; (seconds, how).

    Times ``batches`` training batches (augmentation, forward, backward, step; the first one is a
    warm-up and not counted) and as many evaluation batches, on random images of the run's sizes,
    then scales to the plan's epochs and evaluations over ``data_sizes`` (training, test images of
    the data set, whose images are ``image_shape``). Loading the data and the model is not counted.
    """
    # through the library modules themselves: an estimate is not part of the run (and a test that
    # watches this module's loops or loaders sees only the run's own calls)
    device = pick_device(spec.device)
    channels = image_shape[0]
    model = registry.build(spec.model, spec.model_args, (0.5,) * channels, (0.25,) * channels)
    model = model.to(device, memory_format=torch.channels_last)
    n = spec.batch_size * batches
    x = torch.randint(0, 256, (n, *image_shape), dtype=torch.uint8)
    y = torch.randint(0, registry.output_width(model, image_shape), (n,))
    train = BatchLoader(x, y, spec.batch_size, device, train=True, randaugment=spec.randaugment, seed=0)
    opt = build_optimizer(spec.optimizer, model.parameters(), spec.lr, spec.weight_decay)
    warm = BatchLoader(x[:spec.batch_size], y[:spec.batch_size], spec.batch_size, device, train=True,
                       randaugment=spec.randaugment)
    # with distillation every step runs a teacher forward too (timed with a model of the same architecture)
    kd = {"teacher": copy.deepcopy(model).eval(), "kd_weight": spec.kd_weight} if spec.kd_weight > 0 else {}
    loops.train_one_epoch(model, warm, opt, None, device, amp=spec.amp, cpu_amp=spec.cpu_bf16, progress=False,
                          desc="estimate", **kd)
    st = loops.train_one_epoch(model, train, opt, None, device, amp=spec.amp, cpu_amp=spec.cpu_bf16,
                               progress=False, desc="estimate", **kd)
    ev = loops.evaluate(model, BatchLoader(x, y, min(spec.eval_batch_size, n), device), device, progress=False)
    plan = spec.plan()
    epochs = sum(ph.epochs for ph in plan)
    train_images = min(spec.train_size or data_sizes[0], data_sizes[0])
    test_images = min(spec.test_size or data_sizes[1], data_sizes[1])
    evals = 1 + (epochs if spec.eval_every_epoch else len(plan))
    seconds = epochs * train_images * st.seconds / st.images + evals * test_images * ev.seconds / ev.images
    how = (f"{len(plan)} phase(s), {epochs} epoch(s) over {train_images:,} images, {evals} evaluation(s) of "
           f"{test_images:,}; from {batches} timed batches on {device.type}")
    compiles, why = loops.compile_decision(spec.compile, device, epochs * train_images)
    if compiles:  # the batches were timed eager: compiled steps are faster, so this is an upper bound
        seconds += loops.COMPILE_SECONDS[device.type]
        how += f"; with ~{loops.COMPILE_SECONDS[device.type]:.0f} s of torch.compile first ({why})"
    return seconds, how


def run_schedule(spec: TrainFields, report: ReportFn | None = None,
                 tags: dict[str, str] | None = None, claim: str = "") -> dict[str, Any]:
    """Run (or resume) a train/prune spec to the end; returns the summary of the final phase.

    ``report`` is called with each phase row as it is written (Ray trials report it to Tune);
    ``tags`` (``search_id``, ``trial_id``) are added to every row. The run's lease
    (``jobs/lease.py``) is held while it runs; ``claim`` is the token of the lease the launcher
    took for this job when it submitted it.
    """
    require_run_id(spec)
    run = _Run(spec, report, tags)
    if spec.cpu_bf16 and (warning := loops.cpu_bf16_warning(run.device)):
        log.warning(warning)
    if warning := loops.gpu_bf16_warning(run.device, spec.amp):
        log.warning(warning)
    if check_run(spec) == "finished":
        log.info("run %s already finished", spec.run_id)
        return json.loads((run.dir / store.SUMMARY).read_text())
    lease.acquire(run.dir, claim)
    try:
        with loops.deterministic(run.device):
            summary = _schedule(spec, run)
    except Exception:
        lease.release(run.dir, claim)  # a failed run can be started again at once; a signal keeps it
        raise
    lease.release(run.dir, claim)
    return summary


@dataclass(frozen=True)
class Distill:
    """Distillation during training, as data: no teacher when the spec's ``kd_weight`` is 0."""

    teacher: torch.nn.Module | None = None
    weight: float = 0.0
    temperature: float = 4.0

    @classmethod
    def of(cls, spec: TrainFields, device: torch.device, data: ImageData) -> Distill:
        if spec.kd_weight <= 0:
            return cls()
        teacher = registry.load(spec.model, spec.model_args, spec.teacher or spec.weights or None, data.mean,
                                data.std)
        teacher = teacher.to(device, memory_format=torch.channels_last)
        teacher.eval().requires_grad_(False)
        return cls(teacher, spec.kd_weight, spec.kd_temperature)


# the columns of a phase row the job computes (the rest of a row is spec and provenance)
PHASE_KEYS = ("phase", "target_sparsity", "sparsity", "nonzero", "prunable", "top1", "test_loss", "train_loss",
              "train_acc", "epochs", "train_seconds", "wall_seconds")


class _Schedule:
    """One run's schedule in named steps: start or resume, then per phase prune, train, write; then finish.

    ``state`` is what ``state.pt`` holds between epochs (see the module docstring), set by ``start_or_resume``.
    """

    state: RunState

    def __init__(self, spec: TrainFields, run: _Run) -> None:
        self.spec, self.run, self.device = spec, run, run.device
        torch.manual_seed(spec.seed)
        data = load_run_data(spec)
        model = load_run_model(spec, data)
        if isinstance(spec, PruneSpec):
            check_prunable(spec, model, tuple(data.image_shape))
        self.structured = isinstance(spec, PruneSpec) and spec.structure == "channels"
        self.input_shape = tuple(data.image_shape)
        # the architecture's own widths: what a checkpoint records its layers against (a model that starts
        # channel-pruned, from an earlier run, keeps its widths in this run's checkpoints too)
        self.dense_widths = channels.widths(registry.build(spec.model, spec.model_args, data.mean, data.std))
        run.base.update({**data.describe(), **registry.describe(model, spec.model, spec.model_args)})
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.data = data
        self.train_loader, self.test_loader = _loaders(spec, data, self.device)
        self.plan = run.plan
        self.distill = Distill.of(spec, self.device, data)
        # ``net`` runs the batches: the model itself, or compiled around it (same parameters, so masks,
        # optimizer and checkpoints keep using ``model``)
        on, why = loops.compile_decision(spec.compile, self.device,
                                         sum(ph.epochs for ph in self.plan) * self.train_loader.num_images())
        log.info("%s: %s", "compiling the model" if on else "not compiling the model", why)
        self.net = loops.compiled(self.model, on)
        if on and self.distill.teacher is not None:
            self.distill = dataclasses.replace(self.distill, teacher=loops.compiled(self.distill.teacher, True))
        self.masks = MaskSet()
        self.n_prunable = 0

    def sparsity_now(self) -> tuple[float, int]:
        nz = sum(c[2] for c in nonzero_counts(self.model).values())
        return 1 - nz / self.n_prunable, nz

    def start_or_resume(self) -> None:
        """Resume from ``state.pt`` (same spec only), else evaluate the starting model and write phase 0."""
        spec, run = self.spec, self.run
        self.n_prunable = sum(c[1] for c in nonzero_counts(self.model).values())  # the dense model's, before a resize
        saved = read_state(run.dir, spec.run_id)
        if saved is not None:
            diff = same_spec(saved["spec"], spec)
            if diff:
                raise SpecMismatch(f"run {spec.run_id} under {spec.results} holds another spec ({diff}); "
                                   f"choose another --run-id")
            state = RunState.from_state_dict(saved)
            log.info("resuming %s at phase %d epoch %d", spec.run_id, state.phase, state.epoch)
            if state.widths:  # channels removed before the stop: the same shapes first, then the weights
                channels.resize_to(self.model, state.widths)
            self.model.load_state_dict(state.model)
            self.model.to(memory_format=torch.channels_last)
            self.masks = MaskSet.from_state_dict(state.masks, self.device)
        else:
            run.dir.mkdir(parents=True, exist_ok=True)
            (run.dir / store.SPEC).write_text(json.dumps(dataclasses.asdict(spec), indent=2))
            t0 = time.perf_counter()
            ev = evaluate(self.net, self.test_loader, self.device, desc="phase 0 eval",
                          keep_predictions=True)
            s, nz = self.sparsity_now()
            row0 = {"phase": 0, "target_sparsity": 0.0, "sparsity": s, "nonzero": nz, "prunable": self.n_prunable,
                    "top1": ev.top1, "test_loss": ev.loss, "train_loss": float("nan"), "train_acc": float("nan"),
                    "epochs": 0, "train_seconds": 0.0, "wall_seconds": time.perf_counter() - t0,
                    "predictions": ev.predictions.numpy().tobytes()}
            state = RunState(spec=dataclasses.asdict(spec), phase=1, epoch=0, pruned=False,
                             before=nonzero_counts(self.model), dense_top1=ev.top1)
            if self.structured:
                state.dense_count = channels.count(self.model, self.input_shape)
                row0.update(self.counts(state))
            run.write("phases", store.phase_unit(spec.run_id, 0), [row0], tables.PHASES)
            log.info("phase 0: top-1 %.2f%%, sparsity %.4f", ev.top1, s)
        self.state = state

    def counts(self, state: RunState) -> dict[str, int]:
        """A channels run's row columns: MACs and parameters now and of the dense model."""
        now, dense = channels.count(self.model, self.input_shape), state.dense()
        return {"macs": now.macs, "params": now.params, "dense_macs": dense.macs, "dense_params": dense.params}

    def prune_step(self, ph: Phase) -> None:
        """The phase's pruning: BN-gamma filters in phase 1, then magnitude to its target; or channels."""
        spec, masks = self.spec, self.masks
        if self.structured:
            self.channel_step(ph)
            return
        if ph.filter_fraction > 0:
            filters = bn_gamma_filter_masks(self.model, ph.filter_fraction)
            if not len(filters):
                log.info("phase %d: BN-gamma filter pruning skipped: no conv of this model feeds a BatchNorm",
                         ph.index)
            masks = masks.merge(filters)
            masks.apply(self.model)
        if ph.target is not None:
            masks = masks.merge(global_magnitude_masks(self.model, ph.target, spec.keep_dense,
                                                       spec.max_layer_sparsity, spec.scoring))
            masks.apply(self.model)
            if spec.bn_reestimate:
                reestimate_bn(self.model, self.train_loader, self.device)
        self.masks = masks

    def channel_step(self, ph: Phase) -> None:
        """Remove channels down to the phase's share of the dense model's MACs (or parameters)."""
        spec = self.spec
        by, _ = spec.channel_target()
        if spec.importance == "taylor":  # gradients of the phase's first training batches
            self.train_loader.set_epoch(ph.index, 0)
            channels.taylor_gradients(self.model, self.train_loader, self.device)
        step = channels.prune_channels(self.model, self.input_shape, 1.0 - ph.target, self.state.dense(),
                                       spec.importance, by, spec.global_channels,
                                       spec.keep_dense or channels.default_keep(self.model))
        self.model.zero_grad(set_to_none=True)
        self.model.to(memory_format=torch.channels_last)
        if spec.bn_reestimate:
            reestimate_bn(self.model, self.train_loader, self.device)
        self.state.widths = channels.changed(self.model, self.dense_widths)
        log.info("phase %d: channels removed at ratio %.3g: %.2fM -> %.2fM MACs, %s -> %s params", ph.index,
                 step.ratio, step.before.macs / 1e6, step.after.macs / 1e6, f"{step.before.params:,}",
                 f"{step.after.params:,}")

    def pruned(self, opt: torch.optim.Optimizer, sched: Any) -> None:
        """Save the pruned model before its retraining starts, with the optimizer built for its parameters."""
        self.state = dataclasses.replace(self.state, pruned=True, model=self.model.state_dict(),
                                         masks=self.masks.state_dict(), optimizer=opt.state_dict(),
                                         scheduler=sched.state_dict(), epoch=0, epoch_rows=[])
        self.run.save(self.state)

    def train_phase(self, ph: Phase, opt: torch.optim.Optimizer, sched: Any, t_phase: float) -> float:
        """The phase's epochs from where the state stands, saving after each; returns the running phase clock."""
        spec, state = self.spec, self.state
        for epoch in range(state.epoch, ph.epochs):
            self.train_loader.set_epoch(ph.index, epoch)
            lr = opt.param_groups[0]["lr"]
            st = train_one_epoch(self.net, self.train_loader, opt, sched, self.device,
                                 after_step=functools.partial(self.masks.apply, self.model) if len(self.masks)
                                 else None, teacher=self.distill.teacher, kd_weight=self.distill.weight,
                                 kd_temperature=self.distill.temperature, amp=spec.amp, cpu_amp=spec.cpu_bf16,
                                 desc=f"phase {ph.index} epoch {epoch + 1}/{ph.epochs}")
            last = epoch == ph.epochs - 1
            ev = (evaluate(self.net, self.test_loader, self.device, keep_predictions=last)
                  if spec.eval_every_epoch or last else None)
            if last and ev is not None:  # the phase row's predictions, kept in the state until it is written
                state.predictions = ev.predictions
            state.epoch_rows.append({
                "phase": ph.index, "epoch": epoch + 1, "lr": lr, "train_loss": st.loss, "train_acc": st.accuracy,
                "test_loss": ev.loss if ev else float("nan"), "top1": ev.top1 if ev else float("nan"),
                "images_per_second": st.images / st.seconds, "seconds": st.seconds})
            state.train_seconds += st.seconds
            log.info("phase %d epoch %d/%d: train loss %.4f acc %.2f%%%s", ph.index, epoch + 1, ph.epochs,
                     st.loss, st.accuracy, f", test top-1 {ev.top1:.2f}%" if ev else "")
            state.epoch, state.model = epoch + 1, self.model.state_dict()
            state.optimizer, state.scheduler = opt.state_dict(), sched.state_dict()
            state.wall += time.perf_counter() - t_phase
            t_phase = time.perf_counter()
            self.run.save(state)
        return t_phase

    def write_phase(self, ph: Phase, t_phase: float) -> dict[str, Any]:
        """The phase's rows (its epochs, then its summary row), reported, and the state moved to the next phase."""
        spec, state, run = self.spec, self.state, self.run
        rows, preds = state.epoch_rows, state.predictions  # None in a state saved before predictions were kept
        if rows and rows[-1]["top1"] == rows[-1]["top1"] and preds is not None:  # evaluated after the last epoch
            top1, test_loss = rows[-1]["top1"], rows[-1]["test_loss"]
        else:
            ev = evaluate(self.net, self.test_loader, self.device, keep_predictions=True)
            top1, test_loss, preds = ev.top1, ev.loss, ev.predictions
        s, nz = self.sparsity_now()
        state.wall += time.perf_counter() - t_phase
        row = {"phase": ph.index, "target_sparsity": ph.target if ph.target is not None else 0.0,
               "sparsity": s, "nonzero": nz, "prunable": self.n_prunable, "top1": top1, "test_loss": test_loss,
               "train_loss": rows[-1]["train_loss"] if rows else float("nan"),
               "train_acc": rows[-1]["train_acc"] if rows else float("nan"),
               "epochs": ph.epochs, "train_seconds": sum(r["seconds"] for r in rows), "wall_seconds": state.wall}
        counts = self.counts(state) if self.structured else {}
        if rows:
            run.write("epochs", store.phase_unit(spec.run_id, ph.index), rows, tables.EPOCHS)
        # the predictions go to the table only: not to Tune, the summary or its JSON
        run.write("phases", store.phase_unit(spec.run_id, ph.index),
                  [{**row, **counts, "predictions": preds.numpy().tobytes()}], tables.PHASES)
        log.info("phase %d: target %.4f sparsity %.4f top-1 %.2f%%", ph.index, row["target_sparsity"], s, top1)
        if run.report is not None:
            run.report({**row, "dense_top1": state.dense_top1})
        self.state = state = dataclasses.replace(state, phase=ph.index + 1, epoch=0, pruned=False, epoch_rows=[],
                                                 wall=0.0, last_top1=top1, predictions=None)
        run.save(state)
        return {**row, "dense_top1": state.dense_top1}

    def last_phase_row(self) -> dict[str, Any]:
        """The last phase's row as written (its file, or merged by a compaction), for a run stopped after
        writing it and before finishing."""
        last = self.plan[-1].index
        table = store.read_unit(store.table_file(self.spec.results, "phases", store.phase_unit(self.spec.run_id, last)))
        if table is None:
            raise FileNotFoundError(f"run {self.spec.run_id}: the row of its last phase {last} is missing under "
                                    f"{self.spec.results}/phases")
        (row,) = table.select(list(PHASE_KEYS)).to_pylist()
        return {**row, "dense_top1": self.state.dense_top1}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Masks made permanent; the module table, final.pt, the packed float model, summary.json."""
        spec, run, model = self.spec, self.run, self.model
        make_permanent(model, self.masks)
        shapes = channels.changed(model, self.dense_widths)
        kept = channels.channels_kept(model, self.dense_widths) if self.structured else None
        table = module_table(self.state.before, nonzero_counts(model), kept)
        run.write("modules", spec.run_id, [
            {"module": r.module, "type": r.kind, "params": r.params, "nonzero_before": r.nonzero_before,
             "nonzero_after": r.nonzero_after, "removed": r.removed, "sparsity": r.sparsity,
             "channels_before": r.channels_before, "channels_after": r.channels_after} for r in table],
            tables.MODULES)
        store.torch_save_atomic({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "arch": spec.model,
                           "model_args": spec.model_args, "widths": shapes, "spec": dataclasses.asdict(spec)},
                          run.dir / store.FINAL)
        packed = run.dir / store.EXPORT / "model.float.packed"  # what to ship: the sparse weights only, no optimizer
        expected = summary["top1"]
        if self.device.type != "cpu":  # ``verify`` scores the file on the CPU: the top-1 the CPU gives, to the image
            cpu = torch.device("cpu")
            expected = evaluate(model.cpu(), make_loader(_test_split(spec, self.data), spec.eval_batch_size, cpu), cpu,
                                desc="float eval on the CPU").top1
        write_artifact(packed, pack_float(model.cpu(), spec.model, model_args=spec.model_args, widths=shapes), {
            "kind": "float-packed", "expected_top1": expected, "test_images": self.test_loader.num_images(),
            "load": LOAD_PACKED,
            "source": {"run_id": spec.run_id, "phase": summary["phase"]}, "spec": dataclasses.asdict(spec),
            "git_commit": provenance()["git_commit"]})
        # the phase row's seconds are the last phase's; the run's totals are named as such beside them
        last = {f"last_phase_{k}": summary.pop(k) for k in ("train_seconds", "wall_seconds", "epochs")}
        summary = {**summary, **last, "run_id": spec.run_id, "checkpoint": str(run.dir / store.FINAL),
                   "table": format_modules(table), "packed": str(packed),
                   "total_epochs": sum(ph.epochs for ph in self.plan),
                   "total_train_seconds": self.state.train_seconds, "spec": dataclasses.asdict(spec)}
        store.atomic_write_bytes(run.dir / store.SUMMARY, json.dumps(summary, indent=2).encode())
        run.progress(phase=summary["phase"], epoch=summary["last_phase_epochs"],
                     epochs=summary["last_phase_epochs"], top1=summary["top1"], dense_top1=summary["dense_top1"],
                     finished=True, sparsity=summary["sparsity"])
        remove_states(run.dir)
        return summary


def _schedule(spec: TrainFields, run: _Run) -> dict[str, Any]:
    """Start or resume, then each phase not done yet: prune, train, write; then finish."""
    job = _Schedule(spec, run)
    job.start_or_resume()
    summary: dict[str, Any] = {}
    for ph in job.plan:
        if ph.index < job.state.phase:
            continue
        t_phase = time.perf_counter()
        if not job.state.pruned:
            job.prune_step(ph)  # before the optimizer: removing channels replaces the parameters
        opt = build_optimizer(spec.optimizer, job.model.parameters(), spec.lr, spec.weight_decay)
        sched = _scheduler(spec, opt, len(job.train_loader), ph.epochs)
        if not job.state.pruned:
            job.pruned(opt, sched)
        else:
            opt.load_state_dict(job.state.optimizer)
            sched.load_state_dict(job.state.scheduler)
        t_phase = job.train_phase(ph, opt, sched, t_phase)
        summary = job.write_phase(ph, t_phase)
    return job.finish(summary or job.last_phase_row())


def run_prune(spec: PruneSpec, report: ReportFn | None = None, tags: dict[str, str] | None = None,
              claim: str = "") -> dict[str, Any]:
    """The prune job: a whole prune/retrain schedule (module-level so submitit and Ray can pickle it)."""
    return run_schedule(spec, report, tags, claim)


def run_train(spec: TrainSpec, report: ReportFn | None = None, tags: dict[str, str] | None = None,
              claim: str = "") -> dict[str, Any]:
    """The dense training job."""
    return run_schedule(spec, report, tags, claim)
