"""Convert GPT-2 checkpoints between Hugging Face and jaxformer.

    jaxformer convert SRC DST            # HF dir or hub id -> jaxformer checkpoint dir
    jaxformer convert --to-hf SRC DST    # jaxformer checkpoint or run dir -> HF dir (a LoRA run: merged)
    jaxformer convert --to-peft RUN DST  # a jaxformer LoRA run's adapter -> PEFT directory

DST must not exist yet, or be empty (--overwrite replaces what it holds).
"""

from pathlib import Path

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer convert")
    ap.add_argument("src", help="HF directory or hub id (or, with --to-hf, a jaxformer checkpoint or run directory)")
    ap.add_argument("dst", help="output directory")
    ap.add_argument("--to-hf", action="store_true", help="convert a jaxformer checkpoint to HF format")
    ap.add_argument("--to-peft", action="store_true", help="write a jaxformer LoRA run's adapter as a PEFT directory "
                                                          "(adapter_config.json, adapter_model.safetensors)")
    ap.add_argument("--tokenizer", help="directory with tokenizer files to copy when SRC has none")
    ap.add_argument("--overwrite", action="store_true", help="write into a DST that already holds files")
    ap.add_argument("--dtype", choices=["bfloat16"], help="store bfloat16 weights for decoding (jaxformer format)")
    ap.add_argument("--quantize", choices=["int8"], help="store int8 weights for decoding (jaxformer format)")
    args = ap.parse_args(argv)
    if args.to_peft and (args.to_hf or args.dtype or args.quantize):
        ap.error("--to-peft writes the adapter as it is; it takes no --to-hf, --dtype or --quantize")
    if args.to_hf and (args.dtype or args.quantize):
        ap.error("--to-hf writes float32 weights; --dtype / --quantize are for jaxformer checkpoints")
    if args.dtype and args.quantize:
        ap.error("give --dtype or --quantize, not both")
    return cli.run(lambda: to_peft(args) if args.to_peft else convert(args), args.debug)


def to_peft(args) -> int:
    from jaxformer.errors import InputError
    from jaxformer.gpt2 import lora, peft
    from jaxformer.gpt2.config import GPT2Config

    if peft.run_spec(args.src) is None:
        raise InputError(f"{args.src}: not a jaxformer LoRA run (a run.json with lora_rank)")
    cli.check_output(args.dst, args.overwrite)
    spec, adapter = peft.load_adapter(args.src, GPT2Config.load(Path(args.src) / "config.json"))
    peft.save_peft(args.dst, adapter, spec, base=peft.run_base(args.src))
    print(f"wrote {Path(args.dst)} (PEFT LoRA adapter: r={spec.rank}, alpha={spec.alpha:g}, "
          f"{', '.join(spec.targets)}, {lora.count(adapter):,} parameters; base {peft.run_base(args.src)})")
    return 0


def convert(args) -> int:
    import jax

    from jaxformer.errors import InputError
    from jaxformer.gpt2 import hf
    from jaxformer.gpt2.pretrained import (
        is_jaxformer_checkpoint,
        is_training_run,
        load_pretrained,
        save_pretrained,
    )
    from jaxformer.gpt2.tokenizer import has_tokenizer

    if args.to_hf and not (is_jaxformer_checkpoint(args.src) or is_training_run(args.src)):
        raise InputError(f"{args.src}: not a jaxformer checkpoint (config.json and params/) or training run")
    cli.check_output(args.dst, args.overwrite)
    config, params, _ = load_pretrained(args.src, weights=args.quantize or args.dtype)
    tok_src = args.tokenizer or (hf.resolve(args.src) if not args.to_hf else args.src)
    tok_src = tok_src if has_tokenizer(tok_src) else None
    if args.to_hf:
        hf.save_hf(args.dst, config, params, tokenizer_dir=tok_src)
    else:
        save_pretrained(args.dst, config, params, tokenizer_dir=tok_src)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"wrote {Path(args.dst)} ({'HF' if args.to_hf else 'jaxformer'} format, {config.weights} weights, "
          f"{n:,} parameters, "
          f"n_layer={config.n_layer}, n_embd={config.n_embd}{', tokenizer copied' if tok_src else ', no tokenizer'})")
    return 0
