"""The translator's architecture config (``config.json``) and its presets.

The run settings (data, optimizer, schedule, batching, cadence) are the run config,
:class:`jaxformer.translator.train.TranslatorRunConfig`. A preset names both halves: ``book`` is the
book's setup with three changes (an activation in the feed-forward layer, subword tokens, case and
accents kept); ``default`` is the configuration chosen by measurement for a 30-minute run on a
2-core CPU; ``tiny`` is for tests.
"""

import dataclasses

from jaxformer.nn.activations import ACTIVATIONS
from jaxformer.config import Config, param
from jaxformer.errors import InputError


@dataclasses.dataclass(frozen=True)
class TranslatorConfig(Config):
    """What rebuilding the encoder-decoder needs."""

    vocab_size: int = param(8000, "joint English+French subword vocabulary", ge=4)
    d_model: int = param(256, "model width", ge=1)
    n_heads: int = param(4, "attention heads (must divide d_model)", ge=1)
    d_ff: int = param(1024, "feed-forward width", ge=1)
    enc_layers: int = param(3, "encoder layers", ge=1)
    dec_layers: int = param(3, "decoder layers", ge=1)
    dropout: float = param(0.1, "residual, embedding and attention-probability dropout", ge=0, lt=1)
    activation: str = param("relu", "feed-forward activation", choices=tuple(ACTIVATIONS))
    pre_ln: bool = param(True, "pre-LN (false: post-LN as in 'Attention is all you need')")
    tie_embeddings: bool = param(True, "one table for source, target and output projection")
    layer_norm_eps: float = param(1e-5, "LayerNorm epsilon", gt=0)
    max_len: int = param(64, "tokens per sentence incl. BOS/EOS; longer training pairs are dropped", ge=2)
    dtype: str = param("float32", "compute dtype (parameters stay float32; logits and loss are float32)",
                       choices=("float32", "bfloat16"))

    def __post_init__(self):
        super().__post_init__()
        if self.d_model % self.n_heads:
            raise InputError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# name -> (architecture fields, run-config fields)
PRESETS = {
    # The book's model: N=6, d_model 256, d_ff 1024, 8 heads, dropout 0.1, label smoothing 0.1, Adam
    # with the Noam schedule (warm-up 2000), batches of 128 pairs sorted by length, post-LN.
    "book": (dict(enc_layers=6, dec_layers=6, n_heads=8, pre_ln=False, tie_embeddings=False),
             dict(optimizer="adam", weight_decay=0.0, schedule="noam", lr=1.0, warmup=2000,
                  batch_tokens=128 * 64, max_batch_sentences=128)),
    # Small and fast, chosen for a 30-minute run on a 2-core CPU (measurements in docs/translator.md):
    # 30 minutes are under 3 epochs, so d_model 192 (256 is 1.7x slower per step, 128 learns less per
    # step) and no dropout (far from overfitting; its random bits cost ~20% of a CPU step).
    "default": (dict(vocab_size=4000, d_model=192, n_heads=4, d_ff=768, dropout=0.0),
                dict(warmup=500, lr=0.5, batch_tokens=2048, eval_every=500, eval_sentences=500)),
    # For tests: compiles and runs in seconds.
    "tiny": (dict(vocab_size=300, d_model=32, n_heads=4, d_ff=64, enc_layers=2, dec_layers=2, max_len=24),
             dict(buckets=(8, 16, 24), batch_tokens=256, warmup=20, lr=2.0, log_every=5, eval_every=10,
                  eval_sentences=16)),
}


def preset(name: str) -> TranslatorConfig:
    """The architecture of preset ``name``."""
    if name not in PRESETS:
        raise InputError(f"unknown translator preset {name!r}; choose from {sorted(PRESETS)}")
    return TranslatorConfig(**PRESETS[name][0])
