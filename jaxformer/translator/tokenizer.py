"""A joint English+French byte-level BPE (Hugging Face ``tokenizers``), saved with the model.

Byte-level BPE has every byte in its base alphabet, so text with characters never seen in training
still encodes (into byte tokens) and decoding gives the text back exactly. One vocabulary for both
languages lets the source, target and output embeddings be one table.
"""

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """BPE trained on ``texts`` (an iterable of sentences) with ``<pad>=0, <s>=1, </s>=2``."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(t) for t in (PAD, BOS, EOS)] == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def encode(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids (int32, no BOS/EOS) per text."""
    return [np.asarray(e.ids, np.int32) for e in tok.encode_batch(texts)]


def decode(tok: Tokenizer, ids) -> list[str]:
    """Texts from rows of ids; stops at the first EOS and drops PAD/BOS."""
    rows = []
    for row in np.asarray(ids):
        row = [int(t) for t in row]
        if EOS_ID in row:
            row = row[:row.index(EOS_ID)]
        rows.append([t for t in row if t not in (PAD_ID, BOS_ID)])
    return [s.strip() for s in tok.decode_batch(rows, skip_special_tokens=True)]
