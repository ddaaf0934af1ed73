"""Translating with a trained model: greedy and beam search through :mod:`jaxformer.nn.decoding`.

The encoder runs once per batch (:meth:`Translator.init_cache` also projects the cross-attention
keys/values of every layer); each decoding step feeds one token per row through the KV cache.
Source batches are padded to one of a few lengths (8, 12, 16, 24, 32, 48, ... up to the model's
``max_len``) and a power-of-two row count, so the jitted search compiles once per (rows, length, beam) and never
per batch.
"""

import concurrent.futures
import functools
import math
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.nn import taps
from jaxformer.train.checkpoints import load_run_params
from jaxformer.config import read_json
from jaxformer.nn.decoding import beam_search, decode_loop, greedy_or_sample
from jaxformer.errors import InputError
from jaxformer.translator import tokenizer as tk
from jaxformer.translator.batching import pad_sources
from jaxformer.translator.config import TranslatorConfig
from jaxformer.translator.model import Translator, init_params

BEAM_SIZE = 4
LENGTH_ALPHA = 0.6  # GNMT length penalty exponent
MAX_OUT_RATIO, MAX_OUT_EXTRA = 1.5, 10  # a row may emit ceil(ratio * source tokens) + extra tokens


def source_lengths(max_len: int) -> list[int]:
    """Padded source lengths: 8 and 12 times the powers of two below ``max_len``, and ``max_len``."""
    lengths = {base << k for base in (8, 12) for k in range(max_len.bit_length())}
    return sorted(n for n in lengths if n < max_len) + [max_len]


def output_len(config: TranslatorConfig, src_len: int) -> int:
    """Output slots (static) for sources padded to ``src_len`` tokens, EOS included."""
    return min(config.max_len, math.ceil(MAX_OUT_RATIO * src_len) + MAX_OUT_EXTRA)


@functools.lru_cache(maxsize=8)
def make_search(config: TranslatorConfig):
    """``search(params, src, beam_size, max_len, alpha, edits) -> int32[b, max_len]``, jitted.

    src: int32[b, S], each row tokens + EOS + PAD (an all-PAD row gets an empty output).
    Static: ``beam_size`` (1 = greedy, through ``decode_loop``), ``max_len`` (output slots) and
    ``alpha`` (the length penalty); the config is closed over (cached per config, so models sharing
    one share the compilations). Row ``i`` may emit ``ceil(ratio * n_i) + extra`` tokens (EOS
    included), ``n_i`` its source length, capped by ``max_len``. Output: tokens, EOS, then PAD.
    ``edits``: interventions (:mod:`jaxformer.nn.taps`, the model's tree) at every step, or None.
    """
    model = Translator(config)

    @functools.partial(jax.jit, static_argnames=("beam_size", "max_len", "alpha"))
    def search(params, src, beam_size: int, max_len: int, alpha: float = LENGTH_ALPHA, edits=None):
        n_src = (src != tk.PAD_ID).sum(axis=1)
        limit = jnp.where(n_src > 0, jnp.ceil(MAX_OUT_RATIO * n_src).astype(jnp.int32) + MAX_OUT_EXTRA, 0)
        limit = jnp.minimum(limit, max_len)
        variables = {"params": params} if edits is None else {"params": params, taps.EDITS: edits}
        cache = model.apply(variables, src, max_len + 1, method=model.init_cache)
        step = lambda tokens, c: model.apply(variables, tokens, c, method=model.decode_step)  # noqa: E731
        bos = jnp.full((src.shape[0],), tk.BOS_ID, jnp.int32)
        if beam_size == 1:
            logits, cache = step(bos, cache)
            out, _, _ = decode_loop(step, logits, cache, jax.random.key(0), greedy_or_sample(True),
                                    max_new_tokens=max_len, limit=limit, eos_id=tk.EOS_ID, pad_id=tk.PAD_ID)
            return out
        seqs, _ = beam_search(step, bos, cache, beam_size=beam_size, max_len=max_len, eos_id=tk.EOS_ID,
                              alpha=alpha, limit=limit)
        return seqs[:, 0]

    return search


class TranslationPipeline:
    """A trained model ready to translate: config, params and tokenizer (see :meth:`load`)."""

    def __init__(self, config: TranslatorConfig, params, tokenizer, batch_size: int = 64):
        if batch_size < 1:
            raise InputError(f"batch size {batch_size}: must be >= 1")
        self.config, self.params, self.tokenizer, self.batch_size = config, params, tokenizer, batch_size
        self.search = make_search(config)

    @classmethod
    def load(cls, directory: str | Path, **kw) -> "TranslationPipeline":
        """Reads ``config.json``, ``tokenizer.json`` and the ``best`` params (else those of the newest
        intact checkpoint) from a training run directory."""
        d = Path(directory)
        if not (d / "config.json").is_file():
            raise InputError(f"{d}: no config.json; pass the --out directory of `jaxformer train translator`")
        if "n_embd" in (read_json(d / "config.json") or {}):
            raise InputError(f"{d}: a GPT-2 model, not a translator (use `jaxformer generate` with it)")
        config = TranslatorConfig.load(d / "config.json")
        params = load_run_params(d, jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
        return cls(config, params, tk.load_tokenizer(d / "tokenizer.json"), **kw)

    def row_counts(self) -> list[int]:
        """The row counts :meth:`translate` pads a batch to: powers of two, up to ``batch_size``."""
        return sorted({min(self.batch_size, 1 << (n - 1).bit_length()) for n in range(1, self.batch_size + 1)})

    def warm_up(self, beam_sizes, threads: int | None = None) -> int:
        """Compiles the search for each beam size in ``beam_sizes`` at every padded source length and
        row count :meth:`translate` can meet (the default length penalty, no edits), on ``threads``
        threads (default: one per CPU), so that translating compiles nothing. Returns the shapes."""
        shapes = [(beam, length, rows) for beam in beam_sizes for length in source_lengths(self.config.max_len)
                  for rows in self.row_counts()]

        def compile_one(shape):
            beam, length, rows = shape
            src = np.full((rows, length), tk.PAD_ID, np.int32)
            self.search(self.params, src, beam_size=beam, max_len=output_len(self.config, length), alpha=LENGTH_ALPHA,
                        edits=None)

        with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            list(pool.map(compile_one, shapes))
        return len(shapes)

    def translate(self, sentences: list[str], beam_size: int = BEAM_SIZE, alpha: float = LENGTH_ALPHA,
                  edits: dict | None = None) -> list[str]:
        """Translations in input order, by beam search (``beam_size`` 1 is greedy; ``alpha``: the
        GNMT length penalty exponent). Empty (or blank) sentences give "", sources longer than the
        model's ``max_len`` are truncated with a warning. ``edits``: interventions at every
        decoding step (:mod:`jaxformer.nn.taps`; they must broadcast over rows and positions)."""
        if beam_size < 1:
            raise InputError(f"beam size {beam_size}: must be >= 1")
        tree = None
        if edits:
            probe = np.full((1, 2), tk.EOS_ID, np.int32)
            tree = taps.with_edits(Translator(self.config), self.params, edits, probe, probe)[taps.EDITS]
        config, out = self.config, [""] * len(sentences)
        ids = tk.encode(self.tokenizer, sentences)
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        for i in todo:
            if len(ids[i]) > config.max_len - 1:
                warnings.warn(f"sentence {i + 1} has {len(ids[i])} tokens; translating its first {config.max_len - 1}")
                ids[i] = ids[i][:config.max_len - 1]
        lengths = source_lengths(config.max_len)
        bucket = {i: next(L for L in lengths if L >= len(ids[i]) + 1) for i in todo}
        for L in lengths:
            members = [i for i in todo if bucket[i] == L]
            for s in range(0, len(members), self.batch_size):
                chunk = members[s:s + self.batch_size]
                rows = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
                src = pad_sources([ids[i] for i in chunk], rows, L)
                hyp = self.search(self.params, src, beam_size=beam_size, max_len=output_len(config, L), alpha=alpha,
                                  edits=tree)
                for i, text in zip(chunk, tk.decode(self.tokenizer, np.asarray(hyp))):
                    out[i] = text
        return out
