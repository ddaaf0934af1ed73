"""Training the translator: the translation task of the shared loop (:mod:`jaxformer.train.loop`).

The task brings the data (Tatoeba pairs, a joint BPE trained on the training split, token-budget
batches over a few padded lengths), the label-smoothed loss, and its evaluation (greedy BLEU and
chrF with sacrebleu); "best" is the highest validation BLEU. Besides the loop's files the run
directory (also what ``translate.py --model`` reads) holds::

    tokenizer.json  data/{valid,test}.{en,fr}
"""

import dataclasses
import warnings
from pathlib import Path

import sacrebleu

from jaxformer.config import param
from jaxformer.errors import InputError
from jaxformer.nn.losses import cross_entropy
from jaxformer.train.distributed import on_first_process
from jaxformer.train.run import RunConfig
from jaxformer.train.step import LossFn
from jaxformer.train.task import Task
from jaxformer.translator import data as tdata
from jaxformer.translator import tokenizer as tk
from jaxformer.translator.batching import Batcher
from jaxformer.translator.config import PRESETS, TranslatorConfig
from jaxformer.translator.model import Translator, init_params
from jaxformer.translator.translate import TranslationPipeline


@dataclasses.dataclass(frozen=True)
class TranslatorRunConfig(RunConfig):
    """Translator run settings (``run.json``). Give a length: ``steps``, ``epochs`` or ``max_minutes``."""

    data: str | None = param(None, "fra-eng.zip or the fra.txt inside it (default: the fra-eng data set)")
    label_smoothing: float = param(0.1, "label smoothing of the cross-entropy", ge=0, lt=1)
    batch_tokens: int = param(4096, "padded tokens (rows x padded length) per batch", ge=1)
    max_batch_sentences: int = param(0, "cap on sentences per batch (0: none)", ge=0)
    buckets: tuple[int, ...] = param((8, 12, 16, 24, 32, 48, 64), "padded lengths; the last is the model's max_len",
                                     ge=2)
    eval_sentences: int = param(1000, "validation sentences translated for BLEU at each evaluation", ge=1,
                                resumable=True)


def make_loss_fn(config: TranslatorConfig, label_smoothing: float, deterministic: bool = False) -> LossFn:
    """``loss_fn(params, batch, key) -> (loss sum, (tokens, {"nll": nll sum}))`` (see make_train_step)."""
    model = Translator(config, deterministic=deterministic)

    def loss_fn(params, batch, key):
        rngs = None if deterministic else {"dropout": key}
        logits = model.apply({"params": params}, batch["src"], batch["tgt_in"], rngs=rngs)
        loss, nll, n = cross_entropy(logits, batch["tgt_out"], batch["tgt_out"] != tk.PAD_ID, label_smoothing)
        return loss, (n, {"nll": nll})

    return loss_fn


class TranslatorTask(Task):
    """English→French on Tatoeba: see the module docstring."""

    name = "translator"
    run_config = TranslatorRunConfig
    model_config = TranslatorConfig
    presets = PRESETS
    # The Transformer paper's optimizer and schedule, and a slower cadence than GPT-2's.
    defaults = dict(lr=1.0, schedule="noam", warmup=2000, weight_decay=0.01, clip_norm=0.0, b2=0.98, eps=1e-9,
                    log_every=50, eval_every=1000)
    best_metric = "bleu"
    plot_panels = [
        dict(title="loss", ylabel="loss per target token",
             series=[("train (label-smoothed)", "loss", "-"), ("validation", "val_loss", "o-")]),
        dict(title="validation (greedy)", series=[("BLEU", "bleu", "o-"), ("chrF", "chrf", "s--")]),
    ]

    @classmethod
    def prepare(cls, run: TranslatorRunConfig, out: Path, model_overrides: dict) -> None:
        """``config.json``, the joint BPE trained on the training split (``tokenizer.json``) and
        ``data/{valid,test}.{en,fr}``, written by process 0."""
        config = TranslatorConfig(**{**PRESETS[run.preset][0], **model_overrides})
        if run.buckets[-1] != config.max_len or list(run.buckets) != sorted(set(run.buckets)):
            raise InputError(f"buckets={run.buckets} must be increasing and end at the model's "
                             f"max_len={config.max_len}")

        def write():
            splits = _splits(run, report=False)  # the task reports them when it reads the pairs
            (out / "data").mkdir(exist_ok=True)
            for name in ("valid", "test"):
                tdata.write_split(splits[name], out / "data" / name)
            train = splits["train"]
            tok = tk.train_tokenizer([p[0] for p in train] + [p[1] for p in train], config.vocab_size)
            tok.save(str(out / "tokenizer.json"))
            config.save(out / "config.json")
        on_first_process("jaxformer-translator-data", write)

    def __init__(self, run: TranslatorRunConfig, out: Path, batch_shards: int = 1):
        super().__init__(run, out, batch_shards)
        splits = _splits(run)
        self.tokenizer = tk.load_tokenizer(out / "tokenizer.json")
        enc = lambda ps, i: tk.encode(self.tokenizer, [p[i] for p in ps])  # noqa: E731
        # Batch rows are multiples of 8 and of the mesh's batch shards.
        self.train_batches = Batcher(enc(splits["train"], 0), enc(splits["train"], 1), run.buckets,
                                     run.batch_tokens, run.max_batch_sentences, row_multiple=batch_shards)
        self.valid_batches = Batcher(enc(splits["valid"], 0), enc(splits["valid"], 1), run.buckets,
                                     run.batch_tokens, row_multiple=batch_shards)
        if not len(self.train_batches):
            raise InputError(f"no training pair fits max_len={self.config.max_len} tokens")
        stride = max(1, len(splits["valid"]) // run.eval_sentences)
        self.bleu_pairs = splits["valid"][::stride][:run.eval_sentences]  # spread over all lengths
        self.steps_per_epoch = len(self.train_batches)
        self.d_model = self.config.d_model
        self.split_sizes = {k: len(v) for k, v in splits.items()}
        self._next_step, self._stream = None, None

    def init_params(self, key):
        return init_params(self.config, key)

    def loss_fn(self, deterministic: bool) -> LossFn:
        return make_loss_fn(self.config, self.run.label_smoothing, deterministic)

    def _batches_from(self, step: int):
        """The training batches from ``step`` on, epoch after epoch (the same on every resume)."""
        epoch, start = divmod(step, self.steps_per_epoch)
        while True:
            yield from self.train_batches.epoch(self.run.seed, epoch, start)
            epoch, start = epoch + 1, 0

    def batch(self, step: int):
        if step != self._next_step:  # the loop asks step after step: one stream serves them all
            self._stream = self._batches_from(step)
        self._next_step = step + 1
        return dataclasses.asdict(next(self._stream))

    def eval_batches(self) -> list:
        return [dataclasses.asdict(b) for b in self.valid_batches.in_order()]

    def evaluate(self, params, step: int, record: dict) -> dict:
        """Greedy BLEU/chrF (sacrebleu, detokenised text) on ``eval_sentences`` validation pairs."""
        with warnings.catch_warnings():  # sources truncated to max_len: expected, not news
            warnings.simplefilter("ignore")
            hyps = TranslationPipeline(self.config, params, self.tokenizer, batch_size=128).translate(
                [p[0] for p in self.bleu_pairs], beam_size=1)
        refs = [[p[1] for p in self.bleu_pairs]]
        return dict(bleu=sacrebleu.corpus_bleu(hyps, refs).score, chrf=sacrebleu.corpus_chrf(hyps, refs).score)

    def describe(self) -> str:
        return (f"pairs per split {self.split_sizes}; {len(self.train_batches)} training batches per epoch, "
                f"{self.train_batches.dropped} overlong pairs dropped; batch shapes {self.train_batches.shapes()}")


def _splits(run: TranslatorRunConfig, report: bool = True) -> dict[str, list[tuple[str, str]]]:
    """The train/valid/test pairs of ``run.data``; InputError when training or validation has none.
    ``report``: print the number of malformed lines skipped."""
    splits = tdata.split_pairs(tdata.load_pairs(run.data, report))
    if not splits["train"] or not splits["valid"]:
        raise InputError(f"{run.data or 'the fra-eng data set'}: too few pairs for a training and a validation "
                         f"split ({ {k: len(v) for k, v in splits.items()} })")
    return splits
