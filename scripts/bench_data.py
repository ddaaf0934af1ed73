"""Benchmark the pretraining data path, same machine, same run, one side against another per case.

    python scripts/bench_data.py --json bench_data.json                       # 500 MB corpus, 2B-token shards
    python scripts/bench_data.py --corpus-mb 50 --big-tokens 200000000 --train-tokens-per-s 150  # quick

Cases (tokens/s = tokens delivered / seconds of a whole pass; peak memory in a fresh process each):

* prepare: ``jaxformer.data.prepare.prepare`` (GPT-2, --workers processes, 100M-token shards with
  sha256 and manifest) against nanoGPT's way on the same generated JSONL corpus (random documents of
  GPT-2-vocabulary words, Zipf-distributed): a multiprocessing Pool of the same size running tiktoken's
  ``encode_ordinary_batch`` over chunks of documents, EOT appended, one uint16 ``np.memmap`` written.
* loader: ShardWindows + Prefetcher delivering GPT-2 124M batches (8 x 1024) against what the
  jaxformer GPT-2 124M train step (float32, batch 1 x 1024) consumes on this CPU (or --train-tokens-per-s).
* grain: the same batches from the same shards through ShardWindows + Prefetcher (positioned reads),
  the same sampler reading through a fresh ``np.memmap`` per window (nanoGPT's ``get_batch``), and
  Grain (``MapDataset.source(windows).shuffle(seed).batch(8)``, its default read threads and buffer):
  tokens/s, and the growth of peak resident memory over --memory-steps batches.
* memory: growth of peak resident memory while reading --memory-steps batches from a 20M-token and a
  --big-tokens shard set of random tokens (written under the temporary directory, deleted after).
  The measured workload is :data:`MEMORY_WORKLOAD` (one line to swap for a short training run).
* hellaswag: ``scripts/bench_hellaswag.py``'s case, when that file exists.
"""

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import warnings
from itertools import chain
from pathlib import Path

import numpy as np

import jaxformer
from jaxformer.commands import cli
from jaxformer.data import shards
from jaxformer.data.prefetch import Prefetcher
from jaxformer.data.prepare import gpt2_tiktoken, prepare
from jaxformer.data.sampler import ShardWindows

# No JAX at the top: prepare's tokenizing processes import this module again (Python < 3.13), so
# jaxformer.benchmark and jaxformer.gpt2 (which import JAX) are imported where they are used.
SEQ, BATCH = 1024, 8  # GPT-2 124M's batches
VOCAB_JSON = Path(jaxformer.__file__).parent / "gpt2" / "tokenizer-files" / "vocab.json"  # GPT-2's, shipped


def best_times(fns, repeats: int, warmup: bool = True) -> dict[str, float]:
    from jaxformer.benchmark import best_times

    return best_times(fns, repeats, warmup)


# --- prepare: jaxformer against nanoGPT's way ------------------------------------------------------

def make_corpus(where: Path, mb: float, files: int = 8, seed: int = 0) -> list[Path]:
    """JSONL files of about ``mb`` MB of random English-like documents (GPT-2 vocabulary words,
    Zipf frequencies, sentences of ~15 words, documents of 100-2000 words)."""
    vocab = json.loads(VOCAB_JSON.read_text("utf-8"))
    words = np.array(sorted({t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha()}), dtype="U32")
    rng = np.random.default_rng(seed)
    freq = rng.permutation(1 / np.arange(1, len(words) + 1) ** 1.1)
    freq /= freq.sum()
    paths = [where / f"corpus_{k:02d}.jsonl" for k in range(files)]
    for path in paths:
        with open(path, "w", encoding="utf-8") as f:
            while f.tell() < mb * 1e6 / files:
                w = words[rng.choice(len(words), 200_000, p=freq)]
                w[::15] = np.char.add(w[::15], ".")
                cuts = np.cumsum(rng.integers(100, 2000, 200))
                for a, b in zip(np.r_[0, cuts], cuts[cuts < len(w)]):
                    f.write(json.dumps({"text": " ".join(w[a:b]).capitalize() + "."}) + "\n")
    return paths


def read_jsonl(paths):
    for path in paths:
        with open(path, "rb") as f:
            yield from (json.loads(line)["text"] for line in f if line.strip())


_ENC = None


def _nano_init():
    global _ENC
    _ENC = gpt2_tiktoken(VOCAB_JSON)  # = tiktoken.get_encoding("gpt2"), without a download


def _nano_tokenize(docs):
    ids = _ENC.encode_ordinary_batch(docs, num_threads=1)  # one thread per process, as on our side
    for x in ids:
        x.append(_ENC.eot_token)
    return np.array(list(chain.from_iterable(ids)), np.uint16)


def nanogpt_prepare(paths, out: Path, workers: int) -> int:
    """nanoGPT's way: a Pool tokenizing chunks of 1024 documents, then one uint16 memmap; its tokens."""
    with multiprocessing.get_context("fork").Pool(workers, _nano_init) as pool:
        docs = iter(read_jsonl(paths))
        chunks = iter(lambda: [d for _, d in zip(range(1024), docs)], [])
        parts = list(pool.imap(_nano_tokenize, chunks))
    total = sum(map(len, parts))
    arr = np.memmap(out / "train.bin", np.uint16, mode="w+", shape=(total,))
    idx = 0
    for p in parts:
        arr[idx:idx + len(p)] = p
        idx += len(p)
    arr.flush()
    return total


def case_prepare(args, tmp: Path) -> dict:
    paths = make_corpus(tmp, args.corpus_mb)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    for p in paths:  # both sides read from the page cache
        p.read_bytes()
    counts = {}

    def ours():
        shutil.rmtree(tmp / "ours", ignore_errors=True)
        with warnings.catch_warnings():  # a corpus under one shard goes to validation: said, and known here
            warnings.simplefilter("ignore")
            m = prepare(paths, tmp / "ours", workers=args.workers, progress=False)
        counts["jaxformer"] = m["totals"]["train_tokens"] + m["totals"]["val_tokens"]

    def theirs():
        shutil.rmtree(tmp / "nano", ignore_errors=True)
        (tmp / "nano").mkdir()
        counts["nanogpt"] = nanogpt_prepare(paths, tmp / "nano", args.workers)

    t = best_times({"jaxformer": ours, "nanogpt": theirs}, args.repeats, warmup=False)
    assert counts["jaxformer"] == counts["nanogpt"], counts
    ours_tok_s, nano_tok_s = counts["jaxformer"] / t["jaxformer"], counts["nanogpt"] / t["nanogpt"]
    shutil.rmtree(tmp / "nano")
    return dict(name=f"prepare: GPT-2 tokens of a {mb:.0f} MB JSONL corpus, {args.workers} workers",
                jaxformer_tok_s=round(ours_tok_s), nanogpt_tok_s=round(nano_tok_s), units="tokens/s",
                speedup=round(ours_tok_s / nano_tok_s, 3), tokens=counts["jaxformer"], corpus_mb=round(mb, 1),
                jaxformer_s=round(t["jaxformer"], 2), nanogpt_s=round(t["nanogpt"], 2), target=">= 1.0")


# --- loaders, and resident memory in a fresh process ---------------------------------------------------

def make_random_shards(where: Path, tokens: int, per_shard: int = 100_000_000) -> Path:
    """A shard directory of ``tokens`` random uint16 tokens (GPT-2's vocabulary)."""
    where.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, start in enumerate(range(0, tokens, per_shard)):
        n = min(per_shard, tokens - start)
        shards.write_shard(where / f"random_train_{k:06d}.bin", rng.integers(0, 50257, n, dtype=np.uint16), 1)
    return where


def ours_batches(data: Path, steps: int) -> int:
    """Reads ``steps`` batches through ShardWindows + Prefetcher; returns the tokens delivered."""
    windows = ShardWindows(shards.resolve(data, "train"), SEQ)
    with Prefetcher(lambda s: windows.train_batch(0, s, 1, BATCH), range(steps)) as batches:
        return sum(b.size for b in batches)


class _MemmapWindows(ShardWindows):
    """ShardWindows reading each window through a fresh np.memmap of its shard (nanoGPT's get_batch)."""

    def take(self, idx):
        idx = np.asarray(idx, np.int64).ravel()
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), SEQ + 1), np.int32)
        for j, (s, first) in enumerate(zip(shard, (idx - self.starts[shard]) * SEQ)):
            dtype, count = self.formats[s]
            out[j] = np.memmap(self.paths[s], dtype, "r", shards.HEADER_BYTES, (count,))[first:first + SEQ + 1]
        return out


def memmap_batches(data: Path, steps: int) -> int:
    """As :func:`ours_batches`, reading through memory maps."""
    windows = _MemmapWindows(shards.resolve(data, "train"), SEQ)
    with Prefetcher(lambda s: windows.train_batch(0, s, 1, BATCH), range(steps)) as batches:
        return sum(b.size for b in batches)


class _WindowSource:
    """Grain's random-access source: window ``i`` of the shards."""

    def __init__(self, data: Path):
        self.windows = ShardWindows(shards.resolve(data, "train"), SEQ)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return self.windows.take(np.array([i]))[0]


def grain_batches(data: Path, steps: int) -> int:
    import grain

    it = iter(grain.MapDataset.source(_WindowSource(data)).shuffle(seed=0).batch(BATCH).to_iter_dataset())
    return sum(next(it).size for _ in range(steps))


MEMORY_WORKLOAD = ours_batches  # (data directory, steps) -> anything; e.g. a short training run on --data


def _rss_child(fn, data, steps, queue):
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = _status("VmRSS")
        fn(data, steps)
        queue.put((_status("VmHWM") - before) / 2**20)
    except BaseException as e:
        queue.put(e)


def _status(key: str) -> int:
    """Bytes of ``key`` (VmRSS, VmHWM) in /proc/self/status."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def rss_growth_mb(fn, data: Path, steps: int) -> float:
    """MB by which ``fn(data, steps)`` raises the peak resident memory of a fresh (spawned) process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(fn, data, steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return round(result, 1)


def train_step_tok_s(args) -> tuple[float, str]:
    """Tokens/s of the jaxformer GPT-2 124M train step on this CPU (batch 1 x 1024), or --train-tokens-per-s."""
    if args.train_tokens_per_s:
        return args.train_tokens_per_s, "given (--train-tokens-per-s)"
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_train

    run = bench_train.bench_jax(1, SEQ, "float32", 0.0, True, warmup=1)
    t = best_times({"step": lambda: run(1)}, args.repeats, warmup=False)["step"]
    return SEQ / t, "measured: bench_train.bench_jax, float32, batch 1 x 1024, best of passes of 1 step"


def case_loader(args, data: Path) -> dict:
    steps = args.loader_steps
    t = best_times({"loader": lambda: ours_batches(data, steps)}, args.repeats)["loader"]
    loader = steps * BATCH * (SEQ + 1) / t
    train, how = train_step_tok_s(args)
    return dict(name=f"loader: ShardWindows + Prefetcher, batches {BATCH} x {SEQ + 1}, vs the GPT-2 124M CPU "
                     "train step",
                loader_tok_s=round(loader), train_step_tok_s=round(train, 1), units="tokens/s",
                speedup=round(loader / train, 1), train_step=how, target=">= 100")


def case_grain(args, data: Path, tokens: int) -> dict:
    steps = args.loader_steps
    fns = {"pread": ours_batches, "memmap": memmap_batches, "grain": grain_batches}
    t = best_times({k: (lambda f=f: f(data, steps)) for k, f in fns.items()}, args.repeats)
    tok_s = {k: steps * BATCH * (SEQ + 1) / v for k, v in t.items()}
    return dict(name=f"loaders on {tokens / 1e9:.2g}B tokens: own sampler (pread; memmap) vs Grain MapDataset",
                **{f"{k}_tok_s": round(v) for k, v in tok_s.items()}, units="tokens/s, MB",
                speedup=round(tok_s["pread"] / tok_s["grain"], 2),
                **{f"{k}_rss_growth_mb": rss_growth_mb(f, data, args.memory_steps) for k, f in fns.items()},
                memory_steps=args.memory_steps)


def case_memory(args, small: Path, big: Path, big_tokens: int) -> dict:
    a = rss_growth_mb(MEMORY_WORKLOAD, small, args.memory_steps)
    b = rss_growth_mb(MEMORY_WORKLOAD, big, args.memory_steps)
    return dict(name=f"memory: {MEMORY_WORKLOAD.__name__}, {args.memory_steps} batches, 20M vs "
                     f"{big_tokens / 1e9:.2g}B tokens", rss_growth_mb_20m=a, rss_growth_mb_big=b, units="MB",
                difference_mb=round(b - a, 1), speedup=round(a / b, 2) if b > 0 else None,  # 1: flat
                target="difference within 100 MB")


def case_hellaswag(args) -> dict | None:
    if not (Path(__file__).parent / "bench_hellaswag.py").is_file():
        print("hellaswag: skipped (scripts/bench_hellaswag.py does not exist)")
        return None
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_hellaswag

    return bench_hellaswag.case(bench_hellaswag.parser().parse_args(
        ["--items", str(args.hellaswag_items), "--repeats", str(args.repeats)]))


# --- the run -----------------------------------------------------------------------------------------

def cpu() -> dict:
    from jaxformer.benchmark import device_name

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return dict(device=device_name(), cpu_count=os.cpu_count(), cpu_flags=" ".join(flags))


def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--cases", default="prepare,loader,grain,memory,hellaswag", help="comma-separated cases to run")
    ap.add_argument("--corpus-mb", type=cli.number_in(0.1, 1e5), default=500, help="generated corpus size")
    ap.add_argument("--workers", type=cli.at_least(1), default=os.cpu_count(), help="processes, both sides")
    ap.add_argument("--big-tokens", type=cli.at_least(20_000_000), default=2_000_000_000,
                    help="tokens of the big shard set (memory and grain cases)")
    ap.add_argument("--loader-steps", type=cli.at_least(1), default=2000, help="batches per timed loader pass")
    ap.add_argument("--memory-steps", type=cli.at_least(1), default=2000, help="batches read for the memory figures")
    ap.add_argument("--train-tokens-per-s", type=float, help="the CPU train step's tokens/s (default: measured)")
    ap.add_argument("--hellaswag-items", type=cli.at_least(1), default=50)
    ap.add_argument("--repeats", type=cli.at_least(1), default=2, help="timed passes per side, interleaved")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpus and shards are written")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def bench(args) -> int:
    from jaxformer.benchmark import write_json

    wanted = set(args.cases.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.tmp))
    cases = []
    try:
        if "prepare" in wanted:  # first: nanoGPT's Pool forks before JAX starts a backend's threads
            cases.append(case_prepare(args, tmp))
        if wanted & {"loader", "grain", "memory"}:
            small = make_random_shards(tmp / "small", 20_000_000, 10_000_000)
            big = make_random_shards(tmp / "big", args.big_tokens)
        if "loader" in wanted:
            cases.append(case_loader(args, small))
        if "grain" in wanted:
            cases.append(case_grain(args, big, args.big_tokens))
        if "memory" in wanted:
            cases.append(case_memory(args, small, big, args.big_tokens))
        if "hellaswag" in wanted and (hs := case_hellaswag(args)):
            cases.append(hs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(cases)
    write_json(args.json, dict(**cpu(), cases=cases))
    return 0


def report(cases: list[dict]) -> None:
    """A table: each case's name, its two sides' figures (with units) and the speedup."""
    from jaxformer.benchmark import STATISTIC

    print(f"\n{'case':<92} {'figures':<58} {'speedup':>9}")
    for c in cases:
        figures = ", ".join(f"{k}={v:,}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in c.items()
                            if k.endswith(("_tok_s", "_mb", "_mb_20m", "_mb_big", "_items_per_s")))
        speedup = c.get("speedup")
        print(f"{c['name']:<92} {figures:<58} {'-' if speedup is None else f'{speedup:,.2f}x':>10}")
    print(f"{cpu()['device']}; timing: {STATISTIC}")


if __name__ == "__main__":
    sys.exit(main())
