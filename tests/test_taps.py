"""Capture and intervention (jaxformer.nn.taps) against independent references: Hugging Face's
``output_hidden_states`` / ``output_attentions`` and forward hooks for GPT-2, the PyTorch twin
(``torch.nn.Transformer``) with hooks for the translator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxformer.nn import taps
from jaxformer.errors import InputError
from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.model import GPT2
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.translator.config import preset
from jaxformer.translator.model import Translator, init_params
from jaxformer.translator.torch_model import from_flax


def ids_for(config, shape, seed=0):
    return np.random.RandomState(seed).randint(0, config.vocab_size, shape).astype(np.int32)


def hf_outputs(model, ids, pre_hooks=()):
    """(logits, hidden_states, attentions) of the HF model, float64 numpy, with c_proj pre-hooks."""
    handles = [model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(fn) for layer, fn in pre_hooks]
    try:
        with torch.no_grad():
            out = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    as_np = lambda t: t.double().numpy()  # noqa: E731
    return as_np(out.logits), [as_np(h) for h in out.hidden_states], [as_np(a) for a in out.attentions]


def head_hook(head: int, head_dim: int, factor: float = 0.0):
    """Multiplies one head's columns of c_proj's input (the per-head outputs) by ``factor``."""
    def hook(module, args):
        x = args[0].clone()
        x[..., head * head_dim:(head + 1) * head_dim] *= factor
        return (x,)
    return hook


@pytest.mark.parametrize("name, scan", [("tiny", True), ("flags", False), ("relu", True),
                                        pytest.param("real", False, marks=pytest.mark.slow)])
def test_hidden_states_and_attentions_match_hf(hf_dir, name, scan):
    path, model = hf_dir(name)
    config, params, _ = load_pretrained(path, scan_layers=scan)
    ids = ids_for(config, (2, 12))
    run = jax.jit(lambda p, x: taps.apply(GPT2(config), p, x, capture=("h/resid_pre", "h/attn/pattern", "ln_final")))
    logits, got = run(params, ids)
    want_logits, hidden, attentions = hf_outputs(model, ids)
    ours = [got["h/resid_pre"][i] for i in range(config.n_layer)] + [got["ln_final"]]
    assert len(ours) == len(hidden) == config.n_layer + 1
    for i, (a, b) in enumerate(zip(ours, hidden)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"hidden_states[{i}]")
    for i, b in enumerate(attentions):
        np.testing.assert_allclose(got["h/attn/pattern"][i], b, atol=1e-5, rtol=0, err_msg=f"attentions[{i}]")
    np.testing.assert_allclose(logits[0], want_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, scan", [("tiny", True), ("flags", False)])
def test_head_ablation_and_scaling_match_hf_hooks(hf_dir, name, scan):
    path, model = hf_dir(name)
    config, params, _ = load_pretrained(path, scan_layers=scan)
    ids = ids_for(config, (2, 10), seed=1)
    run = jax.jit(lambda p, x, e: taps.apply(GPT2(config), p, x, edits=e)[0][0])
    plain = np.asarray(run(params, ids, None))
    zero = taps.ablate_heads(config.n_layer, config.n_head, [(1, 2)])
    got = np.asarray(run(params, ids, zero))
    want, _, _ = hf_outputs(model, ids, [(1, head_hook(2, config.head_dim))])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - plain).max() > 100 * np.abs(got - want).max()  # the ablation matters
    half = taps.ablate_heads(config.n_layer, config.n_head, [(0, 0), (2, 1)], how="scale", factor=0.5)
    want, _, _ = hf_outputs(model, ids, [(0, head_hook(0, config.head_dim, 0.5)), (2, head_hook(1, config.head_dim, 0.5))])
    np.testing.assert_allclose(run(params, ids, half), want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_mean_ablation_sets_the_heads_mean_output(hf_dir):
    path, model = hf_dir("tiny")
    config, params, _ = load_pretrained(path)
    ids = ids_for(config, (4, 9), seed=2)
    _, cap = taps.apply(GPT2(config), params, ids, capture="h/attn/z")
    mean = cap["h/attn/z"].mean(axis=(1, 2))  # [L, H, d] over the batch and positions
    edits = taps.ablate_heads(config.n_layer, config.n_head, [(2, 3)], how="mean", mean=mean)
    logits, got = taps.apply(GPT2(config), params, ids, edits=edits, capture="h/attn/z")
    np.testing.assert_allclose(got["h/attn/z"][2, :, :, 3], np.broadcast_to(mean[2, 3], (4, 9, config.head_dim)))

    def hook(module, args):  # the same on the HF side: head 3's columns set to its mean
        x = args[0].clone()
        d = config.head_dim
        x[..., 3 * d:4 * d] = torch.tensor(np.asarray(mean[2, 3]))
        return (x,)
    want, _, _ = hf_outputs(model, ids, [(2, hook)])
    np.testing.assert_allclose(logits[0], want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_patching_the_whole_residual_stream_reproduces_the_other_run(hf_dir):
    path, _ = hf_dir("tiny")
    config, params, _ = load_pretrained(path, scan_layers=False)
    a, b = ids_for(config, (2, 11), seed=3), ids_for(config, (2, 11), seed=4)
    logits_a, cap = taps.apply(GPT2(config), params, a, capture="h/resid_pre")
    logits_b, _ = taps.apply(GPT2(config), params, b, edits=taps.patch(cap["h/resid_pre"], 0))
    # Two programs: run a captures (attention probabilities computed explicitly), run b does not (the
    # fused kernel), and XLA may reassociate float32 sums differently in each (3.3e-6 seen on an
    # AVX-512 CPU): equal within float32 rounding, not bit for bit.
    np.testing.assert_allclose(logits_b[0], logits_a[0], rtol=1e-5, atol=1e-5)
    # a steering vector per batch row equals each row run alone (batch 2 and batch 1: two programs)
    v = np.random.RandomState(5).normal(size=(2, 1, config.n_embd)).astype(np.float32)
    add = jnp.zeros((config.n_layer, 2, 1, config.n_embd)).at[1].set(v)
    both, _ = taps.apply(GPT2(config), params, a, edits={"h/resid_mid": {"add": add}})
    for r in range(2):
        alone, _ = taps.apply(GPT2(config), params, a[r:r + 1], edits={"h/resid_mid": {"add": add[:, r:r + 1]}})
        np.testing.assert_allclose(both[0][r], alone[0][0], rtol=1e-5, atol=1e-5)


def test_generation_with_an_ablated_head_matches_hf_generate(hf_dir):
    """The KV-cache path: greedy generation with a head zeroed equals HF ``generate`` with the same
    head's input to c_proj zeroed by a forward pre-hook, and differs from plain generation."""
    path, model = hf_dir("tiny")
    config, params, _ = load_pretrained(path, scan_layers=False)
    prompt = ids_for(config, (6,), seed=6).tolist()
    edits = taps.ablate_heads(config.n_layer, config.n_head, [(0, 1), (1, 3)])
    got = generate(params, config, [prompt], max_new_tokens=12, greedy=True, stop_at_eos=False, edits=edits)[0]
    plain = generate(params, config, [prompt], max_new_tokens=12, greedy=True, stop_at_eos=False)[0]
    handles = [model.transformer.h[0].attn.c_proj.register_forward_pre_hook(head_hook(1, config.head_dim)),
               model.transformer.h[1].attn.c_proj.register_forward_pre_hook(head_hook(3, config.head_dim))]
    try:
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 pad_token_id=config.eos_token_id)[0, len(prompt):].tolist()
    finally:
        for h in handles:
            h.remove()
    assert got == ref and got != plain


@pytest.mark.slow
def test_generation_with_a_steering_vector_matches_the_uncached_edited_forward(hf_dir):
    path, _ = hf_dir("tiny")
    config, params, _ = load_pretrained(path)
    prompt = ids_for(config, (5,), seed=7).tolist()
    vector = np.random.RandomState(8).normal(scale=3.0, size=config.n_embd).astype(np.float32)
    edits = taps.steer(config.n_layer, 2, vector)
    got = generate(params, config, [prompt], max_new_tokens=8, greedy=True, stop_at_eos=False, edits=edits)[0]
    seq = list(prompt)
    forward = jax.jit(lambda x: taps.apply(GPT2(config), params, x, edits=edits)[0][0])
    for _ in range(8):  # the edited model, re-run on the whole prefix, no cache
        seq.append(int(np.argmax(forward(np.array([seq], np.int32))[0, -1])))
    assert got == seq[len(prompt):]


def test_bad_edits_are_named(hf_dir):
    path, _ = hf_dir("tiny")
    config, params, _ = load_pretrained(path)
    ids = ids_for(config, (1, 4))
    with pytest.raises(InputError, match=r"no tap named \['h/resid_prex'\]; the taps are \[.*'h/resid_pre'"):
        taps.apply(GPT2(config), params, ids, edits={"h/resid_prex": {"add": jnp.zeros(64)}})
    with pytest.raises(InputError, match="keys must be among"):
        taps.apply(GPT2(config), params, ids, edits={"h/resid_pre": {"plus": jnp.zeros(64)}})
    with pytest.raises(InputError, match="head 5.0 does not exist"):
        taps.ablate_heads(config.n_layer, config.n_head, [(5, 0)])
    with pytest.raises(InputError, match="both set"):
        taps.merge(taps.steer(3, 0, np.zeros(64)), taps.steer(3, 1, np.zeros(64)))


# --- the translator against its PyTorch twin ----------------------------------------------------------

def torch_taps(model, src, tgt, zero_heads=()):
    """Layer outputs and attention probabilities of the torch twin, by forward hooks; ``zero_heads``:
    (module, head) pairs whose columns of ``out_proj`` are zeroed (the head's input to it removed)."""
    got, handles = {}, []

    def keep(name):
        return lambda module, args, out: got.setdefault(name, []).append(out.detach().double().numpy())

    def weights(name):
        def pre(module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def post(module, args, out):
            got.setdefault(name, []).append(out[1].detach().double().numpy())
        return pre, post

    tr = model.transformer
    for i, layer in enumerate(tr.encoder.layers):
        handles.append(layer.register_forward_hook(keep("enc/resid_post")))
        pre, post = weights("enc/attn/pattern")
        handles += [layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True),
                    layer.self_attn.register_forward_hook(post)]
    for i, layer in enumerate(tr.decoder.layers):
        handles.append(layer.register_forward_hook(keep("dec/resid_post")))
        for mha, name in ((layer.self_attn, "dec/self_attn/pattern"), (layer.multihead_attn, "dec/cross_attn/pattern")):
            pre, post = weights(name)
            handles += [mha.register_forward_pre_hook(pre, with_kwargs=True), mha.register_forward_hook(post)]
    saved = []
    d = model.config.head_dim
    for mha, head in zero_heads:
        saved.append((mha, mha.out_proj.weight.data.clone()))
        mha.out_proj.weight.data[:, head * d:(head + 1) * d] = 0
    try:  # grad mode on: torch's fused fast path (which skips the hooks) is off
        logits = model(torch.tensor(src, dtype=torch.long), torch.tensor(tgt, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
        for mha, w in saved:
            mha.out_proj.weight.data = w
    return logits.detach().double().numpy(), {k: np.stack(v) for k, v in got.items()}


def batch():
    src = np.array([[5, 9, 14, 7, 2, 0, 0], [8, 3, 11, 12, 13, 6, 2]], np.int32)
    tgt = np.array([[1, 20, 21, 22, 0], [1, 30, 31, 32, 33]], np.int32)
    return src, tgt


@pytest.mark.parametrize("pre_ln, tie", [(True, True), (False, False)])
@pytest.mark.slow
def test_translator_layers_and_attention_match_the_torch_twin(pre_ln, tie):
    config = preset("tiny").replace(dropout=0.0, pre_ln=pre_ln, tie_embeddings=tie)
    params = init_params(config, jax.random.key(3))
    src, tgt = batch()
    names = ("enc/resid_post", "dec/resid_post", "enc/attn/pattern", "dec/self_attn/pattern", "dec/cross_attn/pattern")
    logits, got = taps.apply(Translator(config), params, src, tgt, capture=names)
    want_logits, want = torch_taps(from_flax(params, config).eval(), src, tgt)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    for name in names:
        a, b = np.asarray(got[name]), want[name]
        if name == "dec/self_attn/pattern":  # rows of padding queries: torch leaves them undefined
            a, b = a[:, 0, :, :4], b[:, 0, :, :4]
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


def test_translator_head_ablation_matches_zeroed_torch_columns():
    config = preset("tiny").replace(dropout=0.0)
    params = init_params(config, jax.random.key(4))
    src, tgt = batch()
    edits = taps.merge(taps.ablate_heads(config.enc_layers, config.n_heads, [(0, 1)], site="enc/attn/z"),
                       taps.ablate_heads(config.dec_layers, config.n_heads, [(1, 3)], site="dec/cross_attn/z"))
    logits, _ = taps.apply(Translator(config), params, src, tgt, edits=edits)
    model = from_flax(params, config).eval()
    tr = model.transformer
    want, _ = torch_taps(model, src, tgt, [(tr.encoder.layers[0].self_attn, 1), (tr.decoder.layers[1].multihead_attn, 3)])
    plain, _ = taps.apply(Translator(config), params, src, tgt)
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    assert np.abs(np.asarray(logits) - np.asarray(plain)).max() > 1e-2


@pytest.mark.slow
def test_translation_with_edits_equals_the_edited_greedy_loop(translator_dir):
    """The translator's KV-cache decoding under an ablated cross-attention head: beam 1 equals a
    greedy loop re-running the edited model on the whole prefix."""
    import math

    from jaxformer.translator import tokenizer as tk
    from jaxformer.translator.translate import MAX_OUT_EXTRA, MAX_OUT_RATIO, TranslationPipeline, output_len, source_lengths

    model = TranslationPipeline.load(translator_dir)
    config = model.config
    edits = taps.ablate_heads(config.dec_layers, config.n_heads, [(0, 1), (1, 0)], site="dec/cross_attn/z")
    got = model.translate(["Hello world."], beam_size=1, edits=edits)[0]
    src = np.asarray([list(tk.encode(model.tokenizer, ["Hello world."])[0]) + [tk.EOS_ID]], np.int32)
    forward = jax.jit(lambda t: taps.apply(Translator(config), model.params, src, t, edits=edits)[0])
    seq = [tk.BOS_ID]
    bucket = next(n for n in source_lengths(config.max_len) if n >= src.shape[1])
    limit = min(math.ceil(MAX_OUT_RATIO * src.shape[1]) + MAX_OUT_EXTRA, output_len(config, bucket))
    for _ in range(limit):  # the prefix padded to one length (causal: the padding is never seen)
        padded = np.full((1, limit + 1), tk.PAD_ID, np.int32)
        padded[0, :len(seq)] = seq
        nxt = int(np.argmax(forward(padded)[0, len(seq) - 1]))
        seq.append(nxt)
        if nxt == tk.EOS_ID:
            break
    assert got == tk.decode(model.tokenizer, [seq[1:]])[0]


@pytest.mark.slow
def test_capture_script_matches_hf(hf_dir, capsys, tmp_path):
    """``jaxformer capture`` on a Hugging Face directory, with and without an ablated head."""
    from jaxformer.commands import main as jaxformer_main
    from jaxformer.gpt2.tokenizer import GPT2_DIR, GPT2Tokenizer
    path, model = hf_dir("tiny")
    prompt = "a b c d e"  # GPT-2 ids below the tiny model's 1000-token vocabulary
    ids = np.asarray([GPT2Tokenizer.gpt2().encode(prompt)])
    for ablate, hooks in (([], []), (["--ablate", "1.2"], [(1, head_hook(2, 16))])):
        out = tmp_path / f"acts{len(ablate)}.npz"
        assert jaxformer_main(["capture", "--model", path, "--tokenizer", GPT2_DIR, "--prompt", prompt,
                               "--out", out, *ablate]) == 0
        got = np.load(out)
        logits, hidden, attentions = hf_outputs(model, ids, hooks)
        assert got["token_ids"].tolist() == ids[0].tolist() and got["logits"].dtype == np.float32
        assert got["hidden_states"].shape == (4, 5, 64) and got["attentions"].shape == (3, 4, 5, 5)
        np.testing.assert_allclose(got["logits"], logits[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["hidden_states"], np.stack(hidden)[:, 0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["attentions"], np.stack(attentions)[:, 0], atol=1e-5, rtol=0)
    assert "heads ablated: 1.2" in capsys.readouterr().out


@pytest.mark.slow
def test_attention_map_and_induction_scripts_write_pictures(hf_dir, translator_dir, tmp_path):
    import json

    from jaxformer.commands import main as jaxformer_main
    from jaxformer.gpt2.tokenizer import GPT2_DIR
    path, _ = hf_dir("tiny")
    assert jaxformer_main(["attention-map", "--model", translator_dir, "--text", "Hello world.",
                           "--out", tmp_path / "t"]) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["cross_layer0.png", "cross_layer1.png",
                                                                   "cross_layers.png"]
    assert jaxformer_main(["attention-map", "--model", path, "--tokenizer", GPT2_DIR, "--prompt", "a b c d",
                           "--out", tmp_path / "g"]) == 0
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["logit_lens.png", "self_layer0.png", "self_layer1.png",
                                                                   "self_layer2.png", "self_layers.png"]
    assert all(p.stat().st_size > 5000 for p in (tmp_path / "g").iterdir())
    assert jaxformer_main(["induction-heads", "--model", path, "--length", 20, "--batch", 4, "--out", tmp_path / "h",
                           "--json", tmp_path / "h.json"]) == 0
    scores = json.loads((tmp_path / "h.json").read_text())
    assert np.asarray(scores["induction"]).shape == (3, 4)
    assert [a["ablated"] for a in scores["ablations"]] == ["none", "top induction heads", "top previous-token heads",
                                                          "lowest-scoring other heads"]
    assert (tmp_path / "h" / "scores.png").is_file()


@pytest.mark.slow
def test_logit_lens_ends_at_the_model_output_and_figures_draw(tmp_path):
    """The lens's last row is the model's own prediction; the figures write readable PNGs."""
    from jaxformer import plots
    from jaxformer.gpt2.config import preset
    from jaxformer.gpt2.inspect import hf_outputs, logit_lens
    from jaxformer.gpt2.model import init_params

    config = preset("tiny", vocab_size=97)
    params = init_params(config.replace(initializer_range=0.5), jax.random.key(0))
    tokens = np.arange(9, dtype=np.int32)[None] * 7 % 97
    top, prob = logit_lens(params, tokens, config=config)
    logits = np.asarray(GPT2(config).apply({"params": params}, tokens)[0], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert top.shape == (config.n_layer + 1, 1, 9)
    # The lens and the model are two programs: their argmax may differ only between tokens whose
    # probabilities tie within float32 rounding, so the lens's top token must be (one of) the model's.
    np.testing.assert_allclose(np.take_along_axis(p, np.asarray(top[-1])[..., None], -1)[..., 0], p.max(-1), rtol=1e-5)
    np.testing.assert_allclose(prob[-1], p.max(-1), rtol=1e-5)
    got = hf_outputs(params, tokens, config=config)
    np.testing.assert_allclose(got["logits"], logits, atol=1e-5)
    words = [f"tok{i}" for i in range(9)]
    plots.attention_grid(tmp_path / "a.png", np.asarray(got["attentions"][0, 0]), words, words, "layer 0")
    plots.layer_averages(tmp_path / "b.png", np.asarray(got["attentions"][:, 0]), words, words, "all")
    plots.logit_lens(tmp_path / "c.png", words, [[f"t{j}" for j in r] for r in np.asarray(top[:, 0])],
                       np.asarray(prob[:, 0]), "lens")
    assert all((tmp_path / f"{n}.png").read_bytes()[:4] == b"\x89PNG" for n in "abc")
