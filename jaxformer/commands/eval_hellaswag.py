"""HellaSwag accuracy of a GPT-2, scored as llm.c and nanoGPT do (jaxformer/eval/hellaswag.py).

    jaxformer eval hellaswag --model ckpt/gpt2
    jaxformer eval hellaswag --model gpt2 --data hellaswag_val.jsonl --limit 1000 --json hellaswag.json

Each ending's loss is the cross-entropy over its tokens after the context; acc picks the lowest
summed loss, acc_norm (llm.c's figure) the lowest mean. The data: --data, else the official
validation file, $JAXFORMER_DATA/hellaswag/hellaswag_val.jsonl or ~/.cache/jaxformer/hellaswag/
(downloaded there from github.com/rowanz/hellaswag when online). items/s includes compilation.
"""

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer eval hellaswag")
    ap.add_argument("--model", required=True, help="jaxformer checkpoint or training run, HF directory or hub id")
    ap.add_argument("--data", help="a HellaSwag JSONL file (default: the official validation set)")
    ap.add_argument("--limit", type=cli.at_least(1), help="score the first N items only")
    ap.add_argument("--batch", type=cli.at_least(1), default=8, help="items per batch (4 rows each)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), args.debug)


def run(args) -> int:
    import json
    import time
    from pathlib import Path

    from jaxformer.eval.hellaswag import HellaSwag, load_items
    from jaxformer.gpt2.pretrained import load_pretrained
    from jaxformer.gpt2.tokenizer import GPT2Tokenizer

    items = load_items(args.data, args.limit)
    config, params, tokenizer = load_pretrained(args.model, weights="float", scan_layers=False)
    start = time.perf_counter()
    result = HellaSwag(items, tokenizer or GPT2Tokenizer.gpt2(), config, args.batch).evaluate(params)
    seconds = time.perf_counter() - start
    result = dict(acc=result["hellaswag_acc"], acc_norm=result["hellaswag_acc_norm"], items=len(items),
                  items_per_s=len(items) / seconds)
    print(f"acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  items {len(items)}  "
          f"items/s {result['items_per_s']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, data=args.data, **result), indent=1) + "\n")
    return 0
