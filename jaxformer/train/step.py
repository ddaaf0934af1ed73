"""The jitted steps both trainers share: train state, its placement on a mesh, sharded train and
eval steps with gradient accumulation, and the stop on a non-finite loss. The loop that drives them
is :mod:`jaxformer.train.loop`.

A model plugs in through one function, ``loss_fn(params, batch, key) -> (loss summed over tokens,
(number of tokens, dict of other sums))`` (``key`` is None for evaluation); the steps divide by the
token count, so a batch's gradient is that of its per-token mean however it is split. A run that
trains an adapter on a frozen model (LoRA) passes the frozen params as ``frozen``: then the loss is
``loss_fn(params, batch, key, frozen)`` and only ``params`` (the adapter) are trained.
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxformer.train import sharding as sh

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


def init_state(create: Callable, key, mesh, params=None, checkpoints=None) -> tuple[TrainState, Any]:
    """(state, its shardings) on ``mesh``, by :func:`sharding.state_shardings` (parameters and
    optimizer state split over ``fsdp``): restored from the newest intact checkpoint of
    ``checkpoints`` (:meth:`jaxformer.train.checkpoints.Checkpoints.restore_latest`) when there is one, else
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
                    state_shardings=None, batch_sharding=None, frozen=None):
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
    frozen: arrays the loss reads and training leaves as they are (a LoRA run's base), placed
    where they stay; then ``loss_fn(params, batch, key, frozen)``. They are an argument of the
    jitted step, neither donated nor differentiated (closed over, they would be compiled in as
    constants), and the returned step binds them: it is still ``train_step(state, batch)``.
    """
    if (state_shardings is None) != (batch_sharding is None):
        raise ValueError("give both state_shardings and batch_sharding, or neither")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    extra = () if frozen is None else (frozen,)
    param_shardings = None if state_shardings is None else state_shardings.params

    def constrain(grads):
        return grads if param_shardings is None else jax.lax.with_sharding_constraint(grads, param_shardings)

    def train_step(state: TrainState, batch, *frozen_args):
        key = jax.random.fold_in(state.key, state.step)
        if grad_accum == 1:
            (total, (n, aux)), grads = grad_fn(state.params, batch, key, *frozen_args)
            grads = constrain(grads)
        else:
            def micro(carry, xs):
                i, micro_batch = xs
                (total, (n, aux)), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(key, i), *frozen_args)
                return jax.tree.map(jnp.add, carry, (total, n, aux, constrain(grads))), None

            first = jax.tree.map(lambda x: x[0], batch)
            (total, (n, aux)), grads = jax.eval_shape(grad_fn, state.params, first, key, *frozen_args)
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
        return _bind(jax.jit(train_step, donate_argnums=0), extra)
    return _bind(jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, *_placement(extra)),
                         out_shardings=(state_shardings, sh.replicated(batch_sharding.mesh)), donate_argnums=0),
                 extra)


def make_eval_step(loss_fn: LossFn, param_shardings=None, batch_sharding=None, frozen=None):
    """Jitted ``eval_step(params, batch) -> (loss sum, tokens, dict of other sums)`` with
    ``key=None`` (no dropout); shardings and ``frozen`` as in :func:`make_train_step`. Nothing is
    static."""
    def eval_step(params, batch, *frozen_args):
        total, (n, aux) = loss_fn(params, batch, None, *frozen_args)
        return total, n, aux

    if (param_shardings is None) != (batch_sharding is None):
        raise ValueError("give both param_shardings and batch_sharding, or neither")
    extra = () if frozen is None else (frozen,)
    if param_shardings is None:
        return _bind(jax.jit(eval_step), extra)
    return _bind(jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding, *_placement(extra)),
                         out_shardings=sh.replicated(batch_sharding.mesh)), extra)


def _placement(extra: tuple) -> tuple:
    """The shardings of the frozen arrays, where they already are."""
    return tuple(jax.tree.map(lambda x: x.sharding, e) for e in extra)


def _bind(step: Callable, extra: tuple) -> Callable:
    """``step`` itself, or with the frozen arrays bound as its last argument."""
    if not extra:
        return step

    def bound(params_or_state, batch):
        return step(params_or_state, batch, *extra)
    return bound


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
