"""Perplexity of a GPT-2 on held-out text, with float32, bfloat16 and int8 weights side by side, and
how often their greedy tokens agree with float32's.

    jaxformer eval gpt2 --model runs/shakespeare --weights float32 bfloat16 int8 --json quality.json
    jaxformer eval gpt2 --model ckpt/gpt2 --data valid.txt --seq-len 1024

Text: --data (.txt or .jsonl files), else a training run's validation split (MODEL/data/val.npy).
Perplexity: exp of the mean next-token cross-entropy over non-overlapping windows of --seq-len + 1
tokens (all of them, or the first --max-windows). Agreement: --prompts windows' first 32 tokens are
continued greedily for --new-tokens tokens with each kind of weights; the share of positions whose
token equals float32's, up to the first difference (after it, the contexts differ).
"""

from jaxformer.commands import cli

KINDS = {"float32": "float", "bfloat16": "bfloat16", "int8": "int8"}


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer eval gpt2")
    ap.add_argument("--model", required=True, help="jaxformer checkpoint or training run, HF directory or hub id")
    ap.add_argument("--data", nargs="+", help="text files (default: the run's validation split)")
    ap.add_argument("--weights", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--seq-len", type=cli.at_least(2), default=128)
    ap.add_argument("--batch-size", type=cli.at_least(1), default=8)
    ap.add_argument("--max-windows", type=cli.at_least(1), help="evaluate at most this many windows")
    ap.add_argument("--prompts", type=cli.at_least(0), default=16, help="greedy-agreement prompts (0: none)")
    ap.add_argument("--new-tokens", type=cli.at_least(1), default=64)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), args.debug)


def run(args) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from jaxformer.errors import InputError
    from jaxformer.gpt2 import data as gdata
    from jaxformer.gpt2.generate import generate
    from jaxformer.gpt2.pretrained import load_pretrained
    from jaxformer.gpt2.quantize import to_decoding

    config, params, tok = load_pretrained(args.model, weights="float", scan_layers=False)
    if args.seq_len > config.n_positions:
        raise InputError(f"--seq-len {args.seq_len} exceeds the model's n_positions={config.n_positions}")
    windows = gdata.Windows(eval_tokens(args, tok), args.seq_len, "the evaluation text")
    n = min(len(windows), args.max_windows or len(windows))
    batches = [windows.take(np.arange(i, min(i + args.batch_size, n))) for i in range(0, n, args.batch_size)]
    prompts = [windows.take(np.asarray([i]))[0, :32].tolist() for i in range(min(args.prompts, n))]

    results, greedy = {}, {}
    for kind in args.weights:
        kparams, kconfig = to_decoding(params, config, KINDS[kind])
        results[kind] = perplexity(kparams, kconfig, batches)
        if prompts:
            greedy[kind] = generate(kparams, kconfig, prompts, max_new_tokens=args.new_tokens, greedy=True,
                                    stop_at_eos=False)
    print(f"{n} windows of {args.seq_len} tokens; {len(prompts)} prompts x {args.new_tokens} greedy tokens")
    report(results, greedy)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, seq_len=args.seq_len, windows=n,
                                                   prompts=len(prompts), new_tokens=args.new_tokens,
                                                   results=results), indent=1) + "\n")
    return 0


def eval_tokens(args, tok):
    """The evaluation text's tokens: --data, else the training run's validation split."""
    from pathlib import Path

    import numpy as np

    from jaxformer.errors import InputError
    from jaxformer.gpt2 import data as gdata
    from jaxformer.gpt2.tokenizer import GPT2Tokenizer

    if args.data:
        return gdata.tokenize(tok or GPT2Tokenizer.gpt2(), gdata.read_texts(gdata.resolve_paths(args.data)))
    if (Path(args.model) / "data" / "val.npy").is_file():
        return np.load(Path(args.model) / "data" / "val.npy")
    raise InputError(f"{args.model} is not a training run with data/val.npy: give --data")


def perplexity(params, config, batches) -> dict:
    """Mean next-token cross-entropy over ``batches`` (int32[b, seq_len + 1] windows), its exp, tokens."""
    import math

    import jax
    import numpy as np

    from jaxformer.gpt2.model import GPT2
    from jaxformer.nn.losses import cross_entropy

    model = GPT2(config)

    @jax.jit
    def nll(p, w):
        logits, _ = model.apply({"params": p}, w[:, :-1])
        total, _, count = cross_entropy(logits, w[:, 1:], np.ones(w[:, 1:].shape, bool))
        return total, count

    sums = [jax.device_get(nll(params, b)) for b in batches]
    loss = sum(float(t) for t, _ in sums) / sum(float(c) for _, c in sums)
    return dict(loss=loss, perplexity=math.exp(loss), tokens=int(sum(float(c) for _, c in sums)))


def report(results: dict[str, dict], greedy: dict[str, list]) -> None:
    """Prints a row per kind of weights, adding to its result the perplexity against float32's and
    the greedy agreement with float32's tokens."""
    import numpy as np

    base = results.get("float32")
    print(f"{'weights':<10} {'loss':>8} {'perplexity':>11} {'vs float32':>11} {'greedy agreement':>17}")
    for kind, r in results.items():
        if base:
            r["perplexity_vs_float32"] = r["perplexity"] / base["perplexity"] - 1
        if "float32" in greedy:
            agree = []
            for a, b in zip(greedy[kind], greedy["float32"]):
                same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
                agree.append(same / len(b))
            r["greedy_agreement"] = float(np.mean(agree))
        print(f"{kind:<10} {r['loss']:>8.4f} {r['perplexity']:>11.3f} "
              f"{r.get('perplexity_vs_float32', 0):>+10.2%} {r.get('greedy_agreement', float('nan')):>17.1%}")
