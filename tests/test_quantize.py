"""Decoding with bfloat16 and int8 weights against float32 references: the quantization itself
(float64 numpy), logits and greedy tokens of converted Hugging Face models, checkpoints that save
and load, and the command lines."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxformer.errors import InputError
from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.model import GPT2
from jaxformer.gpt2.pretrained import load_pretrained, save_pretrained
from jaxformer.gpt2.quantize import MATVEC_ROWS, project, to_decoding, to_float


def test_int8_is_symmetric_per_output_channel():
    """q = round(w / s), s = max|w| / 127 per output row, as float64 numpy computes it; the
    dequantized weight is within s / 2 of the original."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 40)).astype(np.float32) * rng.uniform(0.01, 3, size=(6, 1)).astype(np.float32)
    w[2] = 0.0  # a dead output: its scale must not divide by zero
    params = {"wte": {"embedding": rng.normal(size=(9, 6)).astype(np.float32)},
              "layer": {"kernel": w.T.copy(), "bias": np.zeros(6, np.float32)}}
    from jaxformer.gpt2.config import GPT2Config
    q, config = to_decoding(params, GPT2Config(n_embd=6, n_head=1, vocab_size=9, n_layer=1), "int8")
    assert config.weights == "int8" and q["layer"]["kernel"].dtype == np.int8 and q["layer"]["kernel"].shape == (6, 40)
    w64 = w.astype(np.float64)
    scale = np.abs(w64).max(1) / 127
    scale[2] = 1.0
    np.testing.assert_array_equal(q["layer"]["kernel"], np.rint(w64 / scale[:, None]).astype(np.int8))
    np.testing.assert_allclose(q["layer"]["scale"], scale, rtol=1e-7)
    back = np.asarray(q["layer"]["kernel"], np.float64) * scale[:, None]
    assert np.all(np.abs(back - w64) <= scale[:, None] / 2 + 1e-9)
    restored, _ = to_float(q, config)
    np.testing.assert_allclose(restored["layer"]["kernel"], back.T, rtol=1e-6)


@pytest.mark.parametrize("rows", [1, MATVEC_ROWS, MATVEC_ROWS + 1])
def test_project_equals_float64_matmul(rows):
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 48)).astype(np.float32)
    q = rng.integers(-127, 128, size=(30, 48)).astype(np.int8)
    s = rng.uniform(0.001, 0.02, size=30).astype(np.float32)
    want = x.astype(np.float64) @ (q.astype(np.float64) * s[:, None]).T
    np.testing.assert_allclose(project(x, q, s), want, rtol=1e-5, atol=1e-5)
    w16 = jax.numpy.asarray(rng.normal(size=(30, 48)), jax.numpy.bfloat16)
    want = x.astype(np.float64) @ np.asarray(w16, np.float64).T
    np.testing.assert_allclose(project(x, w16), want, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_low_precision_logits_and_greedy_tokens_track_float32(hf_dir):
    """The 124M shape (random weights, Hugging Face's initialisation): bf16 and int8 logits within a
    bound of PyTorch's float32 ones, and most greedy tokens the same as float32's (random weights
    make near ties common)."""
    path, model = hf_dir("real")
    config, params, _ = load_pretrained(path, scan_layers=False)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 24)).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long)).logits.double().numpy()
    prompts = ids[:, :8].tolist()
    want = generate(params, config, prompts, max_new_tokens=16, greedy=True, stop_at_eos=False)
    for weights, logit_atol, min_agreement in (("bfloat16", 0.05, 0.9), ("int8", 0.2, 0.75)):
        qconfig, qparams, _ = load_pretrained(path, weights=weights, scan_layers=False)
        assert qconfig.weights == weights
        got = np.asarray(GPT2(qconfig).apply({"params": qparams}, ids)[0])
        assert 1e-6 < np.abs(got - ref).max() < logit_atol, weights  # really low precision, and close
        b = generate(qparams, qconfig, prompts, max_new_tokens=16, greedy=True, stop_at_eos=False)
        agree = np.mean([x == y for ra, rb in zip(want, b) for x, y in zip(ra, rb)])
        assert agree >= min_agreement, (weights, agree)


@pytest.mark.slow
def test_quantized_checkpoints_save_load_and_convert(hf_dir, tmp_path, capsys):
    from jaxformer.commands import main as jaxformer_main
    from jaxformer.gpt2.tokenizer import GPT2_DIR
    path, model = hf_dir("tiny")
    q8 = tmp_path / "q8"
    assert jaxformer_main(["convert", path, q8, "--quantize", "int8", "--tokenizer", GPT2_DIR]) == 0
    assert "int8 weights" in capsys.readouterr().out
    config, params, _ = load_pretrained(q8)
    assert config.weights == "int8" and params["h"]["mlp"]["c_fc"]["kernel"].dtype == np.int8
    direct_config, direct, _ = load_pretrained(path, weights="int8")
    jax.tree.map(np.testing.assert_array_equal, params, direct)
    assert jaxformer_main(["generate", "--model", q8, "--prompt", "a b c", "--max-new-tokens", 4, "--greedy",
                           "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["token_ids"] == generate(direct, direct_config, [[64, 275, 269]], max_new_tokens=4, greedy=True)[0]
    # back to Hugging Face: the dequantized weights
    assert jaxformer_main(["convert", "--to-hf", q8, tmp_path / "hf"]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    fconfig, fparams = to_float(params, config)[::-1]
    ids = np.arange(10)[None]
    with torch.no_grad():
        hf_logits = back(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(hf_logits, GPT2(fconfig).apply({"params": fparams}, ids)[0], atol=1e-4)


@pytest.mark.slow
def test_training_refuses_low_precision_weights(hf_dir, tmp_path):
    path, _ = hf_dir("tiny")
    config, params, _ = load_pretrained(path, weights="bfloat16")
    save_pretrained(tmp_path / "bf16", config, params)
    from jaxformer.gpt2.train import GPT2Task
    from jaxformer.train.loop import train
    (tmp_path / "c.txt").write_text("a b c d e f g " * 200)
    with pytest.raises(InputError, match="weights are bfloat16 \\(for decoding\\); training needs float"):
        train(GPT2Task, tmp_path / "run", run=dict(data=(str(tmp_path / "c.txt"),), init=str(tmp_path / "bf16"),
                                                  steps=1, tokenizer="bpe:300"), progress=False)
