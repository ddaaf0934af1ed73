"""The training core both trainers share: the run settings they have in common, train state,
optimizer and schedule, jitted (sharded) train and eval steps, state placement on a mesh, and the
stop on a non-finite loss. The loop that drives them is :mod:`jaxformer.loop`.

A model plugs in through one function, ``loss_fn(params, batch, key) -> (loss summed over tokens,
(number of tokens, dict of other sums))`` (``key`` is None for evaluation); the steps divide by the
token count, so a batch's gradient is that of its per-token mean however it is split.
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxformer import sharding as sh
from jaxformer.config import Config, param
from jaxformer.errors import InputError
from jaxformer.schedules import noam, warmup_cosine


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Run settings both trainers share (stored in ``OUT/run.json``); each trainer's run config adds
    its data and evaluation fields and may change these defaults. ``resumable`` fields are the ones
    ``--resume`` may change (:func:`jaxformer.config.resume_changes`)."""

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


def make_schedule(cfg: TrainConfig, d_model: int | None = None) -> optax.Schedule:
    """The learning rate of ``cfg.schedule``; ``noam`` needs the model width ``d_model``, ``cosine``
    a resolved ``cfg.schedule_steps``."""
    if cfg.schedule == "noam":
        if d_model is None:
            raise InputError("schedule=noam needs a model width (d_model); use cosine or constant")
        return noam(d_model, cfg.warmup, cfg.lr)
    if cfg.schedule == "constant":
        return optax.linear_schedule(0.0, cfg.lr, cfg.warmup) if cfg.warmup else optax.constant_schedule(cfg.lr)
    if cfg.schedule_steps is None:
        raise InputError("schedule=cosine needs the run's length: give steps, epochs or schedule_steps")
    return warmup_cosine(cfg.lr, cfg.warmup, cfg.schedule_steps, cfg.min_lr_ratio)

LossFn = Callable[[Any, Any, jax.Array | None], tuple[jax.Array, tuple[jax.Array, dict]]]


class TrainState(NamedTuple):
    """Everything a run needs to continue: a plain pytree, saved whole by the checkpoints.

    step: int32[] updates done; key: uint32[2] the run's base PRNG key (dropout at step ``n`` uses
    ``fold_in(key, n)``, so a resumed run draws the same masks)."""

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, key) -> "TrainState":
        return cls(jnp.int32(0), params, optimizer.init(params), key)


def decay_mask(params):
    """True where weight decay applies: Dense kernels and an untied ``lm_head``; not biases,
    LayerNorm scales/biases or embeddings. Names decide, since stacked layers make biases 2-D."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "lm_head"), params)


def make_optimizer(cfg: TrainConfig, schedule) -> optax.GradientTransformation:
    """``cfg.optimizer``: ``"adam"`` or ``"adamw"`` (decoupled decay on :func:`decay_mask`'s params),
    after clipping the global gradient norm when ``cfg.clip_norm > 0``."""
    if cfg.optimizer == "adam":
        opt = optax.adam(schedule, cfg.b1, cfg.b2, cfg.eps)
    else:
        opt = optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm > 0 else opt


def init_state(create: Callable, key, mesh, params=None, checkpoints=None) -> tuple[TrainState, Any]:
    """(state, its shardings) on ``mesh``, by :func:`sharding.state_shardings` (parameters and
    optimizer state split over ``fsdp``): restored from the newest intact checkpoint of
    ``checkpoints`` (:meth:`jaxformer.checkpoint.Checkpoints.restore_latest`) when there is one, else
    ``create(key[, params]) -> TrainState`` run under ``jax.jit`` so that every array is born
    sharded. ``params``: host arrays to start from (a fine-tuning run)."""
    abstract = jax.eval_shape(create, key)
    shardings = sh.state_shardings(mesh, abstract)
    if checkpoints is not None:
        state, _ = checkpoints.restore_latest(sh.with_shardings(abstract, shardings))
        if state is not None:
            return state, shardings
    if params is None:
        return jax.jit(create, out_shardings=shardings)(key), shardings
    return jax.jit(create, out_shardings=shardings)(key, sh.put_global(params, shardings.params)), shardings


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, grad_accum: int = 1,
                    state_shardings=None, batch_sharding=None):
    """A jitted ``train_step(state, batch) -> (state, metrics)``.

    batch: a pytree of arrays; with ``grad_accum > 1`` each leaf has a leading axis of that many
    micro-batches, run one after another by a ``lax.scan`` (memory of one micro-batch). The update
    uses the gradient of the loss summed over all micro-batches divided by their total token count.
    Dropout uses ``fold_in(state.key, step)``, and ``fold_in(that, i)`` for micro-batch ``i``.
    Shardings (optional): NamedShardings of the state (a tree) and of the batch (one for every leaf);
    with them the step is jitted with these in/out shardings, gradients are constrained to the
    parameters' shardings and the metrics come back replicated.
    ``state`` is donated (argument 0): do not use it after the call. ``grad_accum`` is static (fixed
    here); nothing else is, so the step compiles once per distinct batch shape.
    metrics: ``loss`` (per token), ``tokens``, ``grad_norm`` (before clipping), and loss_fn's other
    sums divided by the tokens.
    """
    if (state_shardings is None) != (batch_sharding is None):
        raise ValueError("give both state_shardings and batch_sharding, or neither")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    param_shardings = None if state_shardings is None else state_shardings.params

    def constrain(grads):
        return grads if param_shardings is None else jax.lax.with_sharding_constraint(grads, param_shardings)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        if grad_accum == 1:
            (total, (n, aux)), grads = grad_fn(state.params, batch, key)
            grads = constrain(grads)
        else:
            def micro(carry, xs):
                i, micro_batch = xs
                (total, (n, aux)), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (total, n, aux, constrain(grads))), None

            first = jax.tree.map(lambda x: x[0], batch)
            (total, (n, aux)), grads = jax.eval_shape(grad_fn, state.params, first, key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (total, n, aux, grads))
            (total, n, aux, grads), _ = jax.lax.scan(micro, zeros, (jnp.arange(grad_accum), batch))
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / n.astype(g.dtype), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(loss=total / n, tokens=n, grad_norm=optax.tree.norm(grads),
                       **{k: v / n for k, v in aux.items()})
        return TrainState(state.step + 1, params, opt_state, state.key), metrics

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, sh.replicated(batch_sharding.mesh)), donate_argnums=0)


def make_eval_step(loss_fn: LossFn, param_shardings=None, batch_sharding=None):
    """Jitted ``eval_step(params, batch) -> (loss sum, tokens, dict of other sums)`` with
    ``key=None`` (no dropout); shardings as in :func:`make_train_step`. Nothing is static."""
    def eval_step(params, batch):
        total, (n, aux) = loss_fn(params, batch, None)
        return total, n, aux

    if (param_shardings is None) != (batch_sharding is None):
        raise ValueError("give both param_shardings and batch_sharding, or neither")
    if param_shardings is None:
        return jax.jit(eval_step)
    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=sh.replicated(batch_sharding.mesh))


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; ``step`` is the update that produced it."""

    def __init__(self, step: int, loss: float, checkpoint: str):
        super().__init__(f"loss is {loss} at step {step}: stopping. {checkpoint}")
        self.step = step


def check_finite(steps_and_losses, checkpoint_note: Callable[[], str]) -> None:
    """Raises :class:`NonFiniteLoss` at the first ``(step, loss)`` whose loss is NaN or Inf."""
    for step, loss in steps_and_losses:
        if not math.isfinite(float(loss)):
            raise NonFiniteLoss(step, float(loss), checkpoint_note())
