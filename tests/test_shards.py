"""llm.c-format token shards, the constant-memory sampler over them, and the prefetcher: against an
independent writer and reader (llm.c's ``write_datafile``, modded-nanogpt's ``_load_data_shard``)."""

import ast
import inspect
import itertools
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxformer.data import sampler, shards
from jaxformer.data.prefetch import Prefetcher
from jaxformer.data.sampler import ShardWindows, permute, round_keys
from jaxformer.errors import InputError


def write_datafile(path, tokens, magic=20240520, version=1, dtype=np.uint16, count=None):
    """llm.c's dev/data/data_common.py write_datafile, written out independently."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype).tobytes())


def load_data_shard(path):
    """modded-nanogpt's reader: the header by np.fromfile, its checks, then the uint16 tokens."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520 and header[1] == 1
    with open(path, "rb") as f:
        f.seek(256 * 4)
        tokens = np.fromfile(f, dtype=np.uint16)
    assert len(tokens) == header[2]
    return tokens


def test_reads_llmc_shards(tmp_path):
    rng = np.random.default_rng(0)
    small, big = rng.integers(0, 50257, 1000), rng.integers(0, 200_000, 500)
    write_datafile(tmp_path / "fineweb_val_000000.bin", small)
    write_datafile(tmp_path / "fineweb_train_000001.bin", small[::-1])
    write_datafile(tmp_path / "fineweb_train_000002.bin", big, version=2, dtype=np.uint32)
    write_datafile(tmp_path / "llama_train_000003.bin", big, magic=20240801, version=7, dtype=np.uint32)
    tokens = shards.read_shard(tmp_path / "fineweb_val_000000.bin")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, small)
    np.testing.assert_array_equal(shards.read_shard(tmp_path / "fineweb_train_000002.bin"), big)
    np.testing.assert_array_equal(shards.read_shard(tmp_path / "llama_train_000003.bin"), big)
    train = shards.resolve(tmp_path, "train")
    assert [p.name for p in train] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin",
                                       "llama_train_000003.bin"]
    assert [p.name for p in shards.resolve(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    assert [p.name for p in shards.resolve(tmp_path / "fineweb_*_00000[01].bin", "train")] == [
        "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty holds no val shards"):
        shards.resolve(tmp_path / "empty", "val")
    with pytest.raises(InputError, match="nothing: no such file"):
        shards.resolve(tmp_path / "nothing", "val")


def test_written_shards_read_by_llmc_reader(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 50257, 3000)
    digest = shards.write_shard(tmp_path / "x_train_000001.bin", tokens, shards.version_for(50257))
    np.testing.assert_array_equal(load_data_shard(tmp_path / "x_train_000001.bin"), tokens)
    assert digest == shards.sha256(tmp_path / "x_train_000001.bin")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temporary file was renamed
    assert shards.version_for(65536) == 1 and shards.version_for(65537) == 2
    shards.write_shard(tmp_path / "big.bin", [0, 70_000], 2)
    assert shards.read_shard(tmp_path / "big.bin").tolist() == [0, 70_000]
    with pytest.raises(InputError, match="do not fit version 1"):
        shards.write_shard(tmp_path / "bad.bin", np.array([70_000]), 1)


@pytest.mark.parametrize("damage, message", [
    (dict(magic=1234), "magic 1234"),
    (dict(version=3), "unknown shard version 3"),
    (dict(count=120), "truncated shard: the header says 120 tokens"),
    (dict(count=80), "trailing bytes: the header says 80 tokens"),
])
def test_malformed_shards_named(tmp_path, damage, message):
    path = tmp_path / "bad_train_000000.bin"
    write_datafile(path, np.arange(100), **damage)
    with pytest.raises(InputError, match=message) as e:
        shards.read_shard(path)
    assert str(path) in str(e.value)
    with pytest.raises(InputError, match="bad_train_000000.bin"):
        ShardWindows([path], 8)


def test_header_cut_short(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\0" * 100)
    with pytest.raises(InputError, match=r"short.bin: truncated shard: 100 bytes"):
        shards.read_shard(tmp_path / "short.bin")


def make_shards(tmp_path, sizes, seed=0):
    """Shards of random tokens of the given lengths; returns (paths, token arrays)."""
    rng = np.random.default_rng(seed)
    toks = [rng.integers(0, 50257, n) for n in sizes]
    paths = [tmp_path / f"d_train_{i:06d}.bin" for i in range(len(sizes))]
    for p, t in zip(paths, toks):
        write_datafile(p, t)
    return paths, toks


def test_windows_within_shards_every_one_once_per_epoch(tmp_path):
    T = 8
    paths, toks = make_shards(tmp_path, [50, 9, 8, 100])  # 6, 1, 0, 12 windows
    w = ShardWindows(paths, T)
    expected = np.stack([t[i * T:i * T + T + 1] for t in toks for i in range(max(0, (len(t) - 1) // T))])
    assert len(w) == len(expected) == 19
    np.testing.assert_array_equal(w.take(np.arange(len(w))), expected)  # no window spans two shards
    for epoch in range(3):
        order = w.sample_order(5, epoch * 19, 19)
        assert sorted(order) == list(range(19))
    assert w.sample_order(5, 0, 19).tolist() != w.sample_order(5, 19, 19).tolist()
    assert w.sample_order(5, 0, 19).tolist() != w.sample_order(6, 0, 19).tolist()
    # a batch across an epoch boundary: the tail of epoch 0, then the head of epoch 1
    batch = w.train_batch(5, 2, 2, 4)  # samples 16..23
    np.testing.assert_array_equal(batch.reshape(-1, T + 1), expected[w.sample_order(5, 16, 8)])
    assert batch.shape == (2, 4, T + 1) and batch.dtype == np.int32


def test_batch_is_a_pure_function_of_seed_and_step(tmp_path):
    paths, _ = make_shards(tmp_path, [3000, 2000, 5000])
    a, b = ShardWindows(paths, 16), ShardWindows(paths, 16)
    steps = [0, 7, 3, 40, 1, 7]
    first = {s: a.train_batch(1, s, 2, 3) for s in steps}
    for s in reversed(steps):  # another instance, another order of calls
        np.testing.assert_array_equal(b.train_batch(1, s, 2, 3), first[s])
    full = a.train_batch(1, 9, 2, 4)
    np.testing.assert_array_equal(a.train_batch(1, 9, 2, 4, rows=slice(1, 3)), full[:, 1:3])
    parts = [a.train_batch(1, 9, 2, 4, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    with pytest.raises(InputError, match="batch_size"):
        a.train_batch(1, 9, 2, 3, process_index=0, process_count=2)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32), epoch=st.integers(0, 1000))
def test_permute_is_a_bijection(n, seed, epoch):
    image = permute(np.arange(n), n, round_keys(seed, epoch))
    assert image.dtype == np.int64 and image.shape == (n,)
    np.testing.assert_array_equal(np.sort(image), np.arange(n))


def test_train_batch_memory_is_independent_of_the_corpus(tmp_path):
    """20M windows (a sparse 40 MB shard, seq_len 1): a batch allocates O(batch), never O(windows)."""
    n_tokens = 20_000_001
    path = tmp_path / "huge_train_000000.bin"
    with open(path, "wb") as f:
        f.write(shards.header(n_tokens, 1).tobytes())
        f.truncate(shards.HEADER_BYTES + 2 * n_tokens)
    w = ShardWindows([path], 1)
    assert len(w) == 20_000_000
    calls = {getattr(node.func, "attr", getattr(node.func, "id", None))
             for node in ast.walk(ast.parse(inspect.getsource(sampler))) if isinstance(node, ast.Call)}
    assert not calls & {"permutation", "shuffle", "argsort", "choice"}  # nothing orders all n windows
    w.train_batch(0, 0, 1, 8)
    tracemalloc.start()
    for step in (1, 2_500_000, 10**9):  # the last one in epoch 400
        w.train_batch(0, step, 4, 8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100_000, peak  # a permutation of the windows would be 160 MB


def test_eval_batches_in_order(tmp_path):
    paths, toks = make_shards(tmp_path, [81, 41])  # 10 + 5 windows of 8
    w = ShardWindows(paths, 8)
    batches = w.eval_batches(4, 10)
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[2][1], toks[0][72:81])
    np.testing.assert_array_equal(batches[2][2], toks[1][:9])
    with pytest.raises(InputError, match="fewer than one batch of 16"):
        w.eval_batches(16, 10)
    with pytest.raises(InputError, match="make no window"):
        ShardWindows(paths[1:], 64)


def test_prefetcher_order_bound_errors_and_close():
    calls = []

    def fn(step):
        calls.append(step)
        if step == 5:
            raise ValueError("step 5 failed")
        return step * 10

    p = Prefetcher(fn, range(10), depth=2)
    assert [next(p) for _ in range(3)] == [0, 10, 20]
    time.sleep(0.2)
    assert max(calls) <= 2 + 2 + 1  # at most `depth` waiting, one being built
    assert next(p) == 30 and next(p) == 40
    with pytest.raises(ValueError, match="step 5 failed"):
        next(p)
    with pytest.raises(StopIteration):
        next(p)
    with Prefetcher(lambda s: s, itertools.count(), depth=3) as endless:
        assert next(endless) == 0
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert list(Prefetcher(lambda s: -s, range(4))) == [0, -1, -2, -3]
