"""Completion-only fine-tuning data: the packed loss mask against an independent computation, the
loss against float64 numpy, and runs (full fine-tuning and LoRA) whose first loss is Hugging Face
PyTorch's loss on the completions of the same batch."""

import json
import random

import jax
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxformer.commands import main as jaxformer
from jaxformer.gpt2 import data as gdata
from jaxformer.gpt2.config import preset
from jaxformer.gpt2.model import GPT2, init_params
from jaxformer.gpt2.train import make_loss_fn
from jaxformer.translator.data import load_pairs

WORDS = ["red", "green", "blue", "cat", "dog", "runs", "sleeps", "a", "the", "."]
TOK = gdata.train_tokenizer([" ".join(WORDS)], "word", 20)
NO_DROPOUT = ["--model.resid-pdrop", "0", "--model.embd-pdrop", "0", "--model.attn-pdrop", "0"]


def counted_positions(tok, pairs) -> set[int]:
    """Stream positions whose token counts as a target, from each example's own token counts:
    ``[start + len(prompt), start + len(prompt) + len(completion) + 1)`` (the completion, then EOS)."""
    counted, start = set(), 0
    for prompt, completion in pairs:
        n_prompt, n_completion = len(tok.encode(prompt)), len(tok.encode(completion))
        counted.update(range(start + n_prompt, start + n_prompt + n_completion + 1))
        start += n_prompt + n_completion + 1
    return counted


text = st.lists(st.sampled_from(WORDS), max_size=5).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(text, text), min_size=1, max_size=10), seq_len=st.integers(2, 12))
def test_packed_loss_mask_matches_an_independent_computation(pairs, seq_len):
    tokens, mask, starts = gdata.tokenize_pairs(TOK, pairs)
    if (len(tokens) - 1) // seq_len < 1:
        return
    counted = counted_positions(TOK, pairs)
    windows = gdata.Windows(tokens, seq_len, loss_mask=mask)
    batch = windows.take(np.arange(len(windows)))
    for k in range(len(windows)):
        targets = k * seq_len + 1 + np.arange(seq_len)  # stream positions of window k's targets
        np.testing.assert_array_equal(batch["loss_mask"][k], [int(i) in counted for i in targets])
        np.testing.assert_array_equal(batch["tokens"][k], tokens[k * seq_len:k * seq_len + seq_len + 1])
    # each example ends with a counted EOS; a prompt's tokens (the next example's too) never count
    ends = np.r_[starts[1:], len(tokens)] - 1
    assert (tokens[ends] == TOK.eos_id).all() and mask[ends].all()
    for (prompt, _), start in zip(pairs, starts):
        assert not mask[start:start + len(TOK.encode(prompt))].any()


def test_completion_only_loss_matches_float64_numpy():
    config = preset("tiny", vocab_size=TOK.vocab_size, n_positions=32)
    params = init_params(config.replace(initializer_range=0.5), jax.random.key(0))
    rng = random.Random(0)
    pairs = [(" ".join(rng.choices(WORDS, k=3)), " ".join(rng.choices(WORDS, k=2))) for _ in range(20)]
    tokens, mask, _ = gdata.tokenize_pairs(TOK, pairs)
    batch = gdata.Windows(tokens, 9, loss_mask=mask).take(np.arange(4))
    total, (n, _) = make_loss_fn(config, deterministic=True)(params, batch, None)
    logits = np.asarray(GPT2(config).apply({"params": params}, batch["tokens"][:, :-1])[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    assert n == batch["loss_mask"].sum() < batch["loss_mask"].size
    np.testing.assert_allclose(float(total), nll[batch["loss_mask"]].sum(), rtol=1e-5)


def test_detection_by_fields(tmp_path):
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    (tmp_path / "text.jsonl").write_text('{"text": "a b"}\n')
    assert gdata.is_sft([tmp_path / "sft.jsonl"])
    assert not gdata.is_sft([tmp_path / "text.jsonl"]) and not gdata.is_sft([tmp_path / "sft.jsonl",
                                                                           tmp_path / "text.jsonl"])


@pytest.fixture(scope="module")
def translation_pairs(data_root, tmp_path_factory):
    """English -> French prompts and completions from the fra-eng data, as JSONL."""
    path = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    pairs = load_pairs(data_root / "fra-eng" / "fra-eng.zip", report=False)[::500][:300]
    path.write_text("".join(json.dumps({"prompt": f"English: {en}\nFrench:", "completion": f" {fr}"}) + "\n"
                            for en, fr in pairs))
    return path


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_run_loss_counts_completions_only(hf_dir, translation_pairs, tmp_path, kind):
    """Step 1's logged loss (before any update; a fresh adapter adds nothing) is PyTorch's mean
    cross-entropy over the completion tokens of step 0's batch, read back from the run's files."""
    path, model = hf_dir("small")
    out = tmp_path / "run"
    lora = ["--lora-rank", "4", "--lora-targets", "c_attn,c_fc"] if kind == "lora" else []
    assert jaxformer(["train", "gpt2", "--init", str(path), "--data", str(translation_pairs), "--out", str(out),
                      "--steps", "2", "--seq-len", "48", "--batch-size", "4", "--log-every", "1", "--eval-batches",
                      "1", "--sample-tokens", "8", "--no-progress", *NO_DROPOUT, *lora]) == 0
    train = gdata.Windows(np.load(out / "data" / "train.npy"), 48,
                          loss_mask=np.load(out / "data" / "train_loss_mask.npy"))
    batch = train.take(train.sample_order(0, 0, 4))
    with torch.no_grad():
        logits = model(torch.tensor(batch["tokens"][:, :-1], dtype=torch.long)).logits.double()
    targets = torch.tensor(batch["tokens"][:, 1:], dtype=torch.long)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").numpy()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("step") == 1 and "loss" in r)
    np.testing.assert_allclose(first["loss"], nll[batch["loss_mask"]].mean(), rtol=1e-5)
    assert records[-1]["sample"].startswith("English: ")  # the first validation example's prompt
