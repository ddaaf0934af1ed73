"""The one training loop both trainers run (``jaxformer/commands/train_gpt2.py``, ``jaxformer/commands/train_translator.py``).

A model plugs in as a :class:`Task`: its data (the batch of a step, a pure function of the seed
and the step), its loss, its evaluation and what "best" means. The loop owns everything else:

* cadence: training metrics every ``log_every`` steps, an evaluation every ``eval_every``, a
  checkpoint every ``ckpt_every``; the run ends at ``steps``, ``epochs`` or ``max_minutes``
  (the first reached; it then logs, evaluates and checkpoints once more), on SIGTERM/SIGINT (the
  step finishes, a checkpoint is written, exit 0), or on a NaN/Inf loss (:class:`NonFiniteLoss`:
  every loss is checked before anything is logged or saved);
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
``elapsed_s``; evaluation lines hold ``val_loss``, ``val_<sum>`` and the task's metrics.
"""

import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxformer.train import flops
from jaxformer.train import sharding as sh
from jaxformer.train.checkpoints import Checkpoints
from jaxformer.config import Config, resume_changes
from jaxformer.train.distributed import barrier, print0
from jaxformer.errors import InputError
from jaxformer import plots
from jaxformer.train.metrics import MetricsLog
from jaxformer.train.preemption import StopRequested, any_process
from jaxformer.train.optim import make_optimizer, make_schedule
from jaxformer.train.run import RunConfig
from jaxformer.train.step import LossFn, NonFiniteLoss, TrainState, check_finite, init_state, make_eval_step, make_train_step


class Task:
    """A model's side of training, built as ``Task(cfg, out, config, model_overrides, batch_shards)``.

    ``config`` is None for a fresh run: the task then builds its architecture config from the
    preset ``cfg.preset``, its data and ``model_overrides``, and writes its files in ``out``
    (``config.json``, tokenizer, data; process 0, then every process reads them). For a resumed run
    ``config`` is the stored one and the task reads its files back. Batches must have a multiple
    of ``batch_shards`` rows (the mesh's batch shards).
    """

    name: str
    run_config: type[RunConfig]
    model_config: type[Config]
    presets: dict[str, tuple[dict, dict]]  # name -> (architecture fields, run-config fields)
    best_metric: str | None = None  # evaluation key that decides best/
    higher_is_better: bool = True
    plot_panels: list[dict] = []  # see jaxformer.plots.curves

    config: Any  # the architecture config
    steps_per_epoch: int
    grad_accum: int = 1  # > 1: batches carry a leading micro-batch axis
    flops_per_token: float | None = None  # training FLOPs per token, for MFU
    pretrained: Any = None  # host params to start from (fine-tuning), or None
    d_model: int | None = None  # model width, for the noam schedule

    def init_params(self, key):
        """Random params as a plain pytree."""
        raise NotImplementedError

    def loss_fn(self, deterministic: bool) -> LossFn:
        """``loss_fn(params, batch, key) -> (loss sum, (tokens, {other sums}))``."""
        raise NotImplementedError

    def batch(self, step: int):
        """The global training batch of ``step`` (a pytree of numpy arrays, a pure function of
        ``cfg.seed`` and ``step``); with ``grad_accum > 1`` each leaf is [grad_accum, rows, ...]."""
        raise NotImplementedError

    def eval_batches(self) -> list:
        """Validation batches (pytrees of numpy arrays, rows first) for the validation loss."""
        raise NotImplementedError

    def evaluate(self, params, step: int, record: dict) -> dict:
        """Metrics beyond ``record`` (``val_loss`` and the other validation sums), e.g. BLEU or a
        sample; ``params`` are whole on this process."""
        return {}

    def finish(self, params) -> None:
        """Called once when the run reaches its end (not when stopped by a signal); process 0 only."""

    def describe(self) -> str:
        """One line about the data and model, printed at the start."""
        return ""


# --- run directories -------------------------------------------------------------------------------

def holds_run(out: Path) -> bool:
    return (out / "run.json").is_file() or (out / "checkpoints").is_dir()


def resolve(task_cls: type[Task], out: Path, run: dict, model: dict, resume: bool) -> tuple[RunConfig, Any]:
    """(run config, stored architecture config or None) for a run in ``out``.

    Fresh: the run config's defaults, then the preset's run fields, then ``run``. Resumed: the
    stored ``run.json`` with the changes in ``run`` that :func:`jaxformer.config.resume_changes`
    allows; the architecture cannot change (``model`` must agree with ``config.json``).
    """
    run_cls = task_cls.run_config
    if not resume:
        if holds_run(out):
            raise InputError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        preset = run.get("preset", run_cls.preset)
        if preset not in task_cls.presets:
            raise InputError(f"preset={preset!r}: choose from {', '.join(task_cls.presets)}")
        cfg = run_cls(**{**task_cls.presets[preset][1], **run})
        if cfg.steps is None and cfg.epochs is None and cfg.max_minutes is None:
            raise InputError("give the run a length: steps, epochs or max_minutes")
        if cfg.schedule == "cosine" and cfg.schedule_steps is None and cfg.steps is None and cfg.epochs is None:
            raise InputError("schedule=cosine needs the run's length in steps: give steps, epochs or schedule_steps")
        return cfg, None
    if not (out / "run.json").is_file():
        if (out / "checkpoints").is_dir() or (out / "latest").is_dir():
            raise InputError(f"--resume: {out} was written by an older jaxformer (no run.json) and cannot be "
                             "resumed; its best/ still loads for translating or generating")
        raise InputError(f"--resume: {out} holds no run (no run.json); start one without --resume")
    cfg = resume_changes(run_cls.load(out / "run.json"), run)
    config = task_cls.model_config.load(out / "config.json")
    differ = {k: v for k, v in model.items() if getattr(config, k) != v}
    if differ:
        raise InputError(f"--resume cannot change the architecture: {differ} (config.json has "
                         f"{ {k: getattr(config, k) for k in differ} })")
    return cfg, config


# --- the loop --------------------------------------------------------------------------------------

def train(task_cls: type[Task], out: str | Path, *, run: dict | RunConfig | None = None,
          model: dict | None = None, resume: bool = False, mesh: str | None = None,
          metrics_path: str | Path | None = None, progress: bool = True) -> dict:
    """Trains ``task_cls`` in the run directory ``out`` (see the module docstring).

    run: run-config fields to set (a dict, or a whole config); model: architecture fields to set
    (fresh runs). resume: continue the run in ``out``. mesh: ``"data=4,fsdp=2"`` style
    (:func:`jaxformer.train.sharding.make_mesh`; default: data parallel over all devices).
    Returns ``{"step", "stopped_by" (signal name or None), "records" (this session's metrics),
    "state", "config"}``; raises :class:`NonFiniteLoss` on a NaN/Inf loss.
    """
    t0 = time.time()
    out = Path(out).absolute()
    run = run.to_dict() if isinstance(run, RunConfig) else dict(run or {})
    cfg, stored = resolve(task_cls, out, run, dict(model or {}), resume)
    device_mesh = sh.make_mesh(mesh)
    out.mkdir(parents=True, exist_ok=True)
    barrier("jaxformer-out")
    rows = sh.batch_size_divisor(device_mesh)
    task = task_cls(cfg, out, stored, dict(model or {}), rows)
    if stored is None:
        if cfg.schedule == "cosine" and cfg.schedule_steps is None:  # fixed once: resumes keep the horizon
            cfg = cfg.replace(schedule_steps=cfg.length(task.steps_per_epoch))
    if jax.process_index() == 0:
        cfg.save(out / "run.json")  # a resumed run's with the changes --resume made
    barrier("jaxformer-run")

    schedule = make_schedule(cfg, task.d_model)
    optimizer = make_optimizer(cfg, schedule)

    def create(key, params=None):
        init_key, run_key = jax.random.split(key)
        return TrainState.create(task.init_params(init_key) if params is None else params, optimizer, run_key)

    ckpts = Checkpoints(out, cfg.keep)
    state, state_sh = init_state(create, jax.random.PRNGKey(cfg.seed), device_mesh, task.pretrained, ckpts)
    step = first_step = int(state.step)
    resumed = step > 0 or stored is not None
    accum = int(task.grad_accum > 1)
    batch_sh = sh.batch_sharding(device_mesh, batch_dim=accum)
    eval_sh = sh.batch_sharding(device_mesh, batch_dim=0)
    train_step = make_train_step(task.loss_fn(False), optimizer, grad_accum=task.grad_accum,
                                 state_shardings=state_sh, batch_sharding=batch_sh)
    eval_step = make_eval_step(task.loss_fn(True), state_sh.params, eval_sh)

    def put(tree, sharding, batch_dim):
        def leaf(x):
            if x.shape[batch_dim] % rows:
                raise InputError(f"a batch of {x.shape[batch_dim]} rows does not split over the {rows} batch "
                                 f"shards of mesh {dict(device_mesh.shape)}")
            return sh.put_batch(x, sharding, batch_dim)
        return jax.tree.map(leaf, tree)

    total = cfg.length(task.steps_per_epoch)
    ckpt_every = cfg.ckpt_every or cfg.eval_every
    n_dev = device_mesh.devices.size
    peak = math.nan
    if task.flops_per_token:
        peak, _ = flops.peak_flops(device_mesh.devices.flat[0], getattr(task.config, "dtype", "float32"))
    metrics = MetricsLog(metrics_path or out / "metrics.jsonl", step if resumed else None)
    print0(f"{task.name}: {'resuming at' if resumed else 'starting at'} step {step}"
           f"{f' of {total}' if total else ''}; {sum(x.size for x in jax.tree.leaves(state.params)):,} params; "
           f"mesh {dict(device_mesh.shape)} on {n_dev} {device_mesh.devices.flat[0].device_kind} device(s), "
           f"{jax.process_count()} process(es); {task.describe()}")

    def checkpoint_note() -> str:
        last = ckpts.latest_step()
        return ("No checkpoint was written yet." if last is None else
                f"The last good checkpoint is step {last} in {ckpts.states} (continue with --resume).")

    def evaluate() -> dict:
        sums = jax.device_get([eval_step(state.params, put(b, eval_sh, 0)) for b in task.eval_batches()])
        n = max(sum(float(k) for _, k, _ in sums), 1.0)
        record = dict(step=step, val_loss=sum(float(t) for t, _, _ in sums) / n)
        for name in sums[0][2] if sums else ():
            record[f"val_{name}"] = sum(float(aux[name]) for _, _, aux in sums) / n
        record.update(task.evaluate(sh.gathered(state.params), step, record))
        if task.best_metric and ckpts.save_best(state.params, task.best_metric, record[task.best_metric], step,
                                                task.higher_is_better):
            record["best"] = True
        record["elapsed_s"] = round(time.time() - t0, 1)
        return record

    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    pending, window = [], []  # (step, device metrics) not fetched yet; fetched since the last log line
    t_mark, compiled_at, tokens_since, last_eval, stopped_by = None, None, 0.0, None, None
    with StopRequested() as stop:
        while True:
            if total is not None and step >= total:
                break
            state, m = train_step(state, put(task.batch(step), batch_sh, accum))
            step += 1
            bar.update(1)
            pending.append((step, m))
            at_log, at_eval, at_ckpt = step % cfg.log_every == 0, step % cfg.eval_every == 0, step % ckpt_every == 0
            # One process: poll every step. Several: agree at log steps (collectives).
            stopping = time_up = False
            if jax.process_count() == 1 or at_log:
                stopping = any_process(bool(stop))
                time_up = any_process(cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes)
            last = time_up or (total is not None and step >= total)
            if t_mark is None:  # the session's first step includes compilation: not throughput
                jax.block_until_ready(m)
                t_mark, compiled_at = time.perf_counter(), step
            if not (at_log or at_eval or at_ckpt or stopping or last):
                continue
            fetched = jax.device_get([x for _, x in pending])
            try:  # every loss is checked before anything is logged or saved
                check_finite([(s, x["loss"]) for (s, _), x in zip(pending, fetched)], checkpoint_note)
            except NonFiniteLoss:
                bar.close()
                ckpts.close()
                raise
            window += fetched
            tokens_since += sum(float(x["tokens"]) for (s, _), x in zip(pending, fetched) if s != compiled_at)
            pending = []
            if at_log or last or stopping:
                record = _train_record(step, window, schedule, task.steps_per_epoch, tokens_since,
                                       time.perf_counter() - t_mark, task.flops_per_token, peak, n_dev, t0)
                metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}")
                window, tokens_since, t_mark = [], 0.0, time.perf_counter()
            paused = time.perf_counter()
            if stopping:
                ckpts.save(step, state)
                stopped_by = stop.signal or "signal on another process"
                break
            if at_eval or last:
                last_eval = evaluate()
                metrics.log(last_eval)
                if jax.process_index() == 0:
                    bar.write(_describe_eval(last_eval), file=sys.stderr)
            if at_ckpt or last:
                ckpts.save(step, state)
            if jax.process_index() == 0 and (at_eval or last):
                plots.curves(out / "curves.png", task.plot_panels, metrics.records)
            t_mark += time.perf_counter() - paused  # evaluations and saves are not training time
            if last:
                break
    bar.close()
    if stopped_by:
        if jax.process_index() == 0:
            plots.curves(out / "curves.png", task.plot_panels, metrics.records)
        print0(f"{stopped_by}: stopped after step {step} and saved a checkpoint in {ckpts.states}. "
               f"Continue with the same command plus --resume (e.g. --out {out} --resume).")
    else:
        if last_eval is None or last_eval["step"] != step:  # resumed at the end: nothing new ran
            last_eval = evaluate()
            metrics.log(last_eval)
            ckpts.save(step, state)
        params = sh.gathered(state.params)
        if jax.process_index() == 0:
            task.finish(jax.device_get(params))
        best = ckpts.best
        print0(f"done at step {step} ({(time.time() - t0) / 60:.1f} min): {_describe_eval(last_eval, texts=False)}"
               + (f"; best {best['metric']} {best['value']:.4g} at step {best['step']}" if best else ""))
    ckpts.close()
    return dict(step=step, stopped_by=stopped_by, state=state, config=cfg,
                records=[r for r in metrics.records if r["step"] > first_step])


def _train_record(step, window, schedule, steps_per_epoch, tokens, seconds, fpt, peak, n_dev, t0) -> dict:
    """The training line of ``metrics.jsonl`` for the steps in ``window`` (fetched metrics dicts)."""
    tok_s = tokens / seconds if tokens and seconds > 0 else None
    record = dict(step=step, loss=float(np.mean([x["loss"] for x in window])))
    for name in window[-1]:
        if name not in ("loss", "tokens", "grad_norm"):
            record[name] = float(np.mean([x[name] for x in window]))
    record.update(grad_norm=float(window[-1]["grad_norm"]), lr=float(schedule(step - 1)),
                  epoch=round(step / steps_per_epoch, 3), tokens_per_s=tok_s and round(tok_s, 1))
    if fpt:
        u = flops.mfu(tok_s, fpt, peak, n_dev)
        record["mfu"] = u and round(u, 5)
    record["elapsed_s"] = round(time.time() - t0, 1)
    return record


def _describe_eval(record: dict, texts: bool = True) -> str:
    """``step N: val_loss 2.345 bleu 12.3``, and with ``texts`` any text metric (a sample) on the next line."""
    nums = " ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "elapsed_s")
    lines = "".join(f"\n{k}: {v!r}" for k, v in record.items() if isinstance(v, str)) if texts else ""
    return f"step {record['step']}: {nums}{lines}"

