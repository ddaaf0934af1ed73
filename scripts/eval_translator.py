"""BLEU and chrF (sacrebleu) of a trained model on a source file against a reference file.

    python scripts/eval_translator.py --model runs/tr --src runs/tr/data/test.en --ref runs/tr/data/test.fr --beam 4

train_translator.py writes the held-out split to OUT/data/test.{en,fr}.
"""

import argparse
import json
import sys
import time

import sacrebleu

from jaxformer.translator.decode import TranslatorModel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--src", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--beam", type=int, help="beam size; 1 = greedy (default: the model's, 4)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hyp", help="also write the translations here")
    ap.add_argument("--json", help="also write the scores as JSON here")
    args = ap.parse_args()
    with open(args.src, encoding="utf-8") as f:
        src = f.read().splitlines()
    with open(args.ref, encoding="utf-8") as f:
        ref = f.read().splitlines()
    if len(src) != len(ref):
        sys.exit(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}")
    model = TranslatorModel.load(args.model, batch_size=args.batch_size)
    beam = args.beam or model.cfg.beam_size
    t0 = time.time()
    hyp = model.translate(src, beam_size=beam)
    seconds = time.time() - t0
    bleu_metric, chrf_metric = sacrebleu.BLEU(), sacrebleu.CHRF()
    bleu, chrf = bleu_metric.corpus_score(hyp, [ref]), chrf_metric.corpus_score(hyp, [ref])
    print(f"{len(src)} sentences, beam {beam}, {seconds:.1f} s (compilation included)")
    print(bleu)
    print(chrf)
    if args.hyp:
        with open(args.hyp, "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bleu=bleu.score, chrf=chrf.score, sentences=len(src), beam=beam,
                           seconds=seconds, bleu_signature=str(bleu_metric.get_signature()),
                           chrf_signature=str(chrf_metric.get_signature())), f, indent=1)


if __name__ == "__main__":
    main()
