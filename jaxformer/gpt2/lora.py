"""LoRA for GPT-2 (Hu et al. 2021), laid out as PEFT lays it out, so adapters go both ways.

An adapter is a :class:`LoRASpec` and a tree of float32 arrays shaped like the params, with the
layers stacked (``nn.scan``)::

    {"h": {"attn": {"c_attn": {"lora_a": [L, in, r], "lora_b": [L, r, out]}}, "mlp": {...}}}

The adapted projection is ``x @ W + b + scale * (dropout(x) @ lora_a @ lora_b)`` with
``scale = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). ``lora_a`` is PEFT's ``lora_A.weight``
transposed ([r, in] there), ``lora_b`` its ``lora_B.weight`` transposed ([out, r]); GPT-2's
``Conv1D`` weights are [in, out] like the Dense kernels here, which is PEFT's ``fan_in_fan_out=True``:
the merged kernel is ``W + scale * lora_a @ lora_b``. Initialisation as PEFT's: ``lora_a``
Kaiming-uniform (``a = sqrt(5)``: uniform in ``±1/sqrt(in)``), ``lora_b`` zeros, so training starts
from the base model. The base is never changed; files: :mod:`jaxformer.gpt2.peft`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import InputError
from jaxformer.gpt2.config import GPT2Config
from jaxformer.gpt2.model import stack_layer_params, unstack_layer_params
from jaxformer.gpt2.quantize import to_float

# Target name (PEFT's module suffix) -> the projection's path inside a layer.
TARGETS = {"c_attn": ("attn", "c_attn"), "attn.c_proj": ("attn", "c_proj"), "c_fc": ("mlp", "c_fc"),
           "mlp.c_proj": ("mlp", "c_proj")}
DEFAULT_TARGETS = ("c_attn",)  # PEFT's default for gpt2


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """What an adapter is besides its arrays (PEFT's ``LoraConfig`` fields: r, lora_alpha,
    target_modules, use_rslora, lora_dropout)."""

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise InputError(f"lora rank={self.rank}: must be >= 1")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise InputError(f"lora targets {list(unknown or self.targets)}: choose from {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def shapes(config: GPT2Config, spec: LoRASpec) -> dict:
    """``{target: ((in, r), (r, out))}``: one layer's adapter shapes."""
    d, f = config.n_embd, config.inner_dim
    io = {"c_attn": (d, 3 * d), "attn.c_proj": (d, d), "c_fc": (d, f), "mlp.c_proj": (f, d)}
    return {t: ((io[t][0], spec.rank), (spec.rank, io[t][1])) for t in spec.targets}


def build(config: GPT2Config, spec: LoRASpec, per_target) -> dict:
    """The adapter tree from ``per_target(target, (a_shape, b_shape)) -> (lora_a, lora_b)`` with
    layers stacked: [L, in, r] and [L, r, out]."""
    tree: dict = {}
    for target, shape in shapes(config, spec).items():
        module, proj = TARGETS[target]
        a, b = per_target(target, shape)
        tree.setdefault(module, {})[proj] = {"lora_a": a, "lora_b": b}
    return {"h": tree}


def init_adapter(config: GPT2Config, spec: LoRASpec, key: jax.Array) -> dict:
    """A fresh adapter as PEFT initialises one (see the module docstring)."""
    keys = dict(zip(spec.targets, jax.random.split(key, len(spec.targets))))

    def per_target(target, shape):
        (n_in, r), b_shape = shape
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(keys[target], (config.n_layer, n_in, r), jnp.float32, -bound, bound)
        return a, jnp.zeros((config.n_layer, *b_shape), jnp.float32)
    return build(config, spec, per_target)


def abstract(config: GPT2Config, spec: LoRASpec) -> dict:
    """The adapter's shapes as ``jax.ShapeDtypeStruct`` (a restore target)."""
    return build(config, spec, lambda _, s: tuple(jax.ShapeDtypeStruct((config.n_layer, *x), jnp.float32)
                                                 for x in s))


def model_input(adapter: dict, spec: LoRASpec, config: GPT2Config) -> dict:
    """The ``lora`` argument of :class:`~jaxformer.gpt2.model.GPT2` for ``adapter`` (stacked):
    ``lora_b`` times the scale, layers unstacked when ``config.scan_layers`` is False.
    Differentiable: a loss of it gives the adapter's gradient."""
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, x: x * spec.scale if path[-1].key == "lora_b" else x, adapter)
    return scaled if config.scan_layers else unstack_layer_params(scaled, config.n_layer)


def bank(config: GPT2Config, adapters: list[tuple[LoRASpec, dict]]) -> dict:
    """Adapters side by side for a batch that mixes them (a server): the ``lora`` tree of
    :func:`model_input` with an adapter axis after the layer axis, row 0 no adapter (zeros), row
    ``i + 1`` ``adapters[i]`` (spec, stacked adapter). Every target any adapter has, at the largest
    rank: smaller ones are zero-padded (extra columns of ``lora_a`` meet zero rows of ``lora_b``)
    and a missing target is zeros; each adapter's scale is folded into its ``lora_b``. Leaves
    float32 [L, n + 1, in, r] (per layer [n + 1, in, r] when ``config.scan_layers`` is False)."""
    targets = tuple(t for t in TARGETS if any(t in spec.targets for spec, _ in adapters))
    rank, n = max(spec.rank for spec, _ in adapters), len(adapters) + 1

    def per_target(target, shape):
        (n_in, _), (_, n_out) = shape
        a = np.zeros((config.n_layer, n, n_in, rank), np.float32)
        b = np.zeros((config.n_layer, n, rank, n_out), np.float32)
        module, proj = TARGETS[target]
        for i, (spec, adapter) in enumerate(adapters, 1):
            if target in spec.targets:
                ab = adapter["h"][module][proj]
                a[:, i, :, :spec.rank] = np.asarray(ab["lora_a"])
                b[:, i, :spec.rank] = np.asarray(ab["lora_b"]) * spec.scale
        return a, b
    tree = build(config, LoRASpec(rank=rank, targets=targets), per_target)
    return tree if config.scan_layers else unstack_layer_params(tree, config.n_layer)


def select(bank: dict, rows, config: GPT2Config) -> dict:
    """The ``lora`` argument giving each row its adapter: rows int32[b] index the :func:`bank`
    (0: none). Leaves [L, b, in, r] (or [b, in, r] per layer)."""
    axis = 1 if config.scan_layers else 0
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=axis), bank)


def merge(params, config: GPT2Config, adapter: dict, spec: LoRASpec):
    """(params, config) with the adapter folded into the kernels, ``W + scale * lora_a @ lora_b``
    (float32, Hugging Face's layout; low-precision weights are converted back first). Layers
    stacked or not as ``config.scan_layers`` says."""
    params, config = to_float(params, config)
    stacked = config.scan_layers
    params = jax.tree.map(np.asarray, params if stacked else stack_layer_params(params, config.n_layer))
    h = {m: dict(sub) for m, sub in params["h"].items()}
    for module, projections in adapter["h"].items():
        for proj, ab in projections.items():
            a, b = (np.asarray(ab[k], np.float64) for k in ("lora_a", "lora_b"))
            delta = np.einsum("lir,lro->lio", a, b)
            kernel = h[module][proj]["kernel"]
            h[module][proj] = {**h[module][proj], "kernel": (kernel + spec.scale * delta).astype(kernel.dtype)}
    merged = {**params, "h": h}
    return (merged if stacked else unstack_layer_params(merged, config.n_layer)), config


def count(adapter: dict) -> int:
    """Number of adapter parameters."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapter))


def flops_per_token(config: GPT2Config, seq_len: int, adapter_params: int) -> float:
    """Training FLOPs per token of a LoRA run: ``4 N`` for the frozen weights (forward, and the
    backward to the activations; no weight gradients), ``6 n`` for the adapter's ``n`` parameters,
    and attention's ``12 L D T`` (:func:`jaxformer.train.flops.gpt2_flops_per_token`'s terms)."""
    n = config.num_params() - config.n_positions * config.n_embd
    return 4.0 * n + 6.0 * adapter_params + 12.0 * config.n_layer * config.n_embd * seq_len
