"""Pretraining from llm.c token shards: shards written here by an independent writer (llm.c's
layout, by hand), trained from with ``jaxformer train gpt2 --data DIR``, resumed bitwise across
shard and epoch boundaries, batches checked against an independent reader, HellaSwag in the loop."""

import json

import jax
import numpy as np
import pytest

from jaxformer.commands import main
from jaxformer.train.checkpoints import Checkpoints

pytestmark = pytest.mark.slow  # end-to-end training runs

SHARD_TOKENS = (700, 650, 800)  # three training shards: batches cross shard boundaries, epochs end at step 32


def write_llmc_shard(path, tokens) -> None:
    """llm.c's ``write_datafile``: 256 int32 (magic 20240520, version 1, count), then uint16 tokens."""
    header = np.zeros(256, np.int32)
    header[:3] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, np.uint16).tobytes())


def read_llmc_shard(path) -> np.ndarray:
    header = np.fromfile(path, np.int32, 256)
    assert header[0] == 20240520 and header[1] == 1
    return np.fromfile(path, np.uint16, offset=1024)[: header[2]]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    write_llmc_shard(d / "tiny_val_000000.bin", rng.integers(0, 50257, 600))
    for i, n in enumerate(SHARD_TOKENS):
        write_llmc_shard(d / f"tiny_train_{i + 1:06d}.bin", rng.integers(0, 50257, n))
    return d


def args(shards, out, *extra) -> list[str]:
    return ["train", "gpt2", "--data", str(shards), "--out", str(out), "--seq-len", "16", "--batch-size", "4",
            "--steps", "40", "--log-every", "5", "--eval-every", "20", "--sample-tokens", "0", "--eval-batches", "2",
            "--model.n-layer", "1", "--no-progress", "--set", "schedule=constant", *extra]


def params_at(out, step):
    ckpt = Checkpoints(out)
    try:
        return jax.device_get(ckpt.restore(step=step)["params"])
    finally:
        ckpt.close()


def test_train_from_llmc_shards_and_resume_bitwise_across_shards(shard_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args(shard_dir, straight)) == 0
    assert not (straight / "data").exists()  # shards are read where they are
    assert main(args(shard_dir, resumed, "--steps", "20")) == 0
    assert main(["train", "gpt2", "--out", str(resumed), "--resume", "--steps", "40", "--no-progress"]) == 0
    jax.tree.map(np.testing.assert_array_equal, params_at(straight, 40), params_at(resumed, 40))
    lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(5, 41, 5))


def test_batches_are_windows_of_the_shards_and_each_epoch_visits_every_window(shard_dir, tmp_path):
    from jaxformer.gpt2.data import open_splits
    from jaxformer.gpt2.train import GPT2RunConfig

    run = GPT2RunConfig(data=(str(shard_dir),), seq_len=16, batch_size=4)
    train, val = open_splits(run, tmp_path)
    streams = [read_llmc_shard(shard_dir / f"tiny_train_{i + 1:06d}.bin") for i in range(len(SHARD_TOKENS))]
    windows = {tuple(s[j * 16: j * 16 + 17]) for s in streams for j in range((len(s) - 1) // 16)}
    assert len(train) == len(windows) == sum((n - 1) // 16 for n in SHARD_TOKENS)
    epoch = [tuple(w) for step in range(len(train) // 4) for w in train.train_batch(0, step, 1, 4)[0]]
    assert set(epoch) <= windows and len(set(epoch)) == len(epoch)  # no window twice within an epoch
    np.testing.assert_array_equal(train.train_batch(3, 7, 2, 4), train.train_batch(3, 7, 2, 4))  # pure in (seed, step)
    val_stream = read_llmc_shard(shard_dir / "tiny_val_000000.bin")
    np.testing.assert_array_equal(val.eval_batches(4, 1)[0][1], val_stream[16:33])


def test_hellaswag_in_the_loop_is_logged_and_plotted(shard_dir, tmp_path):
    rng = np.random.default_rng(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "quickly", "home"]
    def text(n):
        return " ".join(rng.choice(words, n))
    items = [dict(ind=i, ctx=text(8), endings=[text(4) for _ in range(4)], label=int(rng.integers(4)),
                  activity_label="x", split="val", split_type="indomain", source_id="s", ctx_a="", ctx_b="")
             for i in range(6)]
    data = tmp_path / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    out = tmp_path / "run"
    assert main(args(shard_dir, out, "--set", "hellaswag_every=20", "--set", f"hellaswag_data={data}")) == 0
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert all(0 <= r["hellaswag_acc"] <= 1 and r["hellaswag_acc_norm"] in {k / 6 for k in range(7)} for r in evals)
    assert (out / "curves.png").stat().st_size > 0


def test_shard_data_refuses_a_trained_tokenizer_and_missing_validation(shard_dir, tmp_path, capsys):
    assert main(args(shard_dir, tmp_path / "a", "--tokenizer", "bpe:300")) == 2
    assert "holds token shards: give the tokenizer they were prepared with" in capsys.readouterr().err
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    write_llmc_shard(only_train / "x_train_000001.bin", np.arange(100))
    assert main(args(only_train, tmp_path / "b")) == 2
    assert "holds no val shards" in capsys.readouterr().err
