"""BLEU and chrF (sacrebleu) of a trained model on a source file against a reference file.

    jaxformer eval translator --model runs/tr --src runs/tr/data/test.en --ref runs/tr/data/test.fr --beam 4

`jaxformer train translator` writes the held-out split to OUT/data/test.{en,fr}.
"""

import json
import time

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer eval translator")
    ap.add_argument("--model", required=True)
    ap.add_argument("--src", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--beam", type=cli.at_least(1), default=4, help="beam size; 1 = greedy")
    ap.add_argument("--batch-size", type=cli.at_least(1), default=64)
    ap.add_argument("--hyp", help="also write the translations here")
    ap.add_argument("--json", help="also write the scores as JSON here")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), args.debug)


def run(args) -> int:
    import sacrebleu

    from jaxformer.errors import InputError
    from jaxformer.data.textfile import read_lines
    from jaxformer.translator.translate import TranslationPipeline

    src, ref = read_lines(args.src), read_lines(args.ref)
    if len(src) != len(ref):
        raise InputError(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}")
    if not src:
        raise InputError(f"{args.src} is empty")
    model = TranslationPipeline.load(args.model, batch_size=args.batch_size)
    t0 = time.time()
    hyp = model.translate(src, beam_size=args.beam)
    seconds = time.time() - t0
    bleu_metric, chrf_metric = sacrebleu.BLEU(), sacrebleu.CHRF()
    bleu, chrf = bleu_metric.corpus_score(hyp, [ref]), chrf_metric.corpus_score(hyp, [ref])
    print(f"{len(src)} sentences, beam {args.beam}, {seconds:.1f} s (compilation included)")
    print(bleu)
    print(chrf)
    if args.hyp:
        with open(args.hyp, "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bleu=bleu.score, chrf=chrf.score, sentences=len(src), beam=args.beam,
                           seconds=seconds, bleu_signature=str(bleu_metric.get_signature()),
                           chrf_signature=str(chrf_metric.get_signature())), f, indent=1)
    return 0
