"""The GPT-2 command lines as a user runs them, through the installed ``jaxformer`` console script:
convert both ways, generate, errors."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

pytestmark = pytest.mark.slow  # the whole module: end-to-end runs

ROOT = Path(__file__).resolve().parents[1]


def run(*args, ok=True):
    """``jaxformer ARGS...`` as a new user runs it after ``pip install``: the console script on PATH."""
    command = shutil.which("jaxformer")
    assert command, "no jaxformer command on PATH: pip install . (or -e .) first"
    proc = subprocess.run([command, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stderr[-2000:]
    return proc


def test_convert_generate_and_back(hf_dir, gpt2_tokenizer_dir, tmp_path):
    src, model = hf_dir("real")
    jf, back = tmp_path / "jf", tmp_path / "back"
    out = run("convert", str(src), str(jf), "--tokenizer", str(gpt2_tokenizer_dir)).stdout
    assert "124,439,808 parameters" in out and "tokenizer copied" in out
    assert (jf / "tokenizer.json").is_file() and (jf / "params").is_dir()

    prompts = ["Hello, my name is", "The capital of France"]
    gen = run("generate", "--model", str(jf), "--prompt", prompts[0], "--prompt", prompts[1],
              "--max-new-tokens", "12", "--greedy", "--json").stdout
    rows = [json.loads(line) for line in gen.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    tok = transformers.GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir)
    for r in rows:
        ids = tok(r["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=50256)
        assert r["token_ids"] == ref[0, ids.shape[1]:].tolist()
        assert r["text"] == tok.decode(r["token_ids"])

    sampled = run("generate", "--model", str(jf), "--prompt", "Hi", "--max-new-tokens", "5",
                  "--top-k", "40", "--top-p", "0.9", "--temperature", "0.7", "--seed", "3", "--num-samples", "3",
                  "--json").stdout.splitlines()
    assert len(sampled) == 3 and all(len(json.loads(s)["token_ids"]) <= 5 for s in sampled)

    run("convert", "--to-hf", str(jf), str(back))
    assert (back / "tokenizer.json").is_file()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(back).eval()
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_generate_from_hf_dir_directly(hf_dir, gpt2_tokenizer_dir):
    src, _ = hf_dir("tiny")  # vocabulary of 1000: GPT-2 tokens past it are rejected clearly
    proc = run("generate", "--model", str(src), "--prompt", "a b c", "--max-new-tokens", "4",
               "--tokenizer", str(gpt2_tokenizer_dir), "--json").stdout
    assert len(json.loads(proc)["token_ids"]) <= 4
    bad = run("generate", "--model", str(src), "--prompt", "unusual words", "--tokenizer",
              str(gpt2_tokenizer_dir), ok=False)
    assert "token ids must lie in [0, 1000)" in bad.stderr


def test_cli_errors_are_clear(tmp_path):
    assert "not a jaxformer checkpoint" in run("convert", "--to-hf", str(tmp_path), str(tmp_path / "x"), ok=False).stderr
    assert "no such directory" in run("convert", str(tmp_path / "missing"), str(tmp_path / "x"), ok=False).stderr
    assert "no config.json" in run("convert", str(tmp_path), str(tmp_path / "x"), ok=False).stderr
