"""A model's side of training, as the loop (:mod:`jaxformer.train.loop`) sees it.

A task class declares its configs, presets and what "best" means; :meth:`Task.prepare` writes a
fresh run's files (architecture config, tokenizer, data) once; an instance, built from those files
for a fresh or a resumed run, gives the batches, the loss and the evaluation.
"""

from pathlib import Path
from typing import Any

from jaxformer.config import Config
from jaxformer.errors import InputError
from jaxformer.train.run import RunConfig
from jaxformer.train.step import LossFn


class Task:
    """A model's side of training: see the module docstring.

    Class attributes declare the trainer; the constructor sets the instance attributes below it.
    The run config's defaults, lowest first: the dataclass's, ``defaults``, the preset's run fields,
    the command line (:meth:`run_defaults`).
    """

    name: str
    run_config: type[RunConfig]
    model_config: type[Config]
    presets: dict[str, tuple[dict, dict]]  # name -> (architecture fields, run-config fields)
    defaults: dict = {}  # run-config fields this trainer sets differently from RunConfig's defaults
    best_metric: str | None = None  # evaluation key that decides best/
    higher_is_better: bool = True
    plot_panels: list[dict] = []  # see jaxformer.plots.curves

    config: Any  # the architecture config, from config.json
    steps_per_epoch: int
    grad_accum: int = 1  # > 1: batches carry a leading micro-batch axis
    flops_per_token: float | None = None  # training FLOPs per token, for MFU
    d_model: int | None = None  # model width, for the noam schedule
    # Host arrays the loss reads and training never changes (a LoRA run's frozen base), or None;
    # the loop places them on the mesh and passes them to loss_fn as a fourth argument.
    frozen: Any = None

    @classmethod
    def run_defaults(cls, preset: str | None = None) -> dict:
        """The run-config fields that ``preset`` (default: the trainer's default preset) sets over the
        dataclass defaults: ``defaults``, then the preset's run fields."""
        preset = preset or cls.defaults.get("preset", cls.run_config.preset)
        if preset not in cls.presets:
            raise InputError(f"preset={preset!r}: choose from {', '.join(cls.presets)}")
        return {**cls.defaults, "preset": preset, **cls.presets[preset][1]}

    @classmethod
    def prepare(cls, run: RunConfig, out: Path, model_overrides: dict) -> Any:
        """Writes a fresh run's files in ``out``: ``config.json`` (the architecture of the preset
        ``run.preset`` with ``model_overrides``), and the tokenizer and data the task reads back.
        Process 0 writes, every process returns once they exist. Returns host params to start from
        (fine-tuning), or None for a random initialisation. A resumed run does not prepare."""
        raise NotImplementedError

    def __init__(self, run: RunConfig, out: Path, batch_shards: int = 1):
        """The task of the run in ``out`` (its files written by :meth:`prepare`), on every process.
        Batches must have a multiple of ``batch_shards`` rows (the mesh's batch shards). The task
        may complete the run config (``self.run``, saved as ``run.json``), e.g. with settings read
        from its inputs."""
        self.run, self.out, self.batch_shards = run, out, batch_shards
        self.config = self.model_config.load(out / "config.json")

    def init_params(self, key):
        """Random params as a plain pytree."""
        raise NotImplementedError

    def loss_fn(self, deterministic: bool) -> LossFn:
        """``loss_fn(params, batch, key) -> (loss sum, (tokens, {other sums}))``; with ``frozen``,
        ``loss_fn(params, batch, key, frozen)``."""
        raise NotImplementedError

    def batch(self, step: int):
        """The global training batch of ``step`` (a pytree of numpy arrays, a pure function of
        ``run.seed`` and ``step``); with ``grad_accum > 1`` each leaf is [grad_accum, rows, ...]."""
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
