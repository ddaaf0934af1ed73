"""``jaxformer eval lm-eval`` (jaxformer/eval/harness.py) on local tasks written here: the logged
log-likelihoods and generations against Hugging Face PyTorch (float64) on the same random model."""

import copy
import json
import random

import lm_eval.utils
import numpy as np
import pytest
import torch
import transformers

from jaxformer.commands import main
from jaxformer.gpt2.tokenizer import GPT2_DIR

WORDS = ("the a man woman child dog horse rope kitchen knife water pool ball garden fence paint quickly slowly "
         "then runs jumps cuts holds throws climbs washes smiles towel bike wheel begins while after into over").split()
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: {output_type}
{body}
"""
BODIES = {
    "multiple_choice": 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
                       "metric_list:\n  - metric: acc\n  - metric: acc_norm",
    "loglikelihood_rolling": 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                             "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte",
    "generate_until": 'doc_to_text: "{{question}}"\ndoc_to_target: "{{choices[label]}}"\n'
                      'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n'
                      "metric_list:\n  - metric: exact_match",
}


def write_tasks(root) -> dict[str, str]:
    """Three local tasks (jf_choice, jf_rolling, jf_generate) in ``root``; their output types."""
    rng = random.Random(0)
    words = lambda lo, hi: " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))  # noqa: E731
    choice = [dict(question=words(3, 12).capitalize(), choices=[words(1, 5) for _ in range(3)], label=rng.randrange(3))
              for _ in range(5)]
    # The last document (~300 tokens) spans three windows of the model's 128 positions.
    texts = [dict(text=words(5, 30) + ".") for _ in range(2)] + [dict(text=words(300, 300) + ".")]
    tasks = {"jf_choice": ("multiple_choice", choice), "jf_rolling": ("loglikelihood_rolling", texts),
             "jf_generate": ("generate_until", choice[:3])}
    for name, (output_type, docs) in tasks.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(TASK.format(name=name, data=root / f"{name}.jsonl", cache=root / "cache",
                                                       output_type=output_type, body=BODIES[output_type]))
    return {name: t for name, (t, _) in tasks.items()}


class Reference:
    """Hugging Face PyTorch in float64 with HF's tokenizer, tokenizing as lm-eval's TemplateLM does."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).double()
        self.tok = transformers.GPT2TokenizerFast.from_pretrained(GPT2_DIR)

    def logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = torch.tensor([(context + continuation)[:-1]])  # the last token is only predicted
        with torch.no_grad():
            logp = torch.log_softmax(self.model(ids).logits[0], -1)[len(context) - 1:]
        target = torch.tensor(continuation)
        return logp[torch.arange(len(target)), target].sum().item(), bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
        return self.logprob(ctx, whole[len(ctx):])

    def rolling(self, text: str) -> float:
        windows = lm_eval.utils.get_rolling_token_windows(self.tok.encode(text), self.tok.eos_token_id,
                                                          self.model.config.n_positions, 1)
        return sum(self.logprob(*lm_eval.utils.make_disjoint_window(w))[0] for w in windows)

    def generate(self, context: str, new: int, stop: str) -> str:
        ids = torch.tensor([self.tok.encode(context)])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                      pad_token_id=self.tok.eos_token_id)
        return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(stop)[0]


@pytest.fixture(scope="module")
def run(hf_dir, tmp_path_factory):
    """(results JSON of one ``jaxformer eval lm-eval`` run over the three tasks, Reference)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    write_tasks(root)
    path, model = hf_dir("small")
    out = root / "results.json"
    try:
        assert main(["eval", "lm-eval", "--model", path, "--tasks", "jf_choice,jf_rolling", "jf_generate",
                     "--include-path", root, "--batch-size", 4, "--bootstrap-iters", 0, "--log-samples",
                     "--output", out]) == 0
    finally:
        mp.undo()
    return json.loads(out.read_text()), Reference(model)


def test_results_structure(run):
    results, _ = run
    assert set(results["results"]) == {"jf_choice", "jf_rolling", "jf_generate"}
    assert {"acc,none", "acc_norm,none"} <= set(results["results"]["jf_choice"])
    assert {"word_perplexity,none", "bits_per_byte,none"} <= set(results["results"]["jf_rolling"])
    assert "exact_match,none" in results["results"]["jf_generate"]
    assert results["config"]["model"] == "jaxformer" and results["config"]["batch_size"] == 4
    assert {"configs", "versions", "n-shot", "higher_is_better", "n-samples"} <= set(results)
    assert [len(results["samples"][t]) for t in ("jf_choice", "jf_rolling", "jf_generate")] == [5, 3, 3]


def test_loglikelihood_matches_hf(run):
    results, ref = run
    correct = []
    for sample in results["samples"]["jf_choice"]:
        got = [resp[0] for resp in sample["resps"]]  # [(logprob, is_greedy)] per choice
        want = [ref.loglikelihood(*args) for args in sample["arguments"]]
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=1e-4)
        assert [g[1] for g in got] == [w[1] for w in want]
        correct.append(int(np.argmax([w[0] for w in want])) == sample["target"])
        assert sample["acc"] == correct[-1]
    assert results["results"]["jf_choice"]["acc,none"] == pytest.approx(np.mean(correct))


def test_rolling_matches_hf(run):
    results, ref = run
    for sample in results["samples"]["jf_rolling"]:
        (text,) = sample["arguments"][0]
        n = len(ref.tok.encode(text))
        # Summed over up to ~300 tokens: float32 accumulation, 1e-4 per token.
        np.testing.assert_allclose(sample["resps"][0][0], ref.rolling(text), rtol=0, atol=1e-4 * n)


def test_generate_until_matches_hf(run):
    results, ref = run
    for sample in results["samples"]["jf_generate"]:
        context, kwargs = sample["arguments"][0]
        assert sample["resps"][0][0] == ref.generate(context, kwargs["max_gen_toks"], kwargs["until"][0])


@pytest.mark.parametrize("case", ["task", "include_path"])
def test_bad_input(case, hf_dir, tmp_path, capsys):
    args = ["eval", "lm-eval", "--model", hf_dir("small")[0], "--output", tmp_path / "r.json"]
    if case == "task":
        args += ["--tasks", "jf_choise", "--include-path", tmp_path]
        write_tasks(tmp_path)
        expected = "--tasks: no lm-eval task 'jf_choise'; did you mean jf_choice"
    else:
        args += ["--tasks", "jf_choice", "--include-path", tmp_path / "absent"]
        expected = f"--include-path {tmp_path / 'absent'}: no such directory"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {expected}" in err and "Traceback" not in err
