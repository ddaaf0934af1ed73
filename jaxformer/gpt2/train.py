"""GPT-2 pretraining and fine-tuning: the language-modelling task of the shared loop (:mod:`jaxformer.train.loop`).

The task brings the data (packed token windows, :mod:`jaxformer.gpt2.data`), the next-token loss,
and its evaluation (validation perplexity and a sample); "best" is the lowest validation loss.
Parameters are float32 master weights; the forward/backward runs in ``config.dtype`` (bf16 on
accelerators), logits, softmax and loss in float32. Besides the loop's files the run directory holds::

    tokenizer.json         GPT-2's, the --init model's, or one trained on the data
    data/{train,val}.npy   the token streams of text data (written once, reused by --resume); token
                           shards (``--data DIR``) are read where they are, by memory map

Fine-tuning starts from ``--init``: all weights (full fine-tuning), or with ``--lora-rank R`` (or
``--lora-init ADAPTER``) a LoRA adapter on the frozen model (:mod:`jaxformer.gpt2.lora`). Then the
train state's params are the adapter alone (so are the optimizer state, the checkpoints and
``best/``); the base is the task's ``frozen`` params, read again from ``--init`` on resume, and it
may be stored as bfloat16 or int8 (``--model.weights``, QLoRA-style) while the adapter stays
float32. ``--export-peft`` writes the adapter for PEFT, ``--export-hf`` the merged model.
``.jsonl`` data with ``prompt`` and ``completion`` fields trains on the completions only
(:mod:`jaxformer.gpt2.data`), with either kind of fine-tuning.

With ``hellaswag_every`` the evaluations also score HellaSwag (:mod:`jaxformer.eval.hellaswag`):
``hellaswag_acc`` and ``hellaswag_acc_norm`` in ``metrics.jsonl`` and a panel of ``curves.png``.
"""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.config import param
from jaxformer.errors import InputError
from jaxformer.gpt2 import data as gdata
from jaxformer.gpt2 import lora, peft
from jaxformer.gpt2.config import PRESETS, GPT2Config
from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.lora import TARGETS, LoRASpec
from jaxformer.gpt2.model import GPT2, init_params
from jaxformer.gpt2.tokenizer import GPT2Tokenizer
from jaxformer.nn.losses import cross_entropy
from jaxformer.train.distributed import on_first_process
from jaxformer.train.flops import gpt2_flops_per_token
from jaxformer.train.run import RunConfig
from jaxformer.train.step import LossFn
from jaxformer.train.task import Task


@dataclasses.dataclass(frozen=True)
class GPT2RunConfig(RunConfig):
    """GPT-2 run settings (``run.json``); the architecture is the preset's, or ``--init``'s."""

    data: tuple[str, ...] = param(("tinyshakespeare",), ".txt files (one document each), .jsonl files (one "
                                                        "per line), the data set name tinyshakespeare, or a "
                                                        "directory or glob of llm.c token shards (jaxformer "
                                                        "prepare; read by memory map)")
    text_field: str = param("text", "JSONL field holding the text")
    tokenizer: str = param("gpt2", "gpt2 (shipped) | a tokenizer directory | bpe:VOCAB or word:VOCAB trained "
                                   "on the data")
    val_fraction: float = param(0.1, "share of the token stream held out for validation (its end)", gt=0, lt=1)
    init: str | None = param(None, "fine-tune from a jaxformer checkpoint or run, or a Hugging Face directory "
                                   "or hub id (its architecture and tokenizer replace the preset's)")
    seq_len: int = param(128, "tokens per training sequence", ge=1)
    batch_size: int = param(16, "global sequences per micro-batch", ge=1)
    grad_accum: int = param(1, "micro-batches per update", ge=1)
    eval_batches: int = param(8, "validation batches per evaluation", ge=1, resumable=True)
    sample_tokens: int = param(64, "tokens sampled at each evaluation (0: none)", ge=0, resumable=True)
    prompt: str | None = param(None, "prompt of the samples (default: the first validation tokens)",
                               resumable=True)
    export_hf: str | None = param(None, "write a Hugging Face model directory here at the end (LoRA: the merged "
                                        "model)", resumable=True)
    lora_rank: int | None = param(None, "train a LoRA adapter of this rank on the frozen --init model (none: full "
                                        "fine-tuning)", ge=1)
    lora_alpha: float = param(8.0, "LoRA scaling: the update is scaled by alpha / rank", gt=0)
    lora_dropout: float = param(0.0, "dropout on the inputs of the LoRA adapters", ge=0, lt=1)
    lora_targets: tuple[str, ...] = param(("c_attn",), "projections that get LoRA adapters, by PEFT's names: "
                                                       + ", ".join(TARGETS), choices=tuple(TARGETS))
    lora_rslora: bool = param(False, "rank-stabilised LoRA: scale by alpha / sqrt(rank)")
    lora_init: str | None = param(None, "start the adapter from a PEFT directory or a jaxformer LoRA run (its rank, "
                                        "alpha, targets and rslora, unless lora_rank is given)")
    export_peft: str | None = param(None, "LoRA: write the adapter as a PEFT directory here at the end",
                                    resumable=True)
    hellaswag_every: int = param(0, "steps between HellaSwag evaluations, at the evaluation steps (0: off)", ge=0,
                                 resumable=True)
    hellaswag_data: str | None = param(None, "HellaSwag validation JSONL (default: found under the data "
                                             "directory or downloaded)", resumable=True)
    hellaswag_items: int | None = param(None, "score only the first N HellaSwag items", ge=1, resumable=True)


    def __post_init__(self):
        super().__post_init__()
        if self.lora and self.init is None:
            raise InputError("lora_rank / lora_init train an adapter on a base model: give --init BASE")
        if self.export_peft and not self.lora:
            raise InputError("export_peft writes a LoRA adapter: give --lora-rank (and --init)")

    @property
    def lora(self) -> bool:
        """Whether the run trains a LoRA adapter."""
        return self.lora_rank is not None or self.lora_init is not None

    def lora_spec(self) -> LoRASpec:
        return LoRASpec(self.lora_rank, self.lora_alpha, self.lora_targets, self.lora_rslora, self.lora_dropout)


def make_loss_fn(config: GPT2Config, deterministic: bool = False, spec: LoRASpec | None = None) -> LossFn:
    """``loss_fn(params, batch, key) -> (summed next-token cross-entropy, (tokens, {}))`` for a
    batch of windows int32[b, T + 1], or ``{"tokens": that, "loss_mask": bool[b, T]}`` (only the
    targets the mask marks count). float32 loss whatever the compute dtype; dropout unless
    deterministic. With ``spec`` (LoRA): ``loss_fn(adapter, batch, key, base)``, the adapter's loss."""
    model = GPT2(config, deterministic=deterministic, lora_dropout=spec.dropout if spec else 0.0)

    def loss_fn(params, batch, key, adapter=None):
        windows, counted = (batch["tokens"], batch["loss_mask"]) if isinstance(batch, dict) else (batch, None)
        adapters = None if adapter is None else lora.model_input(adapter, spec, config)
        logits, _ = model.apply({"params": params}, windows[:, :-1], rngs=None if key is None else {"dropout": key},
                                lora=adapters)
        mask = jnp.ones(windows[:, 1:].shape, bool) if counted is None else counted
        total, _, n = cross_entropy(logits, windows[:, 1:], mask)
        return total, (n, {})

    if spec is None:
        return loss_fn

    def adapter_loss_fn(adapter, batch, key, base):
        return loss_fn(base, batch, key, adapter)
    return adapter_loss_fn


# llm.c's GPT-2 124M run: 524,288 tokens per update, lr 6e-4 with 700 warm-up steps and a cosine
# decay to 0 over 18,865 steps (~10B tokens), weight decay 0.1, HellaSwag every 250 steps.
LLMC_124M = dict(seq_len=1024, batch_size=64, grad_accum=8, lr=6e-4, warmup=700, steps=18865, schedule="cosine",
                 schedule_steps=18865, min_lr_ratio=0.0, weight_decay=0.1, b1=0.9, b2=0.95, clip_norm=1.0,
                 eval_every=250, eval_batches=20, log_every=10, ckpt_every=1000, hellaswag_every=250)


HELLASWAG_PANEL = dict(title="HellaSwag (validation)", ylabel="accuracy",
                       series=[("acc_norm", "hellaswag_acc_norm", "o-"), ("acc", "hellaswag_acc", "s--")])


class GPT2Task(Task):
    """GPT-2 on a text corpus: see the module docstring."""

    name = "gpt2"
    run_config = GPT2RunConfig
    model_config = GPT2Config
    presets = {name: (fields, {}) for name, fields in PRESETS.items()} | {"gpt2-124m": (PRESETS["gpt2"], LLMC_124M)}
    defaults = dict(preset="tiny", steps=1000)
    best_metric, higher_is_better = "val_loss", False
    plot_panels = [dict(title="GPT-2 training loss", ylabel="cross-entropy per token",
                        series=[("train", "loss", "-"), ("validation", "val_loss", "o-")])]

    @classmethod
    def prepare(cls, run: GPT2RunConfig, out: Path, model_overrides: dict):
        """``config.json`` (the preset's architecture, or ``--init``'s), ``tokenizer.json`` and the
        token streams, written by process 0; returns the params to start from (every process loads
        them): ``--init``'s, a LoRA run's ``--lora-init`` adapter, or None (random)."""
        from jaxformer.gpt2.pretrained import load_config, load_pretrained

        _check_export(run)
        pretrained = init_tok = config = None
        if run.lora:
            config, init_tok = load_config(run.init, scan_layers=True, **model_overrides)
            if run.lora_init is not None:
                pretrained = _adapter_to_continue(run, config)
        elif run.init is not None:
            config, pretrained, init_tok = load_pretrained(run.init, scan_layers=True, **model_overrides)

        def write(config=config):
            tokenized = gdata.shard_source(run.data) is not None  # token shards: no text to read
            if tokenized and ":" in run.tokenizer and init_tok is None:
                raise InputError(f"tokenizer={run.tokenizer!r} trains on text, but {run.data[0]} holds token shards: "
                                 "give the tokenizer they were prepared with (gpt2 or its directory)")
            paths = [] if tokenized else gdata.resolve_paths(run.data)
            pairs = gdata.read_pairs(paths) if paths and gdata.is_sft(paths) else None
            if pairs:
                texts = [p + c for p, c in pairs]  # what a tokenizer trained on the data sees
            else:
                texts = gdata.read_texts(paths, run.text_field) if paths else []
            tok = init_tok or gdata.load_tokenizer(run.tokenizer, texts)
            if run.init is None:
                base = GPT2Config(**cls.presets[run.preset][0])
                config = base.replace(vocab_size=tok.vocab_size, n_positions=max(base.n_positions, run.seq_len),
                                      bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, **model_overrides)
            if tok.vocab_size > config.vocab_size:
                raise InputError(f"the tokenizer has {tok.vocab_size} tokens, the model's vocab_size is "
                                 f"{config.vocab_size}")
            if tokenized:
                gdata.shard_splits(gdata.shard_source(run.data))  # both splits exist, or an error now
            elif pairs:
                gdata.write_sft_splits(out, gdata.tokenize_pairs(tok, pairs), run.val_fraction)
            else:
                gdata.write_splits(out, gdata.tokenize(tok, texts), run.val_fraction)
            tok.tokenizer.save(str(out / "tokenizer.json"))
            config.save(out / "config.json")
        on_first_process("jaxformer-gpt2-data", write)
        return pretrained

    def __init__(self, run: GPT2RunConfig, out: Path, batch_shards: int = 1):
        super().__init__(_with_adapter_settings(run, out), out, batch_shards)
        run, config = self.run, self.config
        _check_export(run)
        if config.weights != "float" and not run.lora:
            raise InputError(f"the model's weights are {config.weights} (for decoding); training needs float "
                             "weights: start from a float checkpoint, or train a LoRA adapter on them")
        if run.seq_len > config.n_positions:
            raise InputError(f"seq_len={run.seq_len} exceeds the model's n_positions={config.n_positions}")
        self.spec = run.lora_spec() if run.lora else None
        self.frozen = self._load_base() if run.lora else None
        self.tokenizer = GPT2Tokenizer.from_dir(out)
        self.train_windows, self.val_windows = gdata.open_splits(run, out)
        self._eval_batches = self.val_windows.eval_batches(run.batch_size, run.eval_batches)
        self.grad_accum = run.grad_accum
        self.steps_per_epoch = max(1, len(self.train_windows) // (run.batch_size * run.grad_accum))
        self.flops_per_token = gpt2_flops_per_token(config, run.seq_len) if self.spec is None else \
            lora.flops_per_token(config, run.seq_len, lora.count(lora.abstract(config, self.spec)))
        self.d_model = config.n_embd
        self.prompt = self.tokenizer.encode(run.prompt) if run.prompt else self._first_validation_prompt()
        self.hellaswag = self._hellaswag(run) if run.hellaswag_every else None
        if self.hellaswag is not None:
            self.plot_panels = [*self.plot_panels, HELLASWAG_PANEL]
        self._hellaswag_at = None  # the step of the last HellaSwag evaluation
        if run.sample_tokens > 0 and len(self.prompt) >= config.n_positions:
            raise InputError(f"prompt: {len(self.prompt)} tokens leave no room to sample in the model's context of "
                             f"{config.n_positions}")

    def _load_base(self):
        """The frozen base of a LoRA run (host arrays, layers stacked), as ``config.json`` stores it."""
        from jaxformer.gpt2.pretrained import load_pretrained

        config = self.config
        base_config, base, _ = load_pretrained(self.run.init, weights=config.weights, scan_layers=True,
                                               param_dtype=config.param_dtype)
        shape = ("n_layer", "n_embd", "n_head", "inner_dim", "vocab_size", "n_positions", "tie_word_embeddings")
        differ = {k: getattr(base_config, k) for k in shape if getattr(base_config, k) != getattr(config, k)}
        if differ:
            raise InputError(f"init={self.run.init}: its architecture {differ} differs from the run's config.json")
        return jax.device_get(base)

    def _first_validation_prompt(self) -> list[int]:
        """The first validation example's prompt (completion-only data), else its first 8 tokens."""
        mask = getattr(self.val_windows, "loss_mask", None)
        if mask is not None:
            return [int(t) for t in self.val_windows.tokens[:max(1, int(np.argmax(mask)))]]
        return [int(t) for t in self.val_windows.take(np.zeros(1, np.int64))[0, :8]]

    def init_params(self, key):
        if self.spec is not None:
            return lora.init_adapter(self.config, self.spec, key)
        return init_params(self.config, key)

    def loss_fn(self, deterministic: bool) -> LossFn:
        return make_loss_fn(self.config, deterministic, self.spec)

    def batch(self, step: int):
        windows = self.train_windows.train_batch(self.run.seed, step, self.run.grad_accum, self.run.batch_size)
        return windows if self.run.grad_accum > 1 else jax.tree.map(lambda x: x[0], windows)

    def eval_batches(self) -> list:
        return self._eval_batches

    def _hellaswag(self, run: GPT2RunConfig):
        from jaxformer.eval.hellaswag import HellaSwag, load_items
        return HellaSwag(load_items(run.hellaswag_data, run.hellaswag_items), self.tokenizer,
                         self.config.replace(weights="float"))

    def merged(self, params):
        """(params, config) of the model trained: ``params`` itself, or a LoRA run's base with the
        adapter ``params`` merged in (float32)."""
        if self.spec is None:
            return params, self.config
        return lora.merge(self.frozen, self.config, jax.device_get(params), self.spec)

    def evaluate(self, params, step: int, record: dict) -> dict:
        extra = dict(val_ppl=math.exp(min(record["val_loss"], 700.0)))
        if self.hellaswag is not None and (self._hellaswag_at is None
                                           or step - self._hellaswag_at >= self.run.hellaswag_every):
            extra.update(self.hellaswag.evaluate(self.merged(params)[0]))
            self._hellaswag_at = step
        if self.run.sample_tokens > 0:
            n = min(self.run.sample_tokens, self.config.n_positions - len(self.prompt))
            model, adapters = (params, None) if self.spec is None else \
                (self.frozen, lora.model_input(params, self.spec, self.config))
            new = generate(model, self.config, [self.prompt], temperature=0.8, top_p=0.95, seed=step,
                           max_new_tokens=n, lora=adapters)[0]
            extra["sample"] = self.tokenizer.decode(self.prompt + new)
        return extra

    def finish(self, params) -> None:
        if self.run.export_peft:
            peft.save_peft(self.run.export_peft, params, self.spec, base=self.run.init)
            print(f"exported a PEFT LoRA adapter to {self.run.export_peft}")
        if self.run.export_hf:
            from jaxformer.gpt2.hf import save_hf
            merged, config = self.merged(params)
            save_hf(self.run.export_hf, config, merged, tokenizer_dir=self.out)
            print(f"exported a Hugging Face model{' (adapter merged)' if self.spec else ''} to {self.run.export_hf}")

    def describe(self) -> str:
        kind = "" if self.spec is None else (f"LoRA r={self.spec.rank} on {', '.join(self.spec.targets)} of a frozen "
                                             f"{self.config.weights} base; ")
        return (f"{kind}{len(self.train_windows):,} train / {len(self.val_windows):,} validation windows of "
                f"{self.run.seq_len} tokens; {self.config.dtype} compute; {self.flops_per_token:.3g} FLOPs/token")


def _check_export(run: GPT2RunConfig) -> None:
    """``export_hf`` and ``export_peft`` must name new or empty directories."""
    for name in ("export_hf", "export_peft"):
        path = getattr(run, name)
        if path and Path(path).exists() and any(Path(path).iterdir()):
            raise InputError(f"{name}={path}: the directory already holds files; choose a new one")


def _with_adapter_settings(run: GPT2RunConfig, out: Path) -> GPT2RunConfig:
    """A fresh run from ``--lora-init`` without ``--lora-rank`` takes the adapter's rank, alpha,
    targets and rslora (saved in run.json, so a resume reads nothing more)."""
    if run.lora_init is None or run.lora_rank is not None:
        return run
    spec, _ = peft.load_adapter(run.lora_init, GPT2Config.load(out / "config.json"))
    return run.replace(lora_rank=spec.rank, lora_alpha=spec.alpha, lora_targets=spec.targets,
                       lora_rslora=spec.rslora)


def _adapter_to_continue(run: GPT2RunConfig, config: GPT2Config) -> dict:
    """The ``--lora-init`` adapter (host arrays), which must fit ``lora_rank`` and ``lora_targets``
    when they are given."""
    spec, adapter = peft.load_adapter(run.lora_init, config)
    if run.lora_rank is not None and (spec.rank, set(spec.targets)) != (run.lora_rank, set(run.lora_targets)):
        raise InputError(f"lora_init={run.lora_init}: the adapter has rank {spec.rank} on {', '.join(spec.targets)}; "
                         f"the run asks for lora_rank={run.lora_rank} on {', '.join(run.lora_targets)}")
    return adapter
