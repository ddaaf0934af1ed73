"""Learning-rate schedules (optax ``step -> lr`` functions); ``step`` counts updates from 0."""

import jax.numpy as jnp
import optax


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
