"""Model-agnostic training pieces: the train state, the optimizer, and a jitted, donating train step."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


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


def make_optimizer(name: str, schedule, *, weight_decay: float = 0.0, clip_norm: float = 0.0,
                   b1: float = 0.9, b2: float = 0.98, eps: float = 1e-9) -> optax.GradientTransformation:
    """``"adam"`` or ``"adamw"`` (decoupled decay on matrices only: not biases or layer norms),
    optionally after clipping the global gradient norm. Betas/eps default to the Transformer paper's."""
    if name == "adam":
        opt = optax.adam(schedule, b1, b2, eps)
    elif name == "adamw":
        opt = optax.adamw(schedule, b1, b2, eps, weight_decay=weight_decay,
                          mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    else:
        raise ValueError(f"unknown optimizer {name!r}; use 'adam' or 'adamw'")
    return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm > 0 else opt


LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, tuple[jax.Array, dict]]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """A jitted ``train_step(state, batch) -> (state, metrics)``.

    loss_fn(params, batch, key) -> (loss summed over tokens, (number of tokens, dict of summed
    metrics)); the gradient is that of the per-token mean. ``state`` is donated (argument 0), so its
    buffers are reused for the new state: do not use the old state after the call. Nothing is static;
    it compiles once per distinct batch shape.
    metrics: ``loss`` (per token), ``tokens``, ``grad_norm``, and loss_fn's sums divided by tokens.
    """
    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)

        def mean_loss(params):
            total, (n, aux) = loss_fn(params, batch, key)
            n = jnp.maximum(n, 1.0)
            return total / n, (n, aux)

        (loss, (n, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(loss=loss, tokens=n, grad_norm=optax.global_norm(grads),
                       **{k: v / n for k, v in aux.items()})
        return TrainState(state.step + 1, params, opt_state, state.key), metrics

    return jax.jit(train_step, donate_argnums=0)
