"""Train GPT-2 from scratch or fine-tune it, on one device or a mesh of many.

    python scripts/train_gpt2.py --data ../shared/data/tinyshakespeare/input.txt --out runs/shakespeare \\
        --preset tiny --steps 2000
    python scripts/train_gpt2.py --data corpus.jsonl --out runs/ft --init runs/gpt2-converted --lr 1e-4 \\
        --mesh data=4,fsdp=2 --dtype bfloat16 --export-hf runs/ft-hf

SIGTERM/SIGINT: the current step finishes, a checkpoint is written and the process exits 0; run the
same command with --resume to continue. With --resume the settings stored in OUT/run.json win,
except --steps (to extend a run), --mesh, and the output flags. Exit status 1: the loss became
NaN/Inf (the message names the step; the last checkpoint is the last good one).
"""

import argparse
import sys
from pathlib import Path

from jaxformer import distributed


def parse_args(argv=None):
    from jaxformer.gpt2.config import PRESETS
    from jaxformer.gpt2.train import TrainConfig

    d = TrainConfig(data=())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", help=".txt files (one document each) or .jsonl (one per line)")
    ap.add_argument("--text-field", default=d.text_field, help="JSONL field with the text")
    ap.add_argument("--tokenizer", default=d.tokenizer,
                    help="gpt2 | a tokenizer directory | bpe:VOCAB or word:VOCAB trained on --data")
    ap.add_argument("--val-fraction", type=float, default=d.val_fraction)
    ap.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plot, tokenizer)")
    ap.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
    ap.add_argument("--init", help="fine-tune from a jaxformer checkpoint or Hugging Face directory")
    ap.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--steps", type=int, help=f"optimizer updates (default {d.steps})")
    ap.add_argument("--schedule-steps", type=int, help="cosine decay horizon (default --steps)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="global sequences per micro-batch")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per update")
    ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--clip-norm", type=float, default=d.clip_norm)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--log-every", type=int, default=d.log_every)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches)
    ap.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    ap.add_argument("--sample-tokens", type=int, default=d.sample_tokens, help="generated at each eval (0: none)")
    ap.add_argument("--prompt", help="sample prompt (default: the first validation tokens)")
    ap.add_argument("--mesh", help="device mesh, e.g. data=4,fsdp=2 (default: data over all devices)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    ap.add_argument("--export-hf", metavar="DIR", help="write a Hugging Face model directory at the end")
    ap.add_argument("--metrics", metavar="PATH", help="JSONL metrics (default OUT/metrics.jsonl)")
    ap.add_argument("--no-progress", action="store_true")
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)
    stored = Path(args.out) / "run.json"
    if args.resume and stored.is_file():
        cfg = TrainConfig.load(stored)
        cfg = cfg.replace(steps=args.steps) if args.steps is not None else cfg
    else:
        if not args.data:
            ap.error("--data is required (except with --resume of an existing run)")
        cfg = TrainConfig(
            data=tuple(args.data), text_field=args.text_field, tokenizer=args.tokenizer,
            val_fraction=args.val_fraction, preset=args.preset, init=args.init, dtype=args.dtype,
            seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
            steps=d.steps if args.steps is None else args.steps, schedule_steps=args.schedule_steps,
            lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, clip_norm=args.clip_norm,
            seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
            eval_batches=args.eval_batches, ckpt_every=args.ckpt_every, sample_tokens=args.sample_tokens,
            prompt=args.prompt)
    return args, cfg


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from jaxformer.gpt2.train import train
    from jaxformer.training import NonFiniteLoss

    try:
        train(cfg, args.out, mesh=args.mesh, resume=args.resume, metrics_path=args.metrics,
              export_hf=args.export_hf, progress=not args.no_progress)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
