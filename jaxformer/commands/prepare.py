"""Tokenize text corpora into llm.c-format token shards for pretraining (``jaxformer train gpt2 --data DIR``).

    jaxformer prepare corpus/*.jsonl.zst --out shards/                         # GPT-2 tokens, all cores
    jaxformer prepare books/ notes.txt.gz --out shards/ --shard-tokens 10000000 --val-tokens 1000000
    jaxformer prepare data.parquet --text-field content --tokenizer my-tokenizer/ --out shards/
    jaxformer prepare saved-dataset/ --split train --out shards/               # a save_to_disk directory
    jaxformer prepare --hub HuggingFaceFW/fineweb-edu --hub-config sample-10BT --out shards/
    jaxformer prepare corpus/*.jsonl --part 0/4 --out shards/                  # machine 0 of 4 (0/4 ... 3/4)

Inputs: .txt (a document per file), .jsonl (a document per line, field --text-field), .parquet
(column --text-field), each optionally .gz or .zst; directories of such files; datasets directories.
Shards: PREFIX_val_000000.bin (the first --val-tokens tokens, default one shard), then
PREFIX_train_000001.bin, ...: a 256-int32 header (magic 20240520, version, token count) and uint16
tokens (uint32 for vocabularies over 65,536), each document starting with <|endoftext|>, as llm.c and
modded-nanogpt read them. OUT/manifest.json records the tokenizer, inputs, shards and their sha256.
Rerun the same command to continue an interrupted run: finished shards are verified and kept.
"""

import re

from jaxformer.commands import cli


def part(text: str) -> tuple[int, int]:
    """argparse type: ``I/N`` with 0 <= I < N."""
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not int(m[1]) < int(m[2]):
        raise cli.argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m[1]), int(m[2])


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer prepare")
    ap.add_argument("inputs", nargs="*", metavar="INPUT", help="files, directories, datasets directories")
    ap.add_argument("--out", required=True, help="directory of the shards and manifest.json")
    ap.add_argument("--hub", metavar="NAME", help="a Hugging Face hub data set, streamed")
    ap.add_argument("--hub-config", metavar="C", help="the hub data set's configuration")
    ap.add_argument("--split", default="train", help="split of a hub or datasets-directory data set (default: train)")
    ap.add_argument("--text-field", default="text", help="JSONL field / column holding the text (default: text)")
    ap.add_argument("--tokenizer", default="gpt2", help="gpt2 (default) or a tokenizer directory")
    ap.add_argument("--shard-tokens", type=cli.at_least(1), default=100_000_000,
                    help="tokens per shard (default: 100,000,000)")
    ap.add_argument("--val-tokens", type=cli.at_least(0), help="validation tokens, the first shard (default: "
                    "--shard-tokens; 0: none)")
    ap.add_argument("--prefix", default="corpus", help="shard file names' prefix (default: corpus)")
    ap.add_argument("--part", type=part, default=(0, 1), metavar="I/N",
                    help="this machine's part: every N-th input file from the I-th (default: 0/1)")
    ap.add_argument("--workers", type=cli.at_least(1), help="tokenizing processes (default: the CPU count)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if not args.inputs and not args.hub:
        ap.error("give INPUT files or directories, or --hub NAME")
    if not re.fullmatch(r"[\w.-]+", args.prefix):
        ap.error(f"--prefix {args.prefix!r}: use letters, digits, '.', '-' and '_'")
    return cli.run(lambda: body(args), args.debug)


def body(args) -> int:
    from jaxformer.data.prepare import prepare

    manifest = prepare(args.inputs, args.out, tokenizer=args.tokenizer, text_field=args.text_field,
                       shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, prefix=args.prefix,
                       part=args.part, workers=args.workers, hub=args.hub, hub_config=args.hub_config,
                       split=args.split, progress=not args.no_progress)
    t = manifest["totals"]
    print(f"{args.out}: {t['shards']} shards, {t['train_tokens']:,} train + {t['val_tokens']:,} validation tokens "
          f"from {t['documents']:,} documents")
    return 0
