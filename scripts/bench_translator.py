"""Speed of the JAX translator against PyTorch on this machine's CPU.

    python scripts/bench_translator.py --model runs/tr --json bench.json

* train: target tokens per second of the jitted train step against ``torch.nn.Transformer`` with the
  same configuration, batches (real training batches of one bucket), AdamW + Noam schedule and
  label-smoothed loss, after warm-up (compilation excluded).
* translate: sentences per second on 256 test sentences, greedy and beam 4 (KV cache, one jit per
  bucket, compilation excluded), against a batched PyTorch greedy decoder that re-runs the decoder on
  the whole prefix at every step, as the book's ``translate()`` does; both use the same weights.

--model: a run directory of ``jaxformer train translator``. Without it, the weights are random (the
tokenizer is trained on the training split), so decoding runs to the length limit in both
implementations.
"""

import dataclasses
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import torch

from jaxformer.benchmark import STATISTIC, best_times, device_name, write_json
from jaxformer.commands import cli
from jaxformer.errors import InputError
from jaxformer.train.optim import make_optimizer, make_schedule
from jaxformer.train.step import TrainState, make_train_step
from jaxformer.translator import data as tdata
from jaxformer.translator import tokenizer as tk
from jaxformer.translator.batching import Batcher, pad_sources
from jaxformer.translator.config import PRESETS, preset
from jaxformer.translator.model import init_params
from jaxformer.translator.torch_model import from_flax
from jaxformer.translator.train import TranslatorRunConfig, TranslatorTask, make_loss_fn
from jaxformer.translator.translate import TranslationPipeline, output_len


def autocast(tdev: str, dtype: str):
    return torch.autocast(tdev, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def bench_train(config, run, params, batches, repeats, tdev):
    """Target (non-PAD) tokens per second over ``batches`` for JAX and PyTorch (model config
    ``config``, run config ``run``: AdamW with the Noam schedule, label smoothing; ``config.dtype``
    bfloat16: PyTorch under bf16 autocast)."""
    tokens = sum(int((b.tgt_out != tk.PAD_ID).sum()) for b in batches)
    schedule = make_schedule(run, config.d_model)
    opt = make_optimizer(run, schedule)
    step = make_train_step(make_loss_fn(config, run.label_smoothing), opt)
    dicts = [dict(src=b.src, tgt_in=b.tgt_in, tgt_out=b.tgt_out) for b in batches]
    box = [TrainState.create(params, opt, jax.random.PRNGKey(0))]

    def run_jax():
        for d in dicts:
            box[0], m = step(box[0], d)
        jax.block_until_ready(box[0])

    model = from_flax(params, config).to(tdev).train()
    topt = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(run.b1, run.b2), eps=run.eps,
                             weight_decay=run.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: float(schedule(s)))
    tb = [tuple(torch.from_numpy(x).long().to(tdev) for x in (b.src, b.tgt_in, b.tgt_out)) for b in batches]

    def run_torch():
        for src, tgt_in, tgt_out in tb:
            with autocast(tdev, config.dtype):
                logits = model(src, tgt_in).float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), tgt_out.reshape(-1),
                                                     ignore_index=tk.PAD_ID, label_smoothing=run.label_smoothing)
            topt.zero_grad(set_to_none=True)
            loss.backward()
            topt.step()
            sched.step()
        if tdev == "cuda":
            torch.cuda.synchronize()

    t = best_times(dict(jax=run_jax, torch=run_torch), repeats)
    return tokens / t["jax"], tokens / t["torch"]


def bench_translate(config, params, tok, sentences, repeats, tdev):
    """Sentences per second: JAX greedy, JAX beam 4, PyTorch book-style greedy."""
    jmodel = TranslationPipeline(config, params, tok, batch_size=len(sentences))
    tmodel = from_flax(params, config).to(tdev).eval()
    ids = [i[:config.max_len - 1] for i in tk.encode(tok, sentences)]
    length = max(len(i) for i in ids) + 1
    src = torch.from_numpy(pad_sources(ids, len(ids), length)).long().to(tdev)
    max_len = output_len(config, length)

    def run_torch():
        with autocast(tdev, config.dtype):
            return tk.decode(tok, tmodel.greedy_book(src, max_len).cpu().numpy())

    fns = {1: lambda: jmodel.translate(sentences, beam_size=1), 4: lambda: jmodel.translate(sentences, beam_size=4),
           "torch": run_torch}
    outputs = {k: fn() for k, fn in fns.items()}  # compiles
    same = np.mean([a == b for a, b in zip(outputs["torch"], outputs[1])])
    return {k: len(sentences) / t for k, t in best_times(fns, repeats, warmup=False).items()}, same


def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--model", help="trained model directory (default: random weights, --preset config)")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--data", help="fra-eng.zip (default: the fra-eng data set, as for jaxformer train translator)")
    ap.add_argument("--train-batches", type=cli.at_least(1), default=8, help="batches per timed training pass")
    ap.add_argument("--bucket", type=cli.at_least(1), default=16, help="padded length of the training batches")
    ap.add_argument("--sentences", type=cli.at_least(1), default=256)
    ap.add_argument("--repeats", type=cli.at_least(1), default=2, help="timed passes, interleaved")
    ap.add_argument("--threads", type=cli.at_least(0), default=0, help="torch threads (default: all cores)")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="compute dtypes (PyTorch: bf16 autocast)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    return cli.run(lambda: bench(args), args.debug)


def bench(args) -> int:
    warnings.filterwarnings("ignore", module="torch")
    if args.threads:
        torch.set_num_threads(args.threads)

    splits = tdata.split_pairs(tdata.load_pairs(args.data))
    if args.model:
        loaded = TranslationPipeline.load(args.model)
        config, params, tok = loaded.config, loaded.params, loaded.tokenizer
    else:
        config = preset(args.preset)
        tok = tk.train_tokenizer([p[i] for p in splits["train"] for i in (0, 1)], config.vocab_size)
        params = init_params(config, jax.random.PRNGKey(0))
    params = jax.device_get(params)
    if args.model and (Path(args.model) / "run.json").is_file():
        run = TranslatorRunConfig.load(Path(args.model) / "run.json")
    else:
        run = TranslatorRunConfig(**{**TranslatorTask.run_defaults(args.preset), "steps": 1})
    if args.bucket not in run.buckets:
        raise InputError(f"--bucket {args.bucket}: choose one of the padded lengths {run.buckets}")

    train = splits["train"]
    batcher = Batcher(tk.encode(tok, [p[0] for p in train]), tk.encode(tok, [p[1] for p in train]),
                      run.buckets, run.batch_tokens, run.max_batch_sentences)
    batches = [b for b in batcher.epoch(run.seed, 0) if b.src.shape[1] == args.bucket][:args.train_batches]
    test = splits["test"]
    sentences = [p[0] for p in test[::max(1, len(test) // args.sentences)][:args.sentences]]

    tdev = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    print(f"config: d_model {config.d_model}, layers {config.enc_layers}+{config.dec_layers}, heads {config.n_heads}, "
          f"d_ff {config.d_ff}, vocab {config.vocab_size}; weights: {'trained ' + args.model if args.model else 'random'}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on {tdev} "
          f"with {torch.get_num_threads()} threads")
    rows, cases, agreement, (b_rows, b_len) = [], [], {}, batches[0].src.shape
    for dtype in args.dtype:
        dtype_config = config.replace(dtype=dtype)
        jax_tps, torch_tps = bench_train(dtype_config, run, params, batches, args.repeats, tdev)
        sps, agreement[dtype] = bench_translate(dtype_config, params, tok, sentences, args.repeats, tdev)
        cases += [
            dict(name=f"train step ({b_rows}x{b_len} batches)", dtype=dtype, jaxformer=jax_tps, pytorch=torch_tps,
                 unit="target tokens/s"),
            dict(name=f"translate {len(sentences)} greedy (vs book greedy)", dtype=dtype, jaxformer=sps[1],
                 pytorch=sps["torch"], unit="sentences/s"),
            dict(name=f"translate {len(sentences)} beam 4 (vs book greedy)", dtype=dtype, jaxformer=sps[4],
                 pytorch=sps["torch"], unit="sentences/s"),
        ]
    for c in cases:
        c["speedup"] = c["jaxformer"] / c["pytorch"]
        rows.append(f"{c['name']:<44} {c['dtype']:>9} {c['jaxformer']:>12.1f} {c['pytorch']:>12.1f} "
                    f"{c['speedup']:>8.2f}x  {c['unit']}")
    print(f"{'case':<44} {'dtype':>9} {'jaxformer':>12} {'pytorch':>12} {'speedup':>9}")
    print("\n".join(rows))
    print(f"greedy outputs identical to the PyTorch book decoder: {agreement}; timing: {STATISTIC}")
    write_json(args.json, dict(device=device_name(), cases=cases, greedy_agreement=agreement,
                               config=dataclasses.asdict(config), model=args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
