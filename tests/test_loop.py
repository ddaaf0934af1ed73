"""The shared training loop with a toy task (least squares, numpy reference): cadence, length limits,
resume, best, signals and the NaN stop, in seconds. The real trainers' runs are in
test_gpt2_train.py and test_translator_train.py."""

import dataclasses
import json
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.config import Config, param
from jaxformer.errors import InputError
from jaxformer.train.loop import Due, cadence, train
from jaxformer.train.run import RunConfig
from jaxformer.train.step import NonFiniteLoss
from jaxformer.train.task import Task


@dataclasses.dataclass(frozen=True)
class ToyModel(Config):
    features: int = param(3, "inputs", ge=1)


@dataclasses.dataclass(frozen=True)
class ToyRun(RunConfig):
    rows: int = param(4, "rows per batch", ge=1)
    nan_at: int | None = param(None, "make the batch of this step NaN")
    signal_at: int | None = param(None, "send SIGTERM to this process while building this step's batch")


class Toy(Task):
    """Least squares ``y = x . w``; the batch of a step comes from ``rng(seed, step)``."""

    name = "toy"
    run_config, model_config = ToyRun, ToyModel
    presets = {"toy": ({}, dict(lr=0.05, schedule="constant", warmup=0, clip_norm=0.0, weight_decay=0.0))}
    defaults = dict(preset="toy", weight_decay=0.5, log_every=3)  # under the preset's fields
    best_metric, higher_is_better = "val_loss", False
    plot_panels = [dict(title="loss", series=[("train", "loss", "-"), ("validation", "val_loss", "o-")])]

    @classmethod
    def prepare(cls, run, out, model_overrides):
        ToyModel(**model_overrides).save(out / "config.json")

    def __init__(self, run, out, batch_shards=1):
        super().__init__(run, out, batch_shards)
        self.steps_per_epoch = 5
        self.w_true = np.arange(1.0, self.config.features + 1, dtype=np.float32)

    def init_params(self, key):
        return {"w": jnp.zeros(self.config.features)}

    def loss_fn(self, deterministic):
        def loss_fn(params, batch, key):
            err = batch["x"] @ params["w"] - batch["y"]
            return (err**2).sum(), (jnp.float32(err.size), {"abs": jnp.abs(err).sum()})
        return loss_fn

    def _batch(self, seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(self.run.rows, self.config.features)).astype(np.float32)
        return {"x": x, "y": x @ self.w_true}

    def batch(self, step):
        if step + 1 == self.run.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        b = self._batch([self.run.seed, step])
        if step + 1 == self.run.nan_at:
            b["y"] = b["y"] * np.nan
        return b

    def eval_batches(self):
        return [self._batch([99, i]) for i in range(2)]

    def evaluate(self, params, step, record):
        return {"w_error": float(np.abs(np.asarray(params["w"]) - self.w_true).max())}


def lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_cadence_says_what_is_due_at_each_step():
    """Every 4 steps a line, every 5 an evaluation, every 3 a checkpoint, 12 steps: worked out by hand."""
    run = RunConfig(log_every=4, eval_every=5, ckpt_every=3)
    due = lambda d: {k for k, v in d._asdict().items() if v}  # noqa: E731
    assert {s: due(cadence(s, run, 12)) for s in range(1, 13)} == {
        1: set(), 2: set(), 3: {"checkpoint"}, 4: {"log"}, 5: {"evaluate"}, 6: {"checkpoint"}, 7: set(),
        8: {"log"}, 9: {"checkpoint"}, 10: {"evaluate"}, 11: set(), 12: {"log", "checkpoint", "evaluate", "last"}}
    # the time limit ends the run at any step, with everything once more
    assert cadence(7, run, 12, time_up=True) == Due(log=True, evaluate=True, checkpoint=True, stop=False, last=True)
    # a signal: a line and a checkpoint, no evaluation, also where one was due and at the end
    signalled = Due(log=True, evaluate=False, checkpoint=True, stop=True, last=False)
    assert cadence(5, run, 12, signalled=True) == cadence(12, run, 12, True, True) == signalled
    # no step limit: never the end by length; checkpoints default to the evaluations' cadence
    run = RunConfig(log_every=10, eval_every=5)
    assert due(cadence(5, run, None)) == {"evaluate", "checkpoint"}
    assert due(cadence(10, run, None)) == {"log", "evaluate", "checkpoint"}
    assert due(cadence(10**6 + 1, run, None)) == set()


def test_cadence_length_best_and_numbers(tmp_path):
    r = train(Toy, tmp_path, run=dict(steps=12, log_every=4, eval_every=5, ckpt_every=3), progress=False)
    recs = lines(tmp_path)
    assert [(x["step"], "loss" in x) for x in recs] == [(4, True), (5, False), (8, True), (10, False),
                                                         (12, True), (12, False)]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [9, 12]  # keep=2
    evals = [x for x in recs if "val_loss" in x]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == dict(metric="val_loss", value=min(x["val_loss"] for x in evals),
                        step=min(evals, key=lambda x: x["val_loss"])["step"])
    assert [x["best"] for x in evals if "best" in x] == [True] * sum("best" in x for x in evals)
    # Adam (betas 0.9/0.95, eps 1e-8, lr 0.05, no decay) on the same batches, in float64
    w, m, v = np.zeros(3), np.zeros(3), np.zeros(3)
    toy = Toy(ToyRun(steps=12), tmp_path)
    for t in range(1, 13):
        b = toy.batch(t - 1)
        err = b["x"] @ w - b["y"]
        g = 2 * b["x"].T @ err / err.size
        m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g**2
        w -= 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.95**t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(r["state"].params["w"]), w, rtol=1e-5)
    assert recs[0]["tokens_per_s"] > 0  # steps 2-4: the first step (compilation) is not counted
    assert recs[0]["epoch"] == 0.8 and np.isclose(recs[0]["lr"], 0.05) and "abs" in recs[0]
    assert (tmp_path / "curves.png").is_file()
    stored = json.loads((tmp_path / "run.json").read_text())
    # the task's defaults, then the preset's run fields (over the defaults), then the caller's
    assert stored["steps"] == 12 and stored["lr"] == 0.05 and stored["weight_decay"] == 0.0
    assert stored["preset"] == "toy" and stored["log_every"] == 4 and Toy.run_defaults()["log_every"] == 3


@pytest.mark.slow
def test_epochs_and_minutes_limit_the_run(tmp_path):
    assert train(Toy, tmp_path / "e", run=dict(epochs=1.2), progress=False)["step"] == 6  # ceil(1.2 * 5)
    r = train(Toy, tmp_path / "m", run=dict(max_minutes=1e-9, log_every=1000), progress=False)
    assert r["step"] == 1 and lines(tmp_path / "m")[-1]["step"] == 1  # stops after the first step, evaluated
    with pytest.raises(InputError, match="give the run a length"):
        train(Toy, tmp_path / "n", progress=False)


@pytest.mark.slow
def test_resume_is_bitwise_and_keeps_settings(tmp_path):
    straight = train(Toy, tmp_path / "a", run=dict(steps=10, log_every=2, eval_every=4), progress=False)
    train(Toy, tmp_path / "b", run=dict(steps=5, log_every=2, eval_every=4), progress=False)
    with pytest.raises(InputError, match="--resume cannot change lr"):
        train(Toy, tmp_path / "b", run=dict(lr=0.1), resume=True, progress=False)
    with pytest.raises(InputError, match="cannot change the architecture"):
        train(Toy, tmp_path / "b", model=dict(features=4), resume=True, progress=False)
    resumed = train(Toy, tmp_path / "b", run=dict(steps=10), resume=True, progress=False)
    np.testing.assert_array_equal(resumed["state"].params["w"], straight["state"].params["w"])
    # The same lines; a training line's loss is the mean since the previous line (after the resume:
    # since step 5's), and evaluations are equal.
    got = [(x["step"], x.get("val_loss")) for x in lines(tmp_path / "b") if x["step"] != 5]
    assert got == [(x["step"], x.get("val_loss")) for x in lines(tmp_path / "a")]


def test_sigterm_checkpoints_and_returns(tmp_path):
    r = train(Toy, tmp_path, run=dict(steps=100, signal_at=7, log_every=50), progress=False)
    assert r["stopped_by"] == "SIGTERM" and r["step"] == 7
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [7]
    assert lines(tmp_path)[-1]["step"] == 7 and "loss" in lines(tmp_path)[-1]


def test_nan_stops_before_anything_is_saved(tmp_path):
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 6: stopping. The last good checkpoint is step 4"):
        train(Toy, tmp_path, run=dict(steps=20, nan_at=6, ckpt_every=4, log_every=8, eval_every=8), progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4]
    assert [x["step"] for x in lines(tmp_path)] == []  # step 8 would have been the first line
