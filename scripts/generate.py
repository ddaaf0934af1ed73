"""Generate text with GPT-2 from a jaxformer checkpoint or a Hugging Face directory / hub id.

    python scripts/generate.py --model DIR --prompt "Hello" --max-new-tokens 40 --top-p 0.9 --seed 1
    python scripts/generate.py --model DIR --prompt "A" --prompt "B" --greedy --json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.hf import CheckpointError
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.paths import DATA_ENV
from jaxformer.tokenizer import GPT2Tokenizer


def find_tokenizer(model_tokenizer, explicit: str | None) -> GPT2Tokenizer:
    """The --tokenizer directory, else the model's own files, else $JAXFORMER_DATA/gpt2-tokenizer."""
    if explicit:
        return GPT2Tokenizer.from_dir(explicit)
    if model_tokenizer is not None:
        return model_tokenizer
    fallback = Path(os.environ.get(DATA_ENV, "")) / "gpt2-tokenizer"
    if os.environ.get(DATA_ENV) and fallback.is_dir():
        return GPT2Tokenizer.from_dir(fallback)
    raise FileNotFoundError(f"the model has no tokenizer files: pass --tokenizer DIR (or set {DATA_ENV})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="jaxformer checkpoint, HF directory or hub id")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="0 disables")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the model's)")
    ap.add_argument("--tokenizer", help="tokenizer directory, when the model has none")
    ap.add_argument("--json", action="store_true", help="one JSON object per output line")
    args = ap.parse_args(argv)
    if args.greedy and args.num_samples > 1:
        ap.error("--num-samples > 1 needs sampling, not --greedy")

    try:
        overrides = dict(scan_layers=False, **({"dtype": args.dtype} if args.dtype else {}))
        config, params, tok = load_pretrained(args.model, **overrides)
        tok = find_tokenizer(tok, args.tokenizer)
        prompts = [p for p in args.prompt for _ in range(args.num_samples)]
        ids = tok.encode_batch(prompts)
        start = time.perf_counter()
        outs = generate(params, config, ids, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        seconds = time.perf_counter() - start
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for prompt, new in zip(prompts, outs):
        text = tok.decode(new)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": new}, ensure_ascii=False))
        else:
            print(f"{prompt}{text}\n{'-' * 40}")
    if not args.json:
        n = sum(map(len, outs))
        print(f"{n} tokens in {seconds:.2f} s (first call includes compilation)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
