"""Token-budget batches over a fixed set of padded lengths, so the train step compiles once per bucket.

A pair goes to the smallest bucket ``L >= max(len(src) + 1, len(tgt) + 1)`` (EOS ends the source;
BOS starts the decoder input and EOS ends its target). Every batch of bucket ``L`` has the same
number of rows, ``batch_rows(L)``; a bucket's last batch is filled with all-padding rows, which
carry no loss. Shapes therefore come from ``len(buckets)`` choices.
"""

import dataclasses
import math

import numpy as np

from jaxformer.translator.tokenizer import BOS_ID, EOS_ID, PAD_ID


def batch_rows(length: int, batch_tokens: int, max_sentences: int = 0, multiple: int = 1) -> int:
    """Rows per batch for padded length ``length``: the token budget, capped, rounded down to a
    multiple of 8 and of ``multiple`` (the batch shards of a device mesh)."""
    rows = batch_tokens // length
    if max_sentences:
        rows = min(rows, max_sentences)
    m = math.lcm(8, multiple)
    return max(m, rows // m * m)


def bucket_of(lengths: np.ndarray, buckets) -> np.ndarray:
    """Index of the smallest bucket >= each length (``len(buckets)`` when none fits)."""
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


@dataclasses.dataclass(frozen=True)
class Batch:
    """src: int32[b, L] (tokens, EOS, pad); tgt_in: int32[b, L] (BOS, tokens, pad);
    tgt_out: int32[b, L] (tokens, EOS, pad). Padding is PAD_ID everywhere."""

    src: np.ndarray
    tgt_in: np.ndarray
    tgt_out: np.ndarray


def pad_sources(srcs: list[np.ndarray], rows: int, length: int) -> np.ndarray:
    """int32[rows, length]: each source followed by EOS, then PAD; missing rows are all PAD."""
    out = np.full((rows, length), PAD_ID, np.int32)
    for i, s in enumerate(srcs):
        out[i, :len(s)] = s
        out[i, len(s)] = EOS_ID
    return out


def make_batch(srcs, tgts, rows: int, length: int) -> Batch:
    tgt_in = np.full((rows, length), PAD_ID, np.int32)
    tgt_out = np.full((rows, length), PAD_ID, np.int32)
    for i, t in enumerate(tgts):
        tgt_in[i, 0], tgt_in[i, 1:len(t) + 1] = BOS_ID, t
        tgt_out[i, :len(t)], tgt_out[i, len(t)] = t, EOS_ID
    return Batch(pad_sources(srcs, rows, length), tgt_in, tgt_out)


class Batcher:
    """Groups pairs of token-id arrays into bucketed batches; pairs longer than the last bucket are
    dropped (and counted in ``dropped``). ``row_multiple``: every batch's rows are a multiple of it."""

    def __init__(self, srcs, tgts, buckets, batch_tokens: int, max_sentences: int = 0, row_multiple: int = 1):
        self.srcs, self.tgts, self.buckets = srcs, tgts, tuple(buckets)
        lengths = np.maximum([len(s) + 1 for s in srcs], [len(t) + 1 for t in tgts])
        which = bucket_of(lengths, self.buckets)
        self.dropped = int((which == len(self.buckets)).sum())
        self.members = [np.flatnonzero(which == b) for b in range(len(self.buckets))]
        self.rows = [batch_rows(L, batch_tokens, max_sentences, row_multiple) for L in self.buckets]
        # (bucket, start) of every batch, in a canonical order; epochs permute this list
        self.slots = [(b, s) for b, m in enumerate(self.members) for s in range(0, len(m), self.rows[b])]

    def __len__(self) -> int:
        return len(self.slots)

    def shapes(self) -> list[tuple[int, int]]:
        """The (rows, length) shapes batches can have."""
        return [(r, L) for r, L, m in zip(self.rows, self.buckets, self.members) if len(m)]

    def _batch(self, bucket: int, idx: np.ndarray) -> Batch:
        return make_batch([self.srcs[i] for i in idx], [self.tgts[i] for i in idx],
                          self.rows[bucket], self.buckets[bucket])

    def epoch(self, seed: int, epoch: int, start: int = 0):
        """Batches of one epoch, shuffled within buckets and in order by ``(seed, epoch)``; ``start``
        skips the first batches (resuming mid-epoch gives the same remaining batches)."""
        rng = np.random.default_rng([seed, epoch])
        members = [rng.permutation(m) for m in self.members]
        order = rng.permutation(len(self.slots))
        for j in order[start:]:
            b, s = self.slots[j]
            yield self._batch(b, members[b][s:s + self.rows[b]])

    def in_order(self):
        """Every pair once, bucket by bucket, unshuffled (evaluation)."""
        for b, s in self.slots:
            yield self._batch(b, self.members[b][s:s + self.rows[b]])
