"""Train the English→French translator.

    python scripts/train_translator.py --data ../shared/data/fra-eng/fra-eng.zip --out runs/tr --max-minutes 30

Without --data the file is looked up in $JAXFORMER_DATA/fra-eng/fra-eng.zip, then in
~/.cache/jaxformer/fra-eng/fra-eng.zip (downloaded from manythings.org when online).

--mesh data=4,fsdp=2 shards the batch over data x fsdp and the parameters and optimizer state over
fsdp (as train_gpt2.py; multi-process starts the same way). SIGTERM/SIGINT: the current step
finishes, a checkpoint is written and the process exits 0; continue with --resume. Exit status 1:
the loss became NaN/Inf (the message names the step).
"""

import argparse
import json
import sys

from jaxformer import distributed
from jaxformer.translator.config import PRESETS, preset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="fra-eng.zip or the fra.txt inside it")
    ap.add_argument("--out", required=True, help="run directory: checkpoints, tokenizer, metrics, plot")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    limit = ap.add_mutually_exclusive_group()
    limit.add_argument("--max-minutes", type=float, help="wall-clock budget, data preparation included")
    limit.add_argument("--epochs", type=float)
    limit.add_argument("--steps", type=int)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a config field, e.g. --set d_model=192 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out (its config wins)")
    ap.add_argument("--metrics", help="JSONL metrics file (default OUT/metrics.jsonl)")
    ap.add_argument("--mesh", help="device mesh, e.g. data=4,fsdp=2 (default: data over all devices)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.max_minutes is None and args.epochs is None and args.steps is None:
        ap.error("give one of --max-minutes, --epochs, --steps")
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from jaxformer.training import NonFiniteLoss
    from jaxformer.translator.train import Run

    data = args.data
    if data is None:
        from jaxformer.translator.data import locate
        data = locate()
    cfg = preset(args.preset)
    for item in args.set:
        field, _, value = item.partition("=")
        if field not in cfg.__dataclass_fields__:
            ap.error(f"--set {item}: no config field {field!r}")
        cfg = cfg.replace(**{field: json.loads(value) if field != "buckets" else tuple(json.loads(value))})
    run = Run(cfg, data, args.out, resume=args.resume, metrics_path=args.metrics,
              progress=not args.no_progress, mesh=args.mesh)
    try:
        run.run(max_minutes=args.max_minutes, epochs=args.epochs, steps=args.steps)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
