"""Train the English→French translator.

    python scripts/train_translator.py --data ../shared/data/fra-eng/fra-eng.zip --out runs/tr --max-minutes 30

Without --data the file is looked up in $JAXFORMER_DATA/fra-eng/fra-eng.zip, then in
~/.cache/jaxformer/fra-eng/fra-eng.zip (downloaded from manythings.org when online).
"""

import argparse
import json

from jaxformer.translator.config import PRESETS, preset
from jaxformer.translator.train import Run


def main():
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
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args()
    if args.max_minutes is None and args.epochs is None and args.steps is None:
        ap.error("give one of --max-minutes, --epochs, --steps")
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
              progress=not args.no_progress)
    run.run(max_minutes=args.max_minutes, epochs=args.epochs, steps=args.steps)


if __name__ == "__main__":
    main()
