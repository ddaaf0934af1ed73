"""GPT-2 text generation: one jit holds the prefill and the whole decode loop over a KV cache.

Prompts are left-padded (positions come from the padding mask) and shapes are bucketed: the batch
to a power of two, the prompt length and the number of new tokens to powers of two (at least 16),
so calls with other prompt lengths or batch sizes reuse a handful of compilations. Sampling
settings are traced values and never recompile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.nn import taps
from jaxformer.nn.attention import KVCache
from jaxformer.nn.decoding import decode_loop, greedy_or_sample
from jaxformer.errors import InputError
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.model import GPT2

MIN_BUCKET = 16


def pow2_bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("config", "max_new", "greedy", "eos_id"))
def _generate(variables, tokens, prompt_valid, row_keys, limit, temperature, top_k, top_p, *,
              config: GPT2Config, max_new: int, greedy: bool, eos_id: int | None, lora=None):
    """Prefill + decode loop. Static: config, max_new (output buffer), greedy, eos_id.

    variables: ``{"params"}``, and ``"interventions"`` when generating with edits (traced).
    lora: the model's ``lora`` argument (adapters, traced) or None.
    tokens, prompt_valid: [b, t] left-padded prompts and their mask; row_keys: [b] PRNG keys;
    limit: int32[b] new tokens allowed per row. Returns (int32[b, max_new], int32[b] lengths).
    """
    b, t = tokens.shape
    model = GPT2(config)
    key_valid = jnp.concatenate([prompt_valid, jnp.ones((b, max_new), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)
    cache = KVCache.zeros(b, t + max_new, config.n_head, config.head_dim, config.compute_dtype, config.n_layer)
    logits, cache = model.apply(variables, tokens, positions=positions, key_valid=key_valid,
                                cache=cache, index=0, last_only=True, lora=lora)
    next_pos = positions[:, -1] + 1

    def step(tok, state):
        cache, i = state
        # Tied to the loop counter, low-precision weights stay loop-variant: otherwise XLA hoists
        # their conversion to float32 out of the loop and every step reads the float32 copy.
        (step_vars, step_lora), _ = jax.lax.optimization_barrier(((variables, lora), i))
        logits, cache = model.apply(step_vars, tok[:, None], positions=(next_pos + i)[:, None],
                                    key_valid=key_valid, cache=cache, index=t + i, last_only=True, lora=step_lora)
        return logits[:, 0], (cache, i + 1)

    pick = greedy_or_sample(greedy, temperature, top_k, top_p)
    out, lengths, _ = decode_loop(step, logits[:, 0], (cache, jnp.int32(0)), row_keys, pick,
                                  max_new_tokens=max_new, limit=limit, eos_id=eos_id,
                                  pad_id=0 if eos_id is None else eos_id)
    return out, lengths


def validate(config: GPT2Config, prompts, max_new_tokens, greedy, temperature, top_k, top_p):
    """Raises InputError naming the first bad argument."""
    if not prompts:
        raise InputError("no prompts given")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty: give at least one token (e.g. <|endoftext|>)")
        if len(p) + max_new_tokens > config.n_positions:
            raise InputError(f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"n_positions={config.n_positions}")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise InputError(f"prompt {i}: token ids must lie in [0, {config.vocab_size})")
    if not greedy:
        if not temperature > 0:
            raise InputError(f"temperature={temperature}: must be > 0 when sampling (use greedy instead of 0)")
        if not 0 < top_p <= 1:
            raise InputError(f"top_p={top_p}: must lie in (0, 1]")
        if top_k < 0:
            raise InputError(f"top_k={top_k}: must be >= 0 (0 disables top-k)")


def generate(params, config: GPT2Config, prompts: list[list[int]], *, max_new_tokens: int = 32,
             greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_at_eos: bool = True, edits: dict | None = None,
             lora: dict | None = None) -> list[list[int]]:
    """New tokens for each prompt (token ids), up to and including EOS when ``stop_at_eos``.

    Greedy when ``greedy``, else sampling with temperature, top-k (0 = off) and top-p (1 = off),
    combinable. Row ``i`` draws from ``fold_in(key(seed), i)``, so its samples do not depend on the
    other prompts in the batch. ``edits``: interventions applied at every step, prefill and
    decoding (:mod:`jaxformer.nn.taps`: an ablated head, a steering vector; edits must broadcast over
    the batch and time, e.g. ``[L, D]`` or ``[L, H, 1]`` per layer). ``lora``: adapters applied
    on top of ``params`` without merging them, as :func:`jaxformer.gpt2.lora.model_input` gives them.
    """
    validate(config, prompts, max_new_tokens, greedy, temperature, top_k, top_p)
    n = len(prompts)
    b, t, new = pow2_bucket(n, 1), pow2_bucket(max(map(len, prompts))), pow2_bucket(max_new_tokens)
    tokens = np.zeros((b, t), np.int32)
    valid = np.zeros((b, t), bool)
    for i, p in enumerate(prompts + [prompts[0]] * (b - n)):  # filler rows repeat prompt 0
        tokens[i, t - len(p):] = p
        valid[i, t - len(p):] = True
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(b))
    limit = np.full((b,), max_new_tokens, np.int32)
    limit[n:] = 0
    variables = taps.with_edits(GPT2(config), params, edits, tokens[:1, :1])
    out, lengths = _generate(variables, tokens, valid, row_keys, limit, jnp.float32(temperature),
                             jnp.int32(top_k), jnp.float32(top_p), config=config, max_new=new,
                             greedy=greedy, eos_id=config.eos_token_id if stop_at_eos else None, lora=lora)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, : lengths[i]].tolist() for i in range(n)]
