"""Losses shared by the models (float32 whatever the compute dtype)."""

from functools import partial

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

    The gradient is written by hand: one elementwise pass ``w * (softmax - q)`` over the logits,
    where autodiff of ``log_softmax`` would materialise ``log p`` and scatter the one-hot target.
    """
    mask = mask.astype(jnp.float32)
    loss, nll = _token_losses(logits.astype(jnp.float32), targets.astype(jnp.int32), label_smoothing)
    return (loss * mask).sum(), (nll * mask).sum(), mask.sum()


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_losses(logits, targets, eps: float):
    """(smoothed loss, nll), each float32[...], from float32 logits [..., V] and int32 targets [...]."""
    return _forward(logits, targets, eps)[0]


def _forward(logits, targets, eps):
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = (1.0 - eps) * nll + eps * (lse - logits.mean(axis=-1))
    return (loss, nll), (logits, targets, lse)


def _backward(eps, residuals, cotangents):
    logits, targets, lse = residuals
    g_loss, g_nll = cotangents  # float32[...]
    p = jnp.exp(logits - lse[..., None])
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    # d loss / d logits = p - (1 - eps) onehot - eps / V;  d nll / d logits = p - onehot
    g = (g_loss + g_nll)[..., None]
    grad = g * p - jnp.where(onehot, ((1.0 - eps) * g_loss + g_nll)[..., None], 0.0) \
        - (eps / logits.shape[-1]) * g_loss[..., None]
    return grad, None


_token_losses.defvjp(_forward, _backward)
