"""Attention shared by GPT-2 and the translator: masks, a preallocated KV cache, the kernel.

Shapes: queries ``q: [batch, q_len, heads, head_dim]`` (as projected); keys and values are kept
heads-major, ``[batch, heads, kv_len, head_dim]``, so attention contracts over them as stored
instead of transposing the whole cache at every decoding step. A cache holds ``max_len`` slots; a
call writes its keys at slot ``index`` and attends over all slots, so the cache is passed in and the
updated one is returned. ``index`` is one slot for every row, or (one new token per row) a slot per
row, int32[batch]: rows at different lengths, as a server's decoding slots are.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class KVCache(NamedTuple):
    """Keys and values ``k, v: [batch, heads, len, head_dim]``, or stacked per layer
    ``[layers, batch, heads, len, head_dim]`` for a model whose layers are scanned."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, heads: int, head_dim: int, dtype=jnp.float32,
              layers: int | None = None) -> "KVCache":
        """The one cache constructor: zeros ``[batch, heads, max_len, head_dim]``, stacked
        ``[layers, ...]`` when ``layers`` is given (a model whose layers are scanned)."""
        shape = (batch, heads, max_len, head_dim) if layers is None else (layers, batch, heads, max_len, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @classmethod
    def from_heads(cls, k: jax.Array, v: jax.Array) -> "KVCache":
        """From projections ``k, v: [batch, len, heads, head_dim]``."""
        return cls(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))

    @property
    def max_len(self) -> int:
        return self.k.shape[-2]

    def update(self, k: jax.Array, v: jax.Array, index, layer=None) -> "KVCache":
        """Writes ``k, v: [batch, len, heads, head_dim]`` at slots ``index .. index+len`` (of ``layer``
        in a stacked cache); with ``index: int32[batch]`` (len 1), row ``r`` at slot ``index[r]``.
        Only the new slots are written, so in a loop XLA updates in place."""
        new = KVCache.from_heads(k, v)
        if jnp.ndim(index) == 1:
            rows = jnp.arange(k.shape[0])
            at = (rows, slice(None), index) if layer is None else (layer, rows, slice(None), index)
            return KVCache(self.k.at[at].set(new.k[:, :, 0].astype(self.k.dtype)),
                           self.v.at[at].set(new.v[:, :, 0].astype(self.v.dtype)))
        k, v, start = new.k, new.v, (0, 0, index, 0)
        if layer is not None:
            k, v, start = k[None], v[None], (layer,) + start
        return KVCache(
            lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start),
            lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start),
        )

    def layer(self, i) -> "KVCache":
        """Layer ``i`` of a stacked cache."""
        return KVCache(self.k[i], self.v[i])


def causal_mask(key_valid: jax.Array, q_len: int, index=0) -> jax.Array:
    """bool[batch, 1, q_len, kv_len]: query ``i`` (at slot ``index+i``) sees valid keys at slots <= its own.

    key_valid: bool[batch, kv_len], False at padding and at slots not written yet. index: one slot,
    or one per row (int32[batch]).
    """
    q_slot = jnp.reshape(index, (-1, 1, 1)) + jnp.arange(q_len)[None, :, None]  # [1 or batch, q_len, 1]
    k_slot = jnp.arange(key_valid.shape[-1])[None, None, :]
    return (k_slot <= q_slot)[:, None] & key_valid[:, None, None, :]


def padding_mask(key_valid: jax.Array) -> jax.Array:
    """bool[batch, 1, 1, kv_len] from bool[batch, kv_len] (encoder and cross attention)."""
    return key_valid[:, None, None, :]


def probs_dropout(key: jax.Array, rate: float):
    """A ``dropout_fn`` for attention probabilities [..., tk]: each is zeroed with probability
    ``rate`` (to 1/65536) and the rest scaled by ``1 / keep``, from 16 random bits per element, two
    draws per 32-bit word: half the generator work of ``jax.random.bernoulli``, which draws 32 bits
    per element (the probabilities are the largest draw of a training step; on a CPU the generator
    is most of dropout's cost)."""
    threshold = round(rate * 65536)
    keep = 1.0 - threshold / 65536

    def dropout_fn(p):
        n = p.shape[-1]
        words = jax.random.bits(key, p.shape[:-1] + ((n + 1) // 2,), jnp.uint32)
        kept = jnp.concatenate([(words & 0xFFFF) >= threshold, (words >> 16) >= threshold], axis=-1)[..., :n]
        return jnp.where(kept, p / jnp.asarray(keep, p.dtype), jnp.zeros((), p.dtype))
    return dropout_fn


def dot_product_attention(q, k, v, mask, *, scale, upcast_qk: bool = False, dropout_fn=None,
                          probs_fn=None, heads_major: bool = True):
    """Softmax attention with float32 scores.

    q: [b, tq, h, d]; k, v: [b, h, tk, d] heads-major, as in KVCache, or [b, tk, h, d] with
    ``heads_major=False`` (fresh projections: training, a prefill). mask: bool broadcastable to
    [b, h, tq, tk], or None for plain causal attention (tq == tk, nothing padded).
    upcast_qk: compute ``q @ k`` in float32 (GPT-2's ``reorder_and_upcast_attn``).
    probs_fn: applied to the attention probabilities float32[b, h, tq, tk] (a tap: capture, edit).
    dropout_fn: applied to the attention probabilities in training, after ``probs_fn``.
    Returns [b, tq, h, d] in v's dtype.

    Fresh keys and values go through ``jax.nn.dot_product_attention`` (cuDNN's fused attention
    on GPUs) unless something needs the probabilities themselves (``probs_fn``, ``dropout_fn``)
    or the scores differ from its (``upcast_qk``, a per-layer traced ``scale``). On CPUs plain
    causal attention over fresh keys (training; ``dropout_fn`` allowed) is
    :func:`_causal_attention` instead, blocked and with a hand-written backward.
    """
    plain = not heads_major and probs_fn is None and not upcast_qk and isinstance(scale, (int, float))
    if plain and mask is None and jax.default_backend() == "cpu":
        mult = None if dropout_fn is None else \
            dropout_fn(jnp.ones((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), jnp.float32))
        return _causal_attention(q, k, v, mult, float(scale))
    if plain and dropout_fn is None:
        if mask is not None:  # a query with no valid key (an all-padding row) attends to every key:
            mask = mask | ~mask.any(-1, keepdims=True)  # finite, as below, where fused kernels may give NaN
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=float(scale), is_causal=mask is None)
    if mask is None:
        mask = causal_mask(jnp.ones((1, q.shape[1]), bool), q.shape[1])
    if not heads_major:  # XLA:CPU's dots (and their gradients) are faster on heads-major operands
        k, v = KVCache.from_heads(k, v)
    if upcast_qk:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if probs_fn is not None:
        probs = probs_fn(probs)
    if dropout_fn is not None:
        probs = dropout_fn(probs)
    return jnp.einsum("bhqk,bhkd->bqhd", probs.astype(v.dtype), v)


# Plain causal attention on CPUs: the scores of queries lo .. hi-1 only against keys 0 .. hi-1 (a
# block of _BLOCK queries at a time skips most of the masked half), and a backward that recomputes
# the probabilities from the saved log-sum-exp instead of keeping [b, h, t, t] per layer, with its
# dots oriented so that XLA:CPU never transposes a [t, t] matrix (dV^T = dO^T P, dK^T = Q^T dS).
_BLOCK = 256


def _blocks(t: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + _BLOCK, t)) for lo in range(0, t, _BLOCK)]


def _block_scores(qh, kh, scale, lo):
    """float32[b, h, c, n]: heads-major queries ``lo .. lo+c`` against keys ``0 .. n``, causally masked."""
    s = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32) * scale
    c, n = s.shape[-2:]
    return jnp.where(jnp.arange(n)[None, :] <= lo + jnp.arange(c)[:, None], s, jnp.finfo(jnp.float32).min)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_attention(q, k, v, mult, scale: float):
    """Causal softmax attention of fresh ``q, k, v: [b, t, h, d]`` -> [b, t, h, d] (v's dtype).

    mult: float32[b, h, t, t], the dropout applied to the probabilities as a multiplier
    (``dropout_fn(1)``: 0 or 1 / keep), or None."""
    return _causal_fwd(q, k, v, mult, scale)[0]


def _causal_fwd(q, k, v, mult, scale):
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    outs, lses = [], []
    for lo, hi in _blocks(q.shape[1]):
        s = _block_scores(qh[:, :, lo:hi], kh[:, :, :hi], scale, lo)
        m = s.max(-1, keepdims=True)
        e = jnp.exp(s - m)
        total = e.sum(-1, keepdims=True)
        p = e / total
        if mult is not None:
            p = p * mult[:, :, lo:hi, :hi]
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vh[:, :, :hi]))
        lses.append(m + jnp.log(total))
    out = jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)
    return out, (q, k, v, mult, out, jnp.concatenate(lses, axis=2))


def _causal_bwd(scale, residuals, g):
    q, k, v, mult, out, lse = residuals
    qh, kh, vh, gh = (a.transpose(0, 2, 1, 3) for a in (q, k, v, g))
    b, t, h, d = q.shape
    # sum_k P~ dP~ = rowsum(dO * O) (P~ = dropped probabilities): no extra pass over [t, t].
    delta = jnp.einsum("bqhd,bqhd->bhq", g.astype(jnp.float32), out.astype(jnp.float32))[..., None]
    dqs = []
    dkt = dvt = jnp.zeros((b, h, d, t), jnp.float32)  # dK, dV transposed: [b, h, d, t]
    for lo, hi in _blocks(t):
        p = jnp.exp(_block_scores(qh[:, :, lo:hi], kh[:, :, :hi], scale, lo) - lse[:, :, lo:hi])
        mu = None if mult is None else mult[:, :, lo:hi, :hi]
        pd = p if mu is None else p * mu
        gi = gh[:, :, lo:hi]
        dvt_i = jnp.einsum("bhqd,bhqk->bhdk", gi, pd.astype(g.dtype), preferred_element_type=jnp.float32)
        dpd = jnp.einsum("bhqd,bhkd->bhqk", gi, vh[:, :, :hi], preferred_element_type=jnp.float32)
        dp = dpd if mu is None else dpd * mu
        ds = (p * (dp - delta[:, :, lo:hi]) * scale).astype(q.dtype)
        dqs.append(jnp.einsum("bhqk,bhkd->bhqd", ds, kh[:, :, :hi], preferred_element_type=jnp.float32))
        dkt_i = jnp.einsum("bhqd,bhqk->bhdk", qh[:, :, lo:hi], ds, preferred_element_type=jnp.float32)
        pad = ((0, 0), (0, 0), (0, 0), (0, t - hi))
        dvt, dkt = dvt + jnp.pad(dvt_i, pad), dkt + jnp.pad(dkt_i, pad)
    dq = jnp.concatenate(dqs, axis=2).transpose(0, 2, 1, 3)
    return (dq.astype(q.dtype), dkt.transpose(0, 3, 1, 2).astype(k.dtype), dvt.transpose(0, 3, 1, 2).astype(v.dtype),
            None if mult is None else jnp.zeros_like(mult))


_causal_attention.defvjp(_causal_fwd, _causal_bwd)
