"""Convert GPT-2 checkpoints between Hugging Face and jaxformer.

    python scripts/convert_gpt2.py SRC DST            # HF dir or hub id -> jaxformer checkpoint dir
    python scripts/convert_gpt2.py --to-hf SRC DST    # jaxformer checkpoint dir -> HF dir
"""

import argparse
import sys
from pathlib import Path

from jaxformer.gpt2 import hf
from jaxformer.gpt2.pretrained import is_jaxformer_checkpoint, load_pretrained, save_pretrained
from jaxformer.tokenizer import has_tokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="HF directory or hub id (or, with --to-hf, a jaxformer checkpoint)")
    ap.add_argument("dst", help="output directory")
    ap.add_argument("--to-hf", action="store_true", help="convert a jaxformer checkpoint to HF format")
    ap.add_argument("--tokenizer", help="directory with tokenizer files to copy when SRC has none")
    args = ap.parse_args(argv)

    try:
        if args.to_hf and not is_jaxformer_checkpoint(args.src):
            raise hf.CheckpointError(f"{args.src}: not a jaxformer checkpoint (needs config.json and params/)")
        config, params, _ = load_pretrained(args.src)
        tok_src = args.tokenizer or (hf.resolve(args.src) if not args.to_hf else args.src)
        tok_src = tok_src if has_tokenizer(tok_src) else None
        if args.to_hf:
            hf.save_hf(args.dst, config, params, tokenizer_dir=tok_src)
        else:
            save_pretrained(args.dst, config, params, tokenizer_dir=tok_src)
    except (hf.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(x.size for x in __import__("jax").tree.leaves(params))
    print(f"wrote {Path(args.dst)} ({'HF' if args.to_hf else 'jaxformer'} format, {n:,} parameters, "
          f"n_layer={config.n_layer}, n_embd={config.n_embd}{', tokenizer copied' if tok_src else ', no tokenizer'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
