"""The translator's joint English+French byte-level BPE (:func:`jaxformer.data.bpe.train_bpe`),
saved with the model. One vocabulary for both languages lets the source, target and output
embeddings be one table; byte-level BPE encodes any text, also characters never seen in training.
"""

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxformer.errors import InputError
from jaxformer.data.bpe import train_bpe

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """BPE trained on ``texts`` (an iterable of sentences) with ``<pad>=0, <s>=1, </s>=2``, NFC."""
    return train_bpe(texts, vocab_size, [PAD, BOS, EOS], add_prefix_space=True, nfc=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exception on a missing or malformed file
        raise InputError(f"{path}: unreadable tokenizer ({e})") from None


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
