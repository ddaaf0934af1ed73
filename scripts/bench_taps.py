"""What capturing costs: a GPT-2 forward pass, plain and through jaxformer.nn.taps, in the same run.

    python scripts/bench_taps.py --json bench_taps.json

Cases (each one ``jax.jit``): the plain model; taps with nothing captured (the claim: the same
program, the same speed); one tap (``h/resid_post``, all layers); the HF outputs (hidden states
and attention maps); every tap. Also the compiled programs' instructions (opcode and shape of each,
source metadata aside), so "the same program" is checked, not only timed. GPT-2 124M shape, random
weights, float32.
"""

import sys

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--preset", default="gpt2", help="GPT-2 size (random weights)")
    ap.add_argument("--batch", type=cli.at_least(1), default=1)
    ap.add_argument("--seq-len", type=cli.at_least(1), default=128)
    ap.add_argument("--repeats", type=cli.at_least(1), default=5, help="timed passes per case, interleaved")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def bench(args) -> int:
    import jax
    import numpy as np

    from jaxformer.benchmark import STATISTIC, best_times, device_name, write_json
    from jaxformer.errors import InputError
    from jaxformer.gpt2.config import preset
    from jaxformer.gpt2.model import GPT2, init_params
    from jaxformer.nn import taps

    config = preset(args.preset, scan_layers=False)
    if args.seq_len > config.n_positions:
        raise InputError(f"--seq-len {args.seq_len} exceeds n_positions={config.n_positions}")
    params = init_params(config, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    model = GPT2(config)
    cases = {
        "plain model.apply": lambda p, x: model.apply({"params": p}, x)[0],
        "taps, nothing captured": lambda p, x: taps.apply(model, p, x)[0][0],
        "taps, h/resid_post": lambda p, x: taps.apply(model, p, x, capture="h/resid_post"),
        "taps, hidden states + attentions": lambda p, x: taps.apply(
            model, p, x, capture=("h/resid_pre", "ln_final", "h/attn/pattern")),
        "taps, everything": lambda p, x: taps.apply(model, p, x, capture="*"),
    }
    jitted = {name: jax.jit(fn) for name, fn in cases.items()}
    programs = {name: instructions(fn.lower(params, tokens).compile().as_text()) for name, fn in jitted.items()}
    seconds = best_times({name: (lambda f=fn: jax.block_until_ready(f(params, tokens))) for name, fn in jitted.items()},
                         args.repeats)
    base = seconds["plain model.apply"]
    print(f"device: {device_name()}; GPT-2 {args.preset} forward, batch {args.batch} x {args.seq_len} tokens")
    print(f"{'case':<36} {'ms':>9} {'vs plain':>9} {'instructions':>13} {'same program':>13}")
    rows = []
    for name in cases:
        same = programs[name] == programs["plain model.apply"]
        rows.append(dict(case=name, ms=round(1e3 * seconds[name], 3), relative=round(seconds[name] / base, 3),
                         instructions=len(programs[name]), same_program_as_plain=same))
        print(f"{name:<36} {1e3 * seconds[name]:>9.2f} {seconds[name] / base:>8.2f}x {len(programs[name]):>13} "
              f"{'yes' if same else 'no':>13}")
    print(f"timing: {STATISTIC}")
    write_json(args.json, dict(device=device_name(), preset=args.preset, batch=args.batch, seq_len=args.seq_len,
                               cases=rows))
    return 0


def instructions(hlo: str) -> list[str]:
    """The program's instructions as sorted ``shape opcode`` strings (names and metadata aside)."""
    import re
    found = (re.match(r"(?:ROOT )?%\S+ = (\S+) ([\w-]+)\(", line.strip()) for line in hlo.splitlines())
    return sorted(f"{m.group(1)} {m.group(2)}" for m in found if m)


if __name__ == "__main__":
    sys.exit(main())
