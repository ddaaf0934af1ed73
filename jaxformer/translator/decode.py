"""Translating with a trained model: greedy and beam search through :mod:`jaxformer.decode`.

The encoder runs once per batch (:meth:`Translator.init_cache` also projects the cross-attention
keys/values of every layer); each decoding step feeds one token per row through the KV cache.
Source batches are padded to a bucket length and a power-of-two row count, so the jitted search
compiles once per (rows, bucket, beam) and never per batch.
"""

import functools
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.checkpoint import Checkpoints, restore_pytree
from jaxformer.decode import beam_search, decode_loop, greedy_or_sample
from jaxformer.translator import tokenizer as tk
from jaxformer.translator.batching import pad_sources
from jaxformer.translator.config import TranslatorConfig
from jaxformer.translator.model import Translator


def output_len(cfg: TranslatorConfig, src_len: int) -> int:
    """Output slots (static) for sources padded to ``src_len`` tokens, EOS included."""
    return min(cfg.max_len, math.ceil(cfg.max_out_ratio * src_len) + cfg.max_out_extra)


@functools.lru_cache(maxsize=8)
def make_search(cfg: TranslatorConfig):
    """``search(params, src, beam_size, max_len) -> int32[b, max_len]``, jitted.

    src: int32[b, S], each row tokens + EOS + PAD (an all-PAD row gets an empty output).
    Static: ``beam_size`` (1 = greedy, through ``decode_loop``) and ``max_len`` (output slots); the
    config is closed over (cached per config, so models sharing one share the compilations). Row ``i`` may emit ``ceil(ratio * n_i) + extra`` tokens (EOS included),
    ``n_i`` its source length, capped by ``max_len``. Output: tokens, EOS, then PAD.
    """
    model = Translator(cfg)

    @functools.partial(jax.jit, static_argnames=("beam_size", "max_len"))
    def search(params, src, beam_size: int, max_len: int):
        n_src = (src != tk.PAD_ID).sum(axis=1)
        limit = jnp.where(n_src > 0, jnp.ceil(cfg.max_out_ratio * n_src).astype(jnp.int32) + cfg.max_out_extra, 0)
        limit = jnp.minimum(limit, max_len)
        cache = model.apply({"params": params}, src, max_len + 1, method=model.init_cache)
        step = lambda tokens, c: model.apply({"params": params}, tokens, c, method=model.decode_step)  # noqa: E731
        bos = jnp.full((src.shape[0],), tk.BOS_ID, jnp.int32)
        if beam_size == 1:
            logits, cache = step(bos, cache)
            out, _, _ = decode_loop(step, logits, cache, jax.random.key(0), greedy_or_sample(True),
                                    max_new_tokens=max_len, limit=limit, eos_id=tk.EOS_ID, pad_id=tk.PAD_ID)
            return out
        seqs, _ = beam_search(step, bos, cache, beam_size=beam_size, max_len=max_len, eos_id=tk.EOS_ID,
                              alpha=cfg.length_alpha, limit=limit)
        return seqs[:, 0]

    return search


class TranslatorModel:
    """A trained model ready to translate: config, params and tokenizer (see :meth:`load`)."""

    def __init__(self, cfg: TranslatorConfig, params, tokenizer, batch_size: int = 64):
        self.cfg, self.params, self.tokenizer, self.batch_size = cfg, params, tokenizer, batch_size
        self.search = make_search(cfg)

    @classmethod
    def load(cls, directory: str | Path, **kw) -> "TranslatorModel":
        """Reads ``config.json``, ``tokenizer.json`` and the ``best`` params (else those of the
        latest checkpoint) from a training output directory."""
        d = Path(directory)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: no config.json; pass the --out directory of train_translator.py")
        cfg = TranslatorConfig.load(d / "config.json")
        if (d / "best").is_dir():
            params = restore_pytree(d / "best")
        elif (d / "checkpoints").is_dir():
            ckpts = Checkpoints(d, read_only=True)
            try:
                params = ckpts.restore()["params"]
            finally:
                ckpts.close()
        else:
            raise FileNotFoundError(f"{d}: neither best/ nor checkpoints/ holds parameters")
        return cls(cfg, params, tk.load_tokenizer(d / "tokenizer.json"), **kw)

    def translate(self, sentences: list[str], beam_size: int | None = None) -> list[str]:
        """Translations in input order, by beam search (``beam_size`` default: the config's; 1 is
        greedy). Empty (or blank) sentences give "", sources longer than the model's ``max_len``
        are truncated with a warning."""
        cfg, out = self.cfg, [""] * len(sentences)
        beam_size = beam_size or cfg.beam_size
        ids = tk.encode(self.tokenizer, sentences)
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        for i in todo:
            if len(ids[i]) > cfg.max_len - 1:
                warnings.warn(f"sentence {i + 1} has {len(ids[i])} tokens; translating its first {cfg.max_len - 1}")
                ids[i] = ids[i][:cfg.max_len - 1]
        bucket = {i: next(L for L in cfg.buckets if L >= len(ids[i]) + 1) for i in todo}
        for L in cfg.buckets:
            members = [i for i in todo if bucket[i] == L]
            for s in range(0, len(members), self.batch_size):
                chunk = members[s:s + self.batch_size]
                rows = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
                src = pad_sources([ids[i] for i in chunk], rows, L)
                hyp = self.search(self.params, src, beam_size=beam_size, max_len=output_len(cfg, L))
                for i, text in zip(chunk, tk.decode(self.tokenizer, np.asarray(hyp))):
                    out[i] = text
        return out
