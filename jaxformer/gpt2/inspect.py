"""GPT-2 seen from inside, in Hugging Face's conventions: hidden states, attention maps, the logit
lens (:mod:`jaxformer.nn.taps` underneath)."""

import functools

import jax
import jax.numpy as jnp

from jaxformer.nn import taps
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.model import GPT2


@functools.partial(jax.jit, static_argnames="config")
def hf_outputs(params, tokens, edits=None, *, config: GPT2Config) -> dict:
    """``logits`` [b, t, V], ``hidden_states`` [L + 1, b, t, D] and ``attentions`` [L, b, H, t, t]
    as Hugging Face's ``output_hidden_states`` / ``output_attentions`` give them (entry 0 the
    embedding sum, the last after the final LayerNorm), for tokens int32[b, t] under ``edits``."""
    model = GPT2(config)
    variables = {"params": params}
    if edits is not None:
        variables[taps.EDITS] = taps.edits_tree(edits, params)
    (logits, _), state = model.apply(variables, tokens, mutable=[taps.CAPTURE])
    got = taps.select(taps.stack_captures(taps.flatten(state[taps.CAPTURE])),
                      ("h/resid_pre", "ln_final", "h/attn/pattern"))
    hidden = jnp.concatenate([got["h/resid_pre"], got["ln_final"][None]])
    return dict(logits=logits, hidden_states=hidden, attentions=got["h/attn/pattern"])


@functools.partial(jax.jit, static_argnames="config")
def logit_lens(params, tokens, *, config: GPT2Config):
    """The next-token distribution each layer's residual stream would give if it were the last:
    ``ln_f`` and the LM head applied to ``h/resid_pre[l]`` (l = 0 .. L-1) and to the final output.
    Returns (top token int32[L + 1, b, t], its probability float32[L + 1, b, t])."""
    _, got = taps.apply(GPT2(config), params, tokens, capture=("h/resid_pre", "h/resid_post"))
    streams = jnp.concatenate([got["h/resid_pre"], got["h/resid_post"][-1:]]).astype(jnp.float32)  # [L+1, b, t, D]
    mean = streams.mean(-1, keepdims=True)
    var = ((streams - mean) ** 2).mean(-1, keepdims=True)
    normed = (streams - mean) * jax.lax.rsqrt(var + config.layer_norm_epsilon)
    normed = normed * params["ln_f"]["scale"] + params["ln_f"]["bias"]
    head = params["wte"]["embedding"] if config.tie_word_embeddings else params["lm_head"].T  # [V, D]
    probs = jax.nn.softmax(jnp.einsum("lbtd,vd->lbtv", normed, head.astype(jnp.float32)), axis=-1)
    top = jnp.argmax(probs, axis=-1)
    return top.astype(jnp.int32), jnp.take_along_axis(probs, top[..., None], axis=-1)[..., 0]
