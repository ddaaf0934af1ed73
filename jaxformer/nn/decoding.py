"""Model-agnostic decoding: sampling, a token loop and beam search, each meant to run inside one jit.

The model is seen only through ``step_fn(token_ids: int32[n], cache) -> (float32[n, V], cache)``:
it feeds one token per row, writes it into the cache and returns the next-token logits. The same
loops serve GPT-2 (decoder-only) and the translator (encoder-decoder).
"""

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

StepFn = Callable[[jax.Array, object], tuple[jax.Array, object]]
NEG_INF = -1e30


def sample_logits(logits, key, temperature, top_k, top_p):
    """Draws one token per row from ``logits: float32[b, V]``.

    key: one key, or a key per row (shape [b]) so that a row's draws do not depend on its batch.
    temperature >= 0 (0: that row is greedy, its argmax); top_k = 0 keeps all tokens; top_p = 1 keeps
    all. Each is a scalar or one value per row ([b]), and may be traced, so changing them does not
    recompile. Ties at the cut-off value are kept. The draw runs only when some row samples, and the
    cut-off search (:func:`kept_tokens`) only when some row asks for one. Returns int32[b].
    """
    temperature, top_k, top_p = (jnp.reshape(jnp.asarray(x), (-1, 1)) for x in (temperature, top_k, top_p))
    logits = logits.astype(jnp.float32)
    greedy = temperature == 0
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(x):
        x = x / jnp.where(greedy, 1.0, temperature)
        x = lax.cond(jnp.any((top_k > 0) | (top_p < 1)),
                     lambda x: jnp.where(kept_tokens(x, top_k, top_p), x, NEG_INF), lambda x: x, x)
        if key.ndim:
            return jax.vmap(jax.random.categorical)(key, x).astype(jnp.int32)
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

    drawn = lax.cond(jnp.all(greedy), lambda x: argmax, draw, logits)
    return jnp.where(greedy[:, 0], argmax, drawn)


def kept_tokens(logits, top_k, top_p):
    """bool[b, V]: the tokens top-k and then top-p keep: the k most likely (k <= 0: all), then the
    fewest of those, most likely first, whose probability (renormalised over the k) reaches top_p;
    every token tied with the last one kept is kept too.

    logits: float32[b, V]; top_k, top_p: [b or 1, 1]. No sort (a sort of the vocabulary costs more
    than a decoding step on a CPU): each cut-off is found by bisection over the float32 values'
    order, 32 counting passes each.
    """
    vocab, shape = logits.shape[-1], (logits.shape[0], 1)
    bits = lax.bitcast_convert_type(logits, jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # uint32, ordered like the floats
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    full = (jnp.zeros(shape, jnp.uint32), jnp.full(shape, 0xFFFFFFFF, jnp.uint32))

    def kth(_, lo_hi):  # the largest key t with at least k keys >= t: the k-th largest
        lo, hi = lo_hi
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)
        ok = jnp.sum(key >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    t_k, _ = lax.fori_loop(0, 32, kth, full)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    above = key > t_k
    e_k = jnp.max(jnp.where(key == t_k, e, 0.0), axis=-1, keepdims=True)
    mass = jnp.sum(jnp.where(above, e, 0.0), axis=-1, keepdims=True) \
        + (k - jnp.sum(above, axis=-1, keepdims=True)) * e_k  # of the k kept (ties at the k-th: as many as fit)

    def nucleus(_, lo_hi):  # the smallest key t >= t_k whose strictly higher mass is below top_p
        lo, hi = lo_hi
        mid = lo + ((hi - lo) >> 1)
        ok = jnp.sum(jnp.where(key > mid, e, 0.0), axis=-1, keepdims=True) < top_p * mass
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, t_p = lax.fori_loop(0, 32, nucleus, (t_k, full[1]))
    return key >= jnp.where(top_p >= 1, t_k, t_p)


def greedy_or_sample(greedy: bool, temperature=1.0, top_k=0, top_p=1.0):
    """A ``(logits, key) -> tokens`` picker: argmax when ``greedy`` (a Python bool), else sampling."""
    if greedy:
        return lambda logits, key: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return lambda logits, key: sample_logits(logits, key, temperature, top_k, top_p)


def decode_loop(step_fn: StepFn, logits, cache, key, pick, *, max_new_tokens: int, limit=None,
                eos_id: int | None = None, pad_id: int = 0):
    """Generates up to ``max_new_tokens`` tokens per row in a ``lax.while_loop``.

    logits: float32[b, V], the next-token logits after the prompt (from a prefill).
    key: one PRNG key or one per row ([b]); step ``i`` hands ``fold_in(key, i)`` to
      ``pick: (logits, key) -> int32[b]`` (see :func:`greedy_or_sample`), so a seed reproduces samples.
    max_new_tokens: static size of the output buffer. limit: optional int32[b] or scalar, the
      number of tokens each row may emit (<= max_new_tokens); traced, so it does not recompile.
    eos_id: a row stops after emitting it; the loop ends when every row has stopped.
    Returns (int32[b, max_new_tokens] padded with ``pad_id``, int32[b] lengths incl. EOS, cache).
    """
    b = logits.shape[0]
    limit = jnp.broadcast_to(jnp.asarray(max_new_tokens if limit is None else limit, jnp.int32), (b,))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

    def cond(s):
        i, _, done, _, _ = s
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(s):
        i, out, done, logits, cache = s
        done = done | (i >= limit)
        tok = jnp.where(done, pad_id, pick(logits, fold_in(key, i)))
        out = lax.dynamic_update_slice(out, tok[:, None], (0, i))
        if eos_id is not None:
            done = done | (tok == eos_id)
        logits, cache = step_fn(tok, cache)
        return i + 1, out, done, logits, cache

    done = limit <= 0
    _, out, _, _, cache = lax.while_loop(cond, body, (jnp.int32(0), out, done, logits, cache))
    lengths = _lengths_until_eos(out, eos_id, limit)
    return out, lengths.astype(jnp.int32), cache


def fold_in(key, i):
    """``jax.random.fold_in`` for one key or a batch of keys."""
    return jax.vmap(jax.random.fold_in, (0, None))(key, i) if key.ndim else jax.random.fold_in(key, i)


def _lengths_until_eos(out, eos_id, limit):
    """Tokens up to and including the first EOS, capped by ``limit``."""
    if eos_id is None:
        return limit
    is_eos = out == eos_id
    first = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, out.shape[1])
    return jnp.minimum(first, limit)


# --- beam search ---------------------------------------------------------------------------------

def length_penalty(length, alpha: float):
    """GNMT length penalty ``((5 + length) / 6) ** alpha``; alpha = 0 ranks by raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


def _flat(x):  # [b, k, ...] -> [b*k, ...]
    return x.reshape((-1,) + x.shape[2:])


def _gather_beams(tree, beam_idx, batch: int, beams_in: int):
    """Selects beams ``beam_idx: int32[b, k]`` from every leaf shaped [b * beams_in, ...] (scalar
    leaves are shared by all rows and stay as they are)."""
    flat_idx = (jnp.arange(batch)[:, None] * beams_in + beam_idx).reshape(-1)
    return jax.tree.map(lambda x: x[flat_idx] if x.ndim else x, tree)


def beam_search(step_fn: StepFn, start_tokens, cache, *, beam_size: int, max_len: int, eos_id: int,
                alpha: float = 0.6, limit=None):
    """Beam search with a GNMT length penalty, one ``lax.while_loop``.

    Each step extends every alive beam, keeps the best ``2 * beam_size`` candidates, moves those
    among the best ``beam_size`` that end to the row's finished set, and continues the best
    ``beam_size`` that did not end. A hypothesis ends with EOS, or with its row's ``limit``-th token
    (kept as it is, as greedy decoding truncates). A row is done when it has ``beam_size`` finished
    hypotheses (fairseq's rule), so beam size 1 is exactly greedy search; the loop ends when every
    row is done.

    start_tokens: int32[b] fed first (BOS). cache: pytree whose leaves have batch ``b`` as their
      leading axis (or are scalars shared by all rows, e.g. the decoding position); it is repeated
      ``beam_size`` times and reordered with the beams, so everything step_fn needs per row (e.g.
      the encoder output) belongs in it.
    max_len: static number of output slots. limit: optional int32[b] or scalar, tokens allowed per
      row, 1 <= limit (capped at max_len); traced, so it does not recompile.
    Returns (int32[b, beam_size, max_len] best-first, float32[b, beam_size] scores = log p / penalty).
    Sequences hold their tokens (up to and including EOS, if they ended with it), then zeros.
    """
    limit = jnp.minimum(jnp.asarray(max_len if limit is None else limit, jnp.int32), max_len)
    limit = jnp.broadcast_to(limit, start_tokens.shape)

    def cond(s):
        return (s["i"] < max_len) & ~jnp.all(_row_done(s["fin_scores"]))

    def body(s):
        logits, cache = step_fn(_flat(s["last"]), s["cache"])
        cand = _candidates(s, logits, eos_id, limit)
        return dict(i=s["i"] + 1, **_alive(cand, cache, beam_size), **_finished(s, cand, alpha))

    s = lax.while_loop(cond, body, _initial_beams(start_tokens, cache, beam_size, max_len))
    return s["fin_seqs"], s["fin_scores"]


def _initial_beams(start_tokens, cache, k: int, max_len: int) -> dict:
    """The loop state before the first step. Per row: k beams fed ``start_tokens`` with the cache
    repeated k times, only the first beam live (the others at log p = -inf, so the first step
    extends one hypothesis, not k copies), no finished hypothesis yet."""
    b = start_tokens.shape[0]
    return dict(
        i=jnp.int32(0),
        last=jnp.repeat(start_tokens[:, None], k, axis=1).astype(jnp.int32),
        seqs=jnp.zeros((b, k, max_len), jnp.int32),
        logp=jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1)),
        fin_seqs=jnp.zeros((b, k, max_len), jnp.int32),
        fin_scores=jnp.full((b, k), NEG_INF, jnp.float32),
        cache=jax.tree.map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x, cache),
    )


def _row_done(fin_scores):
    """bool[b]: the row holds beam_size finished hypotheses (fin_scores: float32[b, k], best first)."""
    return fin_scores[:, -1] > NEG_INF / 2


def _candidates(s: dict, logits, eos_id: int, limit) -> dict:
    """The best ``2k`` one-token extensions of each row's live beams (logits: float32[b * k, V]).

    Returns logp float32[b, 2k] (total log-probability, best first), beam int32[b, 2k] (the beam
    each extends), tok int32[b, 2k] (the new token), seqs int32[b, 2k, max_len] (the hypotheses with
    the new token at slot ``i``), ends bool[b, 2k] (EOS, or the row's ``limit``-th token) and dead
    bool[b, 2k] (an extension of a beam at -inf).
    """
    (b, k), i = s["logp"].shape, s["i"]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    total = (s["logp"][:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
    cand_logp, cand_idx = lax.top_k(total, 2 * k)
    beam, tok = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(s["seqs"], beam[:, :, None], axis=1)
    seqs = lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, i))
    return dict(logp=cand_logp, beam=beam, tok=tok, seqs=seqs,
                ends=(tok == eos_id) | (i + 1 >= limit)[:, None], dead=cand_logp <= NEG_INF / 2)


def _alive(cand: dict, cache, k: int) -> dict:
    """The next step's beams: the best k candidates that did not end, with the cache reordered to
    follow them (``last``, ``seqs``, ``logp`` and ``cache`` of the loop state)."""
    b = cand["logp"].shape[0]
    alive_logp, pos = lax.top_k(jnp.where(cand["ends"] | cand["dead"], 2 * NEG_INF, cand["logp"]), k)
    return dict(
        last=jnp.take_along_axis(cand["tok"], pos, axis=1),
        seqs=jnp.take_along_axis(cand["seqs"], pos[:, :, None], axis=1),
        logp=jnp.maximum(alive_logp, NEG_INF),
        cache=_gather_beams(cache, jnp.take_along_axis(cand["beam"], pos, axis=1), b, k),
    )


def _finished(s: dict, cand: dict, alpha: float) -> dict:
    """The k best finished hypotheses: those so far, merged with the candidates ranked in the top k
    that end, scored ``log p / length_penalty``. A done row's set is frozen, so a row's result does
    not depend on its batch. Returns ``fin_seqs`` int32[b, k, max_len], ``fin_scores`` float32[b, k]."""
    k = s["fin_scores"].shape[1]
    top_k_rank = (jnp.arange(2 * k) < k)[None, :]
    finalize = cand["ends"] & ~cand["dead"] & top_k_rank & ~_row_done(s["fin_scores"])[:, None]
    new_scores = jnp.where(finalize, cand["logp"] / length_penalty(s["i"] + 1.0, alpha), NEG_INF)
    fin_scores, pos = lax.top_k(jnp.concatenate([s["fin_scores"], new_scores], axis=1), k)
    all_seqs = jnp.concatenate([s["fin_seqs"], cand["seqs"]], axis=1)
    fin_seqs = jnp.take_along_axis(all_seqs, pos[:, :, None], axis=1)
    return dict(fin_seqs=fin_seqs, fin_scores=fin_scores)
