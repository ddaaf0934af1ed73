"""Greedy and beam decoding of the translator: cache vs no cache, beam 1 vs greedy, batch vs rows."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.nn.decoding import beam_search
from jaxformer.translator import tokenizer as tk
from jaxformer.translator.batching import pad_sources
from jaxformer.translator.config import preset
from jaxformer.translator.translate import (
    LENGTH_ALPHA,
    MAX_OUT_EXTRA,
    MAX_OUT_RATIO,
    TranslationPipeline,
    make_search,
    output_len,
)
from jaxformer.translator.model import Translator, init_params, sinusoidal

CONFIG = preset("tiny").replace(dropout=0.0)


@pytest.fixture(scope="module")
def params():
    p = init_params(CONFIG, jax.random.PRNGKey(3))
    # EOS's (tied) embedding along the position-6 encoding, so that with these random weights some
    # rows end after a few tokens and others run to their limit
    pe = sinusoidal(jnp.array(6), CONFIG.d_model)
    return dict(p, embed={"embedding": p["embed"]["embedding"].at[tk.EOS_ID].set(5.0 * pe / jnp.linalg.norm(pe))})


@pytest.fixture(scope="module")
def tokenizer():
    words = "I like cheese where is the cat J'aime le fromage où est chat ? . , and".split()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, 6)) for _ in range(300)]
    tok = tk.train_tokenizer(corpus, CONFIG.vocab_size)
    assert tok.get_vocab_size() == CONFIG.vocab_size  # every id the model can emit decodes to text
    return tok


def sources():
    rng = np.random.default_rng(0)
    return pad_sources([rng.integers(3, CONFIG.vocab_size, n) for n in (3, 7, 1, 5, 6, 2, 4, 7)], 8, 8)


def uncached_greedy(params, src, max_len):
    """The book's loop: re-run the whole model on the prefix for every new token."""
    # The prefix sits in a fixed-size buffer (one compilation); by causality, position i's logits
    # do not depend on the padding after it.
    forward = jax.jit(lambda s, t: Translator(CONFIG).apply({"params": params}, s, t))
    n_src = (src != tk.PAD_ID).sum(1)
    limit = np.minimum(np.ceil(MAX_OUT_RATIO * n_src).astype(int) + MAX_OUT_EXTRA, max_len)
    out = np.zeros((src.shape[0], max_len), np.int32)
    for r in range(src.shape[0]):
        prefix = np.zeros((1, max_len + 1), np.int32)
        prefix[0, 0] = tk.BOS_ID
        for i in range(limit[r]):
            out[r, i] = prefix[0, i + 1] = int(jnp.argmax(forward(src[r:r + 1], prefix)[0, i]))
            if out[r, i] == tk.EOS_ID:
                break
    return out


@pytest.mark.slow
def test_cached_greedy_equals_uncached(params):
    src = sources()
    max_len = output_len(CONFIG, src.shape[1])
    got = np.asarray(make_search(CONFIG)(params, src, beam_size=1, max_len=max_len))
    np.testing.assert_array_equal(got, uncached_greedy(params, src, max_len))
    assert (got == tk.EOS_ID).any(axis=1).any() and not (got == tk.EOS_ID).any(axis=1).all()


def test_beam_one_equals_greedy(params):
    src = sources()
    max_len = output_len(CONFIG, src.shape[1])
    greedy = make_search(CONFIG)(params, src, beam_size=1, max_len=max_len)
    model = Translator(CONFIG)
    cache = model.apply({"params": params}, src, max_len + 1, method=model.init_cache)
    step = lambda t, c: model.apply({"params": params}, t, c, method=model.decode_step)  # noqa: E731
    n_src = (src != tk.PAD_ID).sum(1)
    limit = np.minimum(np.ceil(MAX_OUT_RATIO * n_src).astype(np.int32) + MAX_OUT_EXTRA, max_len)
    seqs, scores = beam_search(step, jnp.full((8,), tk.BOS_ID), cache, beam_size=1, max_len=max_len,
                               eos_id=tk.EOS_ID, alpha=LENGTH_ALPHA, limit=jnp.asarray(limit))
    np.testing.assert_array_equal(np.asarray(seqs[:, 0]), np.asarray(greedy))


@pytest.mark.slow
@pytest.mark.parametrize("beam", [1, 4])
def test_batch_equals_sentences_one_by_one(params, tokenizer, beam):
    model = TranslationPipeline(CONFIG, params, tokenizer, batch_size=8)
    sentences = ["I like cheese.", "Where is the cat?", "cheese", "I like the cat. Where is the cheese?",
                 "Où est le chat ?", "I", "the cat, the cheese and I", "like"]
    batch = model.translate(sentences, beam_size=beam)
    assert batch == [model.translate([s], beam_size=beam)[0] for s in sentences]
    assert any(batch)


@pytest.mark.slow
def test_translate_keeps_order_empty_lines_and_truncates(params, tokenizer):
    model = TranslationPipeline(CONFIG, params, tokenizer, batch_size=4)
    long = " ".join(["cheese"] * 60)
    sentences = ["I like cheese.", "", "   ", long, "Where is the cat?"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.translate(sentences, beam_size=2)
    assert len(out) == 5 and out[1] == out[2] == ""
    assert [str(w.message) for w in caught] == [f"sentence 4 has {len(tk.encode(tokenizer, [long])[0])} tokens; "
                                                f"translating its first {CONFIG.max_len - 1}"]
    assert out[0] == model.translate(["I like cheese."], beam_size=2)[0]
