"""beam_search against exhaustive float64 search, greedy decoding and itself, on a toy Markov model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.nn.decoding import beam_search, decode_loop, greedy_or_sample, length_penalty

V, EOS = 4, 0


def markov(batch, seed):
    """Per-row tables ``logits[last token] -> next-token logits`` and the matching step_fn; the
    cache is the row's table, so beam search must repeat and reorder it with the beams."""
    table = jax.random.normal(jax.random.PRNGKey(seed), (batch, V + 1, V)) * 2.0  # row V: start token

    def step(tokens, cache):
        return cache[jnp.arange(tokens.shape[0]), tokens], cache

    return np.asarray(table, np.float64), step, jnp.asarray(table)


def exhaustive(table, max_len, limit, alpha):
    """All (sequence, score) that end with EOS, or with any token at the limit, best first (float64)."""
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    out = []
    limit = min(limit, max_len)
    for n in range(1, limit + 1):
        ends = range(V) if n == limit else [EOS]
        for seq in itertools.product(*[range(1, V)] * (n - 1), ends):
            total, last = 0.0, V
            for t in seq:
                total, last = total + logp[last, t], t
            out.append((seq, total / float(length_penalty(n, alpha))))
    return sorted(out, key=lambda x: -x[1])


def strip(seq, limit):
    """The hypothesis in an output row: up to its EOS, or its first ``limit`` tokens."""
    seq = [int(t) for t in seq[:limit]]
    return tuple(seq[:seq.index(EOS) + 1] if EOS in seq else seq)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_large_beam_equals_exhaustive_search(alpha):
    b, max_len, k = 3, 4, 128  # k exceeds every candidate count (<= 108), so nothing is pruned
    tables, step, cache = markov(b, 0)
    limit = jnp.array([4, 2, 3])
    seqs, scores = beam_search(step, jnp.full((b,), V), cache, beam_size=k, max_len=max_len, eos_id=EOS,
                               alpha=alpha, limit=limit)
    for r in range(b):
        ref = exhaustive(tables[r], max_len, int(limit[r]), alpha)
        got = [(strip(s, int(limit[r])), float(sc)) for s, sc in zip(np.asarray(seqs[r]), np.asarray(scores[r]))
               if sc > -1e29]
        ref = dict(ref)
        assert len(got) == len(ref) and {g[0] for g in got} == set(ref)
        np.testing.assert_allclose([g[1] for g in got], [ref[g[0]] for g in got], rtol=1e-5)
        np.testing.assert_allclose([g[1] for g in got], sorted(ref.values(), reverse=True), rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beam_one_is_greedy(alpha):
    b, max_len = 8, 6
    _, step, cache = markov(b, 1)
    start = jnp.full((b,), V)
    seqs, _ = beam_search(step, start, cache, beam_size=1, max_len=max_len, eos_id=EOS, alpha=alpha)
    logits, cache2 = step(start, cache)
    greedy, _, _ = decode_loop(step, logits, cache2, jax.random.key(0), greedy_or_sample(True),
                               max_new_tokens=max_len, eos_id=EOS, pad_id=0)
    np.testing.assert_array_equal(np.asarray(seqs[:, 0]), np.asarray(greedy))


def test_scores_non_increasing_and_batch_equals_rows():
    b, max_len, k = 6, 8, 4
    _, step, cache = markov(b, 2)
    limit = jnp.array([8, 3, 5, 1, 8, 6])
    run = jax.jit(lambda c, lim: beam_search(step, jnp.full((lim.shape[0],), V), c, beam_size=k,
                                             max_len=max_len, eos_id=EOS, alpha=0.6, limit=lim))
    seqs, scores = run(cache, limit)
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)
    assert np.all((np.asarray(seqs) != 0).sum(-1) <= np.asarray(limit)[:, None])
    for r in range(b):  # batch 1 and batch 6 compile to two programs: scores equal within float32 rounding
        s1, sc1 = run(cache[r:r + 1], limit[r:r + 1])
        np.testing.assert_array_equal(np.asarray(s1[0]), np.asarray(seqs[r]))
        np.testing.assert_allclose(np.asarray(sc1[0]), np.asarray(scores[r]), rtol=1e-5, atol=1e-5)
