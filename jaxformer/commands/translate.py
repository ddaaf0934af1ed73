"""Translate English to French with a trained model.

    jaxformer translate --model runs/tr "How are you?" "I like cheese."
    jaxformer translate --model runs/tr --beam 4 --input en.txt --output fr.txt

Files hold one sentence per line (UTF-8; invalid bytes are replaced, with a warning naming the
line); the output keeps the order and line count, an empty line stays empty, and a line too long
for the model is truncated with a warning on stderr. --output must not exist (or --overwrite).
"""

import sys

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer translate")
    ap.add_argument("--model", required=True, help="output directory of `jaxformer train translator`")
    ap.add_argument("--beam", type=cli.at_least(1), default=4, help="beam size; 1 = greedy")
    ap.add_argument("--length-alpha", type=cli.number_in(0, 10), default=0.6, help="GNMT length penalty exponent")
    ap.add_argument("--batch-size", type=cli.at_least(1), default=64, help="sentences decoded together")
    ap.add_argument("--input", help="file with one English sentence per line")
    ap.add_argument("--output", help="file for the translations (default: stdout)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ap.add_argument("sentences", nargs="*")
    args = ap.parse_args(argv)
    if bool(args.input) == bool(args.sentences):
        ap.error("give sentences or --input FILE (not both)")
    return cli.run(lambda: run(args), args.debug)


def run(args) -> int:
    from jaxformer.data.textfile import read_lines
    from jaxformer.translator.translate import TranslationPipeline

    if args.output:
        cli.check_output(args.output, args.overwrite)
    sentences = read_lines(args.input) if args.input else args.sentences
    model = TranslationPipeline.load(args.model, batch_size=args.batch_size)
    out = model.translate(sentences, beam_size=args.beam, alpha=args.length_alpha)
    text = "".join(line + "\n" for line in out)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
