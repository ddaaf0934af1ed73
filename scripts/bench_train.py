"""Benchmark the GPT-2 124M train step (sequence 1024) against PyTorch on the same machine, same run.

    python scripts/bench_train.py --json bench_train.json                      # CPU: float32, batch 1
    python scripts/bench_train.py --batch-size 16 --json bench_train.json      # GPU: bf16

Both sides do the same update: forward, next-token cross-entropy, backward, global-norm clipping
to 1.0, AdamW (betas 0.9/0.95, weight decay 0.1), dropout ``--dropout`` (GPT-2's 0.1 by default).
jaxformer: the shared jitted, donating train step (``jaxformer.train.step``) with GPT-2's loss, as
``jaxformer train gpt2`` runs it (float32 master weights, ``--dtype`` compute). PyTorch:
transformers' ``GPT2LMHeadModel`` with ``torch.optim.AdamW``; on a GPU its best effort is bf16
autocast, SDPA attention and ``torch.compile``. Each side runs ``--warmup`` untimed steps
(compilation), then ``--repeats`` timed passes of ``--steps`` steps, the sides' passes interleaved
so that a change of load on the machine hits both alike; the best pass counts. MFU uses
``jaxformer.train.flops.gpt2_flops_per_token`` and the device's peak (table for GPUs/TPUs, measured
matmul for the CPU).
"""

import math
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave PyTorch its share of a GPU
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxformer.benchmark import STATISTIC, best_times, device_name, train_steps, write_json  # noqa: E402
from jaxformer.commands import cli  # noqa: E402
from jaxformer.errors import InputError  # noqa: E402


def bench_jax(batch: int, seq: int, dtype: str, dropout: float, scan: bool, warmup: int):
    """``run(n)``: n jaxformer train steps on one device, after ``warmup`` (compiling) ones;
    ``scan``: layers as one ``nn.scan`` (the trainer's default) or unrolled."""
    from jaxformer.gpt2.config import preset
    from jaxformer.gpt2.model import init_params
    from jaxformer.gpt2.train import GPT2RunConfig, make_loss_fn
    from jaxformer.train import sharding as sh
    from jaxformer.train.optim import make_optimizer, make_schedule
    from jaxformer.train.step import TrainState, init_state, make_train_step

    config = preset("gpt2", dtype=dtype, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                    scan_layers=scan)
    run_config = GPT2RunConfig(lr=3e-4, warmup=10, steps=1000, schedule_steps=1000)
    optimizer = make_optimizer(run_config, make_schedule(run_config))
    mesh = sh.make_mesh("data=1", jax.devices()[:1])
    create = lambda key: TrainState.create(init_params(config, key), optimizer, key)  # noqa: E731
    state, state_sh = init_state(create, jax.random.PRNGKey(0), mesh)
    batch_sh = sh.batch_sharding(mesh, batch_dim=0)
    step = make_train_step(make_loss_fn(config), optimizer, state_shardings=state_sh, batch_sharding=batch_sh)
    rng = np.random.default_rng(0)
    batches = [sh.put_batch(rng.integers(0, config.vocab_size, (batch, seq + 1), dtype=np.int32), batch_sh)
               for _ in range(2)]
    run = train_steps(step, state, batches)
    run(warmup)
    return run


def bench_torch(batch: int, seq: int, dropout: float, warmup: int):
    """(``run(n)``, setup): n steps of transformers' GPT2LMHeadModel + torch AdamW, after
    ``warmup`` ones."""
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    config = transformers.GPT2Config(attn_implementation="sdpa", resid_pdrop=dropout, embd_pdrop=dropout,
                                     attn_pdrop=dropout)
    model = transformers.GPT2LMHeadModel(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=gpu)
    fwd = torch.compile(model) if gpu else model
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=gpu)
    tokens = [torch.randint(0, config.vocab_size, (batch, seq), device=device) for _ in range(2)]

    def step(x):
        with autocast:
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def run(n: int):
        for i in range(n):
            loss = step(tokens[i % 2])
        sync()
        assert torch.isfinite(loss)

    run(warmup)
    setup = "bf16 autocast + SDPA + torch.compile" if gpu else f"float32 eager SDPA, {torch.get_num_threads()} threads"
    return run, setup


def main(argv=None) -> int:
    on_cpu = jax.devices()[0].platform == "cpu"
    ap = cli.parser(__doc__)
    ap.add_argument("--batch-size", type=cli.at_least(1), default=1 if on_cpu else 16)
    ap.add_argument("--seq-len", type=cli.at_least(1), default=1024)
    ap.add_argument("--dtype", default="float32" if on_cpu else "bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--dropout", type=cli.number_in(0, 0.99), default=0.1, help="GPT-2's 0.1 by default, on both sides")
    ap.add_argument("--warmup", type=cli.at_least(1), default=1 if on_cpu else 3)
    ap.add_argument("--steps", type=cli.at_least(1), default=3 if on_cpu else 20, help="steps per timed pass")
    ap.add_argument("--repeats", type=cli.at_least(1), default=2, help="timed passes per side, interleaved")
    ap.add_argument("--layers", default="scan", choices=["scan", "unrolled", "scan,unrolled", "unrolled,scan"],
                    help="jaxformer cases: scan (nn.scan, the trainer's default) and/or unrolled")
    ap.add_argument("--no-torch", action="store_true", help="jaxformer only")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def bench(args) -> int:
    from jaxformer.gpt2.config import preset
    from jaxformer.train.flops import gpt2_flops_per_token, peak_flops

    if args.seq_len > 1024:
        raise InputError(f"--seq-len {args.seq_len}: GPT-2 124M has 1024 positions")
    device = jax.devices()[0]
    peak, peak_src = peak_flops(device, args.dtype)
    fpt = gpt2_flops_per_token(preset("gpt2"), args.seq_len)
    runs, torch_setup = {}, "skipped"
    if not args.no_torch:
        runs["torch"], torch_setup = bench_torch(args.batch_size, args.seq_len, args.dropout, args.warmup)
    for layers in args.layers.split(","):
        runs[layers] = bench_jax(args.batch_size, args.seq_len, args.dtype, args.dropout, layers == "scan",
                                 args.warmup)
    seconds = best_times({name: (lambda r=run: r(args.steps)) for name, run in runs.items()}, args.repeats,
                         warmup=False)
    tok_s = {name: args.steps * args.batch_size * args.seq_len / t for name, t in seconds.items()}
    torch_tok_s = tok_s.get("torch", float("nan"))
    print(f"device: {device_name()}; peak {peak:.3g} FLOP/s ({peak_src}); {fpt:.3g} FLOPs/token")
    print(f"{'case':<84} {'jaxformer tok/s':>15} {'pytorch tok/s':>14} {'speedup':>8} {'MFU':>7}")
    cases = []
    for layers in args.layers.split(","):
        jax_tok_s = tok_s[layers]
        name = (f"gpt2-124m train step, batch {args.batch_size} x seq {args.seq_len}, {args.dtype}, "
                f"dropout {args.dropout}, {layers} layers ({device.platform})")
        num = lambda x, digits: None if math.isnan(x) else round(x, digits)  # noqa: E731  (JSON has no NaN)
        case = dict(name=name, jaxformer_tok_s=num(jax_tok_s, 1), pytorch_tok_s=num(torch_tok_s, 1),
                    speedup=num(jax_tok_s / torch_tok_s, 3), mfu=num(jax_tok_s * fpt / peak, 4),
                    pytorch_mfu=num(torch_tok_s * fpt / peak, 4), pytorch_setup=torch_setup,
                    flops_per_token=fpt, peak_flops=peak, peak_source=peak_src, steps=args.steps,
                    repeats=args.repeats)
        cases.append(case)
        print(f"{name:<84} {jax_tok_s:>15.1f} {torch_tok_s:>14.1f} {jax_tok_s / torch_tok_s:>8.2f} "
              f"{jax_tok_s * fpt / peak:>7.2%}")
    print(f"pytorch: {torch_setup}; timing: {STATISTIC}")
    write_json(args.json, dict(device=device_name(), cases=cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
