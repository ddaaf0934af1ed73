"""Text corpora -> packed fixed-length token windows in a deterministic, resumable order.

* Documents: a ``.txt`` file is one document; a ``.jsonl`` file holds one per line in a text field.
* Tokens: the GPT-2 tokenizer, or one trained on the corpus (byte-level BPE, or the word-level
  vocabulary of small book-trained GPTs); documents are joined with ``<|endoftext|>``.
* Split: the last ``val_fraction`` of the token stream is held out.
* Packing: window ``i`` is ``tokens[i*T : i*T + T + 1]`` (inputs = window[:-1], targets = window[1:]).
* Completion-only data (supervised fine-tuning, as TRL's completion-only loss): a ``.jsonl`` file
  whose lines hold ``prompt`` and ``completion`` strings. Each example is ``prompt + completion +
  <|endoftext|>`` (prompt and completion tokenized apart, so the boundary is exact), examples are
  packed into one stream like documents, and a parallel boolean stream marks the tokens that count
  as targets: the completion's and the closing EOS, never a prompt's. A window's targets
  ``window[1:]`` then count where the mask does, so across a boundary the next example's prompt is
  never a target of the previous one; its batches are ``{"tokens": int32[..., T + 1], "loss_mask":
  bool[..., T]}``. The validation split is the last examples (cut at an example's start).
* Order: epoch ``e`` visits the windows in ``permutation(rng(seed, e))``; sample ``k`` of the run is
  position ``k % n`` of epoch ``k // n``. The batch at step ``s`` is therefore a pure function of
  ``(seed, s)``: resuming needs no saved data position beyond the step.
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

from jaxformer.data import datasets, shards
from jaxformer.data.sampler import ShardWindows
from jaxformer.data.bpe import train_bpe
from jaxformer.data.textfile import read_text
from jaxformer.errors import InputError
from jaxformer.gpt2.tokenizer import EOS, GPT2Tokenizer

UNK = "<unk>"


def resolve_paths(data) -> list[Path]:
    """Files for ``data`` entries: paths, or data set names (``tinyshakespeare``, see
    :mod:`jaxformer.data.datasets`)."""
    return [datasets.locate(d) if d in datasets.DATASETS else datasets.locate(d, d) for d in data]


def _records(path: Path):
    """(line number, JSON value) of each non-empty line of a ``.jsonl`` file."""
    for i, line in enumerate(read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            yield i + 1, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i + 1}: malformed JSON ({e.msg} at column {e.colno})") from None


SFT_FIELDS = ("prompt", "completion")


def is_sft(paths) -> bool:
    """Whether ``paths`` are completion-only data: ``.jsonl`` files whose first record holds
    ``prompt`` and ``completion`` strings."""
    for path in map(Path, paths):
        if path.suffix != ".jsonl":
            return False
        first = next(_records(path), (0, None))[1]
        if not (isinstance(first, dict) and all(isinstance(first.get(k), str) for k in SFT_FIELDS)):
            return False
    return bool(paths)


def read_pairs(paths) -> list[tuple[str, str]]:
    """(prompt, completion) of every line of the ``.jsonl`` files ``paths``."""
    pairs = []
    for path in map(Path, paths):
        for line, record in _records(path):
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in SFT_FIELDS):
                raise InputError(f"{path}:{line}: expected string fields prompt and completion")
            pairs.append((record["prompt"], record["completion"]))
    if not pairs:
        raise InputError(f"no examples in {', '.join(map(str, paths))}")
    return pairs


def read_texts(paths, text_field: str = "text") -> list[str]:
    """Documents from ``.txt`` files (one each) and ``.jsonl`` files (field ``text_field`` per line)."""
    docs = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            for line, record in _records(path):
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise InputError(f"{path}:{line}: no text field {text_field!r} (use --text-field)")
                docs.append(record[text_field])
        elif path.suffix == ".txt":
            docs.append(read_text(path))
        else:
            raise InputError(f"{path}: expected a .txt or .jsonl file")
    if not any(d.strip() for d in docs):
        raise InputError(f"no text in {', '.join(map(str, paths))}")
    return docs


def train_tokenizer(texts: list[str], kind: str, vocab_size: int) -> GPT2Tokenizer:
    """A tokenizer trained on ``texts``: ``"bpe"`` (byte-level, like GPT-2's: any text round-trips)
    or ``"word"`` (whitespace/punctuation words, unknown words -> ``<unk>``; decoding joins tokens
    with spaces). ``<|endoftext|>`` is id 0."""
    if kind == "bpe":
        tok = train_bpe(texts, vocab_size, [EOS])
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[EOS, UNK],
                                                                 show_progress=False))
    else:
        raise InputError(f"tokenizer {kind}:{vocab_size}: unknown kind {kind!r}, use bpe or word")
    tok.add_special_tokens([AddedToken(EOS, special=True)])
    return GPT2Tokenizer(tok)


def load_tokenizer(spec: str, texts: list[str]) -> GPT2Tokenizer:
    """``gpt2`` (shipped with the package), a tokenizer directory, or ``bpe:VOCAB`` / ``word:VOCAB``
    trained on ``texts``."""
    kind, sep, size = spec.partition(":")
    if sep:
        if not size.isdigit() or int(size) < 2:
            raise InputError(f"tokenizer={spec!r}: expected {kind}:VOCAB with VOCAB an integer >= 2")
        return train_tokenizer(texts, kind, int(size))
    if spec == "gpt2":
        return GPT2Tokenizer.gpt2()
    if not Path(spec).is_dir():
        raise InputError(f"tokenizer={spec!r}: not gpt2, bpe:VOCAB, word:VOCAB or a tokenizer directory")
    return GPT2Tokenizer.from_dir(spec)


def tokenize(tok: GPT2Tokenizer, texts: list[str]) -> np.ndarray:
    """int32[n]: every document followed by ``<|endoftext|>``."""
    ids = tok.encode_batch(texts)
    return np.fromiter((t for doc in ids for t in (*doc, tok.eos_id)), np.int32)


def tokenize_pairs(tok: GPT2Tokenizer, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32[n], loss_mask bool[n], example starts int64[examples]): every example as
    ``prompt + completion + EOS``; ``loss_mask[i]``: token i is a target that counts (a
    completion's token or the EOS)."""
    prompts = tok.encode_batch([p for p, _ in pairs])
    completions = tok.encode_batch([c for _, c in pairs])
    tokens, mask, starts = [], [], []
    for p, c in zip(prompts, completions):
        starts.append(len(tokens))
        tokens += [*p, *c, tok.eos_id]
        mask += [False] * len(p) + [True] * (len(c) + 1)
    return np.asarray(tokens, np.int32), np.asarray(mask, bool), np.asarray(starts, np.int64)


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the validation part is the last ``val_fraction`` of the stream."""
    cut = len(tokens) - int(round(len(tokens) * val_fraction))
    return tokens[:cut], tokens[cut:]


def write_splits(out: Path, tokens: np.ndarray, val_fraction: float) -> None:
    """Writes the two parts of :func:`split` as ``out/data/{train,val}.npy`` (int32[n] each)."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, part in zip(("train", "val"), split(tokens, val_fraction)):
        np.save(out / "data" / f"{name}.npy", part)


def write_sft_splits(out: Path, tokenized: tuple[np.ndarray, np.ndarray, np.ndarray], val_fraction: float) -> None:
    """Writes :func:`tokenize_pairs`'s streams as ``out/data/{train,val}.npy`` and
    ``{train,val}_loss_mask.npy``, split at the first example start at or after :func:`split`'s cut."""
    tokens, mask, starts = tokenized
    cut = len(split(tokens, val_fraction)[0])
    later = starts[starts >= cut]
    if not len(later) or later[0] == 0:
        raise InputError(f"{len(starts)} examples do not split into training and validation at val_fraction="
                         f"{val_fraction}; give more examples or change val_fraction")
    cut = int(later[0])
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, part in (("train", slice(None, cut)), ("val", slice(cut, None))):
        np.save(out / "data" / f"{name}.npy", tokens[part])
        np.save(out / "data" / f"{name}_loss_mask.npy", mask[part])


def shard_source(data: tuple[str, ...]) -> str | None:
    """The token-shard directory or glob ``data`` names (llm.c's ``*_train_*.bin`` / ``*_val_*.bin``,
    e.g. written by ``jaxformer prepare``), or None when ``data`` names text files."""
    if len(data) != 1:
        return None
    spec = data[0]
    if Path(spec).is_dir():
        return spec if any(Path(spec).glob("*.bin")) else None
    return spec if spec.endswith(".bin") else None


def shard_splits(spec: str) -> tuple[list[Path], list[Path]]:
    """(training, validation) shard files of a directory (by llm.c's names) or of a glob (files with
    ``_val_`` in their name validate, the others train)."""
    if Path(spec).is_dir():
        return shards.resolve(spec, "train"), shards.resolve(spec, "val")
    paths = shards.resolve(spec, "train")
    val = [p for p in paths if "_val_" in p.name]
    train = [p for p in paths if "_val_" not in p.name]
    if not train or not val:
        raise InputError(f"{spec}: matches {len(train)} training and {len(val)} validation shards (names with "
                         "_val_); both are needed")
    return train, val


def open_splits(run, out: Path) -> tuple["Windows", "Windows"]:
    """(training, validation) windows of ``run.seq_len`` tokens for the GPT-2 run ``run`` (its
    GPT2RunConfig) in ``out``: token shards read by memory map (:class:`ShardWindows`) when
    ``run.data`` names them, else the token streams :func:`write_splits` wrote, memory-mapped. Both
    offer ``len()``, ``train_batch(seed, step, grad_accum, batch_size)``,
    ``eval_batches(batch_size, max_batches)`` and ``take(window indices)``; the only place the trainer gets its data from."""
    spec = shard_source(run.data)
    if spec is not None:
        train, val = shard_splits(spec)
        return ShardWindows(train, run.seq_len, "the training shards"), ShardWindows(val, run.seq_len,
                                                                                     "the validation shards")
    def windows(name: str) -> Windows:
        mask = out / "data" / f"{name}_loss_mask.npy"
        return Windows(np.load(out / "data" / f"{name}.npy", mmap_mode="r"), run.seq_len,
                       f"the {'training' if name == 'train' else 'validation'} split",
                       np.load(mask, mmap_mode="r") if mask.is_file() else None)
    return windows("train"), windows("val")


class Windows:
    """Non-overlapping windows of ``seq_len + 1`` tokens over a token stream.

    tokens: int32[n]; loss_mask: optional bool[n], which tokens count as targets (completion-only
    data; then windows come as ``{"tokens", "loss_mask"}``). ``len(self)`` = number of whole
    windows = ``(n - 1) // seq_len``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, what: str = "data", loss_mask: np.ndarray | None = None):
        self.tokens, self.seq_len = np.asarray(tokens, np.int32), seq_len
        self.loss_mask = None if loss_mask is None else np.asarray(loss_mask, bool)
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise InputError(f"{what}: {len(tokens)} tokens make no window of seq_len + 1 = {seq_len + 1} tokens; "
                             "use more text or a smaller seq_len")

    def __len__(self) -> int:
        return self.n

    def take(self, idx: np.ndarray):
        """int32[*idx.shape, seq_len + 1] for window indices ``idx``; with a loss mask
        ``{"tokens": that, "loss_mask": bool[*idx.shape, seq_len]}`` (the mask of ``tokens[..., 1:]``)."""
        positions = idx[..., None] * self.seq_len + np.arange(self.seq_len + 1)
        if self.loss_mask is None:
            return self.tokens[positions]
        return {"tokens": self.tokens[positions], "loss_mask": self.loss_mask[positions[..., 1:]]}

    def sample_order(self, seed: int, start: int, count: int) -> np.ndarray:
        """Window indices of run samples ``start .. start + count - 1`` (see the module docstring)."""
        k = np.arange(start, start + count)
        epochs = k // self.n
        out = np.empty(count, np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([seed, int(e)]).permutation(self.n)
            sel = epochs == e
            out[sel] = perm[k[sel] % self.n]
        return out

    def train_batch(self, seed: int, step: int, grad_accum: int, batch_size: int) -> np.ndarray:
        """The global batch of ``step``: int32[grad_accum, batch_size, seq_len + 1] (see :meth:`take`)."""
        g = grad_accum * batch_size
        return self.take(self.sample_order(seed, step * g, g).reshape(grad_accum, batch_size))

    def eval_batches(self, batch_size: int, max_batches: int):
        """Windows in order, ``min(max_batches, len // batch_size)`` batches of int32[batch_size, seq_len + 1]."""
        n = min(max_batches, self.n // batch_size)
        if n < 1:
            raise InputError(f"the validation split has {self.n} windows of {self.seq_len + 1} tokens, fewer than one "
                             f"batch of {batch_size}; raise val_fraction or lower batch_size")
        return [self.take(np.arange(i * batch_size, (i + 1) * batch_size)) for i in range(n)]
