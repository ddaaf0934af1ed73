"""Training loop: data, tokenizer, bucketed batches, jitted step, evaluation, checkpoints, metrics.

The train step, optimizer, checkpoints, sharding and metrics log are the shared ones
(:mod:`jaxformer.training`, :mod:`jaxformer.checkpoint`, :mod:`jaxformer.sharding`,
:mod:`jaxformer.metrics`); this module adds the translator's loss, evaluation (BLEU) and loop.

Output directory (also what ``translate.py --model`` reads)::

    config.json  tokenizer.json  checkpoints/<step>/  best/  best.json   (see Checkpoints)
    metrics.jsonl  curves.png  data/{valid,test}.{en,fr}
"""

import dataclasses
import math
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import sacrebleu
from tqdm import tqdm

from jaxformer import sharding as sh
from jaxformer.checkpoint import Checkpoints
from jaxformer.distributed import barrier, print0
from jaxformer.losses import cross_entropy
from jaxformer.metrics import MetricsLog, plot_curves
from jaxformer.resumable import StopRequested, any_process
from jaxformer.schedules import noam, warmup_cosine
from jaxformer.training import (NonFiniteLoss, TrainState, check_finite, init_state, make_eval_step,
                                make_optimizer, make_train_step)
from jaxformer.translator import data as tdata
from jaxformer.translator import tokenizer as tk
from jaxformer.translator.batching import Batcher
from jaxformer.translator.config import TranslatorConfig
from jaxformer.translator.decode import TranslatorModel
from jaxformer.translator.model import Translator, init_params


def make_schedule(cfg: TranslatorConfig, total_steps: int | None):
    if cfg.schedule == "noam":
        return noam(cfg.d_model, cfg.warmup_steps, cfg.lr)
    if cfg.schedule == "cosine":
        if total_steps is None:
            raise ValueError("the cosine schedule needs the run length: use --steps or --epochs")
        return warmup_cosine(cfg.lr, cfg.warmup_steps, total_steps)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def make_loss_fn(cfg: TranslatorConfig, deterministic: bool = False):
    """``loss_fn(params, batch, key) -> (loss sum, (tokens, {"nll": nll sum}))`` (see make_train_step)."""
    model = Translator(cfg, deterministic=deterministic)

    def loss_fn(params, batch, key):
        rngs = None if deterministic else {"dropout": key}
        logits = model.apply({"params": params}, batch["src"], batch["tgt_in"], rngs=rngs)
        loss, nll, n = cross_entropy(logits, batch["tgt_out"], batch["tgt_out"] != tk.PAD_ID, cfg.label_smoothing)
        return loss, (n, {"nll": nll})

    return loss_fn


class Run:
    """One training run in ``out``; ``resume`` continues it from its latest checkpoint.

    mesh: ``"data=4,fsdp=2"`` style (:func:`sharding.make_mesh`; default: data parallel over all
    devices). In a multi-process run every process builds the same batches and feeds its rows;
    process 0 writes the files.
    """

    def __init__(self, cfg: TranslatorConfig, data, out: str | Path, resume: bool = False,
                 metrics_path: str | Path | None = None, progress: bool = True, mesh: str | None = None):
        self.t0 = time.time()
        self.out = Path(out).absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / "latest").is_dir() or (self.out / "checkpoints.json").is_file():
            raise ValueError(f"{self.out} holds a run in the layout of jaxformer before the shared Checkpoints "
                             "(latest/, checkpoints.json); it cannot be resumed: start a new --out (its best/ "
                             "still translates)")
        self.ckpts = Checkpoints(self.out)
        self.resume = self.ckpts.latest_step() is not None
        if self.resume and not resume:
            raise FileExistsError(f"{self.out} already holds checkpoints: pass --resume, or choose a new --out")
        if self.resume:
            cfg = TranslatorConfig.load(self.out / "config.json")
        self.cfg, self.progress = cfg, progress
        self.metrics_path = Path(metrics_path) if metrics_path else self.out / "metrics.jsonl"
        self.mesh = sh.make_mesh(mesh)
        rows = sh.batch_size_divisor(self.mesh)

        pairs = data if isinstance(data, list) else tdata.load_pairs(data)
        splits = tdata.split_pairs(pairs)
        if jax.process_index() == 0:
            (self.out / "data").mkdir(exist_ok=True)
            for name in ("valid", "test"):
                tdata.write_split(splits[name], self.out / "data" / name)
            if not self.resume:
                train = splits["train"]
                tok = tk.train_tokenizer([p[0] for p in train] + [p[1] for p in train], cfg.vocab_size)
                tok.save(str(self.out / "tokenizer.json"))
                cfg.save(self.out / "config.json")
        barrier("jaxformer-translator-data")
        self.tok = tk.load_tokenizer(self.out / "tokenizer.json")

        enc = lambda ps, i: tk.encode(self.tok, [p[i] for p in ps])  # noqa: E731
        self.train_batches = Batcher(enc(splits["train"], 0), enc(splits["train"], 1), cfg.buckets,
                                     cfg.batch_tokens, cfg.max_batch_sentences, row_multiple=rows)
        self.valid_batches = Batcher(enc(splits["valid"], 0), enc(splits["valid"], 1), cfg.buckets,
                                     cfg.batch_tokens, row_multiple=rows)
        step = max(1, len(splits["valid"]) // cfg.eval_sentences)
        self.bleu_pairs = splits["valid"][::step][:cfg.eval_sentences]  # spread over all lengths
        print0(f"pairs per split { {k: len(v) for k, v in splits.items()} }; "
               f"train batches/epoch {len(self.train_batches)}, {self.train_batches.dropped} overlong pairs dropped; "
               f"batch shapes {self.train_batches.shapes()}; mesh {dict(self.mesh.shape)}")

    def evaluate(self, params, eval_step, put) -> dict:
        """Validation loss/NLL per target token, and greedy BLEU/chrF on the detokenised output."""
        sums = jax.device_get([eval_step(params, put(b)) for b in self.valid_batches.in_order()])
        n = sum(float(k) for _, k, _ in sums)
        loss, nll = sum(float(t) for t, _, _ in sums), sum(float(aux["nll"]) for _, _, aux in sums)
        with warnings.catch_warnings():  # sources truncated to max_len: expected, not news
            warnings.simplefilter("ignore")
            hyps = TranslatorModel(self.cfg, sh.gathered(params), self.tok, batch_size=128).translate(
                [p[0] for p in self.bleu_pairs], beam_size=1)
        refs = [[p[1] for p in self.bleu_pairs]]
        return dict(val_loss=loss / n, val_nll=nll / n, bleu=sacrebleu.corpus_bleu(hyps, refs).score,
                    chrf=sacrebleu.corpus_chrf(hyps, refs).score)

    def batches_from(self, step: int):
        """The training batches from ``step`` on, epoch after epoch (the same on every resume)."""
        epoch, start = divmod(step, len(self.train_batches))
        while True:
            yield from self.train_batches.epoch(self.cfg.seed, epoch, start)
            epoch, start = epoch + 1, 0

    def run(self, *, max_minutes: float | None = None, epochs: float | None = None, steps: int | None = None):
        """Trains until the first of the limits given (minutes counted from the start of the run,
        data preparation and compilation included), then evaluates, saves and plots once more; or
        until SIGTERM/SIGINT, which saves a checkpoint without evaluating. A NaN/Inf loss raises
        :class:`NonFiniteLoss`. Returns (state, the last evaluation record or None)."""
        cfg, spe = self.cfg, len(self.train_batches)
        total = steps if steps is not None else math.ceil(epochs * spe) if epochs is not None else None
        schedule = make_schedule(cfg, total)
        optimizer = make_optimizer(schedule, name=cfg.optimizer, weight_decay=cfg.weight_decay,
                                   clip_norm=cfg.clip_norm)

        def create(key):
            init_key, run_key = jax.random.split(key)
            return TrainState.create(init_params(cfg, init_key), optimizer, run_key)

        state, state_sh = init_state(create, jax.random.PRNGKey(cfg.seed), self.mesh, checkpoints=self.ckpts)
        batch_sh = sh.batch_sharding(self.mesh, 0, 2)
        train_step = make_train_step(make_loss_fn(cfg), optimizer, state_shardings=state_sh, batch_sharding=batch_sh)
        eval_step = make_eval_step(make_loss_fn(cfg, deterministic=True), state_sh.params, batch_sh)
        put = lambda b: {k: sh.put_batch(v, batch_sh) for k, v in dataclasses.asdict(b).items()}  # noqa: E731
        step = int(state.step)
        metrics = MetricsLog(self.metrics_path, step if self.resume else None)
        print0(f"{'resuming at' if self.resume else 'starting at'} step {step}; "
               f"{sum(x.size for x in jax.tree.leaves(state.params)):,} params")

        def out_of_time():
            return max_minutes is not None and time.time() - self.t0 > 60 * max_minutes

        def checkpoint_note() -> str:
            last = self.ckpts.latest_step()
            return ("No checkpoint was written yet." if last is None else
                    f"The last good checkpoint is step {last} in {self.ckpts.states} (continue with --resume).")

        def evaluate_and_save(train_loss):
            record = dict(step=step, loss=train_loss, **self.evaluate(state.params, eval_step, put),
                          elapsed_s=round(time.time() - self.t0, 1))
            if self.ckpts.save_best(state.params, "bleu", record["bleu"], step):
                record["best"] = True
            self.ckpts.save(step, state)
            metrics.log(record)
            if jax.process_index() == 0:
                plot(metrics.records, self.out / "curves.png")
            return record

        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                   disable=not self.progress or jax.process_index() != 0)
        pending, window, last_eval, time_up, stopped_by = [], [], None, False, None
        t_log, last_loss = time.time(), math.nan
        with StopRequested() as stop:
            for batch in self.batches_from(step):
                if (total is not None and step >= total) or time_up:
                    break
                state, m = train_step(state, put(batch))
                step += 1
                pending.append((step, m))
                bar.update(1)
                at_log, at_eval = step % cfg.log_every == 0, step % cfg.eval_every == 0
                # One process: poll every step. Several: agree at log steps (collectives).
                if jax.process_count() == 1 or at_log:
                    time_up = any_process(out_of_time())
                    if any_process(bool(stop)):
                        stopped_by = stop.signal or "signal on another process"
                if at_log or at_eval or stopped_by:  # every loss is checked before anything is saved
                    ms = jax.device_get([x for _, x in pending])
                    try:
                        check_finite([(s, x["loss"]) for (s, _), x in zip(pending, ms)], checkpoint_note)
                    except NonFiniteLoss:
                        bar.close()
                        raise
                    window, pending = window + ms, []
                if at_log:
                    ms, window = window, []
                    last_loss = float(np.mean([x["loss"] for x in ms]))
                    dt, t_log = time.time() - t_log, time.time()
                    metrics.log(dict(step=step, loss=last_loss, nll=float(np.mean([x["nll"] for x in ms])),
                                     lr=float(schedule(step - 1)), epoch=round(step / spe, 3),
                                     tokens_per_s=round(sum(float(x["tokens"]) for x in ms) / dt, 1),
                                     elapsed_s=round(time.time() - self.t0, 1)))
                    bar.set_postfix(loss=f"{last_loss:.3f}")
                if stopped_by:
                    self.ckpts.save(step, state)
                    break
                if at_eval:
                    last_eval = evaluate_and_save(last_loss)
                    if jax.process_index() == 0:
                        bar.write(f"step {step}: val_loss {last_eval['val_loss']:.3f} BLEU {last_eval['bleu']:.2f} "
                                  f"chrF {last_eval['chrf']:.2f}")
                    t_log = time.time()
        bar.close()
        if pending:  # the steps since the last log line
            check_finite([(s, float(x["loss"])) for s, x in pending], checkpoint_note)
        if stopped_by:
            print0(f"{stopped_by}: stopped after step {step} and saved a checkpoint in {self.ckpts.states}. "
                   f"Continue with --resume (e.g. --out {self.out} --resume and the same limit).")
            self.ckpts.close()
            return state, None
        if last_eval is None or last_eval["step"] != step:
            last_eval = evaluate_and_save(last_loss)
        self.ckpts.close()
        best = self.ckpts.best
        print0(f"done at step {step} ({(time.time() - self.t0) / 60:.1f} min): BLEU {last_eval['bleu']:.2f}, "
               f"best {best['value']:.2f} at step {best['step']}")
        return state, last_eval


def plot(records: list[dict], path: Path) -> None:
    """PNG with the training/validation loss and the validation BLEU against the step."""
    # Evaluation lines repeat the last training loss; only training lines (they carry lr) plot it.
    rows = [r if "lr" in r else {k: v for k, v in r.items() if k != "loss"} for r in records]
    plot_curves(path, [
        dict(title="loss", ylabel="loss per target token",
             series=[("train (label-smoothed)", "loss", "-"), ("validation", "val_loss", "o-")]),
        dict(title="validation (greedy)", series=[("BLEU", "bleu", "o-"), ("chrF", "chrf", "s--")]),
    ], rows)
