"""Training loop: data, tokenizer, bucketed batches, jitted step, evaluation, checkpoints, metrics.

Output directory (also what ``translate.py --model`` reads)::

    config.json  tokenizer.json  best/ latest/ checkpoints.json   (see TrainCheckpoints)
    metrics.jsonl  curves.png  data/{valid,test}.{en,fr}
"""

import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import sacrebleu
from tqdm import tqdm

from jaxformer.checkpoint import TrainCheckpoints
from jaxformer.losses import cross_entropy
from jaxformer.plotting import plot_curves
from jaxformer.schedules import noam, warmup_cosine
from jaxformer.training import TrainState, make_optimizer, make_train_step
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


def make_eval_step(cfg: TranslatorConfig):
    """Jitted ``eval_step(params, batch) -> (loss sum, NLL sum, tokens)`` without dropout; nothing static."""
    loss_fn = make_loss_fn(cfg, deterministic=True)

    @jax.jit
    def eval_step(params, batch):
        loss, (n, aux) = loss_fn(params, batch, None)
        return loss, aux["nll"], n

    return eval_step


def _as_dict(batch) -> dict:
    return dataclasses.asdict(batch)


class Run:
    """One training run in ``out``; ``resume`` continues it from ``out/latest``."""

    def __init__(self, cfg: TranslatorConfig, data, out: str | Path, resume: bool = False,
                 metrics_path: str | Path | None = None, progress: bool = True):
        self.t0 = time.time()
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = TrainCheckpoints(self.out)
        self.resume = resume and self.ckpt.has_latest
        if self.resume:
            cfg = TranslatorConfig.load(self.out / "config.json")
        self.cfg, self.progress = cfg, progress
        self.metrics_path = Path(metrics_path) if metrics_path else self.out / "metrics.jsonl"
        self.eval_step = make_eval_step(cfg)

        pairs = data if isinstance(data, list) else tdata.load_pairs(data)
        splits = tdata.split_pairs(pairs)
        (self.out / "data").mkdir(exist_ok=True)
        for name in ("valid", "test"):
            tdata.write_split(splits[name], self.out / "data" / name)
        if self.resume:
            self.tok = tk.load_tokenizer(self.out / "tokenizer.json")
        else:
            train = splits["train"]
            self.tok = tk.train_tokenizer([p[0] for p in train] + [p[1] for p in train], cfg.vocab_size)
            self.tok.save(str(self.out / "tokenizer.json"))
            cfg.save(self.out / "config.json")

        enc = lambda ps, i: tk.encode(self.tok, [p[i] for p in ps])  # noqa: E731
        self.train_batches = Batcher(enc(splits["train"], 0), enc(splits["train"], 1), cfg.buckets,
                                     cfg.batch_tokens, cfg.max_batch_sentences)
        self.valid_batches = Batcher(enc(splits["valid"], 0), enc(splits["valid"], 1), cfg.buckets,
                                     cfg.batch_tokens)
        step = max(1, len(splits["valid"]) // cfg.eval_sentences)
        self.bleu_pairs = splits["valid"][::step][:cfg.eval_sentences]  # spread over all lengths
        print(f"pairs per split { {k: len(v) for k, v in splits.items()} }; "
              f"train batches/epoch {len(self.train_batches)}, {self.train_batches.dropped} overlong pairs dropped; "
              f"batch shapes {self.train_batches.shapes()}", file=sys.stderr)

    def evaluate(self, params) -> dict:
        """Validation loss/NLL per target token, and greedy BLEU/chrF on the detokenised output."""
        loss = nll = n = 0.0
        for b in self.valid_batches.in_order():
            l_, nll_, n_ = self.eval_step(params, _as_dict(b))
            loss, nll, n = loss + float(l_), nll + float(nll_), n + float(n_)
        with warnings.catch_warnings():  # sources truncated to max_len: expected, not news
            warnings.simplefilter("ignore")
            hyps = TranslatorModel(self.cfg, params, self.tok, batch_size=128).translate(
                [p[0] for p in self.bleu_pairs], beam_size=1)
        refs = [[p[1] for p in self.bleu_pairs]]
        return dict(val_loss=loss / n, val_nll=nll / n, bleu=sacrebleu.corpus_bleu(hyps, refs).score,
                    chrf=sacrebleu.corpus_chrf(hyps, refs).score)

    def run(self, *, max_minutes: float | None = None, epochs: float | None = None, steps: int | None = None):
        """Trains until the first of the limits given (minutes counted from the start of the run,
        data preparation and compilation included); then evaluates, saves and plots once more."""
        cfg, spe = self.cfg, len(self.train_batches)
        total = steps if steps is not None else math.ceil(epochs * spe) if epochs is not None else None
        schedule = make_schedule(cfg, total)
        optimizer = make_optimizer(cfg.optimizer, schedule, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
        train_step = make_train_step(make_loss_fn(cfg), optimizer)

        init_key, run_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
        state = TrainState.create(init_params(cfg, init_key), optimizer, run_key)
        records = []
        if self.resume:
            state = self.ckpt.restore_latest(state)
            if self.metrics_path.is_file():
                records = [r for r in map(json.loads, self.metrics_path.read_text().splitlines())
                           if r["step"] <= int(state.step)]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        step = int(state.step)
        print(f"{'resuming at' if self.resume else 'starting at'} step {step}; "
              f"{sum(x.size for x in jax.tree.leaves(state.params)):,} params", file=sys.stderr)

        def out_of_time():
            return max_minutes is not None and time.time() - self.t0 > 60 * max_minutes

        def log(record):
            records.append(record)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

        def evaluate_and_save(train_loss):
            record = dict(step=step, loss=train_loss, **self.evaluate(state.params),
                          elapsed_s=round(time.time() - self.t0, 1))
            if self.ckpt.save_best(state.params, record["bleu"], step):
                record["best"] = True
            self.ckpt.save_latest(state, step)
            log(record)
            plot(records, self.out / "curves.png")
            return record

        bar = tqdm(total=total, initial=step, disable=not self.progress, unit="step", dynamic_ncols=True)
        window, tokens, t_log, last_loss, last_eval = [], 0.0, time.time(), float("nan"), None
        while (total is None or step < total) and not out_of_time():
            for batch in self.train_batches.epoch(cfg.seed, step // spe, step % spe):
                state, m = train_step(state, _as_dict(batch))
                step += 1
                window.append(m)
                bar.update(1)
                if step % cfg.log_every == 0:
                    ms = jax.device_get(window)
                    tokens = sum(float(x["tokens"]) for x in ms)
                    last_loss = float(np.mean([x["loss"] for x in ms]))
                    dt, t_log, window = time.time() - t_log, time.time(), []
                    log(dict(step=step, loss=last_loss, nll=float(np.mean([x["nll"] for x in ms])),
                             lr=float(schedule(step - 1)), epoch=round(step / spe, 3),
                             tokens_per_s=round(tokens / dt, 1), elapsed_s=round(time.time() - self.t0, 1)))
                    bar.set_postfix(loss=f"{last_loss:.3f}")
                if step % cfg.eval_every == 0:
                    last_eval = evaluate_and_save(last_loss)
                    bar.write(f"step {step}: val_loss {last_eval['val_loss']:.3f} BLEU {last_eval['bleu']:.2f} "
                              f"chrF {last_eval['chrf']:.2f}")
                    t_log = time.time()
                if (total is not None and step >= total) or out_of_time():
                    break
        bar.close()
        if last_eval is None or last_eval["step"] != step:
            last_eval = evaluate_and_save(last_loss)
        print(f"done at step {step} ({(time.time() - self.t0) / 60:.1f} min): BLEU {last_eval['bleu']:.2f}, "
              f"best {self.ckpt.meta['best']:.2f} at step {self.ckpt.meta['best_step']}", file=sys.stderr)
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
