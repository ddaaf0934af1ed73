"""GPT-2 configuration: one frozen dataclass, presets, and the Hugging Face ``config.json`` mapping."""

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp

# HF config keys this implementation honours; everything else in config.json is carried along
# untouched when converting back.
HF_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    "tie_word_embeddings", "bos_token_id", "eos_token_id",
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass (saves memory)
    # Layers as one nn.scan over stacked params (flat compile time; training) or as separate
    # modules h_0 .. h_{L-1} (no per-layer weight slicing: faster decoding on CPU).
    scan_layers: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}={getattr(self, name)!r}: use float32, bfloat16 or float16")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "GPT2Config":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, f, v = self.n_embd, self.inner_dim, self.vocab_size
        block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.n_positions * d + self.n_layer * block + 2 * d + head

    # --- Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "GPT2Config":
        model_type = d.get("model_type")
        if model_type != "gpt2":
            raise ValueError(f"config.json has model_type={model_type!r}; only 'gpt2' is supported")
        kw = {k: d[k] for k in HF_FIELDS if k in d}
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        d = {k: getattr(self, k) for k in HF_FIELDS}
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        return d

    # --- jaxformer config.json ------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "GPT2Config":
        d = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{path}: unknown GPT2Config keys {sorted(unknown)}")
        return cls(**d)


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
        raise ValueError(f"unknown GPT-2 preset {name!r}; choose from {sorted(PRESETS)}")
    return GPT2Config(**{**PRESETS[name], **overrides})
