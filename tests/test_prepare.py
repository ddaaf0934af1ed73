"""``jaxformer prepare``: its shards read by an independent reader hold tiktoken's GPT-2 encoding of
the documents (EOS first); compressed, parquet and datasets inputs; restart; parts; bad input."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load

from jaxformer import commands
from jaxformer.data import prepare as prep
from jaxformer.data import shards

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def enc(data_root):
    """tiktoken's GPT-2, from the shipped ranks (no download)."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(data_root / "gpt2-tokenizer" / "gpt2.tiktoken"))
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def documents(n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "Über", "naïve", "東京", "café", " ", "\n", "it's", "42", "<|endoftext|>", "emoji 🙂", "a"]
    return [" ".join(rng.choice(words, rng.integers(1, 200))) for _ in range(n)]


def read_dir(out: Path) -> np.ndarray:
    """All tokens of a prepared directory, validation shard first, by np.fromfile (llm.c's layout)."""
    parts = []
    for path in sorted(out.glob("*_val_*.bin")) + sorted(out.glob("*_train_*.bin")):
        header = np.fromfile(path, np.int32, 256)
        assert header[0] == 20240520 and header[1] == 1
        tokens = np.fromfile(path, np.uint16, offset=1024)
        assert len(tokens) == header[2]
        parts.append(tokens)
    return np.concatenate(parts)


def reference(enc, docs) -> np.ndarray:
    return np.array([t for d in docs for t in [50256, *enc.encode_ordinary(d)]], np.uint16)


def write_jsonl(path: Path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": 1}) + "\n\n")  # blank lines are skipped
    return path


def run(*args) -> int:
    return commands.main(["prepare", *map(str, args), "--workers", "2", "--no-progress"])


def test_shards_hold_tiktokens_encoding(tmp_path, enc):
    docs = documents()
    write_jsonl(tmp_path / "a.jsonl", docs[:30])
    (tmp_path / "txt").mkdir()
    for k, d in enumerate(docs[30:]):
        (tmp_path / "txt" / f"{k:02d}.txt").write_text(d, encoding="utf-8")
    assert run(tmp_path / "a.jsonl", tmp_path / "txt", "--out", tmp_path / "out", "--shard-tokens", 700,
               "--val-tokens", 300, "--prefix", "web") == 0
    np.testing.assert_array_equal(read_dir(tmp_path / "out"), reference(enc, docs))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    recs = manifest["shards"]
    assert [r["file"] for r in recs[:3]] == ["web_val_000000.bin", "web_train_000001.bin", "web_train_000002.bin"]
    assert [r["tokens"] for r in recs[:-1]] == [300] + [700] * (len(recs) - 2) and 0 < recs[-1]["tokens"] <= 700
    assert all(r["sha256"] == shards.sha256(tmp_path / "out" / r["file"]) for r in recs)
    assert manifest["totals"] == {"documents": 40, "shards": len(recs), "val_tokens": 300,
                                  "train_tokens": len(reference(enc, docs)) - 300}
    assert manifest["settings"]["tokenizer"] | {"sha256": None} == {"name": "gpt2", "vocab_size": 50257,
                                                                    "eos_id": 50256, "sha256": None}


def test_compressed_parquet_and_datasets_inputs(tmp_path, enc):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = documents(12, seed=1)
    write_jsonl(tmp_path / "a.jsonl.gz", docs[:3], gzip.open)
    with open(tmp_path / "b.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[3:5]).encode())
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(docs[5].encode()))
    pq.write_table(pa.table({"content": docs[6:8], "n": [1, 2]}), tmp_path / "d.parquet")
    pq.write_table(pa.table({"content": docs[8:9]}), tmp_path / "e.parquet")
    (tmp_path / "e.parquet.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "e.parquet").read_bytes()))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": docs[9:12]}),
                          "test": datasets.Dataset.from_dict({"content": ["x"]})}).save_to_disk(tmp_path / "ds")
    inputs = [tmp_path / n for n in ("a.jsonl.gz", "b.jsonl.zst", "c.txt.gz")]
    assert run(*inputs, "--out", tmp_path / "o1", "--val-tokens", 0, "--shard-tokens", 400) == 0
    np.testing.assert_array_equal(read_dir(tmp_path / "o1"), reference(enc, docs[:6]))
    assert not list((tmp_path / "o1").glob("*_val_*"))
    assert run(tmp_path / "d.parquet", tmp_path / "e.parquet.zst", tmp_path / "ds", "--text-field", "content",
               "--out", tmp_path / "o2", "--val-tokens", 50) == 0
    np.testing.assert_array_equal(read_dir(tmp_path / "o2"), reference(enc, docs[6:12]))
    for i in range(2):  # a datasets directory is split between parts by its rows
        prep.prepare([tmp_path / "ds"], tmp_path / "o3", text_field="content", part=(i, 2), val_tokens=0,
                     workers=2, progress=False)
    halves = [np.fromfile(p, np.uint16, offset=1024) for p in sorted((tmp_path / "o3").glob("*.bin"))]
    np.testing.assert_array_equal(np.concatenate(halves), reference(enc, docs[9:12]))


def test_tokenizer_directory(tmp_path, capsys):
    from jaxformer.gpt2.data import train_tokenizer

    docs = documents(10, seed=2)
    tok = train_tokenizer(docs, "bpe", 300)
    (tmp_path / "tok").mkdir()
    tok.tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    write_jsonl(tmp_path / "a.jsonl", docs)
    assert run(tmp_path / "a.jsonl", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "out") == 0
    tok.tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a text is text
    expected = [t for d in docs for t in [tok.eos_id, *tok.encode(d)]]
    assert read_dir(tmp_path / "out").tolist() == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["tokenizer"]["vocab_size"] == tok.vocab_size
    capsys.readouterr()
    assert run(tmp_path / "a.jsonl", "--out", tmp_path / "out") == 2  # the same --out, another tokenizer
    assert "holds shards from another tokenizer" in capsys.readouterr().err


def listing(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_restart_continues_and_gives_the_same_shards(tmp_path, monkeypatch):
    docs = documents(60, seed=3)
    for k in range(3):
        write_jsonl(tmp_path / f"{k}.jsonl", docs[k * 20:(k + 1) * 20])
    args = [tmp_path / f"{k}.jsonl" for k in range(3)] + ["--shard-tokens", 500]
    assert run(*args, "--out", tmp_path / "clean") == 0
    clean = listing(tmp_path / "clean")
    assert len(clean) > 8

    write, calls = shards.write_shard, []

    def crash_on_fifth(*a, **kw):  # a crash while the 5th shard is being written
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return write(*a, **kw)

    monkeypatch.setattr(shards, "write_shard", crash_on_fifth)
    assert run(*args, "--out", tmp_path / "crash") == 130
    monkeypatch.setattr(shards, "write_shard", write)
    assert len(json.loads((tmp_path / "crash" / "manifest.json").read_text())["shards"]) == 4
    assert run(*args, "--out", tmp_path / "crash") == 0
    assert listing(tmp_path / "crash") == clean

    # a damaged shard and a lost one: both, and what follows them, are written again
    out = tmp_path / "clean"
    names = sorted(p.name for p in out.glob("*_train_*"))
    (out / names[-1]).unlink()
    data = bytearray((out / names[2]).read_bytes())
    data[2000] ^= 1
    (out / names[2]).write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"{names[2]}: missing or damaged"):
        prep.prepare(args[:3], out, shard_tokens=500, workers=2, progress=False)
    assert listing(out) == clean
    assert run(*args, "--out", out) == 0 and listing(out) == clean  # complete: nothing to do
    assert run(*args[:-1], 400, "--out", out) == 2  # other settings


def test_parts_cover_all_inputs(tmp_path, enc):
    docs = documents(40, seed=4)
    files = [write_jsonl(tmp_path / f"{k}.jsonl", docs[k * 10:(k + 1) * 10]) for k in range(4)]
    out = tmp_path / "out"
    for part in ("0/2", "1/2"):
        assert run(*files, "--out", out, "--part", part, "--shard-tokens", 600, "--val-tokens", 200) == 0
    p0, p1 = (json.loads((out / f"manifest-part{i}of2.json").read_text()) for i in range(2))
    assert [i["path"] for i in p0["settings"]["inputs"]] == [str(files[0]), str(files[2])]
    assert [i["path"] for i in p1["settings"]["inputs"]] == [str(files[1]), str(files[3])]
    assert p0["shards"][0]["file"] == "corpus-part0of2_val_000000.bin" and p0["totals"]["val_tokens"] == 200
    assert p1["shards"][0]["file"] == "corpus-part1of2_train_000000.bin" and p1["totals"]["val_tokens"] == 0
    got = {i: np.concatenate([np.fromfile(out / r["file"], np.uint16, offset=1024) for r in m["shards"]])
           for i, m in enumerate((p0, p1))}
    np.testing.assert_array_equal(got[0], reference(enc, docs[0:10] + docs[20:30]))
    np.testing.assert_array_equal(got[1], reference(enc, docs[10:20] + docs[30:40]))
    assert len(shards.resolve(out, "val")) == 1
    assert run(files[0], "--out", tmp_path / "o2", "--part", "1/2") == 2  # one file, two parts


@pytest.mark.parametrize("setup, args, message", [
    (None, ["missing.jsonl"], "missing.jsonl: no such file or directory"),
    ("x.csv", ["x.csv"], "x.csv: unknown input type"),
    ("bad.jsonl", ["bad.jsonl"], r"bad.jsonl:3: malformed JSON"),
    ("bad.jsonl", ["bad.jsonl", "--text-field", "body"], r"bad.jsonl:1: no text field 'body'"),
    ("t.parquet", ["t.parquet"], r"t.parquet: no column 'text' \(columns: body"),
    ("foreign", ["a.txt"], "holds .bin files that jaxformer prepare did not write"),
    ("emptydir", ["emptydir"], "emptydir: a directory with no .txt"),
    ("a.txt", ["a.txt", "--tokenizer", "nowhere"], "--tokenizer nowhere: neither gpt2 nor a tokenizer directory"),
])
def test_bad_input_errors(tmp_path, capsys, monkeypatch, setup, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": ')
    (tmp_path / "emptydir").mkdir()
    if setup == "t.parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": ["a"]}), tmp_path / "t.parquet")
    out = tmp_path / "out"
    if setup == "foreign":
        out.mkdir()
        shards.write_shard(out / "fineweb_train_000001.bin", [1, 2], 1)
    assert commands.main(["prepare", *args, "--out", str(out), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_hub_offline_says_what_to_do(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "jaxformer", "prepare", "--hub", "HuggingFaceFW/fineweb-edu",
                           "--hub-config", "sample-10BT", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: could not reach the Hugging Face hub for data set "
                                  "'HuggingFaceFW/fineweb-edu'"), proc.stderr
    assert "save_to_disk" in proc.stderr and "Traceback" not in proc.stderr
