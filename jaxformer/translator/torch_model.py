"""The same translator in PyTorch, built on ``torch.nn.Transformer``: the independent reference for
the tests and the baseline for ``scripts/bench_translator.py``. Needs the ``torch`` extra.

Weight mapping (Flax → torch; Flax kernels are [in, out], torch weights [out, in])::

    attn/{query,key,value}/kernel   -> self_attn.in_proj_weight = concat(q.T, k.T, v.T)  (biases alike)
    cross_attn/...                  -> multihead_attn.in_proj_*
    attn/out                        -> *.out_proj
    ff/up, ff/down                  -> linear1, linear2
    enc_i/ln_1, ln_2                -> encoder.layers[i].norm1, norm2
    dec_i/ln_1, ln_2, ln_3          -> decoder.layers[i].norm1 (self), norm2 (cross), norm3 (ff)
    enc_ln, dec_ln                  -> encoder.norm, decoder.norm (post-LN: identity)
    embed (tied)                    -> src_embed = tgt_embed = out.weight (no output bias)
"""

import math

import numpy as np
import torch
from torch import nn

from jaxformer.translator.config import TranslatorConfig
from jaxformer.translator.tokenizer import BOS_ID, EOS_ID, PAD_ID


def sinusoidal(length: int, d: int) -> torch.Tensor:
    """[length, d], sin at even and cos at odd features (as the Flax model)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    angle = pos * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    return torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).reshape(length, d)


class TorchTranslator(nn.Module):
    def __init__(self, config: TranslatorConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.Transformer(
            config.d_model, config.n_heads, config.enc_layers, config.dec_layers, config.d_ff, config.dropout,
            activation={"relu": "relu", "gelu": "gelu"}[config.activation], layer_norm_eps=config.layer_norm_eps,
            batch_first=True, norm_first=config.pre_ln)
        if not config.pre_ln:
            self.transformer.encoder.norm = nn.Identity()
            self.transformer.decoder.norm = nn.Identity()
        self.src_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.tgt_embed = self.src_embed if config.tie_embeddings else nn.Embedding(config.vocab_size, config.d_model)
        self.out = nn.Linear(config.d_model, config.vocab_size, bias=not config.tie_embeddings)
        if config.tie_embeddings:
            self.out.weight = self.src_embed.weight
        self.register_buffer("pe", sinusoidal(512, config.d_model), persistent=False)
        self.drop = nn.Dropout(config.dropout)

    def _embed(self, tokens, table):
        return self.drop(table(tokens) * math.sqrt(self.config.d_model) + self.pe[:tokens.shape[1]])

    def encode(self, src):
        """src: long[b, S] → (memory [b, S, d], padding mask bool[b, S], True at PAD)."""
        pad = src == PAD_ID
        return self.transformer.encoder(self._embed(src, self.src_embed), src_key_padding_mask=pad), pad

    def decode(self, tgt_in, memory, src_pad):
        """tgt_in: long[b, T] → float32[b, T, V] logits."""
        t = tgt_in.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        y = self.transformer.decoder(self._embed(tgt_in, self.tgt_embed), memory, tgt_mask=causal,
                                     tgt_key_padding_mask=tgt_in == PAD_ID, memory_key_padding_mask=src_pad)
        return self.out(y)

    def forward(self, src, tgt_in):
        return self.decode(tgt_in, *self.encode(src))

    @torch.no_grad()
    def greedy_book(self, src, max_len: int):
        """The book's greedy ``translate()``, batched: encode once, then re-run the decoder on the
        whole prefix at every step. Returns long[b, <= max_len] (tokens, EOS, PAD)."""
        memory, src_pad = self.encode(src)
        ys = torch.full((src.shape[0], 1), BOS_ID, dtype=torch.long)
        done = torch.zeros(src.shape[0], dtype=torch.bool)
        for _ in range(max_len):
            nxt = self.decode(ys, memory, src_pad)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            ys = torch.cat([ys, nxt[:, None]], dim=1)
            done |= nxt == EOS_ID
            if done.all():
                break
        return ys[:, 1:]


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def from_flax(params, config: TranslatorConfig) -> TorchTranslator:
    """A TorchTranslator holding the Flax ``params`` (see the table above); shapes are checked."""
    model = TorchTranslator(config)
    tr = model.transformer

    def put(param: torch.Tensor, value, name: str):
        value = _t(value)
        if param.shape != value.shape:
            raise ValueError(f"{name}: torch shape {tuple(param.shape)} != flax shape {tuple(value.shape)}")
        param.data.copy_(value)

    def attention(mha, p, name):
        put(mha.in_proj_weight, np.concatenate([p[k]["kernel"].T for k in ("query", "key", "value")]), name)
        put(mha.in_proj_bias, np.concatenate([p[k]["bias"] for k in ("query", "key", "value")]), name)
        put(mha.out_proj.weight, p["out"]["kernel"].T, name + "/out")
        put(mha.out_proj.bias, p["out"]["bias"], name + "/out")

    def norm(ln, p, name):
        put(ln.weight, p["scale"], name)
        put(ln.bias, p["bias"], name)

    def ff(layer, p, name):
        put(layer.linear1.weight, p["up"]["kernel"].T, name + "/up")
        put(layer.linear1.bias, p["up"]["bias"], name + "/up")
        put(layer.linear2.weight, p["down"]["kernel"].T, name + "/down")
        put(layer.linear2.bias, p["down"]["bias"], name + "/down")

    for i, layer in enumerate(tr.encoder.layers):
        p = params[f"enc_{i}"]
        attention(layer.self_attn, p["attn"], f"enc_{i}/attn")
        ff(layer, p["ff"], f"enc_{i}/ff")
        norm(layer.norm1, p["ln_1"], f"enc_{i}/ln_1")
        norm(layer.norm2, p["ln_2"], f"enc_{i}/ln_2")
    for i, layer in enumerate(tr.decoder.layers):
        p = params[f"dec_{i}"]
        attention(layer.self_attn, p["self_attn"], f"dec_{i}/self_attn")
        attention(layer.multihead_attn, p["cross_attn"], f"dec_{i}/cross_attn")
        ff(layer, p["ff"], f"dec_{i}/ff")
        for j in (1, 2, 3):
            norm(getattr(layer, f"norm{j}"), p[f"ln_{j}"], f"dec_{i}/ln_{j}")
    if config.pre_ln:
        norm(tr.encoder.norm, params["enc_ln"], "enc_ln")
        norm(tr.decoder.norm, params["dec_ln"], "dec_ln")
    if config.tie_embeddings:
        put(model.src_embed.weight, params["embed"]["embedding"], "embed")
    else:
        put(model.src_embed.weight, params["src_embed"]["embedding"], "src_embed")
        put(model.tgt_embed.weight, params["tgt_embed"]["embedding"], "tgt_embed")
        put(model.out.weight, params["out"]["kernel"].T, "out")
        put(model.out.bias, params["out"]["bias"], "out")
    return model
