"""GPT-2's architecture config: one frozen dataclass, presets, and the Hugging Face ``config.json`` mapping."""

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from jaxformer.nn.activations import ACTIVATIONS
from jaxformer.config import Config, param, read_json
from jaxformer.errors import InputError

# HF config keys this implementation honours; everything else in config.json is carried along
# untouched when converting back.
HF_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    "tie_word_embeddings", "bos_token_id", "eos_token_id",
)
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class GPT2Config(Config):
    """What rebuilding a GPT-2 needs (``config.json`` of a checkpoint); names follow Hugging Face's."""

    vocab_size: int = param(50257, "tokens in the vocabulary", ge=1)
    n_positions: int = param(1024, "longest sequence (position embeddings)", ge=1)
    n_embd: int = param(768, "model width", ge=1)
    n_layer: int = param(12, "transformer blocks", ge=1)
    n_head: int = param(12, "attention heads (must divide n_embd)", ge=1)
    n_inner: int | None = param(None, "MLP width (none: 4 * n_embd)", ge=1)
    activation_function: str = param("gelu_new", "MLP activation", choices=tuple(ACTIVATIONS))
    resid_pdrop: float = param(0.1, "dropout on each block's outputs", ge=0, lt=1)
    embd_pdrop: float = param(0.1, "dropout on the embeddings", ge=0, lt=1)
    attn_pdrop: float = param(0.1, "dropout on the attention probabilities", ge=0, lt=1)
    layer_norm_epsilon: float = param(1e-5, "LayerNorm epsilon", gt=0)
    initializer_range: float = param(0.02, "std of the normal initialisation", gt=0)
    scale_attn_weights: bool = param(True, "divide attention scores by sqrt(head_dim)")
    scale_attn_by_inverse_layer_idx: bool = param(False, "also divide them by layer index + 1")
    reorder_and_upcast_attn: bool = param(False, "compute q.k in float32")
    tie_word_embeddings: bool = param(True, "the LM head is the token embedding")
    bos_token_id: int | None = param(50256, "beginning-of-text token", ge=0)
    eos_token_id: int | None = param(50256, "end-of-text token (generation stops there)", ge=0)
    dtype: str = param("float32", "compute dtype (logits, softmax and loss stay float32)", choices=DTYPES)
    param_dtype: str = param("float32", "parameter dtype", choices=DTYPES)
    remat: bool = param(False, "recompute each block in the backward pass (saves memory)")
    weights: str = param("float", "how Dense kernels and the token embedding are stored: float (param_dtype, "
                                  "[in, out] as Hugging Face's), or for decoding bfloat16 or int8 ([out, in]; int8 "
                                  "with a float32 scale per output), see jaxformer.gpt2.quantize",
                         choices=("float", "bfloat16", "int8"))
    # Layers as one nn.scan over stacked params (flat compile time; training) or as separate
    # modules h_0 .. h_{L-1} (no per-layer weight slicing: faster decoding on CPU).
    scan_layers: bool = param(True, "layers as one nn.scan over stacked params (false: h_0 .. h_{L-1})")

    def __post_init__(self):
        super().__post_init__()
        if self.n_embd % self.n_head:
            raise InputError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self) -> int:
        d, f, v = self.n_embd, self.inner_dim, self.vocab_size
        block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.n_positions * d + self.n_layer * block + 2 * d + head

    # --- Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **overrides) -> "GPT2Config":
        model_type = d.get("model_type")
        if model_type != "gpt2":
            raise InputError(f"{source} has model_type={model_type!r}; only 'gpt2' is supported")
        return cls.from_dict({**{k: d[k] for k in HF_FIELDS if k in d}, **overrides}, source)

    def to_hf_dict(self) -> dict:
        d = {k: getattr(self, k) for k in HF_FIELDS}
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        return d

    # --- jaxformer config.json ------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, ignore: tuple[str, ...] = ()) -> "GPT2Config":
        d = read_json(path)
        if isinstance(d, dict) and "d_model" in d:
            raise InputError(f"{path}: a translator's config, not GPT-2's (use `jaxformer translate` with this model)")
        if isinstance(d, dict) and "model_type" in d:
            raise InputError(f"{path}: a Hugging Face config.json; pass its directory as the model instead")
        return cls.from_dict(d, str(path), ignore)


PRESETS = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


def preset(name: str, **overrides) -> GPT2Config:
    """The published GPT-2 sizes (``gpt2`` .. ``gpt2-xl``) and ``tiny`` for tests."""
    if name not in PRESETS:
        raise InputError(f"unknown GPT-2 preset {name!r}; choose from {sorted(PRESETS)}")
    return GPT2Config(**{**PRESETS[name], **overrides})
