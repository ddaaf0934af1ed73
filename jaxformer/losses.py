"""Losses shared by the models (float32 whatever the compute dtype)."""

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, mask, label_smoothing: float = 0.0):
    """Label-smoothed cross-entropy summed over the unmasked positions.

    logits: float[..., V]; targets: int[...]; mask: bool[...] (False at padding).
    The smoothed target puts ``1 - eps`` on the true token and spreads ``eps`` uniformly over all
    ``V`` tokens (as ``torch.nn.functional.cross_entropy(label_smoothing=eps)``), so the loss is
    ``(1 - eps) * nll + eps * mean_v(-log p_v)``. No normalising constant is subtracted: its
    minimum is the smoothed target's entropy, not 0, and with eps = 0 it is the plain NLL.
    Returns (float32 sum of losses, float32 sum of NLL, float32 number of unmasked tokens);
    divide by the last for per-token values.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
    mask = mask.astype(jnp.float32)
    return (loss * mask).sum(), (nll * mask).sum(), mask.sum()
