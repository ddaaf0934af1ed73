"""LoRA against PEFT on random-weight Hugging Face GPT-2 bases: logits both ways, a training
step's adapter gradients against torch autograd, the merged export against ``merge_and_unload``,
a PEFT-trained adapter here, the frozen base, bitwise resume, taps, bf16, an int8 base, bad input.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft as hf_peft
import pytest
import torch
import transformers

from jaxformer.commands import main as jaxformer
from jaxformer.gpt2 import lora, peft
from jaxformer.gpt2.model import GPT2
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.gpt2.tokenizer import GPT2Tokenizer
from jaxformer.gpt2.train import make_loss_fn
from jaxformer.nn import taps
from jaxformer.train.checkpoints import Checkpoints
from jaxformer.train.step import TrainState, make_train_step

ALL = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# float32 against float32: "flags"'s base alone differs from HF by 1.1e-5 (reorder_and_upcast_attn).
LOGIT_TOL = {"tiny": 1e-5, "relu": 1e-5, "flags": 2e-5}


def peft_model(path, targets=ALL, r=4, alpha=16, rslora=False, seed=1, scale=0.05):
    """PEFT on the HF model in ``path`` with a random adapter (A and B both nonzero; ``scale=None``:
    PEFT's initialisation), eval mode."""
    base = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager", **NO_DROPOUT)
    model = hf_peft.get_peft_model(base, hf_peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                            use_rslora=rslora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and scale is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.double().numpy()


def random_adapter(config, spec, seed=0, scale=0.05):
    """An adapter with every matrix normal(0, scale), float32."""
    leaves, tree = jax.tree.flatten(lora.abstract(config, spec))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [np.asarray(jax.random.normal(k, x.shape) * scale) for k, x in zip(keys, leaves)])


def our_logits(config, params, ids, adapter=None, spec=None):
    adapters = None if adapter is None else lora.model_input(adapter, spec, config)
    return np.asarray(GPT2(config).apply({"params": params}, ids, lora=adapters)[0], np.float64)


def random_ids(config, shape, seed=0):
    return np.random.RandomState(seed).randint(0, config.vocab_size, shape).astype(np.int32)


def cli(*argv) -> int:
    return jaxformer([str(a) for a in argv])


# --- the adapter's arithmetic against PEFT -------------------------------------------------------

@pytest.mark.parametrize("name,rslora,scan", [("tiny", False, True), ("flags", True, False), ("relu", False, True)])
def test_logits_match_peft_both_ways(hf_dir, tmp_path, name, rslora, scan):
    """A random PEFT adapter read here, and a random adapter of ours read by PeftModel.from_pretrained,
    give PEFT's logits."""
    path, _ = hf_dir(name)
    config, params, _ = load_pretrained(path, scan_layers=scan)
    ids = random_ids(config, (2, 20))
    theirs = peft_model(path, rslora=rslora)
    theirs.save_pretrained(tmp_path / "theirs")
    spec, adapter = peft.load_peft(tmp_path / "theirs", config)
    assert spec == lora.LoRASpec(4, 16.0, ALL, rslora)
    want = torch_logits(theirs, ids)
    assert np.abs(want - our_logits(config, params, ids)).max() > 0.5  # the adapter matters
    np.testing.assert_allclose(our_logits(config, params, ids, adapter, spec), want, atol=LOGIT_TOL[name], rtol=0)

    spec = lora.LoRASpec(4, 8.0, ("c_fc", "attn.c_proj"), rslora)
    mine = random_adapter(config, spec)
    peft.save_peft(tmp_path / "mine", mine, spec, base=str(path))
    base = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager")
    loaded = hf_peft.PeftModel.from_pretrained(base, tmp_path / "mine").eval()
    np.testing.assert_allclose(our_logits(config, params, ids, mine, spec), torch_logits(loaded, ids),
                               atol=LOGIT_TOL[name], rtol=0)


def test_train_step_gradients_match_peft_autograd(hf_dir):
    """One jitted train step (SGD, lr 1: the update is minus the gradient) on the frozen base:
    its loss and adapter gradients equal PEFT + torch autograd on the same batch and loss."""
    path, _ = hf_dir("flags")
    config, base, _ = load_pretrained(path, **NO_DROPOUT)
    theirs = peft_model(path, targets=("c_attn", "c_proj", "c_fc"), alpha=8).train()
    windows = random_ids(config, (3, 17))
    loss = theirs(torch.tensor(windows, dtype=torch.long), labels=torch.tensor(windows, dtype=torch.long)).loss
    loss.backward()
    spec = lora.LoRASpec(4, 8.0, ALL)
    state_dict = {k.replace(".default", ""): v.detach().numpy() for k, v in theirs.state_dict().items() if "lora_" in k}
    adapter = peft.from_state(state_dict, config, spec, "peft")
    grads = peft.from_state({k.replace(".default", ""): p.grad.numpy() for k, p in theirs.named_parameters()
                             if "lora_" in k}, config, spec, "grads")

    opt = optax.sgd(1.0)
    frozen = jax.device_put(base)
    step = make_train_step(make_loss_fn(config, spec=spec), opt, frozen=frozen)
    new, metrics = step(TrainState.create(jax.tree.map(jnp.asarray, adapter), opt, jax.random.key(0)), windows)
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-6)
    ours = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), adapter, new.params)
    scale = max(np.abs(g).max() for g in jax.tree.leaves(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4), ours, grads)


def test_base_is_bitwise_unchanged_and_never_donated(hf_dir):
    path, _ = hf_dir("tiny")
    config, base, _ = load_pretrained(path)
    spec = lora.LoRASpec(2, 4.0, ALL, dropout=0.1)
    frozen = jax.device_put(base)
    before = jax.device_get(frozen)
    opt = optax.adamw(1e-2)
    state = TrainState.create(lora.init_adapter(config, spec, jax.random.key(1)), opt, jax.random.key(0))
    step = make_train_step(make_loss_fn(config, spec=spec), opt, grad_accum=2, frozen=frozen)
    for i in range(3):
        state, _ = step(state, random_ids(config, (2, 2, 9), seed=i))
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), before)
    assert jax.tree.structure(state.params) == jax.tree.structure(lora.abstract(config, spec))


# --- a LoRA run ------------------------------------------------------------------------------------

RUN = ["--tokenizer", "bpe:300", "--seq-len", "32", "--batch-size", "8", "--lora-rank", "4", "--lora-alpha", "16",
       "--lora-targets", "c_attn,mlp.c_proj", "--lora-dropout", "0.1", "--lr", "1e-2", "--warmup", "0",
       "--log-every", "1", "--eval-every", "3", "--ckpt-every", "3", "--eval-batches", "1", "--sample-tokens", "4",
       "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_root):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text((data_root / "tinyshakespeare" / "input.txt").read_text()[:20000])
    return path


@pytest.fixture(scope="module")
def lora_run(hf_dir, corpus, tmp_path_factory):
    """A 6-step LoRA run on the tiny base, exporting PEFT and merged HF directories."""
    out = tmp_path_factory.mktemp("lora") / "run"
    base, _ = hf_dir("tiny")
    assert cli("train", "gpt2", "--init", base, "--data", corpus, "--out", out, "--steps", "6", *RUN,
               "--export-peft", out.parent / "peft", "--export-hf", out.parent / "hf") == 0
    return out, base


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_trains_only_the_adapter_and_exports_match_peft(lora_run):
    """Checkpoints hold the adapter and adapter-shaped optimizer state only; the PEFT export gives
    our logits in PEFT, and the merged export equals PEFT's merge_and_unload (weights and logits)."""
    out, base = lora_run
    ckpt = Checkpoints(out)
    state = ckpt.restore(step=6)
    ckpt.close()
    config, params, _ = load_pretrained(base)
    spec, adapter = peft.load_adapter(out, config)
    assert spec == lora.LoRASpec(4, 16.0, ("c_attn", "mlp.c_proj"), dropout=0.1)
    shapes = {x.shape for x in jax.tree.leaves(adapter)}
    assert {x.shape for x in jax.tree.leaves(state["opt_state"])} <= shapes | {()}
    assert {x.shape for x in jax.tree.leaves(state["params"])} == shapes
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert losses[-1] < losses[0]

    ids = random_ids(config, (2, 16))
    ours = our_logits(config, params, ids, adapter, spec)
    theirs = hf_peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(base, attn_implementation="eager"), out.parent / "peft").eval()
    np.testing.assert_allclose(ours, torch_logits(theirs, ids), atol=1e-5, rtol=0)
    merged = theirs.merge_and_unload().eval()
    exported = transformers.GPT2LMHeadModel.from_pretrained(out.parent / "hf", attn_implementation="eager").eval()
    want = merged.state_dict()
    for key, value in exported.state_dict().items():
        np.testing.assert_allclose(value.numpy(), want[key].numpy(), atol=1e-6, rtol=0, err_msg=key)
    np.testing.assert_allclose(torch_logits(exported, ids), torch_logits(merged, ids), atol=1e-5, rtol=0)
    # a LoRA run loads as its merged model, and converts to PEFT again
    _, loaded, _ = load_pretrained(out)
    np.testing.assert_allclose(our_logits(config, loaded, ids), ours, atol=1e-5, rtol=0)
    assert cli("convert", "--to-peft", out, out.parent / "again") == 0
    assert json.loads((out.parent / "again" / peft.CONFIG_FILE).read_text())["base_model_name_or_path"] == str(base)


@pytest.mark.slow
def test_resumed_lora_run_is_bitwise_the_uninterrupted_one(lora_run, corpus, tmp_path):
    out, base = lora_run
    split = tmp_path / "run"
    assert cli("train", "gpt2", "--init", base, "--data", corpus, "--out", split, "--steps", "3",
               "--schedule-steps", "6", *RUN) == 0
    assert cli("train", "gpt2", "--out", split, "--resume", "--steps", "6", "--no-progress") == 0
    got, want = (Checkpoints(d) for d in (split, out))
    jax.tree.map(np.testing.assert_array_equal, got.restore(step=6), want.restore(step=6))
    got.close(), want.close()
    assert [r.get("loss") for r in metrics(split)] == [r.get("loss") for r in metrics(out)]


@pytest.mark.slow
def test_lora_run_on_a_data4_fsdp2_mesh_matches_one_device(lora_run, corpus, tmp_path):
    """8 virtual CPU devices, the base split over fsdp: the losses of the 1-device run within 1e-5."""
    out, base = lora_run
    argv = ["train", "gpt2", "--init", str(base), "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps",
            "6", *RUN, "--mesh", "data=4,fsdp=2"]
    child = f"import sys; from jaxformer.commands import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = ([r["loss"] for r in metrics(d) if "loss" in r] for d in (tmp_path / "run", out))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_peft_trained_adapter_generates_and_trains_here(hf_dir, tmp_path, capsys):
    """A few torch AdamW steps with PEFT; here: the same logits and greedy tokens (jaxformer generate
    --lora), and --lora-init continues from exactly that adapter with its settings."""
    path, _ = hf_dir("small")
    theirs = peft_model(path, targets=("c_attn", "c_proj"), alpha=32, scale=None).train()
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.tensor(random_ids(theirs.config, (4, 24)), dtype=torch.long)
    for _ in range(3):
        theirs(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    theirs.eval().save_pretrained(tmp_path / "adapter")
    config, params, _ = load_pretrained(path)
    spec, adapter = peft.load_adapter(tmp_path / "adapter", config)
    assert spec.targets == ("c_attn", "attn.c_proj", "mlp.c_proj") and spec.scale == 8.0
    ids = random_ids(config, (2, 16))
    np.testing.assert_allclose(our_logits(config, params, ids, adapter, spec), torch_logits(theirs, ids),
                               atol=1e-5, rtol=0)

    prompt = GPT2Tokenizer.gpt2().encode("The cat sat")
    want = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(prompt):]
    want = want.tolist()
    capsys.readouterr()
    assert cli("generate", "--model", path, "--lora", tmp_path / "adapter", "--prompt", "The cat sat", "--greedy",
               "--max-new-tokens", "8", "--json") == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want

    (tmp_path / "data.txt").write_text("the cat sat on the mat. " * 200)
    out = tmp_path / "run"  # warm-up from 0: step 1's learning rate is 0, the adapter is kept as read
    assert cli("train", "gpt2", "--init", path, "--lora-init", tmp_path / "adapter", "--data", tmp_path / "data.txt",
               "--out", out, "--steps", "1", "--warmup", "5", "--seq-len", "16", "--batch-size", "2",
               "--eval-batches", "1", "--sample-tokens", "0", "--no-progress") == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["lora_rank"], run["lora_alpha"], run["lora_targets"]) == (4, 32.0, list(spec.targets))
    jax.tree.map(np.testing.assert_array_equal, peft.load_adapter(out, config)[1], adapter)


# --- taps, bf16, an int8 base ------------------------------------------------------------------

def test_taps_and_edits_see_the_adapter(hf_dir):
    """Captures and a head ablation with an adapter equal those of the merged model."""
    path, _ = hf_dir("tiny")
    config, params, _ = load_pretrained(path)
    spec = lora.LoRASpec(4, 16.0, ALL)
    adapter = random_adapter(config, spec, seed=3)
    merged, _ = lora.merge(params, config, adapter, spec)
    ids = random_ids(config, (1, 12))
    edits = taps.ablate_heads(config.n_layer, config.n_head, [(1, 2)])
    capture = ("h/resid_post", "h/attn/pattern")
    (got, _), got_acts = taps.apply(GPT2(config), params, ids, capture=capture, edits=edits,
                                    lora=lora.model_input(adapter, spec, config))
    (want, _), want_acts = taps.apply(GPT2(config), merged, ids, capture=capture, edits=edits)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for name in capture:
        np.testing.assert_allclose(got_acts[name], want_acts[name], atol=1e-5, rtol=0, err_msg=name)


def test_bf16_compute_and_an_int8_base(hf_dir):
    """bf16 compute and a frozen int8 base (QLoRA-style) give the loss within 0.3% and float32
    adapter gradients pointing where float32's do (cosine > 0.99 per matrix; measured >= 0.997)."""
    path, _ = hf_dir("tiny")
    config, base, _ = load_pretrained(path, **NO_DROPOUT)
    spec = lora.LoRASpec(4, 16.0, ALL)
    adapter = random_adapter(config, spec, seed=4)
    windows = random_ids(config, (2, 17))

    def loss_and_grads(config, base):
        loss_fn = make_loss_fn(config, True, spec)

        def mean_loss(a):
            total, (n, _) = loss_fn(a, windows, None, base)
            return total / n
        return jax.jit(jax.value_and_grad(mean_loss))(adapter)
    want_loss, want = loss_and_grads(config, base)
    int8_config, int8_base, _ = load_pretrained(path, weights="int8", **NO_DROPOUT)
    assert int8_base["h"]["attn"]["c_attn"]["kernel"].dtype == jnp.int8
    for loss, got in (loss_and_grads(config.replace(dtype="bfloat16"), base), loss_and_grads(int8_config, int8_base)):
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=3e-3)
        assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.float32)}
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()) > 0.99


@pytest.mark.slow
def test_lora_run_on_an_int8_base(hf_dir, corpus, tmp_path):
    base, _ = hf_dir("tiny")
    out = tmp_path / "run"
    assert cli("train", "gpt2", "--init", base, "--data", corpus, "--out", out, "--steps", "3", "--model.weights",
               "int8", "--export-peft", tmp_path / "peft", *RUN) == 0
    assert json.loads((out / "config.json").read_text())["weights"] == "int8"
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert np.isfinite(losses).all() and (tmp_path / "peft" / peft.WEIGHTS_FILE).is_file()


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_named_without_a_traceback(hf_dir, corpus, tmp_path, capsys):
    tiny, _ = hf_dir("tiny")
    relu, _ = hf_dir("relu")
    peft_model(relu, targets=("c_attn",)).save_pretrained(tmp_path / "relu-adapter")
    llama = tmp_path / "llama-adapter"
    shutil.copytree(tmp_path / "relu-adapter", llama)
    cfg = json.loads((llama / peft.CONFIG_FILE).read_text())
    (llama / peft.CONFIG_FILE).write_text(json.dumps({**cfg, "target_modules": ["q_proj", "v_proj"]}))
    train = ["train", "gpt2", "--data", corpus, "--steps", "1", "--no-progress"]
    cases = [
        ([*train, "--init", tiny, "--lora-rank", "4", "--lora-targets", "q_proj", "--out", tmp_path / "a"],
         "lora_targets='q_proj': choose from c_attn, attn.c_proj, c_fc, mlp.c_proj"),
        ([*train, "--init", tiny, "--lora-rank", "0", "--out", tmp_path / "b"], "lora_rank=0: must be >= 1"),
        ([*train, "--lora-rank", "4", "--out", tmp_path / "c"], "give --init BASE"),
        ([*train, "--init", tiny, "--lora-init", tmp_path / "relu-adapter", "--tokenizer", "bpe:300",
          "--out", tmp_path / "d"], "attn.c_attn.lora_A.weight has shape (4, 32), the base"),
        (["generate", "--model", tiny, "--lora", tmp_path / "relu-adapter", "--prompt", "a"], "has shape (4, 32)"),
        (["generate", "--model", tiny, "--lora", llama, "--prompt", "a"], "target_modules names 'q_proj'"),
        (["generate", "--model", tiny, "--lora", corpus.parent, "--prompt", "a"], "not a PEFT adapter"),
        (["convert", "--to-peft", tiny, tmp_path / "e"], "not a jaxformer LoRA run"),
    ]
    for argv, message in cases:
        assert cli(*argv) == 2, argv
        err = capsys.readouterr().err
        assert "error: " in err and message in err and "Traceback" not in err, (argv, err)
