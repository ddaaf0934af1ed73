"""The one training loop both trainers run (``jaxformer train gpt2|translator``).

A model plugs in as a :class:`~jaxformer.train.task.Task`: its data (the batch of a step, a pure
function of the seed and the step), its loss, its evaluation and what "best" means. :func:`train`
reads top to bottom: :func:`set_up` builds the run once (a :class:`Setup` and the train state);
each step runs the jitted train step on the step's batch; :func:`cadence` says what is due; the
metrics not fetched yet are fetched and checked (:func:`fetch_and_check`) before anything is logged
or saved; then the training line, the evaluation, the checkpoint and the plot, as due.

* cadence: training metrics every ``log_every`` steps, an evaluation every ``eval_every``, a
  checkpoint every ``ckpt_every``; the run ends at ``steps``, ``epochs`` or ``max_minutes``
  (the first reached; it then logs, evaluates and checkpoints once more), on SIGTERM/SIGINT (the
  step finishes, a checkpoint is written, exit 0), or on a NaN/Inf loss (:class:`NonFiniteLoss`);
* resume: the newest intact checkpoint, the metrics log cut back to it. The data order and dropout
  keys are functions of the step, so a resumed run is bitwise the uninterrupted one;
* all processes agree on stopping and on ``best/``; process 0 writes the files;
* a progress bar, ``metrics.jsonl`` and ``curves.png``.

Run directory::

    run.json  config.json                      run config, architecture config (jaxformer.config)
    checkpoints/<step>/  best/  best.json       jaxformer.train.checkpoints.Checkpoints (damaged/: set aside)
    metrics.jsonl  curves.png                  + the task's files (tokenizer, data)

``metrics.jsonl`` training lines hold ``step``, ``loss`` (mean per token over the steps since the
last line), the task's other sums per token (e.g. ``nll``), ``grad_norm``, ``lr``, ``epoch``,
``tokens_per_s`` (None right after compilation), ``mfu`` (when the task knows its FLOPs) and
``elapsed_s``; evaluation lines hold ``val_loss``, ``val_<sum>``, the task's metrics, ``best``
(when best/ was replaced) and ``elapsed_s``.
"""

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax
from tqdm import tqdm

from jaxformer import plots
from jaxformer.config import resume_changes
from jaxformer.errors import InputError
from jaxformer.train import flops
from jaxformer.train import sharding as sh
from jaxformer.train.checkpoints import Checkpoints
from jaxformer.train.distributed import barrier, print0
from jaxformer.train.metrics import MetricsLog
from jaxformer.train.optim import make_optimizer, make_schedule
from jaxformer.train.preemption import StopRequested, any_process
from jaxformer.train.run import RunConfig
from jaxformer.train.step import TrainState, check_finite, init_state, make_eval_step, make_train_step
from jaxformer.train.task import Task


def train(task_cls: type[Task], out: str | Path, *, run: dict | RunConfig | None = None,
          model: dict | None = None, resume: bool = False, mesh: str | None = None,
          metrics_path: str | Path | None = None, progress: bool = True) -> dict:
    """Trains ``task_cls`` in the run directory ``out`` (see the module docstring).

    run: run-config fields to set (a dict, or a whole config); model: architecture fields to set
    (fresh runs). resume: continue the run in ``out``. mesh: ``"data=4,fsdp=2"`` style
    (:func:`jaxformer.train.sharding.make_mesh`; default: data parallel over all devices).
    Returns ``{"step", "stopped_by" (signal name or None), "records" (this session's metrics),
    "state", "run" (the run config)}``; raises :class:`NonFiniteLoss` on a NaN/Inf loss.
    """
    run_fields = run.to_dict() if isinstance(run, RunConfig) else dict(run or {})
    setup, state = set_up(task_cls, Path(out).absolute(), run_fields, dict(model or {}), resume, mesh,
                          metrics_path, progress)
    step = first_step = int(state.step)
    pending, interval = [], Interval()  # (step, device metrics) not fetched yet; the steps since the last line
    last_eval = stopped_by = None
    with setup:  # closes the progress bar and the checkpoints, also on an error
        with StopRequested() as guard:
            while setup.total is None or step < setup.total:
                state, metrics = setup.train_step(state, setup.train_batch(step))
                step += 1
                setup.bar.update(1)
                pending.append((step, metrics))
                interval.start_clock(step, metrics)
                due = cadence(step, setup.run, setup.total, *poll(setup, guard, step))
                if not any(due):
                    continue
                fetched = fetch_and_check(setup, pending)  # a NaN/Inf loss raises: nothing is logged or saved
                pending = []
                interval.add(fetched)
                if due.log:
                    log_training(setup, step, interval)
                with interval.paused():  # evaluations and saves are not training time
                    if due.evaluate:
                        last_eval = evaluate(setup, state, step)
                        log_eval(setup, last_eval)
                    if due.checkpoint:
                        setup.checkpoints.save(step, state)
                    if due.evaluate:
                        plot(setup)
                if due.stop:
                    stopped_by = guard.signal or "signal on another process"
                if due.stop or due.last:
                    break
        setup.bar.close()
        if stopped_by:
            plot(setup)
            print0(f"{stopped_by}: stopped after step {step} and saved a checkpoint in {setup.checkpoints.states}. "
                   f"Continue with the same command plus --resume (e.g. --out {setup.out} --resume).")
        else:
            finish(setup, state, step, last_eval)
    return dict(step=step, stopped_by=stopped_by, state=state, run=setup.run,
                records=[r for r in setup.metrics.records if r["step"] > first_step])


# --- what is due ---------------------------------------------------------------------------------

class Due(NamedTuple):
    """What the loop does after a step; ``stop`` and ``last`` end the run."""

    log: bool  # a training line
    evaluate: bool  # an evaluation line (and best/ when it improves), then curves.png
    checkpoint: bool
    stop: bool  # a stop signal: log and checkpoint, no evaluation
    last: bool  # the run's end (its length or time limit): log, evaluate and checkpoint


def cadence(step: int, run: RunConfig, total: int | None, signalled: bool = False, time_up: bool = False) -> Due:
    """What is due after update ``step`` (counted from 1) of a run of ``total`` steps (None: no step
    limit): every ``log_every``, ``eval_every`` and ``ckpt_every`` (default ``eval_every``) steps,
    and all three at the end. A stop signal wins over the end: the run stops without evaluating."""
    last = not signalled and (time_up or (total is not None and step >= total))
    end = signalled or last
    return Due(log=step % run.log_every == 0 or end,
               evaluate=(step % run.eval_every == 0 and not signalled) or last,
               checkpoint=step % (run.ckpt_every or run.eval_every) == 0 or end,
               stop=signalled, last=last)


def poll(setup: "Setup", guard: StopRequested, step: int) -> tuple[bool, bool]:
    """(a stop signal arrived, the time limit passed), agreed by all processes: with one process at
    every step; with several at log steps only (the exchange is a collective)."""
    if jax.process_count() > 1 and step % setup.run.log_every:
        return False, False
    minutes = setup.run.max_minutes
    return any_process(bool(guard)), any_process(minutes is not None and time.time() - setup.t0 > 60 * minutes)


# --- setting up ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """What a run builds once, before its first step (:func:`set_up`)."""

    run: RunConfig
    task: Task
    out: Path
    mesh: jax.sharding.Mesh
    train_step: Callable  # (state, batch) -> (state, device metrics); donates the state
    eval_step: Callable  # (params, batch) -> (loss sum, tokens, {other sums})
    batch_sharding: Any  # of a training batch (rows: axis 1 under gradient accumulation, else 0)
    eval_sharding: Any
    checkpoints: Checkpoints
    metrics: MetricsLog
    schedule: optax.Schedule
    total: int | None  # the run's length in steps (None: until max_minutes or a signal)
    peak_flops: float  # of one device, for MFU (nan: unknown)
    bar: tqdm
    t0: float  # time.time() when this session started

    def __enter__(self) -> "Setup":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.checkpoints.close()

    def train_batch(self, step: int):
        """The global training batch of ``step``, placed on the mesh."""
        return self._put(self.task.batch(step), self.batch_sharding, int(self.task.grad_accum > 1))

    def eval_batches(self):
        """The validation batches, each placed on the mesh when it is needed."""
        return (self._put(b, self.eval_sharding, 0) for b in self.task.eval_batches())

    def _put(self, tree, sharding, batch_dim: int):
        rows = sh.batch_size_divisor(self.mesh)

        def leaf(x):
            if x.shape[batch_dim] % rows:
                raise InputError(f"a batch of {x.shape[batch_dim]} rows does not split over the {rows} batch "
                                 f"shards of mesh {dict(self.mesh.shape)}")
            return sh.put_batch(x, sharding, batch_dim)
        return jax.tree.map(leaf, tree)


def set_up(task_cls: type[Task], out: Path, run_fields: dict, model_overrides: dict, resume: bool,
           mesh: str | None, metrics_path, progress: bool) -> tuple[Setup, TrainState]:
    """The run in ``out`` ready for its next step: (setup, train state restored from the newest
    intact checkpoint, or initialised). A fresh run prepares its files first (:meth:`Task.prepare`)."""
    t0 = time.time()
    run = resolve(task_cls, out, run_fields, model_overrides, resume)
    device_mesh = sh.make_mesh(mesh)
    out.mkdir(parents=True, exist_ok=True)
    barrier("jaxformer-out")
    pretrained = None if resume else task_cls.prepare(run, out, model_overrides)
    task = task_cls(run, out, sh.batch_size_divisor(device_mesh))
    run = task.run  # as the task completed it
    if not resume and run.schedule == "cosine" and run.schedule_steps is None:
        run = run.replace(schedule_steps=run.length(task.steps_per_epoch))  # fixed once: resumes keep the horizon
    if jax.process_index() == 0:
        run.save(out / "run.json")  # a resumed run's with the changes --resume made
    barrier("jaxformer-run")

    schedule = make_schedule(run, task.d_model)
    optimizer = make_optimizer(run, schedule)

    def create(key, params=None):
        init_key, run_key = jax.random.split(key)
        return TrainState.create(task.init_params(init_key) if params is None else params, optimizer, run_key)

    checkpoints = Checkpoints(out, run.keep)
    state, state_sh = init_state(create, jax.random.PRNGKey(run.seed), device_mesh, pretrained, checkpoints)
    # A frozen base is placed once, split like params, and passed to the steps (never donated).
    frozen = None if task.frozen is None else sh.put_global(task.frozen, sh.state_shardings(device_mesh, task.frozen))
    batch_sh = sh.batch_sharding(device_mesh, batch_dim=int(task.grad_accum > 1))
    eval_sh = sh.batch_sharding(device_mesh, batch_dim=0)
    peak = math.nan
    if task.flops_per_token:
        peak, _ = flops.peak_flops(device_mesh.devices.flat[0], getattr(task.config, "dtype", "float32"))
    step, total = int(state.step), run.length(task.steps_per_epoch)
    setup = Setup(
        run=run, task=task, out=out, mesh=device_mesh,
        train_step=make_train_step(task.loss_fn(False), optimizer, grad_accum=task.grad_accum,
                                   state_shardings=state_sh, batch_sharding=batch_sh, frozen=frozen),
        eval_step=make_eval_step(task.loss_fn(True), state_sh.params, eval_sh, frozen=frozen),
        batch_sharding=batch_sh, eval_sharding=eval_sh, checkpoints=checkpoints,
        metrics=MetricsLog(metrics_path or out / "metrics.jsonl", step if resume else None),
        schedule=schedule, total=total, peak_flops=peak, t0=t0,
        bar=tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                 disable=not progress or jax.process_index() != 0))
    trainable = "trainable params (the rest frozen)" if frozen is not None else "params"
    print0(f"{task.name}: {'resuming at' if resume else 'starting at'} step {step}{f' of {total}' if total else ''}; "
           f"{sum(x.size for x in jax.tree.leaves(state.params)):,} {trainable}; mesh {dict(device_mesh.shape)} on "
           f"{device_mesh.devices.size} {device_mesh.devices.flat[0].device_kind} device(s), "
           f"{jax.process_count()} process(es); {task.describe()}")
    return setup, state


def holds_run(out: Path) -> bool:
    return (out / "run.json").is_file() or (out / "checkpoints").is_dir()


def resolve(task_cls: type[Task], out: Path, run_fields: dict, model_overrides: dict, resume: bool) -> RunConfig:
    """The run config of the run in ``out``.

    Fresh: the dataclass defaults, then :meth:`Task.run_defaults` (the trainer's, then the preset's
    run fields), then ``run_fields``. Resumed: the stored ``run.json`` with the changes in
    ``run_fields`` that :func:`jaxformer.config.resume_changes` allows; the architecture cannot
    change (``model_overrides`` must agree with ``config.json``).
    """
    if not resume:
        if holds_run(out):
            raise InputError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        run = task_cls.run_config(**{**task_cls.run_defaults(run_fields.get("preset")), **run_fields})
        if run.steps is None and run.epochs is None and run.max_minutes is None:
            raise InputError("give the run a length: steps, epochs or max_minutes")
        if run.schedule == "cosine" and run.schedule_steps is None and run.steps is None and run.epochs is None:
            raise InputError("schedule=cosine needs the run's length in steps: give steps, epochs or schedule_steps")
        return run
    if not (out / "run.json").is_file():
        raise InputError(f"--resume: {out} holds no run (no run.json); start one without --resume")
    run = resume_changes(task_cls.run_config.load(out / "run.json"), run_fields)
    config = task_cls.model_config.load(out / "config.json")
    differ = {k: v for k, v in model_overrides.items() if getattr(config, k) != v}
    if differ:
        raise InputError(f"--resume cannot change the architecture: {differ} (config.json has "
                         f"{ {k: getattr(config, k) for k in differ} })")
    return run


# --- metrics, evaluation, the end ----------------------------------------------------------------

def fetch_and_check(setup: Setup, pending: list[tuple[int, Any]]) -> list[tuple[int, dict]]:
    """``pending`` (step, metrics) pairs, metrics a dict of float32[] device scalars, fetched to the
    host after checking every loss: a NaN/Inf one raises :class:`NonFiniteLoss` naming its step and
    the last good checkpoint."""
    steps, fetched = [s for s, _ in pending], jax.device_get([m for _, m in pending])
    check_finite([(s, m["loss"]) for s, m in zip(steps, fetched)], lambda: checkpoint_note(setup.checkpoints))
    return list(zip(steps, fetched))


def checkpoint_note(checkpoints: Checkpoints) -> str:
    last = checkpoints.latest_step()
    return ("No checkpoint was written yet." if last is None else
            f"The last good checkpoint is step {last} in {checkpoints.states} (continue with --resume).")


class Interval:
    """The training steps since the last training line: their fetched metrics, tokens and time.
    The session's first step (it includes compilation) and evaluations and saves are not counted."""

    def __init__(self):
        self.metrics, self.tokens, self.start, self.first_step = [], 0.0, None, None

    def start_clock(self, step: int, metrics) -> None:
        """Once, after the session's first step: waits for it, then starts the clock."""
        if self.start is None:
            jax.block_until_ready(metrics)
            self.start, self.first_step = time.perf_counter(), step

    def add(self, fetched: list[tuple[int, dict]]) -> None:
        self.metrics += [m for _, m in fetched]
        self.tokens += sum(float(m["tokens"]) for s, m in fetched if s != self.first_step)

    def tokens_per_s(self) -> float | None:
        seconds = time.perf_counter() - self.start
        return self.tokens / seconds if self.tokens and seconds > 0 else None

    def restart(self) -> None:
        self.metrics, self.tokens, self.start = [], 0.0, time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        paused = time.perf_counter()
        yield
        self.start += time.perf_counter() - paused


def log_training(setup: Setup, step: int, interval: Interval) -> None:
    """Writes the training line of the steps in ``interval`` (see the module docstring), then restarts it."""
    window, tok_s, task = interval.metrics, interval.tokens_per_s(), setup.task
    record = dict(step=step, loss=float(np.mean([x["loss"] for x in window])))
    for name in window[-1]:
        if name not in ("loss", "tokens", "grad_norm"):
            record[name] = float(np.mean([x[name] for x in window]))
    record.update(grad_norm=float(window[-1]["grad_norm"]), lr=float(setup.schedule(step - 1)),
                  epoch=round(step / task.steps_per_epoch, 3), tokens_per_s=tok_s and round(tok_s, 1))
    if task.flops_per_token:
        u = flops.mfu(tok_s, task.flops_per_token, setup.peak_flops, setup.mesh.devices.size)
        record["mfu"] = u and round(u, 5)
    record["elapsed_s"] = round(time.time() - setup.t0, 1)
    setup.metrics.log(record)
    setup.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}")
    interval.restart()


def evaluate(setup: Setup, state: TrainState, step: int) -> dict:
    """The evaluation line of ``state`` at ``step``: the validation sums per token, the task's
    metrics, and ``best`` when the params beat best/ (then saved there)."""
    sums = jax.device_get([setup.eval_step(state.params, b) for b in setup.eval_batches()])
    n = max(sum(float(k) for _, k, _ in sums), 1.0)
    record = dict(step=step, val_loss=sum(float(t) for t, _, _ in sums) / n)
    for name in sums[0][2] if sums else ():
        record[f"val_{name}"] = sum(float(aux[name]) for _, _, aux in sums) / n
    task = setup.task
    record.update(task.evaluate(sh.gathered(state.params), step, record))
    if task.best_metric and setup.checkpoints.save_best(state.params, task.best_metric, record[task.best_metric],
                                                        step, task.higher_is_better):
        record["best"] = True
    record["elapsed_s"] = round(time.time() - setup.t0, 1)
    return record


def log_eval(setup: Setup, record: dict) -> None:
    setup.metrics.log(record)
    if jax.process_index() == 0:
        setup.bar.write(_describe_eval(record), file=sys.stderr)


def plot(setup: Setup) -> None:
    if jax.process_index() == 0:
        plots.curves(setup.out / "curves.png", setup.task.plot_panels, setup.metrics.records)


def finish(setup: Setup, state: TrainState, step: int, last_eval: dict | None) -> None:
    """The run reached its end: evaluates and checkpoints when this session ran no step (resumed at
    the end), calls the task's ``finish`` (process 0) and prints the summary."""
    if last_eval is None or last_eval["step"] != step:
        last_eval = evaluate(setup, state, step)
        setup.metrics.log(last_eval)
        setup.checkpoints.save(step, state)
    params = sh.gathered(state.params)
    if jax.process_index() == 0:
        setup.task.finish(jax.device_get(params))
    best = setup.checkpoints.best
    print0(f"done at step {step} ({(time.time() - setup.t0) / 60:.1f} min): {_describe_eval(last_eval, texts=False)}"
           + (f"; best {best['metric']} {best['value']:.4g} at step {best['step']}" if best else ""))


def _describe_eval(record: dict, texts: bool = True) -> str:
    """``step N: val_loss 2.345 bleu 12.3``, and with ``texts`` any text metric (a sample) on the next line."""
    nums = " ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "elapsed_s")
    lines = "".join(f"\n{k}: {v!r}" for k, v in record.items() if isinstance(v, str)) if texts else ""
    return f"step {record['step']}: {nums}{lines}"
