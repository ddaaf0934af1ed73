"""Benchmark LoRA on GPT-2 124M: a train step against full fine-tuning and PEFT + PyTorch
(``lora-train``), and serving many adapters on one base against the base alone
(``multi-adapter-serve``).

    python scripts/bench_lora.py --json bench_lora.json          # CPU: batch 1 x 1024 tokens
    python scripts/bench_lora.py --cases lora-train --batch-size 8 --json bench_lora.json
    python scripts/bench_lora.py --cases multi-adapter-serve --serve-streams 16 --adapters 4

Every side does the same update: forward, next-token cross-entropy, backward, global-norm
clipping to 1.0, AdamW (betas 0.9/0.95, weight decay 0.1), GPT-2's dropout ``--dropout``.
jaxformer: the shared jitted, donating train step (``jaxformer.train.step``) as ``jaxformer train
gpt2`` runs it: LoRA with the frozen base as a non-donated argument and only the adapter in the
train state, or all weights (full fine-tuning). PEFT: ``get_peft_model(GPT2LMHeadModel, LoraConfig)``
with ``torch.optim.AdamW`` over the adapter, and PyTorch full fine-tuning for reference (on a GPU:
bf16 autocast, SDPA, ``torch.compile``).
LoRA as PEFT's defaults for GPT-2 except the rank: r ``--rank``, alpha 8, targets ``c_attn``,
dropout 0. Memory is measured as the bytes of the arrays each side holds after a step: the
params (frozen base + adapter, or all) and the optimizer state (Adam's moments and counters).
Timing: ``jaxformer.benchmark.STATISTIC``.

multi-adapter-serve: two ``jaxformer serve`` processes on one random-weight GPT-2 124M, the base
alone and the base with ``--adapters`` PEFT adapters (r ``--rank`` on ``c_attn``, random
matrices); the same closed-loop load on each (``jaxformer.benchmark.LOAD_STATISTIC``:
``--serve-streams`` streaming clients, greedy, EOS ignored), client i of the adapter server asking
for adapter i mod n, so every step mixes them. Passes alternate between the servers after one
untimed pass each; the best pass of each counts. ``speedup``: adapters' tokens/s over the base's.
JSON: ``{"device", "cases": [...]}``, each case with its ``name``, both sides' figures, ``speedup``
and for ``lora-train`` ``optimizer_state_fraction``.
"""

import contextlib
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave PyTorch its share of a GPU
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxformer.benchmark import STATISTIC, best_times, device_name, train_steps, write_json  # noqa: E402
from jaxformer.commands import cli  # noqa: E402
from jaxformer.errors import InputError  # noqa: E402


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def bench_jax(args, rank: int | None):
    """(``run(n)``, memory dict): n jaxformer train steps after ``args.warmup`` ones; LoRA of
    ``rank`` on the frozen base, or full fine-tuning (None)."""
    from jaxformer.gpt2 import lora
    from jaxformer.gpt2.config import preset
    from jaxformer.gpt2.model import init_params
    from jaxformer.gpt2.train import GPT2RunConfig, make_loss_fn
    from jaxformer.train import sharding as sh
    from jaxformer.train.optim import make_optimizer, make_schedule
    from jaxformer.train.step import TrainState, init_state, make_train_step

    p = args.dropout
    config = preset("gpt2", dtype=args.dtype, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    run_config = GPT2RunConfig(lr=3e-4, warmup=10, steps=1000, schedule_steps=1000)
    optimizer = make_optimizer(run_config, make_schedule(run_config))
    mesh = sh.make_mesh("data=1", jax.devices()[:1])
    spec = None if rank is None else lora.LoRASpec(rank=rank)
    frozen = None
    if spec is None:
        create = lambda key: TrainState.create(init_params(config, key), optimizer, key)  # noqa: E731
    else:
        base = jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(1))
        frozen = sh.put_global(jax.device_get(base), sh.state_shardings(mesh, base))
        del base
        create = lambda key: TrainState.create(lora.init_adapter(config, spec, key), optimizer, key)  # noqa: E731
    state, state_sh = init_state(create, jax.random.PRNGKey(0), mesh)
    batch_sh = sh.batch_sharding(mesh, batch_dim=0)
    step = make_train_step(make_loss_fn(config, spec=spec), optimizer, state_shardings=state_sh,
                           batch_sharding=batch_sh, frozen=frozen)
    rng = np.random.default_rng(0)
    batches = [sh.put_batch(rng.integers(0, config.vocab_size, (args.batch_size, args.seq_len + 1), dtype=np.int32),
                            batch_sh) for _ in range(2)]
    run = train_steps(step, state, batches)
    run(args.warmup)
    state = run.state()
    memory = dict(params_bytes=nbytes(state.params) + (nbytes(frozen) if frozen is not None else 0),
                  trainable_params=sum(x.size for x in jax.tree.leaves(state.params)),
                  optimizer_state_bytes=nbytes(state.opt_state))
    return run, memory


def bench_torch(args, rank: int | None):
    """(``run(n)``, memory dict, setup): n PEFT + torch LoRA steps of ``rank`` (None: torch full
    fine-tuning) after ``args.warmup`` ones."""
    import peft
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    p = args.dropout
    config = transformers.GPT2Config(attn_implementation="sdpa", resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    model = transformers.GPT2LMHeadModel(config)
    if rank is not None:
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=8, target_modules=["c_attn"],
                                                           fan_in_fan_out=True))
    model = model.to(device).train()
    trainable = [x for x in model.parameters() if x.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=gpu)
    fwd = torch.compile(model) if gpu else model
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=gpu)
    tokens = [torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device) for _ in range(2)]
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def run(n: int):
        for i in range(n):
            with autocast:
                loss = fwd(input_ids=tokens[i % 2], labels=tokens[i % 2]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        assert torch.isfinite(loss)

    run(args.warmup)
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    memory = dict(params_bytes=sum(x.numel() * x.element_size() for x in model.parameters()),
                  trainable_params=sum(x.numel() for x in trainable),
                  optimizer_state_bytes=sum(t.numel() * t.element_size() for t in state))
    setup = "bf16 autocast + SDPA + torch.compile" if gpu else f"float32 eager SDPA, {torch.get_num_threads()} threads"
    return run, memory, f"peft {peft.__version__}, torch {torch.__version__}, {setup}"


def main(argv=None) -> int:
    on_cpu = jax.devices()[0].platform == "cpu"
    ap = cli.parser(__doc__)
    ap.add_argument("--batch-size", type=cli.at_least(1), default=1 if on_cpu else 16)
    ap.add_argument("--seq-len", type=cli.at_least(1), default=1024)
    ap.add_argument("--rank", type=cli.at_least(1), default=8, help="LoRA rank (PEFT's default 8)")
    ap.add_argument("--dtype", default="float32" if on_cpu else "bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--dropout", type=cli.number_in(0, 0.99), default=0.1, help="GPT-2's 0.1 by default, every side")
    ap.add_argument("--warmup", type=cli.at_least(1), default=1 if on_cpu else 3)
    ap.add_argument("--steps", type=cli.at_least(1), default=2 if on_cpu else 20, help="steps per timed pass")
    ap.add_argument("--repeats", type=cli.at_least(1), default=2, help="timed passes per side, interleaved")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--adapters", type=cli.at_least(1), default=4, help="adapters served (multi-adapter-serve)")
    ap.add_argument("--serve-streams", type=cli.at_least(1), default=16, help="concurrent streaming clients")
    ap.add_argument("--serve-requests", type=cli.at_least(1), default=2, help="requests per client and pass")
    ap.add_argument("--serve-max-tokens", type=cli.at_least(1), default=64, help="tokens per request")
    ap.add_argument("--prompt-len", type=cli.at_least(1), default=32, help="prompt tokens per request")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    if not args.cases or set(args.cases) - set(CASES):
        ap.error(f"--cases {','.join(args.cases)!r}: choose among {', '.join(CASES)}")
    return cli.run(lambda: bench(args), args.debug)


def bench(args) -> int:
    if args.seq_len > 1024:
        raise InputError(f"--seq-len {args.seq_len}: GPT-2 124M has 1024 positions")
    print(f"device: {device_name()}; timing: {STATISTIC}")
    cases = [c for name in args.cases for c in CASES[name](args)]
    write_json(args.json, dict(device=device_name(), cases=cases))
    return 0 if all(math.isfinite(c["speedup"]) and not c.get("failed") for c in cases) else 1


def bench_train(args) -> list[dict]:
    """The lora-train case (and full-train: full fine-tuning against PyTorch's)."""
    runs, memory = {}, {}
    runs["peft"], memory["peft"], peft_setup = bench_torch(args, args.rank)
    runs["torch-full"], memory["torch-full"], _ = bench_torch(args, None)
    runs["lora"], memory["lora"] = bench_jax(args, args.rank)
    runs["full"], memory["full"] = bench_jax(args, None)
    seconds = best_times({name: (lambda r=run: r(args.steps)) for name, run in runs.items()}, args.repeats,
                         warmup=False)
    tok_s = {name: args.steps * args.batch_size * args.seq_len / t for name, t in seconds.items()}
    shape = f"gpt2-124m, batch {args.batch_size} x seq {args.seq_len}, {args.dtype}, dropout {args.dropout}"
    fraction = memory["lora"]["optimizer_state_bytes"] / memory["full"]["optimizer_state_bytes"]
    print(f"{shape}")
    print(f"{'side':<34} {'tok/s':>8} {'trainable':>12} {'params MB':>10} {'optimizer MB':>13}")
    for name, label in (("lora", f"jaxformer LoRA r={args.rank}"), ("peft", f"PEFT + torch LoRA r={args.rank}"),
                        ("full", "jaxformer full fine-tuning"), ("torch-full", "torch full fine-tuning")):
        m = memory[name]
        print(f"{label:<34} {tok_s[name]:>8.1f} {m['trainable_params']:>12,} {m['params_bytes'] / 1e6:>10.1f} "
              f"{m['optimizer_state_bytes'] / 1e6:>13.2f}")
    print(f"LoRA against PEFT {tok_s['lora'] / tok_s['peft']:.2f}x, full fine-tuning against torch "
          f"{tok_s['full'] / tok_s['torch-full']:.2f}x; LoRA's optimizer state is {fraction:.3%} of full "
          f"fine-tuning's; torch side: {peft_setup}")
    return [
        dict(name="lora-train", setup=f"LoRA r={args.rank} alpha 8 on c_attn; {shape}",
             jaxformer_tok_s=round(tok_s["lora"], 1), peft_tok_s=round(tok_s["peft"], 1),
             speedup=round(tok_s["lora"] / tok_s["peft"], 3), jaxformer_full_tok_s=round(tok_s["full"], 1),
             jaxformer=memory["lora"], peft=memory["peft"], full=memory["full"],
             optimizer_state_fraction=round(fraction, 6), peft_setup=peft_setup),
        dict(name="full-train", setup=f"all weights; {shape}", jaxformer_tok_s=round(tok_s["full"], 1),
             pytorch_tok_s=round(tok_s["torch-full"], 1), speedup=round(tok_s["full"] / tok_s["torch-full"], 3),
             jaxformer=memory["full"], pytorch=memory["torch-full"]),
    ]


def bench_serve(args) -> list[dict]:
    """The multi-adapter-serve case (the module docstring)."""
    from jaxformer.benchmark import (HOST, ServerProcess, closed_loop, free_port, make_model, make_prompts,
                                     one_token_words, summarize_load)

    work = Path(tempfile.mkdtemp(prefix="bench-lora-serve-"))
    try:
        model_dir = work / "gpt2-random"
        make_model(model_dir)
        names = write_adapters(work, model_dir, args.adapters, args.rank)
        streams = args.serve_streams
        cmd = [sys.executable, "-m", "jaxformer", "serve", "--gpt2", str(model_dir), "--host", HOST,
               "--slots", str(streams), "--max-queue", str(streams), "--compile-cache", str(work / "jit"),
               "--access-log", "none"]
        request = dict(max_tokens=args.serve_max_tokens, temperature=0, stream=True, ignore_eos=True,
                       stream_options={"include_usage": True})
        sides = {"base": ([], [dict(request, model=model_dir.name)]),
                 "lora": ([f"{n}={work / n}" for n in names], [dict(request, model=n) for n in names])}
        words, env = one_token_words(), {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        with contextlib.ExitStack() as stack:
            servers = {}
            for side, (flags, _) in sides.items():
                port = free_port()
                server = ServerProcess(cmd + ["--port", str(port)] + [x for f in flags for x in ("--lora", f)], port,
                                       work / f"{side}.log", env, f"the {side} server")
                servers[side] = stack.enter_context(server)
            for s in servers.values():
                s.wait_ready(900)
            best = {}
            for rep in range(args.repeats + 1):  # pass 0 warms up
                for side, (_, fields) in sides.items():
                    s = servers[side]
                    prompts = make_prompts(words, streams * args.serve_requests, args.prompt_len, rep)
                    before = s.health().get("compilations")
                    results, wall = closed_loop(HOST, s.port, fields, prompts, streams, 600)
                    row = dict(summarize_load(results, wall, args.serve_max_tokens),
                               compilations_during=s.health().get("compilations", 0) - (before or 0))
                    if rep and (side not in best or row["tok_s"] > best[side]["tok_s"]):
                        best[side] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base, mixed = best["base"], best["lora"]
    print(f"serving {streams} streams: base alone {base['tok_s']:.1f} tok/s, over {args.adapters} adapters "
          f"{mixed['tok_s']:.1f} tok/s ({mixed['tok_s'] / base['tok_s']:.2f}x); TPOT p50 {base['tpot_p50_s'] * 1e3:.0f} "
          f"/ {mixed['tpot_p50_s'] * 1e3:.0f} ms; failed {base['failed']} / {mixed['failed']}; compilations while "
          f"loaded {base['compilations_during']} / {mixed['compilations_during']}")
    return [dict(name="multi-adapter-serve",
                setup=f"jaxformer serve, GPT-2 124M random weights, {args.adapters} PEFT adapters r={args.rank} on "
                      f"c_attn, {streams} streams (client i: adapter i mod {args.adapters}) against the same load on "
                      f"the base alone; prompts {args.prompt_len} tokens, {args.serve_max_tokens} new tokens greedy, "
                      f"{args.serve_requests} requests per stream",
                jaxformer_tok_s=round(mixed["tok_s"], 1), base_tok_s=round(base["tok_s"], 1),
                speedup=round(mixed["tok_s"] / base["tok_s"], 3), streams=streams, adapters=args.adapters,
                failed=base["failed"] + mixed["failed"], lora=mixed, base=base)]


def write_adapters(work: Path, model_dir: Path, n: int, rank: int) -> list[str]:
    """Writes n PEFT adapters of ``rank`` on ``c_attn`` (random normal(0, 0.02) matrices, seeds 0 ..
    n-1) as ``work/adapter{i}``; returns their names."""
    from jaxformer.gpt2 import lora, peft
    from jaxformer.gpt2.config import preset

    config, spec = preset("gpt2"), lora.LoRASpec(rank=rank)
    leaves, tree = jax.tree.flatten(lora.abstract(config, spec))
    names = [f"adapter{i}" for i in range(n)]
    for i, name in enumerate(names):
        rng = np.random.default_rng(i)
        adapter = jax.tree.unflatten(tree, [rng.normal(0, 0.02, x.shape).astype(np.float32) for x in leaves])
        peft.save_peft(work / name, adapter, spec, base=str(model_dir))
    return names


CASES = {"lora-train": bench_train, "multi-adapter-serve": bench_serve}


if __name__ == "__main__":
    sys.exit(main())
