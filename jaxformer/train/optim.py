"""The optimizer and learning-rate schedules of a run (optax), chosen by its :class:`RunConfig`;
a schedule maps ``step`` (updates done, from 0) to the learning rate."""

import jax
import jax.numpy as jnp
import optax

from jaxformer.errors import InputError
from jaxformer.train.run import RunConfig


def make_schedule(run: RunConfig, d_model: int | None = None) -> optax.Schedule:
    """The learning rate of ``run.schedule``; ``noam`` needs the model width ``d_model``, ``cosine``
    a resolved ``run.schedule_steps``."""
    if run.schedule == "noam":
        if d_model is None:
            raise InputError("schedule=noam needs a model width (d_model); use cosine or constant")
        return noam(d_model, run.warmup, run.lr)
    if run.schedule == "constant":
        return optax.linear_schedule(0.0, run.lr, run.warmup) if run.warmup else optax.constant_schedule(run.lr)
    if run.schedule_steps is None:
        raise InputError("schedule=cosine needs the run's length: give steps, epochs or schedule_steps")
    return warmup_cosine(run.lr, run.warmup, run.schedule_steps, run.min_lr_ratio)


def noam(d_model: int, warmup_steps: int, factor: float = 1.0) -> optax.Schedule:
    """``factor * d_model^-0.5 * min(n^-0.5, n * warmup^-1.5)`` with ``n = step + 1`` ("Attention is
    all you need", eq. 3): linear warm-up to the peak at ``warmup_steps``, then inverse square root.
    It does not depend on the run's length, so time-limited runs and resumes see the same rates."""
    def schedule(step):
        n = jnp.asarray(step, jnp.float32) + 1.0
        return factor * d_model**-0.5 * jnp.minimum(n**-0.5, n * warmup_steps**-1.5)
    return schedule


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end_ratio: float = 0.1) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to
    ``end_ratio * peak`` at ``total_steps`` (constant after)."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1),
                                              end_value=end_ratio * peak)


DECAYED = ("kernel", "lm_head", "lora_a", "lora_b")


def decay_mask(params):
    """True where weight decay applies: Dense kernels, an untied ``lm_head`` and LoRA matrices (as
    PEFT under the transformers Trainer decays them); not biases, LayerNorm scales/biases or
    embeddings. Names decide, since stacked layers make biases 2-D."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)


def make_optimizer(run: RunConfig, schedule) -> optax.GradientTransformation:
    """``run.optimizer``: ``"adam"`` or ``"adamw"`` (decoupled decay on :func:`decay_mask`'s params),
    after clipping the global gradient norm when ``run.clip_norm > 0``."""
    if run.optimizer == "adam":
        opt = optax.adam(schedule, run.b1, run.b2, run.eps)
    else:
        opt = optax.adamw(schedule, run.b1, run.b2, run.eps, weight_decay=run.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(run.clip_norm), opt) if run.clip_norm > 0 else opt
