"""Text corpora -> packed fixed-length token windows in a deterministic, resumable order.

* Documents: a ``.txt`` file is one document; a ``.jsonl`` file holds one per line in a text field.
* Tokens: the GPT-2 tokenizer, or one trained on the corpus (byte-level BPE, or the word-level
  vocabulary of small book-trained GPTs); documents are joined with ``<|endoftext|>``.
* Split: the last ``val_fraction`` of the token stream is held out.
* Packing: window ``i`` is ``tokens[i*T : i*T + T + 1]`` (inputs = window[:-1], targets = window[1:]).
* Order: epoch ``e`` visits the windows in ``permutation(rng(seed, e))``; sample ``k`` of the run is
  position ``k % n`` of epoch ``k // n``. The batch at step ``s`` is therefore a pure function of
  ``(seed, s)``: resuming needs no saved data position beyond the step.
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxformer.paths import data_dir
from jaxformer.tokenizer import EOS, GPT2Tokenizer

UNK = "<unk>"


def read_texts(paths, text_field: str = "text") -> list[str]:
    """Documents from ``.txt`` files (one each) and ``.jsonl`` files (field ``text_field`` per line)."""
    docs = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise ValueError(f"{path}:{i + 1}: no field {text_field!r} (use --text-field)")
                docs.append(record[text_field])
        elif path.suffix == ".txt":
            docs.append(path.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"{path}: expected a .txt or .jsonl file")
    if not docs:
        raise ValueError("no documents in --data")
    return docs


def train_tokenizer(texts: list[str], kind: str, vocab_size: int) -> GPT2Tokenizer:
    """A tokenizer trained on ``texts``: ``"bpe"`` (byte-level, like GPT-2's: any text round-trips)
    or ``"word"`` (whitespace/punctuation words, unknown words -> ``<unk>``; decoding joins tokens
    with spaces). ``<|endoftext|>`` is id 0."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[EOS, UNK], show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: use bpe or word")
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(EOS, special=True)])
    return GPT2Tokenizer(tok)


def load_tokenizer(spec: str, texts: list[str] | None = None) -> GPT2Tokenizer:
    """``gpt2`` ($JAXFORMER_DATA/gpt2-tokenizer), a tokenizer directory, or ``bpe:VOCAB`` /
    ``word:VOCAB`` trained on ``texts``."""
    kind, sep, size = spec.partition(":")
    if sep:
        if texts is None:
            raise ValueError(f"--tokenizer {spec}: training a tokenizer needs the texts")
        return train_tokenizer(texts, kind, int(size))
    return GPT2Tokenizer.from_dir(data_dir() / "gpt2-tokenizer" if spec == "gpt2" else spec)


def tokenize(tok: GPT2Tokenizer, texts: list[str]) -> np.ndarray:
    """int32[n]: every document followed by ``<|endoftext|>``."""
    ids = tok.encode_batch(texts)
    return np.fromiter((t for doc in ids for t in (*doc, tok.eos_id)), np.int32)


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the validation part is the last ``val_fraction`` of the stream."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must lie in (0, 1)")
    cut = len(tokens) - int(round(len(tokens) * val_fraction))
    return tokens[:cut], tokens[cut:]


class Windows:
    """Non-overlapping windows of ``seq_len + 1`` tokens over a token stream.

    tokens: int32[n]. ``len(self)`` = number of whole windows = ``(n - 1) // seq_len``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, what: str = "data"):
        self.tokens, self.seq_len = np.asarray(tokens, np.int32), seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"{what}: {len(tokens)} tokens make no window of {seq_len + 1}")

    def __len__(self) -> int:
        return self.n

    def take(self, idx: np.ndarray) -> np.ndarray:
        """int32[*idx.shape, seq_len + 1] for window indices ``idx``."""
        return self.tokens[idx[..., None] * self.seq_len + np.arange(self.seq_len + 1)]

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
        """The global batch of ``step``: int32[grad_accum, batch_size, seq_len + 1]."""
        g = grad_accum * batch_size
        return self.take(self.sample_order(seed, step * g, g).reshape(grad_accum, batch_size))

    def eval_batches(self, batch_size: int, max_batches: int):
        """Windows in order, ``min(max_batches, len // batch_size)`` batches of int32[batch_size, seq_len + 1]."""
        n = min(max_batches, self.n // batch_size)
        if n < 1:
            raise ValueError(f"validation split has {self.n} windows, fewer than one batch of {batch_size}")
        return [self.take(np.arange(i * batch_size, (i + 1) * batch_size)) for i in range(n)]
