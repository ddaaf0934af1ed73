"""Generation: sampling filters against float64 numpy, EOS, seeds, bucketing, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.nn.decoding import sample_logits
from jaxformer.gpt2.config import preset
from jaxformer.gpt2.generate import _generate, generate
from jaxformer.gpt2.model import init_params

CONFIG = preset("tiny", vocab_size=300, n_positions=96, eos_token_id=299, bos_token_id=299)


@pytest.fixture(scope="module")
def params():
    # A larger init than GPT-2's makes the random model's predictions peaked and varied.
    return init_params(CONFIG.replace(initializer_range=0.3), jax.random.key(0))


def draw(logits, n, **kw):
    """n samples per row with independent keys: int[n, b]."""
    keys = jax.random.split(jax.random.key(1), n)
    f = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, kw.get("temperature", 1.0), kw.get("top_k", 0),
                                                 kw.get("top_p", 1.0))))
    return np.asarray(f(keys))


def np_nucleus(logits, top_p):
    """Smallest set of most likely tokens whose probability reaches top_p (float64)."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    return set(order[before < top_p].tolist())


def np_kept(logits, top_k, top_p):
    """The tokens top-k then top-p keep, by sorting in float64 (ties at the last kept value kept)."""
    x = logits.astype(np.float64)
    ranked = np.sort(x)[::-1][:top_k if 0 < top_k <= len(x) else len(x)]
    probs = np.exp(ranked - ranked[0])
    probs /= probs.sum()
    kept = np.sum(np.cumsum(probs) - probs < top_p) if top_p < 1 else len(ranked)
    return x >= ranked[kept - 1]


def test_kept_tokens_equal_a_sorted_float64_reference():
    """The bisection cut-offs keep exactly what sorting keeps, ties, extremes and -inf included."""
    from jaxformer.nn.decoding import kept_tokens
    rng = np.random.RandomState(3)
    rows = [np.round(rng.normal(size=300) * 3, 1) for _ in range(40)]  # many ties
    rows += [rng.normal(size=300) * 20, np.full(300, 2.5), np.r_[np.full(299, -np.inf), 0.0]]
    logits = np.stack(rows).astype(np.float32)
    for top_k in (0, 1, 7, 40, 300, 1000):
        for top_p in (0.05, 0.5, 0.9, 0.999, 1.0):
            k = np.full((len(rows), 1), top_k, np.int32)
            p = np.full((len(rows), 1), top_p, np.float32)
            got = np.asarray(jax.jit(kept_tokens)(jnp.asarray(logits), k, p))
            for i, row in enumerate(logits):
                np.testing.assert_array_equal(got[i], np_kept(row, top_k, float(np.float32(top_p))),
                                              err_msg=f"row {i}, top_k={top_k}, top_p={top_p}")


def test_temperature_zero_rows_are_greedy_next_to_sampled_rows():
    logits = np.random.RandomState(4).normal(size=(4, 50)).astype(np.float32) * 2
    samples = draw(jnp.asarray(logits), 300, temperature=jnp.float32([0, 1, 0, 1]), top_k=3)
    for row in (0, 2):
        assert set(samples[:, row].tolist()) == {int(np.argmax(logits[row]))}
    for row in (1, 3):
        assert set(samples[:, row].tolist()) == set(np.argsort(-logits[row].astype(np.float64))[:3].tolist())


def test_top_k_never_leaves_top_k_set():
    logits = np.random.RandomState(0).normal(size=(4, 50)).astype(np.float32) * 3
    samples = draw(jnp.asarray(logits), 2000, top_k=5)
    for row in range(4):
        allowed = set(np.argsort(-logits[row].astype(np.float64))[:5].tolist())
        assert set(samples[:, row].tolist()) == allowed  # stays inside, and reaches all of it


def test_top_p_never_leaves_nucleus():
    logits = np.random.RandomState(1).normal(size=(4, 40)).astype(np.float32) * 2
    for top_p in (0.3, 0.75, 0.95):
        samples = draw(jnp.asarray(logits), 3000, top_p=top_p)
        for row in range(4):
            nucleus = np_nucleus(logits[row].astype(np.float64), top_p)
            assert set(samples[:, row].tolist()) <= nucleus
            assert len(set(samples[:, row].tolist())) >= min(len(nucleus), 2)


def test_top_k_and_top_p_combined():
    logits = np.random.RandomState(2).normal(size=(2, 60)).astype(np.float32) * 2
    samples = draw(jnp.asarray(logits), 2000, top_k=10, top_p=0.8)
    for row in range(2):
        topk = np.sort(np.argsort(-logits[row].astype(np.float64))[:10])
        sub = np.full_like(logits[row], -np.inf, dtype=np.float64)
        sub[topk] = logits[row, topk]
        assert set(samples[:, row].tolist()) <= np_nucleus(sub, 0.8)


def test_temperature_matches_softmax_frequencies():
    logits = np.array([[1.0, 0.5, 0.0, -0.5, -2.0]], np.float32)
    for t in (0.5, 2.0):
        samples = draw(jnp.asarray(logits), 20000, temperature=t)[:, 0]
        expect = np.exp(logits[0] / t - np.max(logits[0] / t))
        expect /= expect.sum()
        freq = np.bincount(samples, minlength=5) / len(samples)
        np.testing.assert_allclose(freq, expect, atol=0.015)


@pytest.mark.slow
def test_top_k_1_sampling_equals_greedy(params):
    prompts = [[5, 6, 7], [9]]
    greedy = generate(params, CONFIG, prompts, max_new_tokens=20, greedy=True, stop_at_eos=False)
    sampled = generate(params, CONFIG, prompts, max_new_tokens=20, top_k=1, seed=3, stop_at_eos=False)
    assert greedy == sampled


def test_each_sequence_stops_at_its_own_eos(params):
    prompts = [[5, 6, 7], [40, 41]]
    free = generate(params, CONFIG, prompts, max_new_tokens=30, greedy=True, stop_at_eos=False)
    eos = free[0][4]  # make the 5th token of prompt 0 the end of text
    assert eos not in free[1]
    out = generate(params, CONFIG.replace(eos_token_id=eos), prompts, max_new_tokens=30, greedy=True)
    assert out[0] == free[0][: free[0].index(eos) + 1]
    assert out[1] == free[1]


@pytest.mark.slow
def test_seed_reproducible_and_rows_independent_of_batch(params):
    kw = dict(max_new_tokens=16, temperature=1.3, seed=7, stop_at_eos=False)
    a = generate(params, CONFIG, [[1, 2, 3], [4, 5]], **kw)
    assert a == generate(params, CONFIG, [[1, 2, 3], [4, 5]], **kw)
    assert a[0] == generate(params, CONFIG, [[1, 2, 3]], **kw)[0]
    assert a != generate(params, CONFIG, [[1, 2, 3], [4, 5]], **{**kw, "seed": 8})


@pytest.mark.slow
def test_prompt_lengths_and_batch_sizes_are_bucketed(params):
    before = _generate._cache_size()
    for n in range(1, 11):  # ten prompt lengths, one bucket
        generate(params, CONFIG, [list(range(1, n + 1))], max_new_tokens=8, greedy=True)
    assert _generate._cache_size() - before == 1
    for b in (3, 4):  # both pad to a batch of 4
        generate(params, CONFIG, [[1, 2]] * b, max_new_tokens=8, greedy=True)
    for new in (5, 9, 16):  # one bucket of new tokens
        generate(params, CONFIG, [[1, 2]], max_new_tokens=new, greedy=True)
    assert _generate._cache_size() - before == 2


@pytest.mark.parametrize("prompts, kw, message", [
    ([[]], {}, "prompt 0 is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1] * 90], dict(max_new_tokens=10), "exceeds n_positions=96"),
    ([[1]], dict(top_p=0.0), r"top_p=0.0: must lie in \(0, 1\]"),
    ([[1]], dict(top_p=1.5), "top_p=1.5"),
    ([[1]], dict(top_k=-1), "top_k=-1"),
    ([[1]], dict(temperature=0.0), "temperature=0.0"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens=0"),
    ([[1, 300]], {}, r"token ids must lie in \[0, 300\)"),
    ([], {}, "no prompts"),
])
def test_bad_input_is_a_clear_error(params, prompts, kw, message):
    with pytest.raises(ValueError, match=message):
        generate(params, CONFIG, prompts, **{"max_new_tokens": 4, **kw})


def test_extreme_sampling_settings_give_valid_tokens(params):
    out = generate(params, CONFIG, [[1, 2]], max_new_tokens=8, temperature=1e-4, top_p=1e-6, stop_at_eos=False)
    assert all(0 <= t < CONFIG.vocab_size for t in out[0]) and len(out[0]) == 8
