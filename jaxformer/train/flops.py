"""Model FLOPs utilisation: training FLOPs per token, the device's peak, and their ratio.

MFU = achieved FLOP/s (tokens/s x FLOPs per token) / (peak FLOP/s per device x devices). Peaks
come from a table for accelerators and from a measured matmul on CPUs, which no table knows.
"""

import math
import time

import jax
import jax.numpy as jnp


def gpt2_flops_per_token(config, seq_len: int) -> float:
    """GPT-2 training FLOPs per token (PaLM, appendix B): ``6 N + 12 L D T``.

    N counts the parameters that take part in matmuls: all but the position embeddings (the tied
    token embedding is counted once, as the output projection). ``6 N``: 2 forward + 4 backward
    FLOPs per weight; ``12 L D T``: attention scores and values (QK^T and AV, no causal saving).
    """
    n = config.num_params() - config.n_positions * config.n_embd
    return 6.0 * n + 12.0 * config.n_layer * config.n_embd * seq_len


# Dense bf16 peak FLOP/s per chip, matched by substring of ``device.device_kind`` (first match).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("A10", 125e12), ("L4", 121e12), ("V100", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def measure_matmul_flops(device, dtype, n: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of an ``n x n`` matmul on ``device``."""
    x = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device for ``dtype`` compute, where it came from). Accelerators: the
    table (float32 counts half the bf16 rate: TF32 on GPUs); CPUs: measured."""
    if device.platform == "cpu":
        return measure_matmul_flops(device, jnp.dtype(dtype)), "measured matmul"
    for name, flops in PEAK_BF16_FLOPS:
        if name in device.device_kind:
            return (flops if dtype != "float32" else flops / 2), f"table ({name})"
    return math.nan, f"unknown device kind {device.device_kind!r}"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, devices: int = 1) -> float | None:
    """The fraction of ``devices`` x ``peak`` that ``tokens_per_s`` uses; None when unknown."""
    if not tokens_per_s or not math.isfinite(peak):
        return None
    return tokens_per_s * flops_per_token / (peak * devices)
