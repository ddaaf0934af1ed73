"""HellaSwag scoring (jaxformer/eval/hellaswag.py) against Hugging Face PyTorch in float64, and the
``jaxformer eval hellaswag`` command's errors."""

import copy
import json
import random
import urllib.request

import numpy as np
import pytest
import torch
import transformers

from jaxformer.commands import main
from jaxformer.eval import scoring
from jaxformer.eval.hellaswag import HellaSwag, read_items
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.gpt2.tokenizer import GPT2_DIR, GPT2Tokenizer

WORDS = ("the a man woman child dog horse rope ladder kitchen knife onion water pool ball garden fence paint brush "
         "quickly slowly then runs jumps cuts holds throws climbs washes smiles camera towel bike wheel shows "
         "begins while after into over under with his her their").split()


def official_items(n: int, seed: int = 0) -> list[dict]:
    """``n`` items in the official file's format: random contexts and endings of real words."""
    rng = random.Random(seed)
    sentence = lambda lo, hi: " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))  # noqa: E731
    items = []
    for i in range(n):
        ctx_a, ctx_b = sentence(4, 25).capitalize() + ".", sentence(1, 8)
        items.append(dict(ind=i, activity_label="Testing", ctx_a=ctx_a, ctx_b=ctx_b, ctx=f"{ctx_a} {ctx_b}",
                          split="val", split_type="indomain", label=rng.randrange(4),
                          endings=[sentence(1, 18) + "." for _ in range(4)], source_id=f"test~{i}"))
    return items


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(hf_dir, tmp_path_factory):
    """(HF directory, data file, items, reference summed losses [n, 4], reference mean losses [n, 4])."""
    path, model = hf_dir("small")
    items = official_items(12)
    data = write_jsonl(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl", items)
    ref = copy.deepcopy(model).double()
    tok = transformers.GPT2TokenizerFast.from_pretrained(GPT2_DIR)
    total, mean = np.zeros((12, 4)), np.zeros((12, 4))
    for i, item in enumerate(items):
        ctx = tok.encode(item["ctx"])
        for j, ending in enumerate(item["endings"]):
            end = tok.encode(" " + ending)
            ids = torch.tensor([ctx + end])
            with torch.no_grad():
                logp = torch.log_softmax(ref(ids).logits[0, :-1], -1)
            nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(ctx) - 1:]
            total[i, j], mean[i, j] = nll.sum().item(), nll.mean().item()
    return path, data, items, total, mean


def test_losses_match_hf(setup):
    path, _, items, ref_total, ref_mean = setup
    config, params, _ = load_pretrained(path, scan_layers=False)
    hs = HellaSwag(items, GPT2Tokenizer.gpt2(), config, batch=2)
    total, mean = hs.losses(params)
    np.testing.assert_allclose(total, ref_total, rtol=0, atol=1e-4)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-4)
    labels = np.asarray([it["label"] for it in items])
    assert hs.evaluate(params) == dict(hellaswag_acc=(ref_total.argmin(1) == labels).mean(),
                                       hellaswag_acc_norm=(ref_mean.argmin(1) == labels).mean())
    # Programs: one per length bucket, not per item; a second evaluation compiles nothing.
    shapes = {b.tokens.shape for b in hs.batches}
    assert len(shapes) < len(hs.batches) and all(s[0] == 8 and s[1] in (16, 24, 32, 48, 64) for s in shapes)
    compiled = scoring.batch_logprobs._cache_size()
    hs.evaluate(params)
    assert scoring.batch_logprobs._cache_size() == compiled


def test_command(setup, tmp_path, capsys):
    path, data, items, ref_total, ref_mean = setup
    out = tmp_path / "hellaswag.json"
    assert main(["eval", "hellaswag", "--model", path, "--data", data, "--limit", 10, "--batch", 3,
                 "--json", out]) == 0
    labels = np.asarray([it["label"] for it in items[:10]])
    result = json.loads(out.read_text())
    assert result["items"] == 10 and result["items_per_s"] > 0
    assert result["acc"] == (ref_total[:10].argmin(1) == labels).mean()
    assert result["acc_norm"] == (ref_mean[:10].argmin(1) == labels).mean()
    assert f"acc_norm {result['acc_norm']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "malformed", "field", "label", "endings"])
def test_bad_input(case, hf_dir, tmp_path, capsys):
    good = official_items(3)
    lines, expected = {
        "missing": (None, "absent.jsonl: no such file"),
        "malformed": ([*map(json.dumps, good[:2]), '{"ctx": "unterminated'], "bad.jsonl:3: not JSON"),
        "field": ([json.dumps(good[0]), json.dumps({k: v for k, v in good[1].items() if k != "endings"})],
                  "bad.jsonl:2: no field 'endings'"),
        "label": ([*map(json.dumps, good[:2]), json.dumps({**good[2], "label": 7})],
                  "bad.jsonl:3: 'label' must be an integer in [0, 4), not 7"),
        "endings": ([json.dumps({**good[0], "endings": ["a", "b"]})],
                    "bad.jsonl:1: 'endings' must be a list of 4 non-empty strings"),
    }[case]
    data = tmp_path / ("absent.jsonl" if lines is None else "bad.jsonl")
    if lines is not None:
        data.write_text("\n".join(lines) + "\n")
    assert main(["eval", "hellaswag", "--model", hf_dir("small")[0], "--data", data]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_read_items_accepts_string_labels(tmp_path):
    item = {**official_items(1)[0], "label": "3"}  # the Hugging Face copy's labels are strings
    assert read_items(write_jsonl(tmp_path / "s.jsonl", [item]))[0]["label"] == 3


@pytest.mark.parametrize("where", ["cache", "data_root"])
def test_offline_message(where, hf_dir, tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if where == "cache":
        monkeypatch.delenv("JAXFORMER_DATA", raising=False)
    else:
        (tmp_path / "data").mkdir()
        monkeypatch.setenv("JAXFORMER_DATA", str(tmp_path / "data"))
    assert main(["eval", "hellaswag", "--model", hf_dir("small")[0]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "hellaswag/hellaswag_val.jsonl" in err
    if where == "cache":
        assert "could not be downloaded" in err and "network unreachable" in err
        assert str(tmp_path / "cache" / "jaxformer" / "hellaswag" / "hellaswag_val.jsonl") in err
    else:
        assert f"JAXFORMER_DATA={tmp_path / 'data'} holds no hellaswag/hellaswag_val.jsonl" in err
