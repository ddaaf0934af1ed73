"""HellaSwag scoring speed: jaxformer against Hugging Face PyTorch on the same items, in the same run.

    python scripts/bench_hellaswag.py --items 200 --json bench_hellaswag.json

Both score the same random-weight GPT-2 (124M shape, ``transformers.GPT2LMHeadModel(GPT2Config())``,
seed 0, float32) on the same items, written in the official format from real words (contexts of
about 40 tokens, endings of about 20). Both sort the 4 x items endings by length and run batches of
4 x --batch rows: jaxformer through :class:`jaxformer.eval.hellaswag.HellaSwag` (lengths padded to
length buckets, jitted), Hugging Face as llm.c does (a batched forward, rows right-padded to the
batch's longest, ``cross_entropy`` masked to the ending). Tokenizing is outside the timing. items/s
= items / seconds of a whole pass; the two sides' losses are compared too (max |difference|).
"""

import argparse
import re
import sys

import numpy as np

from jaxformer.benchmark import STATISTIC, best_times, device_name, write_json
from jaxformer.commands import cli


def parser() -> argparse.ArgumentParser:
    ap = cli.parser(__doc__)
    ap.add_argument("--items", type=cli.at_least(1), default=200)
    ap.add_argument("--batch", type=cli.at_least(1), default=8, help="items per batch (4 rows each)")
    ap.add_argument("--repeats", type=cli.at_least(1), default=2, help="timed passes per side, interleaved")
    ap.add_argument("--json", help="write {'cases': [case]} here")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    def body():
        result = case(args)
        report([result])
        write_json(args.json, dict(cases=[result]))
    return cli.run(body, args.debug)


def items(n: int, seed: int = 0) -> list[dict]:
    """``n`` HellaSwag items of real words (GPT-2 vocabulary words, one token each): contexts of
    about 40 tokens, 4 endings of about 20."""
    from jaxformer.gpt2.tokenizer import GPT2Tokenizer

    words = sorted(w[1:] for w in GPT2Tokenizer.gpt2().tokenizer.get_vocab() if re.fullmatch("Ġ[a-z]{3,}", w))
    rng = np.random.default_rng(seed)
    text = lambda mean, sd, low: " ".join(rng.choice(words, max(low, int(rng.normal(mean, sd)))))  # noqa: E731
    return [dict(ind=i, ctx=text(40, 10, 10).capitalize(), endings=[text(20, 6, 4) for _ in range(4)],
                 label=int(rng.integers(4)), split="val") for i in range(n)]


def case(args) -> dict:
    """The benchmark case for ``args`` (``items``, ``batch``, ``repeats``): items/s both sides."""
    import jax
    import torch
    import transformers

    from jaxformer.eval.hellaswag import HellaSwag
    from jaxformer.gpt2.config import GPT2Config
    from jaxformer.gpt2.hf import hf_to_params
    from jaxformer.gpt2.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    config = GPT2Config.from_hf_dict(hf_model.config.to_dict(), scan_layers=False)
    params = jax.device_put(hf_to_params({k: v.numpy() for k, v in hf_model.state_dict().items()}, config))
    data = items(args.items)
    hs = HellaSwag(data, GPT2Tokenizer.gpt2(), config, args.batch)
    hf_run, hf_tokens = hf_scorer(hf_model, hs)
    losses = {}
    fns = {"jaxformer": lambda: losses.update(jaxformer=hs.losses(params)[0]),
           "hf": lambda: losses.update(hf=hf_run())}
    t = best_times(fns, args.repeats)
    return dict(name="hellaswag", jaxformer_items_per_s=args.items / t["jaxformer"],
                hf_items_per_s=args.items / t["hf"], speedup=t["hf"] / t["jaxformer"], items=args.items,
                batch_items=args.batch, jaxformer_tokens=sum(b.tokens.size for b in hs.batches), hf_tokens=hf_tokens,
                jaxformer_s=t["jaxformer"], hf_s=t["hf"],
                max_abs_loss_diff=float(np.abs(losses["jaxformer"] - losses["hf"]).max()),
                model="gpt2 124M shape, random weights (seed 0), float32", device=device_name(),
                torch=torch.__version__, torch_threads=torch.get_num_threads(), jax=jax.__version__,
                statistic=STATISTIC)


def hf_scorer(model, hs):
    """(``run() -> float64[items, 4]``, tokens per pass): the summed ending losses of ``hs``'s requests
    with Hugging Face, batched as ``hs`` is (same rows, same order), each batch padded to its longest row."""
    import torch
    import torch.nn.functional as F

    batches = []
    for b in hs.batches:
        k, n = len(b.index), int(b.weights[: len(b.index)].any(0).nonzero()[0].max()) + 1  # rows, longest row
        batches.append((torch.from_numpy(b.tokens[:k, :n].astype(np.int64)),
                        torch.from_numpy(b.targets[:k, :n].astype(np.int64)),
                        torch.from_numpy(b.weights[:k, :n]), b.index))

    def run():
        total = np.zeros(4 * hs.items)
        with torch.inference_mode():
            for tokens, targets, weights, index in batches:
                logits = model(tokens).logits
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
                total[index] = (loss * weights).sum(1).double().numpy()
        return total.reshape(hs.items, 4)
    return run, sum(tokens.numel() for tokens, _, _, _ in batches)


def report(cases: list[dict]) -> None:
    print(f"\n{'items':>6} {'batch':>6} {'jaxformer items/s':>18} {'HF items/s':>11} {'speedup':>8} "
          f"{'max |dloss|':>12}")
    for c in cases:
        print(f"{c['items']:>6} {c['batch_items']:>6} {c['jaxformer_items_per_s']:>18.2f} {c['hf_items_per_s']:>11.2f} "
              f"{c['speedup']:>7.2f}x {c['max_abs_loss_diff']:>12.2e}")
    print(f"{cases[0]['device']}; torch {cases[0]['torch']} ({cases[0]['torch_threads']} threads); timing: {STATISTIC}")


if __name__ == "__main__":
    sys.exit(main())
