"""Translator configuration: one frozen dataclass holding every hyperparameter, and its presets.

Presets are functions returning configs: ``book`` reproduces the book's setup (with the fixes the
issue asks for: an activation in the feed-forward layer, subwords, case and accents kept), and
``default`` is the configuration chosen by measurement for a 30-minute run on a 2-core CPU.
"""

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class TranslatorConfig:
    # model
    vocab_size: int = 8000  # joint English+French subword vocabulary
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    enc_layers: int = 3
    dec_layers: int = 3
    dropout: float = 0.1  # residual, embedding and attention-probability dropout
    activation: str = "relu"
    pre_ln: bool = True  # False: post-LN as in "Attention is all you need"
    tie_embeddings: bool = True  # one table for source, target and output projection
    layer_norm_eps: float = 1e-5
    max_len: int = 64  # tokens per sentence incl. BOS/EOS; longer pairs are dropped in training
    # training
    label_smoothing: float = 0.1
    optimizer: str = "adamw"  # "adam" (beta2 0.98, eps 1e-9, as the book) or "adamw"
    weight_decay: float = 0.01
    schedule: str = "noam"  # "noam" or "cosine" (cosine needs --steps or --epochs)
    lr: float = 1.0  # noam: the factor before d_model^-0.5; cosine: the peak
    warmup_steps: int = 2000
    clip_norm: float = 0.0  # global gradient-norm clip, 0 = off
    batch_tokens: int = 4096  # padded tokens (batch * bucket length) per batch
    max_batch_sentences: int = 0  # cap on sentences per batch, 0 = none
    buckets: tuple[int, ...] = (8, 12, 16, 24, 32, 48, 64)  # padded lengths, last = max_len
    seed: int = 0
    # evaluation
    log_every: int = 50
    eval_every: int = 1000
    eval_sentences: int = 1000  # validation sentences translated for BLEU during training
    # decoding
    beam_size: int = 4
    length_alpha: float = 0.6  # GNMT length penalty exponent
    max_out_ratio: float = 1.5  # output limit = ratio * source tokens + extra, capped by max_len
    max_out_extra: int = 10

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.buckets[-1] != self.max_len or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets {self.buckets} must be increasing and end at max_len={self.max_len}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **kw) -> "TranslatorConfig":
        return dataclasses.replace(self, **kw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TranslatorConfig":
        d = json.loads(Path(path).read_text())
        d["buckets"] = tuple(d["buckets"])
        return cls(**d)


def book() -> TranslatorConfig:
    """The book's model: N=6, d_model 256, d_ff 1024, 8 heads, dropout 0.1, label smoothing 0.1,
    Adam with the Noam schedule (warmup 2000), batches of 128 pairs sorted by length, post-LN."""
    return TranslatorConfig(
        enc_layers=6, dec_layers=6, n_heads=8, pre_ln=False, tie_embeddings=False,
        optimizer="adam", weight_decay=0.0, schedule="noam", lr=1.0, warmup_steps=2000,
        batch_tokens=128 * 64, max_batch_sentences=128,
    )


def default() -> TranslatorConfig:
    """Small and fast, chosen for a 30-minute run on a 2-core CPU (measurements in docs/translator.md):
    30 minutes are under 3 epochs, so d_model 192 (256 is 1.7x slower per step, 128 learns less per
    step) and no dropout (far from overfitting; its random bits cost ~20% of a CPU step)."""
    return TranslatorConfig(
        vocab_size=4000, d_model=192, n_heads=4, d_ff=768, enc_layers=3, dec_layers=3, dropout=0.0,
        warmup_steps=500, lr=0.5, batch_tokens=2048, eval_every=500, eval_sentences=500,
    )


def tiny() -> TranslatorConfig:
    """For tests: compiles and runs in seconds."""
    return TranslatorConfig(
        vocab_size=300, d_model=32, n_heads=4, d_ff=64, enc_layers=2, dec_layers=2, max_len=24,
        buckets=(8, 16, 24), batch_tokens=256, warmup_steps=20, lr=2.0, log_every=5, eval_every=10,
        eval_sentences=16, dropout=0.1,
    )


PRESETS = {"book": book, "default": default, "tiny": tiny}


def preset(name: str) -> TranslatorConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
