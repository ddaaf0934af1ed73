"""A training run's settings: the fields both trainers share (``run.json``); each trainer's run config
adds its data and evaluation fields."""

import dataclasses
import math

from jaxformer.config import Config, param


@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    """Run settings both trainers share (stored in ``OUT/run.json``); each trainer's run config only
    adds fields (its data and evaluation); a trainer's other defaults are its task's ``defaults``
    (:meth:`jaxformer.train.task.Task.run_defaults`). ``resumable`` fields are the ones ``--resume``
    may change (:func:`jaxformer.config.resume_changes`)."""

    preset: str = param("default", "named setup of the model (and run defaults)")
    steps: int | None = param(None, "stop after this many updates", ge=1, resumable=True)
    epochs: float | None = param(None, "stop after this many passes over the training data", gt=0, resumable=True)
    max_minutes: float | None = param(None, "stop after this many minutes of this session (data preparation "
                                            "included)", gt=0, resumable=True)
    seed: int = param(0, "seed of the initialisation, the data order and dropout")
    optimizer: str = param("adamw", "adam, or adamw (decoupled decay on Dense kernels only)",
                           choices=("adam", "adamw"))
    lr: float = param(1e-3, "peak learning rate (noam: the factor before d_model^-0.5)", gt=0)
    schedule: str = param("cosine", "cosine: warm-up then cosine decay; noam: warm-up then 1/sqrt(step); "
                                    "constant: warm-up then flat", choices=("cosine", "noam", "constant"))
    warmup: int = param(100, "linear warm-up steps", ge=0)
    schedule_steps: int | None = param(None, "cosine decay horizon (default: the run's length in steps)", ge=1)
    min_lr_ratio: float = param(0.1, "cosine: final learning rate / peak", ge=0, le=1)
    weight_decay: float = param(0.1, "AdamW decoupled weight decay", ge=0)
    clip_norm: float = param(1.0, "clip the global gradient norm to this (0: off)", ge=0)
    b1: float = param(0.9, "Adam beta1", ge=0, lt=1)
    b2: float = param(0.95, "Adam beta2", ge=0, lt=1)
    eps: float = param(1e-8, "Adam epsilon", gt=0)
    log_every: int = param(10, "steps between logged training metrics", ge=1, resumable=True)
    eval_every: int = param(200, "steps between evaluations", ge=1, resumable=True)
    ckpt_every: int | None = param(None, "steps between checkpoints (default: eval_every)", ge=1, resumable=True)
    keep: int = param(2, "train-state checkpoints kept", ge=1, resumable=True)

    def length(self, steps_per_epoch: int) -> int | None:
        """The run's length in steps from ``steps`` and ``epochs`` (the smaller), None if neither."""
        limits = [n for n in (self.steps, self.epochs and math.ceil(self.epochs * steps_per_epoch)) if n]
        return min(limits) if limits else None
