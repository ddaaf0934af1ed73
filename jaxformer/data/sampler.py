"""Training windows over token shards at constant memory: the batch of a step is a pure function of
(seed, step), and neither memory nor the cost of one batch grows with the corpus.

* Windows: window ``i`` of a shard is ``tokens[i*T : i*T + T + 1]`` (non-overlapping within the
  shard, none spans two shards); the shards' windows are numbered one after another, ``[0, n)``.
* Order: sample ``k`` of the run is window ``perm_e(k % n)`` with epoch ``e = k // n``, where
  ``perm_e`` is a pseudo-random bijection of ``[0, n)`` keyed by ``(seed, e)``: every window once per
  epoch, a fresh order each epoch, and nothing of size ``n`` is ever built.
* The bijection is a keyed Feistel network with cycle-walking (the construction of format-preserving
  encryption, and of Grain's ``index_shuffle``) over the numbers of ``b`` bits, ``2**b < 2n``: 4
  rounds, each XORing into one half a splitmix64 mix of the other half and a round key drawn from
  ``(seed, e)`` (unbalanced halves when ``b`` is odd); a value that lands outside ``[0, n)`` is
  encrypted again until it lands inside, which keeps the map a bijection of ``[0, n)`` (fewer than
  2 passes per index on average). Chosen over the simpler affine map
  ``i -> (a*i + b) mod n``: that one makes every batch an arithmetic progression of windows (samples
  ``k`` and ``k+1`` always ``a`` windows apart), so neighbouring samples are correlated in where they
  come from, while a Feistel order looks like ``permutation(n)``. O(1) memory, O(batch) work.
* Reading: one positioned read (``os.preadv``) of each window's ``T + 1`` tokens, straight into the
  batch's buffer: only the batch is ever in the process's memory. Measured against memory maps (see
  docs/pretraining.md): a map faults in whole page-cache folios (2 MB per window on Linux 6.x), so
  resident memory grows by 2 MB per window read while mapped, and reads are 3x slower.
"""

import os
from pathlib import Path

import numpy as np

from jaxformer.data.shards import HEADER_BYTES, read_header
from jaxformer.errors import InputError

ROUNDS = 4  # Luby-Rackoff: 4 rounds of a pseudo-random function make a strong pseudo-random permutation
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: uint64[...] -> uint64[...], a bijective avalanche mix."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def round_keys(seed: int, epoch: int) -> np.ndarray:
    """uint64[ROUNDS]: the Feistel keys of ``epoch`` of a run seeded ``seed``."""
    return np.random.default_rng([seed, epoch]).integers(0, 2**64, ROUNDS, dtype=np.uint64, endpoint=False)


def permute(i: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """int64[...]: the image of positions ``i`` (int[...] in ``[0, n)``) under the keyed bijection of
    ``[0, n)`` (see the module docstring)."""
    bits = max(2, int(n - 1).bit_length())  # the domain: [0, 2**bits), 2**bits < 2n
    wide, narrow = bits - bits // 2, bits // 2  # the low and high halves' widths; they swap each round
    masks = [np.uint64((1 << w) - 1) for w in (narrow, wide) * (len(keys) // 2)]

    def encrypt(x):
        hi, lo = x >> np.uint64(wide), x & masks[1]
        for k, mask in zip(keys, masks):  # an even number of rounds: the halves end as they began
            hi, lo = lo, hi ^ (_mix(lo ^ k) & mask)
        return (hi << np.uint64(wide)) | lo

    y = encrypt(np.asarray(i, np.uint64).ravel())
    while (out := y >= n).any():  # cycle-walking: stays a bijection of [0, n)
        y[out] = encrypt(y[out])
    return y.astype(np.int64).reshape(np.shape(i))


class ShardWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens over llm.c-format shards (``paths``, in
    order), with the interface of :class:`jaxformer.gpt2.data.Windows`. Only the headers are read here."""

    def __init__(self, paths, seq_len: int, what: str = "data"):
        self.paths, self.seq_len = [Path(p) for p in paths], seq_len
        if not self.paths:
            raise InputError(f"{what}: no shards")
        self.formats = [read_header(p) for p in self.paths]  # (dtype, token count) per shard
        per_shard = [max(0, (count - 1) // seq_len) for _, count in self.formats]
        self.starts = np.cumsum([0, *per_shard])  # int64[shards + 1]: first window of each shard
        self.n = int(self.starts[-1])
        self.n_tokens = sum(count for _, count in self.formats)
        if self.n < 1:
            raise InputError(f"{what}: {self.n_tokens} tokens in {len(self.paths)} shard(s) make no window of "
                             f"seq_len + 1 = {seq_len + 1} tokens; use more data or a smaller seq_len")

    def __len__(self) -> int:
        return self.n

    def take(self, idx: np.ndarray) -> np.ndarray:
        """int32[*idx.shape, seq_len + 1]: the windows of global indices ``idx`` (int[...])."""
        idx = np.asarray(idx, np.int64)
        flat = idx.ravel()
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        first = (flat - self.starts[shard]) * self.seq_len
        out = np.empty((len(flat), self.seq_len + 1), np.int32)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            dtype = self.formats[s][0]
            buf = np.empty((len(rows), self.seq_len + 1), dtype)
            fd = os.open(self.paths[s], os.O_RDONLY)
            try:
                for row, j in zip(buf, rows):  # one positioned read per window
                    if os.preadv(fd, [row], HEADER_BYTES + int(first[j]) * dtype.itemsize) != row.nbytes:
                        raise InputError(f"{self.paths[s]}: shorter than its header says (changed while in use?)")
            finally:
                os.close(fd)
            out[rows] = buf
        return out.reshape(*idx.shape, self.seq_len + 1)

    def sample_order(self, seed: int, start: int, count: int) -> np.ndarray:
        """int64[count]: the windows of run samples ``start .. start + count - 1`` (as ``Windows``'s)."""
        return self.windows_of(seed, np.arange(start, start + count, dtype=np.int64))

    def windows_of(self, seed: int, samples: np.ndarray) -> np.ndarray:
        """int64[...]: the window of each run sample number in ``samples`` (int[...])."""
        samples = np.asarray(samples, np.int64)
        epochs, pos = np.divmod(samples, self.n)
        out = np.empty_like(samples)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = permute(pos[sel], self.n, round_keys(seed, int(e)))
        return out

    def train_batch(self, seed: int, step: int, grad_accum: int, batch_size: int, rows: slice | None = None,
                    process_index: int | None = None, process_count: int | None = None) -> np.ndarray:
        """The global batch of ``step``, int32[grad_accum, batch_size, seq_len + 1], or only its
        ``rows`` (a slice of the batch_size axis), or the ``process_index``-th of ``process_count``
        equal blocks of rows: int32[grad_accum, rows, seq_len + 1]. Only those rows are read."""
        if process_count is not None:
            if rows is not None or batch_size % process_count or not 0 <= process_index < process_count:
                raise InputError(f"process {process_index} of {process_count}: needs 0 <= index < count, a "
                                 f"batch_size ({batch_size}) that count divides, and no rows")
            per = batch_size // process_count
            rows = slice(process_index * per, (process_index + 1) * per)
        g = grad_accum * batch_size
        samples = (step * g + np.arange(g, dtype=np.int64)).reshape(grad_accum, batch_size)
        return self.take(self.windows_of(seed, samples[:, slice(None) if rows is None else rows]))

    def eval_batches(self, batch_size: int, max_batches: int) -> list[np.ndarray]:
        """Windows in order, ``min(max_batches, len // batch_size)`` batches of int32[batch_size, seq_len + 1]."""
        n = min(max_batches, self.n // batch_size)
        if n < 1:
            raise InputError(f"the validation shards hold {self.n} windows of {self.seq_len + 1} tokens, fewer than "
                             f"one batch of {batch_size}; use more validation tokens or a smaller batch_size")
        return [self.take(np.arange(i * batch_size, (i + 1) * batch_size)) for i in range(n)]
