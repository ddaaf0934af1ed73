"""Generate text with GPT-2 from a jaxformer checkpoint or training run, or a Hugging Face
directory / hub id.

    jaxformer generate --model DIR --prompt "Hello" --max-new-tokens 40 --top-p 0.9 --seed 1
    jaxformer generate --model DIR --prompt "A" --prompt "B" --greedy --json
    jaxformer generate --model BASE --lora ADAPTER --prompt "English: I like cheese. French:"

--lora applies a LoRA adapter (a PEFT directory or a jaxformer LoRA run) to the model as it
runs, without merging it into the weights.

The tokenizer is the model's own files, else --tokenizer DIR, else GPT-2's (shipped with jaxformer).
"""

import json
import sys
import time

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer generate")
    ap.add_argument("--model", required=True, help="jaxformer checkpoint or run directory, HF directory or hub id")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--max-new-tokens", type=cli.at_least(1), default=50)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--temperature", type=cli.number_in(0, float("inf"), low_open=True), default=1.0)
    ap.add_argument("--top-k", type=cli.at_least(0), default=0, help="0 disables")
    ap.add_argument("--top-p", type=cli.number_in(0, 1, low_open=True), default=1.0, help="1 disables")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=cli.at_least(1), default=1, help="samples per prompt")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"],
                    help="weights as read while decoding: bfloat16 halves the bytes (default: the model's)")
    ap.add_argument("--quantize", choices=["int8"], help="int8 weights with a scale per output (a quarter)")
    ap.add_argument("--lora", metavar="ADAPTER", help="LoRA adapter on --model: a PEFT directory or a jaxformer "
                                                      "LoRA run")
    ap.add_argument("--tokenizer", help="tokenizer directory, when the model has none")
    ap.add_argument("--json", action="store_true", help="one JSON object per output line")
    args = ap.parse_args(argv)
    if args.greedy and args.num_samples > 1:
        ap.error("--num-samples > 1 needs sampling, not --greedy")
    if args.dtype and args.quantize:
        ap.error("give --dtype or --quantize, not both")
    return cli.run(lambda: run(args), args.debug)


def run(args) -> int:
    from jaxformer.gpt2.generate import generate
    from jaxformer.gpt2.pretrained import load_pretrained
    from jaxformer.gpt2.tokenizer import GPT2Tokenizer

    weights = args.quantize or {"float32": "float", "bfloat16": "bfloat16"}.get(args.dtype)
    config, params, tok = load_pretrained(args.model, weights=weights, scan_layers=False)
    adapters = None
    if args.lora:
        from jaxformer.gpt2 import lora, peft
        from jaxformer.gpt2.tokenizer import has_tokenizer

        spec, adapter = peft.load_adapter(args.lora, config)
        adapters = lora.model_input(adapter, spec, config)
        tok = tok or (GPT2Tokenizer.from_dir(args.lora) if has_tokenizer(args.lora) else None)
    if args.tokenizer:
        tok = GPT2Tokenizer.from_dir(args.tokenizer)
    tok = tok or GPT2Tokenizer.gpt2()
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    ids = tok.encode_batch(prompts)
    start = time.perf_counter()
    outs = generate(params, config, ids, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, lora=adapters)
    seconds = time.perf_counter() - start
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
