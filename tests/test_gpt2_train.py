"""GPT-2 training: optimizer and loss against float64 numpy, data order, resume bitwise, kill -9 during
a checkpoint write, SIGTERM, NaN, and equal losses on an 8-device mesh and across 2 processes.

One reference run (40 steps, 1 device, in this process) anchors the comparisons; the runs that need
their own process (8 virtual devices, 2 processes, signals) are subprocesses, kept few.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sigterm import sigterm_after_logging

from jaxformer.commands.train_gpt2 import main  # jaxformer train gpt2, in this process
from jaxformer.gpt2 import data as gdata
from jaxformer.gpt2.config import GPT2Config, preset
from jaxformer.gpt2.model import GPT2, init_params
from jaxformer.gpt2.train import GPT2RunConfig, make_loss_fn
from jaxformer.train.checkpoints import Checkpoints
from jaxformer.train.flops import gpt2_flops_per_token
from jaxformer.train.optim import decay_mask, make_optimizer, make_schedule

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "jaxformer", "train", "gpt2"]
# 40 updates with a cosine over 40; runs that stop at 20 keep schedule_steps=40.
FLAGS = ["--tokenizer", "bpe:300", "--seq-len", "32", "--batch-size", "8", "--steps", "40", "--warmup", "5",
         "--lr", "3e-3", "--log-every", "1", "--eval-every", "20", "--eval-batches", "2", "--ckpt-every", "20",
         "--sample-tokens", "0", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text((data_root / "tinyshakespeare" / "input.txt").read_text()[:40000])
    return path


def cli(corpus, out, *extra) -> list[str]:
    return ["--data", str(corpus), "--out", str(out), *FLAGS, *extra]




def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def restore_state(out: Path, step: int | None = None):
    ckpt = Checkpoints(out)
    try:
        return ckpt.restore(step=step)
    finally:
        ckpt.close()


def subprocess_env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The 40-step single-device run: (out dir, {step: loss}, final params as numpy)."""
    out = tmp_path_factory.mktemp("reference")
    assert main(cli(corpus, out, "--sample-tokens", "8", "--export-hf", str(out / "hf"))) == 0
    return out, losses(out / "metrics.jsonl"), jax.device_get(restore_state(out, 40)["params"])


# --- numerics against independent references ---------------------------------------------------

def test_decay_mask_names():
    params = jax.eval_shape(lambda: init_params(preset("tiny", vocab_size=64, tie_word_embeddings=False),
                                                jax.random.key(0)))
    mask = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert {k for k, v in mask.items() if v} == {
        "h/attn/c_attn/kernel", "h/attn/c_proj/kernel", "h/mlp/c_fc/kernel", "h/mlp/c_proj/kernel", "lm_head"}
    assert not mask["wte/embedding"] and not mask["h/ln_1/scale"] and not mask["h/attn/c_attn/bias"]


def np_adamw(params, grads_seq, mask, lrs, b1, b2, eps, wd, clip):
    """float64 clip-by-global-norm + AdamW (Loshchilov & Hutter, decoupled decay), written out."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g.values()))
        scale = min(1.0, clip / norm)
        for k in p:
            gk = g[k].astype(np.float64) * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            update = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            p[k] = p[k] - lr * (update + (wd * p[k] if mask[k] else 0.0))
    return p


def test_adamw_matches_float64_numpy():
    run = GPT2RunConfig(lr=1e-2, warmup=2, steps=6, schedule_steps=6, weight_decay=0.1, clip_norm=0.5)
    schedule = make_schedule(run)
    opt = make_optimizer(run, schedule)
    rng = np.random.default_rng(0)
    params = {"wte": {"embedding": rng.normal(size=(5, 4)).astype(np.float32)},
              "h": {"c_fc": {"kernel": rng.normal(size=(2, 4, 3)).astype(np.float32),
                             "bias": rng.normal(size=(2, 3)).astype(np.float32)}}}
    grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(5)]
    state, p = opt.init(params), params
    for g in grads_seq:
        upd, state = opt.update(g, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, upd)
    flat = lambda t: {"/".join(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    want = np_adamw(flat(params), [flat(g) for g in grads_seq], flat(decay_mask(params)),
                    [float(schedule(i)) for i in range(5)], 0.9, 0.95, 1e-8, 0.1, 0.5)
    for k, x in flat(p).items():
        np.testing.assert_allclose(x, want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # warm-up then cosine: 0 at step 0, the peak at the end of warm-up, 10% of it at the end
    np.testing.assert_allclose([schedule(0), schedule(2), schedule(6)], [0.0, 1e-2, 1e-3], rtol=1e-6)


def test_loss_fn_matches_numpy_cross_entropy():
    config = preset("tiny", vocab_size=50, n_positions=16)
    params = init_params(config.replace(initializer_range=0.5), jax.random.key(1))
    windows = np.random.default_rng(0).integers(0, 50, (3, 9)).astype(np.int32)
    total, (n, _) = make_loss_fn(config, deterministic=True)(params, jnp.asarray(windows), None)
    loss = total / n
    logits = np.asarray(GPT2(config).apply({"params": params}, windows[:, :-1])[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
    assert n == 24
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_master_weights_and_loss():
    config = preset("tiny", vocab_size=50, n_positions=16, dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    loss, _ = make_loss_fn(config, deterministic=True)(params, jnp.zeros((2, 9), jnp.int32), None)
    assert loss.dtype == jnp.float32


def test_flops_per_token_counts_matmul_weights():
    config = preset("gpt2")
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    kernels = sum(np.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(shapes)
                  if path[-1].key == "kernel")
    # matmul weights: the layers' kernels + the (tied) output projection; biases/LN add 6 FLOPs each
    small = sum(np.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(shapes)
                if path[-1].key in ("bias", "scale"))
    want = 6 * (kernels + config.vocab_size * config.n_embd + small) + 12 * 12 * 768 * 1024
    assert gpt2_flops_per_token(config, 1024) == want
    assert 0.85e9 < want < 0.9e9  # ~ 6 * 124M + attention, as usually quoted


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch():
    """Without dropout, 2 micro-batches of 4 give the update of one batch of 8 (the shared step)."""
    from jaxformer.train import sharding as sh
    from jaxformer.train.step import TrainState, make_train_step

    config = preset("tiny", vocab_size=64, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    opt = optax.sgd(1.0)  # the update is the gradient itself (Adam would amplify rounding in ~0 gradients)
    mesh = sh.make_mesh("data=1", jax.devices()[:1])
    state = TrainState.create(init_params(config, jax.random.key(0)), opt, jax.random.PRNGKey(0))
    state_sh = sh.state_shardings(mesh, state)
    steps = {accum: make_train_step(make_loss_fn(config), opt, grad_accum=accum, state_shardings=state_sh,
                                    batch_sharding=sh.batch_sharding(mesh, int(accum > 1)))
             for accum in (1, 2)}
    windows = np.random.default_rng(0).integers(0, 64, (8, 9)).astype(np.int32)
    copy = lambda: jax.tree.map(jnp.array, state)  # noqa: E731  (the step donates its input)
    big, m_big = steps[1](copy(), windows)
    acc, m_acc = steps[2](copy(), windows.reshape(2, 4, 9))
    assert float(m_acc["tokens"]) == float(m_big["tokens"]) == 64
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_acc["grad_norm"], m_big["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), acc.params, big.params)


# --- data ---------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(n_tokens=st.integers(20, 400), seq_len=st.integers(2, 16), seed=st.integers(0, 5),
       batch=st.integers(1, 4), accum=st.integers(1, 3))
def test_windows_order_is_a_permutation_per_epoch(n_tokens, seq_len, seed, batch, accum):
    tokens = np.arange(n_tokens, dtype=np.int32)
    if (n_tokens - 1) // seq_len < 1:
        return
    w = gdata.Windows(tokens, seq_len)
    order = w.sample_order(seed, 0, max(3 * len(w), 3 * accum * batch, 12))
    for e in range(3):
        assert sorted(order[e * len(w):(e + 1) * len(w)]) == list(range(len(w)))
    np.testing.assert_array_equal(w.sample_order(seed, 5, 7), order[5:12])  # resumable from any sample
    b = w.train_batch(seed, 2, accum, batch)
    assert b.shape == (accum, batch, seq_len + 1)
    np.testing.assert_array_equal(b[..., 1:] - b[..., :-1], 1)  # consecutive tokens
    np.testing.assert_array_equal(b[..., 0] // seq_len, order[2 * accum * batch:3 * accum * batch].reshape(accum, batch))


def test_read_split_and_tokenize(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one two"}\n\n{"text": "three"}\n')
    (tmp_path / "b.txt").write_text("four five six")
    docs = gdata.read_texts([tmp_path / "a.jsonl", tmp_path / "b.txt"])
    assert docs == ["one two", "three", "four five six"]
    tok = gdata.train_tokenizer(docs, "word", 20)
    ids = gdata.tokenize(tok, docs)
    assert tok.decode(ids[:3]) == "one two <|endoftext|>" and ids[-1] == tok.eos_id
    train_part, val = gdata.split(np.arange(100), 0.1)
    assert len(val) == 10 and val[0] == 90 and len(train_part) == 90
    with pytest.raises(ValueError, match="text_field|field 'body'"):
        gdata.read_texts([tmp_path / "a.jsonl"], "body")


# --- runs ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_reference_run_learns_logs_and_exports(reference):
    out, ref, _ = reference
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(ref) == list(range(1, 41))
    assert ref[40] < ref[1] - 0.5
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert np.isclose(evals[-1]["val_ppl"], np.exp(evals[-1]["val_loss"]))
    assert isinstance(evals[-1]["sample"], str) and evals[-1]["sample"]
    throughput = [(r["tokens_per_s"], r["mfu"]) for r in records if "tokens_per_s" in r]
    assert throughput[0] == (None, None)  # step 1 is compilation
    assert all(t > 0 and 0 < m < 1 for t, m in throughput[1:])
    assert (out / "curves.png").stat().st_size > 0
    best = json.loads((out / "best.json").read_text())  # the lowest validation loss
    assert best == dict(metric="val_loss", value=min(r["val_loss"] for r in evals),
                        step=min(evals, key=lambda r: r["val_loss"])["step"])
    # the exported HF model gives the same logits as ours
    import torch
    import transformers
    config = GPT2Config.load(out / "config.json")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out / "hf").eval()
    tokens = np.arange(10, dtype=np.int32)[None]
    want = GPT2(config).apply({"params": reference[2]}, tokens)[0]
    got = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.detach().numpy()
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)


@pytest.mark.slow
def test_kill9_during_checkpoint_write_then_resume_is_bitwise(corpus, reference, tmp_path):
    """kill -9 inside the write of checkpoint 40 (files written, not yet committed): checkpoint 20
    still restores, and 20 + resume + 20 steps equal the 40 straight steps bitwise."""
    out = tmp_path / "run"
    child = textwrap.dedent(f"""
        import os, signal, sys
        from orbax.checkpoint._src.path import atomicity
        real = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self):  # commit of checkpoints/40: all its files are written
            if 'final="40"' in repr(self):
                os.kill(os.getpid(), signal.SIGKILL)
            return await real(self)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
        from jaxformer.commands.train_gpt2 import main
        main({cli(corpus, out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", child], env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(".orbax-checkpoint-tmp" in p.name for p in (out / "checkpoints").iterdir())  # the torn write
    assert Checkpoints(out).latest_step() == 20

    assert main(["--out", str(out), "--resume", "--no-progress"]) == 0
    ref_out, ref, ref_params = reference
    got = jax.device_get(restore_state(out, 40)["params"])
    jax.tree.map(np.testing.assert_array_equal, got, ref_params)
    assert losses(out / "metrics.jsonl") == ref


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(corpus, tmp_path):
    out = tmp_path / "run"
    step, _ = sigterm_after_logging([*COMMAND, *cli(corpus, out, "--steps", "100000", "--ckpt-every",
                                                                  "100000")], out, env=subprocess_env())
    assert Checkpoints(out).latest_step() == step >= 3


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # a huge learning rate: step 1's update overflows the weights, step 2's loss is not finite
    assert main(cli(corpus, out, "--lr", "1e30", "--warmup", "0", "--ckpt-every", "1")) == 1
    err = capsys.readouterr().err
    assert "at step 2: stopping" in err and "last good checkpoint is step 1" in err
    assert Checkpoints(out).latest_step() == 1


@pytest.mark.slow
def test_refuses_to_overwrite_a_run_without_resume(corpus, reference, capsys):
    assert main(cli(corpus, reference[0])) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_and_the_run_redone_bitwise(reference, tmp_path, capsys):
    """A real run's newest checkpoint (40) truncated: --resume warns naming it, sets it aside,
    continues from 20 and ends with the reference's parameters; with every checkpoint damaged it
    refuses, naming each, and trains nothing, then and at the next try."""
    ref_out, ref, ref_params = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out, ignore=shutil.ignore_patterns("hf"))
    victim = max((out / "checkpoints" / "40").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    with victim.open("r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    assert main(["--out", str(out), "--resume", "--export-hf", "none", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint step 40 is damaged and skipped ({victim} has" in err
    assert "resuming at step 20" in err and (out / "damaged" / "40").is_dir()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restore_state(out, 40)["params"]), ref_params)
    assert losses(out / "metrics.jsonl") == ref

    for step in (20, 40):  # now damage both
        data = max((out / "checkpoints" / str(step)).rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
        data.write_bytes(b"\0" * data.stat().st_size)
    assert main(["--out", str(out), "--resume", "--steps", "60", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: no intact checkpoint in" in err and "step 40:" in err and "step 20:" in err
    assert "does not match its checksum" in err and "Traceback" not in err
    assert main(["--out", str(out), "--resume", "--steps", "60", "--no-progress"]) == 2  # again: still refused
    err = capsys.readouterr().err
    assert f"damaged ones were set aside in {out / 'damaged'}" in err and "Traceback" not in err
    assert losses(out / "metrics.jsonl") == ref  # the log kept


# --- sharded and multi-process runs -----------------------------------------------------------------

@pytest.mark.slow
def test_mesh_data4_fsdp2_matches_one_device_and_restores_on_another_mesh(corpus, reference, tmp_path):
    """8 virtual CPU devices: data=4,fsdp=2 losses equal the 1-device run within 1e-5 over 20
    steps; its step-10 checkpoint restores on fsdp=8 and continues with the same losses."""
    run = dict(data=(str(corpus),), tokenizer="bpe:300", seq_len=32, batch_size=8, steps=20, schedule_steps=40,
               warmup=5, lr=3e-3, log_every=1, eval_every=20, eval_batches=2, ckpt_every=10, sample_tokens=0)
    child = textwrap.dedent(f"""
        import shutil
        from pathlib import Path
        import jax
        from jaxformer.gpt2.train import GPT2Task
        from jaxformer.train.loop import train
        assert jax.device_count() == 8
        a, b = Path({str(tmp_path / 'a')!r}), Path({str(tmp_path / 'b')!r})
        r = train(GPT2Task, a, run={run!r}, mesh="data=4,fsdp=2", progress=False)
        wte = r["state"].params["wte"]["embedding"]
        print("SPEC", wte.sharding.spec, len(wte.addressable_shards))
        shutil.copytree(a, b)
        shutil.rmtree(b / "checkpoints" / "20")
        r = train(GPT2Task, b, mesh="fsdp=8", resume=True, progress=False)
        print("RESUMED", r["records"][0]["step"])
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SPEC P('fsdp', None) 8" in proc.stdout  # wte [300, 64]: the vocabulary split over fsdp
    assert "RESUMED 11" in proc.stdout
    _, ref, _ = reference
    for run in ("a", "b"):
        got = losses(tmp_path / run / "metrics.jsonl")
        assert sorted(got) == list(range(1, 21))
        np.testing.assert_allclose([got[s] for s in range(1, 21)], [ref[s] for s in range(1, 21)], rtol=0, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(corpus, reference, tmp_path):
    """2 processes on localhost (jax.distributed.initialize with a local coordinator, one CPU device
    each, mesh data=2): same losses as the 1-process run; the shared checkpoint restores."""
    out, port = tmp_path / "run", free_port()
    flags = cli(corpus, out, "--steps", "20", "--schedule-steps", "40", "--ckpt-every", "10", "--mesh", "data=2",
                "--coordinator", f"localhost:{port}", "--num-processes", "2")
    procs = [subprocess.Popen([*COMMAND, *flags, "--process-id", str(i)], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "process 1/2" in logs[1]
    got, (_, ref, _) = losses(out / "metrics.jsonl"), reference
    assert sorted(got) == list(range(1, 21))
    np.testing.assert_allclose([got[s] for s in range(1, 21)], [ref[s] for s in range(1, 21)], rtol=0, atol=1e-5)
    assert Checkpoints(out).latest_step() == 20


@pytest.mark.slow
def test_fine_tune_from_exported_hf_in_bf16(corpus, reference, tmp_path):
    """--init from the reference run's HF export (its tokenizer comes along), bf16 compute: the
    first loss is the trained model's, not a fresh one's."""
    ref_out, ref, _ = reference
    out = tmp_path / "ft"
    assert main(cli(corpus, out, "--init", str(ref_out / "hf"), "--model.dtype", "bfloat16", "--steps", "3",
                    "--eval-every", "3", "--ckpt-every", "3")) == 0
    got = losses(out / "metrics.jsonl")
    assert abs(got[1] - ref[40]) < 0.15 < ref[1] - got[1]
    assert GPT2Config.load(out / "config.json").dtype == "bfloat16"
    assert (out / "tokenizer.json").read_text() == (ref_out / "tokenizer.json").read_text()
