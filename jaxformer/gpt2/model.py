"""GPT-2 in Flax Linen. Parameter names follow Hugging Face's so the converter is a table.

Params (``L`` = n_layer, stacked by ``nn.scan`` so compile time does not grow with depth)::

    wte/embedding [V, D]   wpe/embedding [P, D]   ln_f/{scale, bias} [D]   (lm_head [D, V] if untied)
    h/ln_1, h/ln_2 {scale, bias} [L, D]
    h/attn/c_attn {kernel [L, D, 3D], bias [L, 3D]}    h/attn/c_proj {kernel [L, D, D], bias [L, D]}
    h/mlp/c_fc {kernel [L, D, F], bias [L, F]}         h/mlp/c_proj {kernel [L, F, D], bias [L, D]}

With ``config.scan_layers=False`` the same block params sit unstacked under ``h_0 .. h_{L-1}``
(:func:`unstack_layer_params` / :func:`stack_layer_params` convert). The KV cache is a
:class:`~jaxformer.nn.attention.KVCache` with leaves ``[L, batch, heads, max_len, head_dim]``.

Taps (:mod:`jaxformer.nn.taps`; captured and edited by name, layers stacked, shapes per layer)::

    embed, pos_embed [b, t, D]   ln_final [b, t, D] (after ln_f; with last_only or at, one position)
    h/resid_pre, h/resid_mid, h/resid_post, h/attn_out, h/mlp_out [b, t, D]    h/mlp/post [b, t, F]
    h/attn/q, h/attn/k, h/attn/v, h/attn/z [b, t, H, d]   h/attn/pattern [b, H, t, kv_len]

LoRA adapters (:mod:`jaxformer.gpt2.lora`) enter as the ``lora`` argument, a tree shaped like the
params' (layers stacked the same way) holding ``{"lora_a" [in, r], "lora_b" [r, out]}`` for each
adapted projection, e.g. ``{"h": {"attn": {"c_attn": {...}}}}``: the projection of x becomes
``dense(x) + dropout(x) @ lora_a @ lora_b`` (``lora_b`` already multiplied by the adapter's
scaling). The params stay as they are, so a frozen base is shared by any number of adapters (with a
batch axis after the layer axis, ``[b, in, r]`` per layer, each row has its own adapter:
:func:`jaxformer.gpt2.lora.select`).

``z`` is the attention output per head (the input of ``c_proj``, split by head); ``pattern`` the
probabilities after softmax, before dropout. Hugging Face's ``hidden_states[i]`` is
``h/resid_pre[i]`` for ``i < L`` and ``ln_final`` for ``i = L``; ``attentions[i]`` is
``h/attn/pattern[i]``.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.nn.activations import activation
from jaxformer.nn.attention import KVCache, causal_mask, dot_product_attention, probs_dropout
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.quantize import LowPrecisionDense, LowPrecisionEmbed
from jaxformer.nn.taps import CAPTURE, EDITS, tap, tapped


def _dense(config: GPT2Config, features: int, name: str, std: float | None = None):
    if config.weights != "float":
        return LowPrecisionDense(features, config.weights, name=name)
    return nn.Dense(
        features, name=name, dtype=config.compute_dtype, param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nn.initializers.normal(std or config.initializer_range),
    )


def _adapted(module: nn.Module, dense: nn.Module, x, lora: dict | None, name: str):
    """``dense(x)``, plus ``dropout(x) @ lora_a @ lora_b`` when ``lora`` holds an adapter for ``name``.

    x: [b, t, in]; lora[name]: {"lora_a": [in, r], "lora_b": [r, out]} (scaled), or [b, in, r] and
    [b, r, out]: an adapter per row (a server's mixed batch). The update runs in the compute dtype;
    its dropout (``module.lora_dropout``, training only) is named so that the other dropout masks
    do not change with it."""
    y = dense(x)
    if not lora or name not in lora:
        return y
    if module.lora_dropout > 0:
        x = nn.Dropout(module.lora_dropout, name=f"{name}_lora_dropout")(x, deterministic=module.deterministic)
    dtype = module.config.compute_dtype
    a, b = (lora[name][k].astype(dtype) for k in ("lora_a", "lora_b"))
    if a.ndim == 3:
        update = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x.astype(dtype), a), b)
    else:
        update = (x.astype(dtype) @ a) @ b
    return y + update.astype(y.dtype)


def _layer_norm(config: GPT2Config, name: str):
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype,
                        param_dtype=jnp.dtype(config.param_dtype), name=name)


class CausalSelfAttention(nn.Module):
    config: GPT2Config
    deterministic: bool = True
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, mask, layer_idx, cache: KVCache | None, index, lora=None):
        """x: [b, t, D]; mask: bool[b, 1, t, kv_len], or None for plain causal attention without a
        cache; cache: stacked over layers, this layer's slots are written at ``index``; lora: this
        module's adapters (``c_attn``, ``c_proj``) or None. Returns ([b, t, D], updated cache)."""
        config = self.config
        b, t, _ = x.shape
        qkv = _adapted(self, _dense(config, 3 * config.n_embd, "c_attn"), x, lora, "c_attn")
        q, k, v = (tap(self, n, a.reshape(b, t, config.n_head, config.head_dim))
                   for n, a in zip("qkv", jnp.split(qkv, 3, axis=-1)))
        # Training and a prefill from slot 0 attend over their own keys; decoding steps over the cache.
        fresh = cache is None or (t > 1 and isinstance(index, int) and index == 0)
        if cache is not None:
            cache = cache.update(k, v, index, layer=layer_idx)
            if fresh:
                mask = mask[..., :t]
            else:
                k, v = (a[:b].astype(q.dtype) for a in cache.layer(layer_idx))
        scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale = scale / (layer_idx + 1)  # traced under nn.scan
        dropout = None
        if not self.deterministic and config.attn_pdrop > 0:
            dropout = probs_dropout(self.make_rng("dropout"), config.attn_pdrop)
        probs_fn = (lambda p: tap(self, "pattern", p)) if tapped(self, "pattern") else None
        y = dot_product_attention(q, k, v, mask, scale=scale, upcast_qk=config.reorder_and_upcast_attn,
                                  dropout_fn=dropout, probs_fn=probs_fn, heads_major=not fresh)
        y = tap(self, "z", y)
        std = config.initializer_range / math.sqrt(2 * config.n_layer)
        y = _adapted(self, _dense(config, config.n_embd, "c_proj", std), y.reshape(b, t, config.n_embd), lora, "c_proj")
        return nn.Dropout(config.resid_pdrop)(y, deterministic=self.deterministic), cache


class MLP(nn.Module):
    config: GPT2Config
    deterministic: bool = True
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, lora=None):
        config = self.config
        h = _adapted(self, _dense(config, config.inner_dim, "c_fc"), x, lora, "c_fc")
        h = tap(self, "post", activation(config.activation_function)(h))
        std = config.initializer_range / math.sqrt(2 * config.n_layer)
        y = _adapted(self, _dense(config, config.n_embd, "c_proj", std), h, lora, "c_proj")
        return nn.Dropout(config.resid_pdrop)(y, deterministic=self.deterministic)


class Block(nn.Module):
    """Pre-LN transformer block as a scan body: ``((x, cache), layer_idx, lora) -> ((x, cache), None)``
    (``lora``: this layer's adapters, or None).

    The whole stacked cache rides in the carry and each layer writes only its new slots, so a decode
    loop updates the cache in place instead of copying it once per layer.
    """

    config: GPT2Config
    deterministic: bool = True
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, carry, layer_idx, lora, mask, index):
        config, det, p = self.config, self.deterministic, self.lora_dropout
        x, cache = carry
        lora = lora or {}
        x = tap(self, "resid_pre", x)
        h = _layer_norm(config, "ln_1")(x)
        y, cache = CausalSelfAttention(config, det, p, name="attn")(h, mask, layer_idx, cache, index, lora.get("attn"))
        x = tap(self, "resid_mid", x + tap(self, "attn_out", y))
        y = MLP(config, det, p, name="mlp")(_layer_norm(config, "ln_2")(x), lora.get("mlp"))
        x = tap(self, "resid_post", x + tap(self, "mlp_out", y))
        return (x, cache), None


class GPT2(nn.Module):
    """GPT-2 language model (``GPT2LMHeadModel``); ``lora_dropout``: dropout on the inputs of LoRA
    adapters while training."""

    config: GPT2Config
    deterministic: bool = True
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, positions=None, key_valid=None, cache: KVCache | None = None, index=0,
                 last_only: bool = False, at=None, lora=None):
        """Logits (float32) and the updated cache.

        tokens: int32[b, t]. positions: int32[b, t], default ``index + arange(t)``.
        key_valid: bool[b, kv_len] with kv_len = t without a cache, max_len with one; False marks
          padding (and cache slots not yet written). Default: all valid.
        cache: KVCache with leaves [L, B, heads, max_len, head_dim]; this call writes at slot ``index``.
          B >= b: a batch of b rows uses (and writes) the cache's first b rows only.
        last_only: return logits for the last position only ([b, 1, V]), as generation needs.
        at: int32[b]: return logits for position ``at[i]`` of row i only ([b, 1, V]; e.g. the last
          token of a right-padded prompt).
        lora: LoRA adapters (see the module docstring), or None.
        Returns (float32[b, t or 1, V], cache or None).
        """
        config = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        if key_valid is None and cache is None:
            mask = None  # plain causal (fused attention can skip the masked half)
        else:
            if key_valid is None:
                key_valid = jnp.ones((b, cache.max_len), bool)
            mask = causal_mask(key_valid, t, index)

        emb = lambda n, name: nn.Embed(  # noqa: E731
            n, config.n_embd, name=name, dtype=config.compute_dtype, param_dtype=jnp.dtype(config.param_dtype),
            embedding_init=nn.initializers.normal(config.initializer_range))
        wte = emb(config.vocab_size, "wte") if config.weights == "float" else \
            LowPrecisionEmbed(config.vocab_size, config.n_embd, config.weights, name="wte")
        x = tap(self, "embed", wte(tokens)) + tap(self, "pos_embed", emb(config.n_positions, "wpe")(positions))
        x = nn.Dropout(config.embd_pdrop)(x, deterministic=self.deterministic)

        x, cache = self._blocks(x, cache, lora or {}, mask, index)
        if at is not None:
            x = jnp.take_along_axis(x, at[:, None, None], axis=1)
        elif last_only:
            x = x[:, -1:]
        x = tap(self, "ln_final", _layer_norm(config, "ln_f")(x))
        # Contract with the embedding as stored ([V, D]): a transposed copy would cost a full
        # extra pass over the largest matrix at every decoding step.
        if config.weights != "float":
            return wte.attend(x), cache
        if config.tie_word_embeddings:
            head, spec = wte.embedding, "btd,vd->btv"
        else:
            head, spec = self.param("lm_head", nn.initializers.normal(config.initializer_range),
                                    (config.n_embd, config.vocab_size), jnp.dtype(config.param_dtype)), "btd,dv->btv"
        logits = jnp.einsum(spec, x, head.astype(config.compute_dtype), preferred_element_type=jnp.float32)
        return logits, cache


    def _blocks(self, x, cache, lora: dict, mask, index):
        """The layers, one ``nn.scan`` over stacked params or ``h_0 .. h_{L-1}``: (x, cache)."""
        config, det = self.config, self.deterministic
        block = nn.remat(Block, prevent_cse=not config.scan_layers) if config.remat else Block
        if config.scan_layers:
            blocks = nn.scan(
                block, variable_axes={"params": 0, CAPTURE: 0, EDITS: 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast), length=config.n_layer,
            )(config, det, self.lora_dropout, name="h")
            return blocks((x, cache), jnp.arange(config.n_layer), lora.get("h"), mask, index)[0]
        for i in range(config.n_layer):
            layer = block(config, det, self.lora_dropout, name=f"h_{i}")
            (x, cache), _ = layer((x, cache), i, lora.get(f"h_{i}"), mask, index)
        return x, cache


def unstack_layer_params(params, n_layer: int):
    """Stacked ``h`` ([L, ...] leaves) -> ``h_0 .. h_{L-1}`` (for ``scan_layers=False``)."""
    params = dict(params)
    stacked = params.pop("h")
    return {**params, **{f"h_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(n_layer)}}


def stack_layer_params(params, n_layer: int):
    """``h_0 .. h_{L-1}`` -> stacked ``h`` (for ``scan_layers=True``)."""
    params = dict(params)
    layers = [params.pop(f"h_{i}") for i in range(n_layer)]
    return {**params, "h": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def init_params(config: GPT2Config, key: jax.Array):
    """Random params (GPT-2 initialisation) as a plain pytree."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return GPT2(config).init(key, tokens)["params"]
