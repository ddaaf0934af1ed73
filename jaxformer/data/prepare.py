"""Text corpora -> llm.c-format token shards (:mod:`jaxformer.data.shards`): ``jaxformer prepare``.

* Inputs, in the order given (a directory's files sorted): ``.txt`` (a document per file), ``.jsonl``
  (a document per line, in a text field), ``.parquet`` (a text column), each optionally ``.gz`` or
  ``.zst``; a ``datasets`` directory (``save_to_disk``); a hub data set, streamed.
* Stream: each document is ``<|endoftext|>`` + its tokens; the stream is cut into shards of
  ``shard_tokens`` (documents may straddle two, as in llm.c's fineweb.py): the first ``val_tokens``
  go to ``{prefix}_val_000000.bin``, the rest to ``{prefix}_train_000001.bin``, ...
* Tokenizer: GPT-2 through tiktoken when installed (the same ids as the ``tokenizers`` library,
  about 5x faster on one core, measured), or any tokenizer directory; special tokens in a text are
  text (nanoGPT's ``encode_ordinary``). Worker processes tokenize chunks of documents, a bounded
  number in flight; they fork from a fork server (a fresh process: the parent may hold JAX's
  threads, which forking does not survive) that has imported this module. Python 3.11 still has
  each worker import the caller's main module, so scripts calling :func:`prepare` keep JAX out of
  their top-level imports (as ``scripts/bench_data.py`` does).
* Restart: ``manifest.json`` (rewritten atomically after each shard) holds each shard's tokens,
  sha256 and where in the document stream it ends; a rerun verifies the finished shards, keeps them
  and continues after the last good one, so the same inputs give the same shards.
* Parts: ``part=(i, n)`` takes every n-th input file from the i-th (a data set is split itself, by
  ``split_dataset_by_node``), names its shards ``{prefix}-part{i}of{n}_...`` and its manifest
  ``manifest-part{i}of{n}.json``; only part 0 holds out validation tokens. No scheduler needed.
"""

import dataclasses
import functools
import gzip
import hashlib
import importlib
import importlib.util
import io
import itertools
import json
import multiprocessing
import os
import re
import warnings
from collections import deque
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxformer.data import shards
from jaxformer.errors import InputError

INPUT = re.compile(r".*\.(txt|jsonl|parquet)(\.gz|\.zst)?", re.IGNORECASE)  # kind, compression
FILES = ("txt", "jsonl", "parquet")
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHUNK_CHARS = 1 << 20  # text per task sent to a worker


@dataclasses.dataclass(frozen=True)
class Source:
    """One input. kind: ``txt``, ``jsonl``, ``parquet``, ``datasets`` (a save_to_disk directory) or
    ``hub``; name: its path or hub name; compression: ``""``, ``.gz`` or ``.zst``; part: (i, n), the
    part of a data set's records to read."""
    kind: str
    name: str
    compression: str = ""
    config: str | None = None
    split: str = "train"
    part: tuple[int, int] = (0, 1)

    def describe(self) -> dict:
        where = {"hub": self.name, "config": self.config} if self.kind == "hub" else {"path": self.name, "bytes": (
            sum(f.stat().st_size for f in Path(self.name).rglob("*") if f.is_file()) if self.kind == "datasets"
            else Path(self.name).stat().st_size)}
        return where if self.kind in FILES else {**where, "split": self.split, "part": list(self.part)}


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise InputError(f"this input needs {module}, from the extra data: pip install 'jaxformer[data]'") from None


def find_sources(inputs, hub: str | None = None, hub_config: str | None = None, split: str = "train") -> list[Source]:
    """Sources for input paths (files, directories of them, ``datasets`` directories) and a hub name."""
    found = []
    for path in map(Path, inputs):
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        if path.is_dir() and any((path / m).is_file() for m in DATASET_MARKERS):
            found.append(Source("datasets", str(path), split=split))
            continue
        files = sorted(f for f in path.rglob("*") if f.is_file() and INPUT.fullmatch(f.name)) if path.is_dir() \
            else [path]
        if not files:
            raise InputError(f"{path}: a directory with no .txt, .jsonl or .parquet files (optionally .gz/.zst) "
                             "and not a datasets directory (save_to_disk)")
        for f in files:
            if not (m := INPUT.fullmatch(f.name)):
                raise InputError(f"{f}: unknown input type; expected .txt, .jsonl or .parquet, optionally .gz or "
                                 ".zst, or a datasets directory (save_to_disk)")
            found.append(Source(m[1].lower(), str(f), (m[2] or "").lower()))
    if hub:
        found.append(Source("hub", hub, config=hub_config, split=split))
    if not found:
        raise InputError("no inputs: give files, directories, or --hub NAME")
    return found


def select_part(sources: list[Source], part: tuple[int, int]) -> list[Source]:
    """The sources of part ``i`` of ``n``: every n-th file from the i-th; every data set, to be split."""
    i, n = part
    files = [k for k, s in enumerate(sources) if s.kind in FILES]
    picked = [s if s.kind in FILES else dataclasses.replace(s, part=part) for k, s in enumerate(sources)
              if k in files[i::n] or s.kind not in FILES]
    if not picked:
        raise InputError(f"part {i}/{n} has no inputs: {len(files)} input file(s) for {n} parts")
    return picked


# --- reading documents -----------------------------------------------------------------------------
# Each reader yields (text, bytes of its input consumed so far); text is None for the first ``skip``
# documents, which are counted but not decoded (a restart skips what finished shards hold).

def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        warnings.warn(f"{where}: not valid UTF-8; invalid bytes were replaced by U+FFFD")
        return data.decode("utf-8", errors="replace")


def _read_file(src: Source, field: str, skip: int):
    """.txt and .jsonl, decompressed on the fly; progress: the position in the (compressed) file."""
    with open(src.name, "rb") as raw:
        stream = raw if not src.compression else io.BufferedReader(
            gzip.GzipFile(fileobj=raw) if src.compression == ".gz" else
            _need("zstandard").ZstdDecompressor().stream_reader(raw))
        if src.kind == "txt":
            yield (None if skip else _decode(stream.read(), src.name)), raw.tell()
            return
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            if skip:
                skip -= 1
                yield None, raw.tell()
                continue
            where = f"{src.name}:{number}"
            try:
                record = json.loads(_decode(line, where))
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise InputError(f"{where}: no text field {field!r} (use --text-field)")
            yield record[field], raw.tell()


def _read_parquet(src: Source, field: str, skip: int):
    pq = _need("pyarrow.parquet")
    data = src.name
    if src.compression:  # parquet needs random access: decompressed into memory
        with open(src.name, "rb") as raw:
            data = io.BytesIO(gzip.decompress(raw.read()) if src.compression == ".gz" else
                              _need("zstandard").ZstdDecompressor().stream_reader(raw).read())
    table = pq.ParquetFile(data)
    _check_column(src, field, table.schema_arrow.names)
    yield from _rows(src, field, (b.column(0).to_pylist() for b in table.iter_batches(1024, columns=[field])),
                     table.metadata.num_rows, skip)


def _read_datasets(src: Source, field: str, skip: int):
    ds = _need("datasets").load_from_disk(src.name)
    if hasattr(ds, "keys"):  # a DatasetDict
        if src.split not in ds:
            raise InputError(f"{src.name}: no split {src.split!r} (splits: {', '.join(ds)}; use --split)")
        ds = ds[src.split]
    _check_column(src, field, ds.column_names)
    ds = ds.select_columns([field]).shard(src.part[1], src.part[0], contiguous=True)
    yield from _rows(src, field, (b[field] for b in ds.iter(1024)), len(ds), skip)


@functools.cache
def _hub(src: Source):
    """The hub data set's part ``src.part``, streamed: an InputError saying what to do when the hub
    cannot be reached."""
    datasets = _need("datasets")
    from datasets.distributed import split_dataset_by_node

    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split, streaming=True)
        return split_dataset_by_node(ds, rank=src.part[0], world_size=src.part[1])
    except Exception as e:  # no connection, offline mode, unknown name: datasets raises many kinds
        raise InputError(f"could not reach the Hugging Face hub for data set {src.name!r} ({type(e).__name__}: "
                         f"{str(e)[:300]}). Download it where the hub is reachable (datasets.load_dataset(...)"
                         ".save_to_disk(DIR)) and pass DIR here, or pass local files") from None


def _read_hub(src: Source, field: str, skip: int):
    batches = _hub(src).iter(1024)
    first = next(batches, None)
    _check_column(src, field, list(first or [field]))
    yield from _rows(src, field, (b[field] for b in itertools.chain([first] if first else [], batches)), None, skip)


def _check_column(src: Source, field: str, names) -> None:
    if field not in names:
        raise InputError(f"{src.name}: no column {field!r} (columns: {', '.join(names)}; use --text-field)")


def _rows(src: Source, field: str, batches, rows: int | None, skip: int):
    """A reader over batches (lists) of a text column's values; progress: the share of ``rows`` read."""
    size = src.describe().get("bytes", 0)
    for done, value in enumerate(itertools.chain.from_iterable(batches), start=1):
        if skip:
            skip -= 1
            yield None, 0
            continue
        if not isinstance(value, str):
            raise InputError(f"{src.name}: row {done}: {field!r} is {type(value).__name__}, not text")
        yield value, size * done // rows if rows else 0


READERS = {"txt": _read_file, "jsonl": _read_file, "parquet": _read_parquet, "datasets": _read_datasets,
           "hub": _read_hub}


def _chunks(sources: list[Source], field: str, skip: int):
    """(texts, input bytes consumed so far): the documents after the first ``skip``, in lists of about
    CHUNK_CHARS characters."""
    texts, chars, base, pos = [], 0, 0, 0
    for src in sources:
        for text, pos in READERS[src.kind](src, field, skip):
            if text is None:
                skip -= 1
                continue
            texts.append(text)
            chars += len(text)
            if chars >= CHUNK_CHARS:
                yield texts, base + pos
                texts, chars = [], 0
        base += src.describe().get("bytes", 0)
    if texts:
        yield texts, base


# --- tokenizing (in worker processes) ----------------------------------------------------------------

def tokenizer_info(spec: str) -> tuple[dict, Path]:
    """(the manifest's record of a tokenizer: name, vocab size, EOS id, sha256 of its files; its
    directory) for ``gpt2`` or a tokenizer directory."""
    from jaxformer.gpt2.tokenizer import EOS, GPT2_DIR, TOKENIZER_FILES, GPT2Tokenizer

    path = GPT2_DIR if spec == "gpt2" else Path(spec)
    if not path.is_dir():
        raise InputError(f"--tokenizer {spec}: neither gpt2 nor a tokenizer directory")
    tok = GPT2Tokenizer.from_dir(path)
    if tok.eos_id is None:
        raise InputError(f"{path}: the tokenizer has no {EOS} token, which starts every document")
    digest = hashlib.sha256()
    for name in (n for n in TOKENIZER_FILES if (path / n).is_file()):
        digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    return {"name": spec, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "sha256": digest.hexdigest()}, path


def gpt2_tiktoken(vocab_json: str | Path):
    """tiktoken's GPT-2 encoding from a HF ``vocab.json`` (no download): each token's characters map
    back to bytes by GPT-2's table (printable bytes are themselves, the others 256, 257, ...)."""
    import tiktoken

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(c): b for c, b in zip(printable + [256 + k for k in range(len(others))], printable + others)}
    vocab = json.loads(Path(vocab_json).read_text("utf-8"))
    special = {t: i for t, i in vocab.items() if t.startswith("<|")}
    ranks = {bytes(byte_of[c] for c in t): i for t, i in vocab.items() if t not in special}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


_WORKER = None  # (encode: str -> int[n], eos id, token dtype), set in each worker process


def _start_worker(tok_dir: str, fast_gpt2: bool, eos: int, dtype: str) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    if fast_gpt2:
        enc = gpt2_tiktoken(Path(tok_dir) / "vocab.json")
        encode = lambda text: enc.encode_to_numpy(text, disallowed_special=())  # noqa: E731
    else:
        from jaxformer.gpt2.tokenizer import GPT2Tokenizer

        tok = GPT2Tokenizer.from_dir(tok_dir).tokenizer
        tok.encode_special_tokens = True  # "<|endoftext|>" in a text is text, as with encode_ordinary
        encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    _WORKER = encode, eos, np.dtype(dtype)


def _tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens: dtype[m], lengths: int64[len(texts)]): each text as EOS + its tokens, concatenated."""
    encode, eos, dtype = _WORKER
    ids = [encode(t) for t in texts]
    lengths = np.array([len(x) + 1 for x in ids], np.int64)
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype)
    out[starts] = eos
    for start, x in zip(starts, ids):
        out[start + 1:start + len(x) + 1] = x
    return out, lengths


# --- the manifest --------------------------------------------------------------------------------

def _resume(out: Path, manifest_path: Path, settings: dict, stem: str) -> dict:
    """The manifest to continue: a fresh one, or the one in ``out`` cut at its first missing or
    damaged shard; removes this run's files beyond it. An InputError for foreign shards."""
    manifests = sorted(out.glob("manifest*.json"))
    ours = re.compile(rf"\.?{re.escape(stem)}_(train|val)_\d{{6}}\.bin(\.\d+\.tmp)?")
    if not manifests and any(not ours.fullmatch(p.name) for p in out.glob("*.bin")):
        raise InputError(f"{out} holds .bin files that jaxformer prepare did not write (no manifest.json); "
                         "choose another --out")
    for path in manifests:
        try:
            tok = json.loads(path.read_text())["settings"]["tokenizer"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}: not a manifest of jaxformer prepare; choose another --out") from None
        if tok["sha256"] != settings["tokenizer"]["sha256"]:
            raise InputError(f"{out} holds shards from another tokenizer ({tok['name']}, vocabulary "
                             f"{tok['vocab_size']}, per {path.name}); choose another --out")
    manifest = {"settings": settings, "shards": [], "complete": False}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        for k in (k for k in settings if old["settings"].get(k) != settings[k]):
            raise InputError(f"{manifest_path}: prepared with other settings ({k}: {old['settings'].get(k)} there, "
                             f"{settings[k]} now); pass the same ones to continue, or choose another --out")
        manifest["shards"] = shards.verified(out, old["shards"])
        if old["complete"] and len(manifest["shards"]) == len(old["shards"]):
            return old
    kept = {rec["file"] for rec in manifest["shards"]}
    for path in out.iterdir():
        if ours.fullmatch(path.name) and path.name not in kept:
            path.unlink()
    return manifest


def prepare(inputs=(), out: str | Path = "shards", *, tokenizer: str = "gpt2", text_field: str = "text",
            shard_tokens: int = 100_000_000, val_tokens: int | None = None, prefix: str = "corpus",
            part: tuple[int, int] = (0, 1), workers: int | None = None, hub: str | None = None,
            hub_config: str | None = None, split: str = "train", progress: bool = True) -> dict:
    """Tokenizes ``inputs`` (and the hub data set ``hub``) into shards in ``out``, or continues an
    interrupted run there (see the module docstring); returns the manifest."""
    sources = select_part(find_sources(inputs, hub, hub_config, split), part)
    for src in (s for s in sources if s.kind == "hub"):
        _hub(src)  # reachable, before anything is written
    tok, tok_dir = tokenizer_info(tokenizer)
    i, n = part
    settings = json.loads(json.dumps({
        "tokenizer": tok, "inputs": [s.describe() for s in sources], "text_field": text_field,
        "shard_tokens": shard_tokens, "val_tokens": 0 if i else shard_tokens if val_tokens is None else val_tokens,
        "prefix": prefix, "part": f"{i}/{n}", "version": shards.version_for(tok["vocab_size"])}))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem, tag = (prefix, "") if n == 1 else (f"{prefix}-part{i}of{n}", f"-part{i}of{n}")
    manifest = _resume(out, out / f"manifest{tag}.json", settings, stem)
    if manifest["complete"]:
        return manifest
    writer = shards.ShardWriter(out, stem, manifest, out / f"manifest{tag}.json")
    workers = workers or os.cpu_count()
    fast = tokenizer == "gpt2" and importlib.util.find_spec("tiktoken") is not None
    init = (str(tok_dir), fast, tok["eos_id"], shards.FORMATS[shards.MAGIC, settings["version"]].str)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])  # imported once, in the server (3.11: not __main__)
    with ctx.Pool(workers, _start_worker, init) as pool:
        _run(pool, workers, _chunks(sources, text_field, writer.doc), writer,
             sum(s.get("bytes", 0) for s in settings["inputs"]), progress, str(out))
    if writer.doc == 0:
        raise InputError(f"no documents in {', '.join(s.name for s in sources)}")
    manifest = writer.finish()
    if settings["val_tokens"] and not manifest["totals"]["train_tokens"]:
        warnings.warn(f"all {manifest['totals']['val_tokens']} tokens went to validation; lower --val-tokens")
    return manifest


def _run(pool, workers: int, chunks, writer: shards.ShardWriter, total_bytes: int, progress: bool, desc: str) -> None:
    """Tokenizes ``chunks`` ((texts, input bytes consumed)) on ``pool``, at most 2 per worker in
    flight, into ``writer`` in order; a progress bar of tokens/s with an ETA estimated from the bytes."""
    done = sum(r["tokens"] for r in writer.records)
    with tqdm(unit="tok", unit_scale=True, initial=done, disable=not progress, desc=desc) as bar:
        pending = deque()
        for item in itertools.chain(chunks, [None]):
            if item is not None:
                pending.append((pool.apply_async(_tokenize, (item[0],)), item[1]))
            while pending and (item is None or len(pending) > 2 * workers):
                result, pos = pending.popleft()
                bar.update(writer.add(*result.get()))
                if pos and total_bytes:
                    bar.total = max(bar.n, int(bar.n * total_bytes / pos))
