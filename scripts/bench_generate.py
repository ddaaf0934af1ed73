"""GPT-2 generation speed: jaxformer against Hugging Face PyTorch ``generate`` in the same run.

    python scripts/bench_generate.py --json bench_generate.json

Both run the same random-weight GPT-2 (124M shape by default), greedy, with a KV cache, a
32-token prompt and 128 new tokens (no early stop). ``--dtype``: the weights jaxformer reads while
decoding, float32, bfloat16 or int8 (jaxformer.gpt2.quantize); Hugging Face runs in float32 or
bfloat16 (its int8 comparison is float32). Roofline: the bytes of weights one decode step reads
(in their stored type), divided by the time per step, as a fraction of a copy bandwidth measured in
this run (STREAM convention: bytes read + written per second).
"""

import json
import sys
import time

import jax
import numpy as np

from jaxformer.benchmark import (
    STATISTIC,
    best_times,
    copy_bandwidth,
    device_name,
    write_json,
)
from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--preset", default="gpt2", help="GPT-2 size (random weights)")
    ap.add_argument("--batch", type=cli.at_least(1), nargs="+", default=[1, 8])
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "int8"])
    ap.add_argument("--prompt-len", type=cli.at_least(1), default=32)
    ap.add_argument("--new-tokens", type=cli.at_least(1), default=128)
    ap.add_argument("--repeats", type=cli.at_least(1), default=3, help="timed passes per side, interleaved")
    ap.add_argument("--no-hf", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def bench(args) -> int:
    import torch
    import transformers

    from jaxformer.gpt2.config import preset
    from jaxformer.gpt2.generate import generate
    from jaxformer.gpt2.hf import hf_to_params
    from jaxformer.gpt2.quantize import to_decoding

    on_gpu = jax.devices()[0].platform == "gpu"
    tdev = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    base = preset(args.preset)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**base.to_hf_dict())).eval()
    state = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
    bw, bw_one = copy_bandwidth()
    device = device_name()
    print(f"device: {device}; torch {torch.__version__} on {tdev} with {torch.get_num_threads()} threads; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (one thread: {bw_one / 1e9:.1f} GB/s)")

    rng = np.random.RandomState(0)
    cases = []
    for dtype in args.dtype:
        config = base.replace(scan_layers=False)
        params, config = to_decoding(hf_to_params(state, config), config, "float" if dtype == "float32" else dtype)
        params = jax.device_put(params)
        # Weights one decode step reads: everything but the position table (one row of it is read).
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params["wpe"]["embedding"].nbytes
        tmodel = hf_model.to(tdev, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        for b in args.batch:
            prompts = rng.randint(0, config.vocab_size, (b, args.prompt_len)).tolist()
            run = lambda: generate(params, config, prompts, max_new_tokens=args.new_tokens,  # noqa: E731
                                   greedy=True, stop_at_eos=False)
            start = time.perf_counter()
            out = run()
            first_call = time.perf_counter() - start
            assert all(len(o) == args.new_tokens for o in out)
            fns = {"jaxformer": run}
            if not args.no_hf:
                fns["hf"] = hf_generate(tmodel, prompts, args.new_tokens, config.eos_token_id, tdev)
            t = best_times(fns, args.repeats)
            jf_s = t["jaxformer"]
            step_s = jf_s / args.new_tokens
            case = dict(batch=b, dtype=dtype, hf_dtype="bfloat16" if dtype == "bfloat16" else "float32",
                        weight_bytes=weight_bytes, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        jaxformer_tok_s=b * args.new_tokens / jf_s, compile_s=first_call - jf_s, jaxformer_s=jf_s,
                        roofline_fraction=weight_bytes / step_s / bw)
            if "hf" in t:
                case.update(hf_tok_s=b * args.new_tokens / t["hf"], hf_s=t["hf"], speedup=t["hf"] / jf_s)
            cases.append(case)
            print(json.dumps(case))

    report(cases)
    write_json(args.json, dict(device=device, copy_bandwidth_gb_s=bw / 1e9, copy_bandwidth_one_thread_gb_s=bw_one / 1e9,
                               jax=jax.__version__, torch=torch.__version__, preset=args.preset, cases=cases))
    return 0


def hf_generate(model, prompts: list[list[int]], new_tokens: int, eos_token_id: int, tdev: str):
    """``run()``: Hugging Face greedy ``generate`` of exactly ``new_tokens`` tokens for ``prompts``."""
    import torch

    ids = torch.tensor(prompts, device=tdev)

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=eos_token_id, use_cache=True)
        if tdev == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def report(cases: list[dict]) -> None:
    print(f"\n{'batch':>5} {'dtype':>9} {'jaxformer tok/s':>16} {'HF tok/s':>9} {'speedup':>8} "
          f"{'compile s':>10} {'roofline':>9}")
    for c in cases:
        print(f"{c['batch']:>5} {c['dtype']:>9} {c['jaxformer_tok_s']:>16.1f} {c.get('hf_tok_s', float('nan')):>9.1f} "
              f"{c.get('speedup', float('nan')):>7.2f}x {c['compile_s']:>10.2f} {c['roofline_fraction']:>8.0%}")
    print(f"timing: {STATISTIC}")


if __name__ == "__main__":
    sys.exit(main())
