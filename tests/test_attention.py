"""The shared attention pieces against float64 references: the fused path (``jax.nn.dot_product_attention``;
on CPUs, causal attention goes through the blocked kernel with its own backward, checked against
torch autograd), the einsum kernel, masks, and the KV cache written at one slot per row."""

import numpy as np
import pytest

from jaxformer.nn.attention import KVCache, causal_mask, dot_product_attention


def reference(q, k, v, mask, scale):
    """float64 softmax attention; q [b, t, h, d], k/v [b, s, h, d], mask [b or 1, 1, t, s]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = np.where(mask, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("kind", ["causal", "padded causal", "padding (cross)"])
def test_fused_and_einsum_paths_equal_float64(kind):
    rng = np.random.default_rng(0)
    b, t, s, h, d = 2, 7, 7 if kind != "padding (cross)" else 5, 3, 8
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, s, h, d)).astype(np.float32) for _ in range(2))
    valid = np.ones((b, s), bool)
    valid[1, -2:] = False
    if kind == "causal":
        mask, want_mask = None, np.tril(np.ones((t, s), bool))[None, None]
    elif kind == "padded causal":
        mask = want_mask = np.asarray(causal_mask(valid, t))
    else:
        mask = want_mask = valid[:, None, None, :]
    want = reference(q, k, v, want_mask, 0.3)
    fused = dot_product_attention(q, k, v, mask, scale=0.3, heads_major=False)
    einsum = dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, scale=0.3,
                                   probs_fn=lambda p: p)
    rows = slice(None) if kind != "padded causal" else np.s_[:, :5]  # padded queries' rows are arbitrary
    np.testing.assert_allclose(np.asarray(fused)[rows], want[rows], atol=1e-5)
    np.testing.assert_allclose(np.asarray(einsum)[rows], want[rows], atol=1e-5)
    np.testing.assert_allclose(np.asarray(fused)[rows], np.asarray(einsum)[rows], atol=1e-5)


def test_cache_writes_one_slot_per_row_and_the_mask_follows():
    """Rows at different lengths (a server's slots): row r's new key lands at index[r], in a
    stacked cache too, and its query sees slots up to index[r]."""
    rng = np.random.default_rng(1)
    cache = KVCache.zeros(3, 6, 2, 4, layers=2)
    k, v = (rng.normal(size=(3, 1, 2, 4)).astype(np.float32) for _ in range(2))
    index = np.array([0, 3, 5], np.int32)
    new = cache.update(k, v, index, layer=1)
    want = np.zeros((2, 3, 2, 6, 4), np.float32)
    for r, i in enumerate(index):
        want[1, r, :, i] = k[r, 0]
    np.testing.assert_array_equal(new.k, want)
    assert np.asarray(new.v)[1, 2, :, 5].tolist() == v[2, 0].tolist()
    mask = np.asarray(causal_mask(np.ones((3, 6), bool), 1, index))  # [3, 1, 1, 6]
    np.testing.assert_array_equal(mask[:, 0, 0], np.arange(6)[None] <= index[:, None])
    single = np.asarray(causal_mask(np.ones((1, 6), bool), 2, 3))
    np.testing.assert_array_equal(single[0, 0], np.arange(6)[None] <= np.array([[3], [4]]))



@pytest.mark.parametrize("dropout", [False, True])
def test_blocked_causal_attention_and_its_gradient_equal_torch_float64(dropout):
    """Training's causal attention on CPU (blocks of queries, a hand-written backward), over three
    query blocks, against torch autograd in float64; the dropout as a fixed multiplier on the
    probabilities, applied on both sides."""
    import jax
    import torch

    b, t, h, d = 2, 600, 3, 8
    rng = np.random.default_rng(0)
    q, k, v, w = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(4))
    keep = (rng.random((b, h, t, t)) > 0.2).astype(np.float32) / 0.8 if dropout else None
    dropout_fn = None if keep is None else (lambda p: p * keep)
    scale = d ** -0.5

    def loss(q, k, v):
        return (dot_product_attention(q, k, v, None, scale=scale, dropout_fn=dropout_fn, heads_major=False) * w).sum()

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", tq, tk) * scale
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    p = scores.softmax(-1) * (1 if keep is None else torch.tensor(keep, dtype=torch.float64))
    want = (torch.einsum("bhqk,bkhd->bqhd", p, tv) * torch.tensor(w, dtype=torch.float64)).sum()
    want.backward()
    assert abs(float(value) - want.item()) <= 1e-5 * abs(want.item()) + 1e-3
    for got, ref in zip(grads, (tq.grad, tk.grad, tv.grad)):
        ref = ref.numpy()
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=1e-5 * np.abs(ref).max())


def test_probs_dropout_keeps_each_probability_with_its_rate_and_rescales():
    """Attention's dropout from 16-bit draws: the kept fraction within 5 binomial sigmas of
    1 - rate over a million draws, kept values divided by the kept probability, odd widths, a
    different mask per key."""
    import jax
    import jax.numpy as jnp

    from jaxformer.nn.attention import probs_dropout

    p = jnp.full((4, 3, 257, 333), 0.5, jnp.float32)
    rate = 0.1
    out = np.asarray(probs_dropout(jax.random.key(0), rate)(p))
    kept = out != 0
    n, keep = kept.size, 1 - rate
    assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * rate / n)
    np.testing.assert_allclose(out[kept], 0.5 / keep, rtol=1e-5)
    again = np.asarray(probs_dropout(jax.random.key(1), rate)(p)) != 0
    assert 0.1 < (again != kept).mean() < 0.3  # independent masks disagree on 2 * 0.9 * 0.1 = 18%
