"""llm.c-format token shards: the on-disk form of a tokenized pretraining corpus.

A shard is a header of 256 little-endian int32 followed by the tokens:

* ``header[0]``: magic 20240520; ``header[1]``: version, 1 = uint16 tokens (vocabularies of at most
  65,536 ids, GPT-2's), 2 = uint32 tokens; ``header[2]``: the token count; the rest is zero.
* Every document starts with ``<|endoftext|>`` (as llm.c's and modded-nanogpt's fineweb.py write it).

This is the format of llm.c's ``write_datafile`` and of modded-nanogpt's loader, so their shards
(``fineweb_train_000001.bin``, ``fineweb_val_000000.bin``) read here unchanged, and shards written here
read there. llm.c's LLaMA-3 shards (magic 20240801, version 7, uint32) read here too.
Writing is atomic (a temporary file renamed into place); reading is a read-only memory map.
:class:`ShardWriter` cuts a tokenized document stream into a directory of shards with a manifest
(``jaxformer prepare``); :func:`resolve` finds a directory's train or validation shards.
"""

import glob
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from jaxformer.errors import InputError

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype; the last one is llm.c's LLaMA-3 layout, read only.
FORMATS = {(MAGIC, 1): np.dtype("<u2"), (MAGIC, 2): np.dtype("<u4"), (20240801, 7): np.dtype("<u4")}


def version_for(vocab_size: int) -> int:
    """1 (uint16 tokens) when every id of a ``vocab_size`` vocabulary fits 16 bits, else 2 (uint32)."""
    return 1 if vocab_size <= 1 << 16 else 2


def header(count: int, version: int) -> np.ndarray:
    """int32[256]: the header of a shard of ``count`` tokens."""
    h = np.zeros(HEADER_INTS, "<i4")
    h[:3] = MAGIC, version, count
    return h


def write_shard(path: str | Path, tokens: np.ndarray, version: int) -> str:
    """Writes ``tokens`` (int[n]) as a shard at ``path`` atomically; returns the file's sha256 (hex).

    The tokens are written in the version's dtype; an id that does not fit it is an InputError."""
    path = Path(path)
    dtype = FORMATS[MAGIC, version]
    tokens = np.asarray(tokens)
    if tokens.size and not np.can_cast(tokens.dtype, dtype) and (tokens.min() < 0 or
                                                                tokens.max() > np.iinfo(dtype).max):
        raise InputError(f"{path}: token ids {tokens.min()}..{tokens.max()} do not fit version {version} ({dtype})")
    head, body = header(len(tokens), version).tobytes(), np.ascontiguousarray(tokens, dtype).data
    digest = hashlib.sha256(head)
    digest.update(body)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return digest.hexdigest()


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """(token dtype, token count) of the shard at ``path``, checked against the file's size: an
    InputError naming the file when the magic or version is unknown or the size disagrees."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise InputError(f"{path}: truncated shard: {size} bytes, less than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        h = np.frombuffer(f.read(12), "<i4")
    magic, version, count = (int(x) for x in h)
    if magic not in {m for m, _ in FORMATS}:
        raise InputError(f"{path}: not a token shard: magic {magic}, expected {MAGIC} (llm.c's format)")
    if (magic, version) not in FORMATS:
        raise InputError(f"{path}: unknown shard version {version} (known: 1 = uint16, 2 = uint32 tokens)")
    dtype = FORMATS[magic, version]
    expected = HEADER_BYTES + count * dtype.itemsize
    if count < 0 or size != expected:
        what = "truncated shard" if size < expected else "trailing bytes"
        raise InputError(f"{path}: {what}: the header says {count} tokens ({expected} bytes with the header), "
                         f"the file holds {size} bytes")
    return dtype, count


def read_shard(path: str | Path) -> np.memmap:
    """The shard's tokens, uint16[n] or uint32[n], as a read-only memory map (nothing is read into RAM)."""
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """The file's sha256 (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve(data: str | Path, split: str) -> list[Path]:
    """The shards of ``split`` (``"train"`` or ``"val"``): a directory's ``*_{split}_*.bin``, sorted,
    or the files a glob pattern matches (sorted), or a single shard file. An InputError when none."""
    text = str(data)
    if Path(text).is_dir():
        paths = sorted(Path(text).glob(f"*_{split}_*.bin"))
        where = f"{text} holds no {split} shards (*_{split}_*.bin)"
    elif glob.has_magic(text):
        paths = sorted(map(Path, glob.glob(text)))
        where = f"{text}: no files match"
    else:
        paths = [Path(text)] if Path(text).is_file() else []
        where = f"{text}: no such file or directory"
    if not paths:
        raise InputError(where)
    return paths


def verified(out: Path, records: list[dict]) -> list[dict]:
    """The leading ``records`` (manifest entries) whose shard in ``out`` exists with its sha256; a
    warning names the first that does not."""
    for k, rec in enumerate(records):
        if not (out / rec["file"]).is_file() or sha256(out / rec["file"]) != rec["sha256"]:
            warnings.warn(f"{out / rec['file']}: missing or damaged; writing it and the shards after it again")
            return records[:k]
    return list(records)


class ShardWriter:
    """Cuts a stream of documents' tokens into the shards ``{stem}_{split}_{index:06d}.bin`` in ``out``,
    recording each in ``manifest["shards"]`` (file, split, tokens, sha256, and ``end``: the stream
    position after it) and saving the manifest at ``manifest_path`` (atomically) as each is written.
    The stream position is (document, tokens of it already written). ``manifest["settings"]`` gives
    ``val_tokens`` (the first shard's size, 0 for none), ``shard_tokens`` and ``version``."""

    def __init__(self, out: Path, stem: str, manifest: dict, manifest_path: Path):
        self.out, self.stem, self.manifest, self.manifest_path = out, stem, manifest, manifest_path
        self.settings, self.records = manifest["settings"], manifest["shards"]
        self.doc, self.offset = self.records[-1]["end"] if self.records else (0, 0)
        self.buf, self.fill = None, 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> int:
        """Appends the stream of the next ``len(lengths)`` documents (tokens: int[sum(lengths)]) but
        its first ``self.offset`` tokens, written before (a restart inside a document); returns how
        many tokens it appended."""
        ends = np.cumsum(lengths) - self.offset  # where each document ends in ``tokens[offset:]``
        tokens, base, start, taken = tokens[self.offset:], self.doc, self.offset, 0
        while taken < len(tokens):
            if self.buf is None:
                val = self.settings["val_tokens"] if not self.records else 0
                self.buf = np.empty(val or self.settings["shard_tokens"],
                                    FORMATS[MAGIC, self.settings["version"]])
            n = min(len(self.buf) - self.fill, len(tokens) - taken)
            self.buf[self.fill:self.fill + n] = tokens[taken:taken + n]
            self.fill, taken = self.fill + n, taken + n
            done = int(np.searchsorted(ends, taken, side="right"))
            self.doc, self.offset = base + done, taken - int(ends[done - 1]) if done else start + taken
            if self.fill == len(self.buf):
                self.flush()
        return len(tokens)

    def flush(self) -> None:
        """Writes the tokens gathered as the next shard, then the manifest."""
        index = len(self.records)
        split = "val" if index == 0 and self.settings["val_tokens"] else "train"
        name = f"{self.stem}_{split}_{index:06d}.bin"
        digest = write_shard(self.out / name, self.buf[:self.fill], self.settings["version"])
        self.records.append({"file": name, "split": split, "tokens": self.fill, "sha256": digest,
                             "end": [self.doc, self.offset]})
        self.buf, self.fill = None, 0
        self.save()

    def finish(self) -> dict:
        if self.fill:
            self.flush()
        tokens = {f"{s}_tokens": sum(r["tokens"] for r in self.records if r["split"] == s) for s in ("train", "val")}
        self.manifest.update(complete=True, totals={"documents": self.doc, "shards": len(self.records), **tokens})
        self.save()
        return self.manifest

    def save(self) -> None:
        tmp = self.manifest_path.with_name(f".{self.manifest_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1) + "\n")
        tmp.replace(self.manifest_path)
