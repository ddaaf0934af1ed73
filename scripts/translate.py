"""Translate English to French with a trained model.

    python scripts/translate.py --model runs/tr "How are you?" "I like cheese."
    python scripts/translate.py --model runs/tr --beam 4 --input en.txt --output fr.txt

Files hold one sentence per line (UTF-8); the output keeps the order and line count, an empty line
stays empty, and a line too long for the model is truncated with a warning on stderr.
"""

import argparse
import sys
import warnings

from jaxformer.translator.decode import TranslatorModel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="output directory of train_translator.py")
    ap.add_argument("--beam", type=int, help="beam size; 1 = greedy (default: the model's, 4)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input", help="file with one English sentence per line")
    ap.add_argument("--output", help="file for the translations (default: stdout)")
    ap.add_argument("sentences", nargs="*")
    args = ap.parse_args()
    if bool(args.input) == bool(args.sentences):
        ap.error("give sentences or --input FILE (not both)")
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            sentences = f.read().splitlines()
    else:
        sentences = args.sentences
    warnings.simplefilter("always")
    warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
    out = TranslatorModel.load(args.model, batch_size=args.batch_size).translate(sentences, beam_size=args.beam)
    text = "".join(line + "\n" for line in out)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
