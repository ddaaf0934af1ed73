"""GPT-2 against Hugging Face PyTorch: logits, greedy generation, caching, padding, conversion."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxformer.nn.attention import KVCache
from jaxformer.gpt2 import hf
from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.model import GPT2
from jaxformer.gpt2.pretrained import load_pretrained, save_pretrained


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.double().numpy()


def random_ids(config, shape, seed=0):
    return np.random.RandomState(seed).randint(0, config.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("name", ["tiny", "flags", "relu", pytest.param("real", marks=pytest.mark.slow)])
def test_logits_match_hf(hf_dir, name):
    path, model = hf_dir(name)
    config, params, _ = load_pretrained(path)
    ids = random_ids(config, (2, 24))
    logits, _ = jax.jit(lambda p, x: GPT2(config).apply({"params": p}, x))(params, ids)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits, np.float64), hf_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "flags"])
@pytest.mark.slow
def test_unstacked_layers_match_hf(hf_dir, name, tmp_path):
    """scan_layers=False (h_0 .. h_{L-1}): same logits, and checkpoints store the stacked layout."""
    path, model = hf_dir(name)
    config, params, _ = load_pretrained(path, scan_layers=False)
    assert "h" not in params and f"h_{config.n_layer - 1}" in params
    ids = random_ids(config, (2, 24))
    logits, _ = GPT2(config).apply({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(logits, np.float64), hf_logits(model, ids), atol=1e-4, rtol=0)
    save_pretrained(tmp_path / "jf", config, params)
    config2, params2, _ = load_pretrained(tmp_path / "jf")
    assert config2 == config.replace(scan_layers=True) and "h" in params2
    back = hf.params_to_hf(params, config)
    for key, value in load_file(path / "model.safetensors").items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["tiny", "flags", pytest.param("real", marks=pytest.mark.slow)])
def test_cached_decoding_matches_uncached_hf(hf_dir, name):
    """Prefill 10 tokens, then feed 6 one at a time through the cache; compare with HF's full forward."""
    path, model = hf_dir(name)
    config, params, _ = load_pretrained(path)
    ids = random_ids(config, (2, 16), seed=1)
    apply = jax.jit(lambda p, x, c, i: GPT2(config).apply({"params": p}, x, cache=c, index=i))
    cache = KVCache.zeros(2, 16, config.n_head, config.head_dim, layers=config.n_layer)
    logits, cache = apply(params, ids[:, :10], cache, 0)
    steps = [logits]
    for i in range(10, 16):
        logits, cache = apply(params, ids[:, i:i + 1], cache, i)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), hf_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, scan", [("tiny", True), ("flags", False),
                                        pytest.param("real", False, marks=pytest.mark.slow)])
def test_greedy_matches_hf_generate(hf_dir, name, scan):
    path, model = hf_dir(name)
    config, params, _ = load_pretrained(path, scan_layers=scan)
    prompt = random_ids(config, (7,), seed=2).tolist()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             pad_token_id=config.eos_token_id)[0, len(prompt):].tolist()
    ours = generate(params, config, [prompt], max_new_tokens=64, greedy=True, stop_at_eos=False)[0]
    assert len(set(ref)) > 3, "reference generation too degenerate to test anything"
    assert ours == ref


@pytest.mark.slow
def test_left_padded_batch_equals_single_prompts(hf_dir):
    path, _ = hf_dir("tiny")
    config, params, _ = load_pretrained(path)
    prompts = [random_ids(config, (n,), seed=n).tolist() for n in (3, 11, 6, 1, 9)]
    batch = generate(params, config, prompts, max_new_tokens=20, greedy=True, stop_at_eos=False)
    singles = [generate(params, config, [p], max_new_tokens=20, greedy=True, stop_at_eos=False)[0] for p in prompts]
    assert batch == singles


def test_left_padded_batch_matches_hf_batch(hf_dir):
    """HF's own left-padded batched generate (attention_mask) as an independent reference."""
    path, model = hf_dir("tiny")
    config, params, _ = load_pretrained(path)
    prompts = [random_ids(config, (n,), seed=10 + n).tolist() for n in (4, 9)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                             pad_token_id=0)[:, width:].tolist()
    assert generate(params, config, prompts, max_new_tokens=24, greedy=True, stop_at_eos=False) == ref


def test_round_trip_hf_to_jaxformer_to_hf(hf_dir, tmp_path):
    for name in ("tiny", "flags"):
        path, model = hf_dir(name)
        config, params, _ = load_pretrained(path)
        save_pretrained(tmp_path / name / "jf", config, params)
        config2, params2, _ = load_pretrained(tmp_path / name / "jf")
        assert config2 == config
        out = hf.save_hf(tmp_path / name / "hf", config2, params2)
        original, back = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
        assert sorted(back) == sorted(original)
        for key in original:
            np.testing.assert_array_equal(back[key], original[key], err_msg=key)
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
        ids = random_ids(config, (1, 12))
        np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(model, ids))


@pytest.mark.parametrize("save_kw", [dict(safe_serialization=False), dict(max_shard_size="100KB")],
                         ids=["pytorch_model.bin", "sharded-safetensors"])
def test_other_hf_weight_formats(hf_dir, save_kw):
    path, model = hf_dir("tiny", **save_kw)
    config, params, _ = load_pretrained(path)
    ids = random_ids(config, (1, 8))
    logits, _ = GPT2(config).apply({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(logits), hf_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_bfloat16_compute_stays_close(hf_dir):
    path, model = hf_dir("tiny")
    config, params, _ = load_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    ids = random_ids(config, (2, 16))
    logits, _ = GPT2(config).apply({"params": params}, ids)
    assert logits.dtype == jnp.float32
    ref = hf_logits(model, ids)
    assert np.abs(np.asarray(logits) - ref).max() < 0.05 * np.abs(ref).max()


# --- errors that name the problem ------------------------------------------------------------------

def _copy_with(path, tmp_path, edit_state=None, edit_config=None):
    from safetensors.numpy import save_file

    state = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_key_is_named(hf_dir, tmp_path):
    path = _copy_with(hf_dir("tiny")[0], tmp_path, edit_state=lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(hf.CheckpointError, match=r"missing key 'h\.1\.mlp\.c_fc\.bias'"):
        load_pretrained(path)


def test_unexpected_key_is_named(hf_dir, tmp_path):
    def add(s):
        s["transformer.h.0.attn.extra"] = np.zeros(3, np.float32)
    with pytest.raises(hf.CheckpointError, match=r"unexpected keys.*h\.0\.attn\.extra"):
        load_pretrained(_copy_with(hf_dir("tiny")[0], tmp_path, edit_state=add))


def test_shape_mismatch_names_key_and_shapes(hf_dir, tmp_path):
    def shrink(s):
        s["transformer.wpe.weight"] = s["transformer.wpe.weight"][:100]
    with pytest.raises(hf.CheckpointError, match=r"wpe\.weight: shape \(100, 64\) in the checkpoint, \(128, 64\) expected"):
        load_pretrained(_copy_with(hf_dir("tiny")[0], tmp_path, edit_state=shrink))


def test_not_gpt2_model_type(hf_dir, tmp_path):
    path = _copy_with(hf_dir("tiny")[0], tmp_path, edit_config=lambda c: c.update(model_type="llama"))
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_pretrained(path)


def test_unreadable_weights_file(hf_dir, tmp_path):
    path = _copy_with(hf_dir("tiny")[0], tmp_path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(hf.CheckpointError, match="model.safetensors: unreadable"):
        load_pretrained(path)


def test_missing_weights_and_hub_offline(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(hf.CheckpointError, match="no weights"):
        load_pretrained(tmp_path)
    with pytest.raises(hf.CheckpointError, match="Hugging Face Hub"):
        hf.resolve("jaxformer-test/definitely-not-a-repo")
