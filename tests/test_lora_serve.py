"""Many LoRA adapters on one base in one server: the engine batches sequences of different adapters
and of the base in the same steps, each equal to ``generate()`` with its adapter, with nothing
compiled after the warm-up; ``jaxformer serve --lora`` with adapters PEFT saved, through the
official ``openai`` client, gives PEFT + PyTorch's greedy tokens for each."""

import concurrent.futures
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import openai
import peft as hf_peft
import pytest
import torch
import transformers

from jaxformer.commands import main as jaxformer
from jaxformer.gpt2 import lora
from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.serve.compilations import compilations
from jaxformer.serve.engine import ENGINE_THREAD, Engine, Sampling, Sequence

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_adapter(config, spec, seed):
    leaves, tree = jax.tree.flatten(lora.abstract(config, spec))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [np.asarray(jax.random.normal(k, x.shape) * 0.1) for k, x in zip(keys, leaves)])


def run_sequence(engine, prompt, sampling, adapter):
    tokens, done = [], threading.Event()
    seq = Sequence(prompt, sampling, 0, lambda t: tokens.append(t.id), lambda reason: done.set(), adapter=adapter)
    return seq, tokens, done


def test_mixed_adapters_in_one_batch_equal_generate_with_each(hf_dir):
    """Two adapters of different ranks, targets and scaling, and the base, in the same steps."""
    config, params, _ = load_pretrained(hf_dir("tiny")[0], scan_layers=False)
    specs = {"a": lora.LoRASpec(rank=4, alpha=16, targets=("c_attn", "mlp.c_proj")),
             "b": lora.LoRASpec(rank=2, alpha=4, targets=("attn.c_proj", "c_fc"), rslora=True)}
    adapters = {name: (spec, random_adapter(config, spec, i)) for i, (name, spec) in enumerate(specs.items())}
    engine = Engine(params, config, slots=4, max_queue=8, adapters=adapters)
    try:
        before = compilations().by_thread[ENGINE_THREAD]
        rng = np.random.default_rng(0)
        cases = [(row, rng.integers(0, 999, n).tolist(), s) for row, n, s in [
            (0, 5, Sampling(10, temperature=0)), (1, 9, Sampling(10, temperature=0)),
            (2, 3, Sampling(12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)),
            (1, 20, Sampling(8, temperature=1.0, top_k=7, seed=2, ignore_eos=True)),
            (2, 6, Sampling(6, temperature=0)), (0, 6, Sampling(6, temperature=0))]]
        runs = [run_sequence(engine, p, s, row) for row, p, s in cases]
        for seq, *_ in runs:  # six sequences on four slots: the last two join as others leave
            engine.submit([seq])
        for _, _, done in runs:
            assert done.wait(120)
        assert compilations().by_thread[ENGINE_THREAD] == before
    finally:
        engine.close()
    names = [None, *engine.adapters]
    for (row, prompt, s), (_, tokens, _) in zip(cases, runs):
        spec_adapter = adapters.get(names[row])
        adapter = None if spec_adapter is None else lora.model_input(spec_adapter[1], spec_adapter[0], config)
        want = generate(params, config, [prompt], max_new_tokens=s.max_tokens, greedy=s.temperature == 0,
                        temperature=s.temperature or 1.0, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                        stop_at_eos=not s.ignore_eos, lora=adapter)[0]
        assert tokens == want, (row, prompt)
    base = generate(params, config, [cases[1][1]], max_new_tokens=10, greedy=True)[0]
    assert runs[1][1] != base  # the adapter changed what was generated


def peft_dir(base_path, path, targets, r, alpha, seed):
    """A random PEFT adapter (A and B nonzero) saved by PEFT; returns the PEFT model (eval)."""
    base = transformers.GPT2LMHeadModel.from_pretrained(base_path, attn_implementation="eager")
    model = hf_peft.get_peft_model(base, hf_peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return model.eval()


def torch_greedy(model, ids, n):
    """n greedy tokens, EOS or not (a forward pass over the whole sequence per token)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.slow
def test_serve_lora_adapters_saved_by_peft(hf_dir, tmp_path):
    path, base_model = hf_dir("small")
    models = {"fr": peft_dir(path, tmp_path / "fr", ["c_attn"], 8, 16, 1),
              "style": peft_dir(path, tmp_path / "style", ["c_fc", "mlp.c_proj", "attn.c_proj"], 4, 8, 2)}
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "jaxformer", "serve", "--gpt2", str(path), "--lora", f"fr={tmp_path / 'fr'}",
           "--lora", str(tmp_path / "style"), "--port", str(port), "--slots", "4"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                listed = {m.id: m for m in client.models.list().data}
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert set(listed) == {path.name, "fr", "style"}
        assert listed["fr"].parent == listed["style"].parent == path.name
        ids = [464, 2068, 7586, 21831]  # "The quick brown fox"
        jobs = [(name, ids[:k]) for k in (2, 4) for name in (path.name, "fr", "style")]

        def ask(job):
            name, prompt = job
            got = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
            return got.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # all at once: mixed in the steps
            answers = list(pool.map(ask, jobs))
        torch_models = {path.name: base_model, **models}
        tok = transformers.AutoTokenizer.from_pretrained(ROOT / "jaxformer" / "gpt2" / "tokenizer-files")
        for (name, prompt), text in zip(jobs, answers):
            assert text == tok.decode(torch_greedy(torch_models[name], prompt, 12)), name
        assert answers[0] != answers[1] != answers[2]
        with pytest.raises(openai.NotFoundError, match="fr"):
            client.completions.create(model="nope", prompt="x", max_tokens=1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_lora_flags_are_named(hf_dir, tmp_path, capsys):
    path, _ = hf_dir("tiny")
    with pytest.raises(SystemExit):
        jaxformer(["serve", "--lora", f"x={tmp_path}"])
    assert "--lora serves an adapter on a base: give --gpt2 BASE" in capsys.readouterr().err
    argv = ["serve", "--gpt2", str(path), "--port", str(free_port()), "--no-warmup"]
    assert jaxformer(argv + ["--lora", f"{path.name}={tmp_path}"]) != 0
    assert f"the model name {path.name!r} is taken" in capsys.readouterr().err
    assert jaxformer(argv + ["--lora", f"x={tmp_path}"]) != 0
    err = capsys.readouterr().err
    assert f"{tmp_path}: not a PEFT adapter" in err and "Traceback" not in err
