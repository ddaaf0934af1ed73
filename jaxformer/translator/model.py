"""Encoder-decoder Transformer in Flax Linen, using the shared attention kernel and KV cache.

Params (tied embeddings; ``E``/``D`` = encoder/decoder layer)::

    embed/embedding [V, d]   (untied: src_embed, tgt_embed [V, d] and out {kernel [d, V], bias [V]})
    enc_i/{attn, ff, ln_1, ln_2}              dec_i/{self_attn, cross_attn, ff, ln_1, ln_2, ln_3}
    attn/{query, key, value, out}/{kernel [d, d], bias [d]}    ff/{up [d, F], down [F, d]}
    enc_ln, dec_ln/{scale, bias} [d]          (pre-LN only: the final layer norms)

Decoding cache (a dict; every leaf has batch ``b`` first, so beam search can repeat and reorder it)::

    self:  tuple of KVCache, one per decoder layer, [b, heads, max_len, head_dim], written at ``index``
    cross: tuple of KVCache, one per decoder layer, [b, heads, S, head_dim], projected once
    src_valid: bool[b, S]    index: int32[], the slot the next token is written to (shared by all rows)

Taps (:mod:`jaxformer.nn.taps`; by name, layers stacked; ``T`` target, ``S`` source length)::

    enc_tok_embed, enc_pos_embed [b, S, d]   dec_tok_embed, dec_pos_embed [b, T, d] (token embeddings
                                              scaled by sqrt(d); the sinusoidal positions)
    enc/resid_pre, enc/resid_mid, enc/resid_post [b, S, d]        enc_out [b, S, d] (encoder output)
    dec/resid_pre, dec/resid_mid, dec/resid_cross, dec/resid_post [b, T, d]   dec_out [b, T, d]
    enc/attn/{q, z} [b, S, H, dh]  enc/attn/pattern [b, H, S, S]   {enc,dec}/ff/post [b, *, d_ff]
    dec/self_attn/{q, z} [b, T, H, dh]  dec/self_attn/pattern [b, H, T, T]
    dec/cross_attn/{q, z} [b, T, H, dh]  dec/cross_attn/pattern [b, H, T, S]

``z`` is an attention's output per head (the input of its ``out`` projection, split by head).
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxformer.nn.activations import activation
from jaxformer.nn.attention import (
    KVCache,
    causal_mask,
    dot_product_attention,
    padding_mask,
)
from jaxformer.nn.taps import tap, tapped
from jaxformer.translator.config import TranslatorConfig
from jaxformer.translator.tokenizer import PAD_ID


def sinusoidal(positions, d: int):
    """float32[..., d]: ``sin(p / 10000^(2i/d))`` at even and ``cos`` at odd features."""
    inv_freq = 10000.0 ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(positions.shape + (d,))


def _dense(config: TranslatorConfig, features: int, name: str | None = None):
    return nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(), dtype=jnp.dtype(config.dtype), name=name)


def _layer_norm(config: TranslatorConfig):
    return nn.LayerNorm(config.layer_norm_eps, dtype=jnp.dtype(config.dtype))


class Attention(nn.Module):
    config: TranslatorConfig
    deterministic: bool = True

    def setup(self):
        d = self.config.d_model
        self.query, self.key, self.value, self.out = (_dense(self.config, d) for _ in range(4))
        self.dropout = nn.Dropout(self.config.dropout)

    def _heads(self, x):  # [b, t, d] -> [b, t, h, d/h]
        return x.reshape(x.shape[:2] + (self.config.n_heads, self.config.head_dim))

    def kv(self, x) -> KVCache:
        """Keys and values of ``x: [b, t, d]`` as a KVCache ``[b, h, t, d/h]``."""
        return KVCache.from_heads(self._heads(self.key(x)), self._heads(self.value(x)))

    def __call__(self, x, mask, memory=None, cache: KVCache | None = None, index=0):
        """x: [b, t, d] queries. memory: what to attend to: None (x itself), an encoder output
        [b, S, d] (projected here), or its projection as a KVCache [b, h, S, d/h] (decoding).
        cache: self-attention cache, x's keys are written at slot ``index`` and all slots attended.
        mask: bool broadcastable to [b, h, t, kv_len]. Returns ([b, t, d], cache)."""
        q = tap(self, "q", self._heads(self.query(x)))
        if cache is not None:
            kv = cache = cache.update(self._heads(self.key(x)), self._heads(self.value(x)), index)
            k, v, heads_major = kv.k, kv.v, True
        elif isinstance(memory, KVCache):
            k, v, heads_major = memory.k, memory.v, True
        else:
            src = x if memory is None else memory
            k, v, heads_major = self._heads(self.key(src)), self._heads(self.value(src)), False
        drop = None
        if not self.deterministic and self.config.dropout > 0:
            drop = lambda p: self.dropout(p, deterministic=False)  # noqa: E731
        probs_fn = (lambda p: tap(self, "pattern", p)) if tapped(self, "pattern") else None
        y = dot_product_attention(q, k, v, mask, scale=self.config.head_dim**-0.5, dropout_fn=drop, probs_fn=probs_fn,
                                  heads_major=heads_major)
        return self.out(tap(self, "z", y).reshape(x.shape)), cache


class FeedForward(nn.Module):
    config: TranslatorConfig

    @nn.compact
    def __call__(self, x):
        h = tap(self, "post", activation(self.config.activation)(_dense(self.config, self.config.d_ff, "up")(x)))
        return _dense(self.config, self.config.d_model, "down")(h)


class _Residual(nn.Module):
    """Shared by both layer kinds: ``x + drop(f(ln(x)))`` (pre-LN) or ``ln(x + drop(f(x)))`` (post-LN)."""

    config: TranslatorConfig
    deterministic: bool = True

    def residual(self, x, ln, f):
        """Applies ``f: h -> (y, aux)`` as a residual branch; returns (x', aux)."""
        if self.config.pre_ln:
            y, aux = f(ln(x))
            return x + self.drop(y, deterministic=self.deterministic), aux
        y, aux = f(x)
        return ln(x + self.drop(y, deterministic=self.deterministic)), aux


class EncoderLayer(_Residual):
    def setup(self):
        self.attn = Attention(self.config, self.deterministic)
        self.ff = FeedForward(self.config)
        self.ln_1, self.ln_2 = (_layer_norm(self.config) for _ in range(2))
        self.drop = nn.Dropout(self.config.dropout)

    def __call__(self, x, mask):
        x = tap(self, "resid_pre", x)
        x, _ = self.residual(x, self.ln_1, lambda h: self.attn(h, mask))
        x, _ = self.residual(tap(self, "resid_mid", x), self.ln_2, lambda h: (self.ff(h), None))
        return tap(self, "resid_post", x)


class DecoderLayer(_Residual):
    def setup(self):
        self.self_attn = Attention(self.config, self.deterministic)
        self.cross_attn = Attention(self.config, self.deterministic)
        self.ff = FeedForward(self.config)
        self.ln_1, self.ln_2, self.ln_3 = (_layer_norm(self.config) for _ in range(3))
        self.drop = nn.Dropout(self.config.dropout)

    def __call__(self, x, self_mask, memory, cross_mask, cache=None, index=0):
        """memory: the encoder output [b, S, d], or its cross-attention KVCache (decoding)."""
        x = tap(self, "resid_pre", x)
        x, cache = self.residual(x, self.ln_1, lambda h: self.self_attn(h, self_mask, cache=cache, index=index))
        x, _ = self.residual(tap(self, "resid_mid", x), self.ln_2, lambda h: self.cross_attn(h, cross_mask, memory))
        x, _ = self.residual(tap(self, "resid_cross", x), self.ln_3, lambda h: (self.ff(h), None))
        return tap(self, "resid_post", x), cache


class Translator(nn.Module):
    """``__call__(src, tgt_in) -> logits`` for training; ``encode``/``init_cache``/``decode_step`` for decoding."""

    config: TranslatorConfig
    deterministic: bool = True

    def setup(self):
        config, det = self.config, self.deterministic
        emb = lambda: nn.Embed(config.vocab_size, config.d_model, dtype=jnp.dtype(config.dtype),  # noqa: E731
                               embedding_init=nn.initializers.normal(config.d_model**-0.5))
        if config.tie_embeddings:
            self.embed = emb()
        else:
            self.src_embed, self.tgt_embed = emb(), emb()
            self.out = _dense(config, config.vocab_size)
        self.enc = [EncoderLayer(config, det, name=f"enc_{i}") for i in range(config.enc_layers)]
        self.dec = [DecoderLayer(config, det, name=f"dec_{i}") for i in range(config.dec_layers)]
        if config.pre_ln:
            self.enc_ln, self.dec_ln = _layer_norm(config), _layer_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def _embed(self, side: str, tokens, positions, table):
        """``side``: ``enc`` or ``dec`` (the taps' names)."""
        x = tap(self, f"{side}_tok_embed", table(tokens) * math.sqrt(self.config.d_model)) \
            + tap(self, f"{side}_pos_embed", jnp.broadcast_to(sinusoidal(positions, self.config.d_model),
                                                             tokens.shape + (self.config.d_model,)))
        return self.dropout(x, deterministic=self.deterministic)

    def _logits(self, x):
        x = tap(self, "dec_out", self.dec_ln(x) if self.config.pre_ln else x)
        if self.config.tie_embeddings:
            return self.embed.attend(x).astype(jnp.float32)
        return self.out(x).astype(jnp.float32)

    def encode(self, src):
        """src: int32[b, S] (PAD_ID = padding). Returns (float32[b, S, d], src_valid bool[b, S])."""
        valid = src != PAD_ID
        table = self.embed if self.config.tie_embeddings else self.src_embed
        x = self._embed("enc", src, jnp.arange(src.shape[1]), table)
        mask = padding_mask(valid)
        for layer in self.enc:
            x = layer(x, mask)
        return tap(self, "enc_out", self.enc_ln(x) if self.config.pre_ln else x), valid

    def decode(self, tgt_in, enc, src_valid):
        """Teacher-forced decoder: tgt_in int32[b, T]. Returns float32[b, T, V] logits."""
        table = self.embed if self.config.tie_embeddings else self.tgt_embed
        x = self._embed("dec", tgt_in, jnp.arange(tgt_in.shape[1]), table)
        self_mask, cross_mask = causal_mask(tgt_in != PAD_ID, tgt_in.shape[1]), padding_mask(src_valid)
        for layer in self.dec:
            x, _ = layer(x, self_mask, enc, cross_mask)
        return self._logits(x)

    def __call__(self, src, tgt_in):
        """src: int32[b, S]; tgt_in: int32[b, T] (BOS first). Returns float32[b, T, V] logits."""
        return self.decode(tgt_in, *self.encode(src))

    def init_cache(self, src, max_len: int) -> dict:
        """Encodes src: int32[b, S] once and projects the cross-attention keys/values of every layer.
        ``max_len`` (static) is the number of self-attention slots."""
        enc, valid = self.encode(src)
        b, config = src.shape[0], self.config
        return dict(
            self=tuple(KVCache.zeros(b, max_len, config.n_heads, config.head_dim) for _ in self.dec),
            cross=tuple(layer.cross_attn.kv(enc) for layer in self.dec),
            src_valid=valid, index=jnp.zeros((), jnp.int32),
        )

    def decode_step(self, tokens, cache: dict):
        """Feeds tokens: int32[n] at slot ``cache['index']``. Returns (float32[n, V], cache)."""
        index = cache["index"]
        table = self.embed if self.config.tie_embeddings else self.tgt_embed
        x = self._embed("dec", tokens[:, None], index[None], table)
        slots = cache["self"][0].max_len
        self_mask = (jnp.arange(slots) <= index)[None, None, None, :]
        cross_mask = padding_mask(cache["src_valid"])
        new_self = []
        for layer, self_cache, enc_kv in zip(self.dec, cache["self"], cache["cross"]):
            x, self_cache = layer(x, self_mask, enc_kv, cross_mask, self_cache, index)
            new_self.append(self_cache)
        cache = dict(cache, self=tuple(new_self), index=cache["index"] + 1)
        return self._logits(x)[:, 0], cache


def init_params(config: TranslatorConfig, key):
    """Random parameters as a plain pytree."""
    tokens = jnp.ones((1, 8), jnp.int32)
    return Translator(config).init(key, tokens, tokens)["params"]
