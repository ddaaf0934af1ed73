"""Log-likelihood of continuations under a GPT-2, batched and jitted with bucketed shapes.

A request is ``(context, continuation)``, two lists of token ids (the context non-empty). Its row is
``(context + continuation)[-(n_positions + 1):]``: the model reads all but the last token and the
continuation's tokens are scored (lm-eval's left truncation when a row is too long). Requests are
sorted by length and cut into batches of a fixed number of rows (the last batch padded with empty
rows); each batch is right-padded to a length bucket, 16, 24, 32, 48, 64, 96, ... (powers of two and
1.5 times them: at most a third of a batch is padding), at most ``n_positions``. Padding comes after
a row's tokens, so causal attention needs no mask. One program is compiled per length bucket
(static: the config, the rows, the length), so a whole data set compiles a handful of programs,
once, and later calls with the same shapes reuse them.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import InputError
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.model import GPT2
from jaxformer.nn.losses import cross_entropy


def length_bucket(n: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... that is >= n."""
    p = max(16, 1 << (max(n, 1) - 1).bit_length())
    return p * 3 // 4 if p > 16 and p * 3 // 4 >= n else p


@dataclasses.dataclass(frozen=True)
class Batch:
    """tokens, targets: int32[rows, t]; weights: bool[rows, t] (True at scored positions);
    index: int[n] the requests of the first n rows (the others are padding)."""

    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    index: np.ndarray


def pack(requests: list[tuple[list[int], list[int]]], config: GPT2Config, rows: int) -> list[Batch]:
    """The batches of ``requests``, ``min(rows, the power of two >= len(requests))`` rows each."""
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise InputError(f"request {i}: the context and the continuation need at least one token each")
        if max(context + continuation) >= config.vocab_size:
            raise InputError(f"request {i}: token id {max(context + continuation)} outside the model's "
                             f"vocabulary of {config.vocab_size} (is the tokenizer the model's?)")
    rows = min(rows, 1 << max(len(requests) - 1, 0).bit_length())
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    batches = []
    for start in range(0, len(order), rows):
        index = np.asarray(order[start:start + rows])
        seqs = [(requests[i][0] + requests[i][1])[-(config.n_positions + 1):] for i in index]
        t = min(length_bucket(max(len(s) for s in seqs) - 1), config.n_positions)
        tokens, targets = np.zeros((rows, t), np.int32), np.zeros((rows, t), np.int32)
        weights = np.zeros((rows, t), bool)
        for r, (i, s) in enumerate(zip(index, seqs)):
            n = len(s) - 1
            tokens[r, :n], targets[r, :n] = s[:-1], s[1:]
            weights[r, n - min(len(requests[i][1]), n):n] = True
        batches.append(Batch(tokens, targets, weights, index))
    return batches


@functools.partial(jax.jit, static_argnames="config")
def batch_logprobs(params, tokens, targets, weights, *, config: GPT2Config):
    """(float32[rows] summed log-probability of the scored tokens, bool[rows] whether each scored
    token is the argmax) for one :class:`Batch`'s arrays. Logits are float32[rows, t, V]."""
    logits, _ = GPT2(config).apply({"params": params}, tokens)
    _, nll, _ = jax.vmap(cross_entropy)(logits, targets, weights)
    greedy = jnp.all((logits.argmax(-1) == targets) | ~weights, axis=-1)
    return -nll, greedy


def score(params, config: GPT2Config, batches: list[Batch], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64[n] summed log-probabilities, int[n] scored tokens, bool[n] greedy) of the ``n``
    requests packed into ``batches``, in request order."""
    logprob, count, greedy = np.zeros(n), np.zeros(n, int), np.zeros(n, bool)
    results = [batch_logprobs(params, b.tokens, b.targets, b.weights, config=config) for b in batches]
    for b, (lp, g) in zip(batches, jax.device_get(results)):
        k = len(b.index)
        logprob[b.index], greedy[b.index], count[b.index] = lp[:k], g[:k], b.weights[:k].sum(-1)
    return logprob, count, greedy


def loglikelihoods(params, config: GPT2Config, requests: list[tuple[list[int], list[int]]],
                   rows: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`score` of ``requests`` packed by :func:`pack` (``rows`` per batch)."""
    return score(params, config, pack(requests, config, rows), len(requests))
