"""Attention heatmaps as PNG files: the translator's cross-attention for a sentence (--text), or
GPT-2's self-attention and its logit lens for a prompt (--prompt).

    jaxformer attention-map --model runs/tr --text "I like cheese." --out maps/tr
    jaxformer attention-map --model runs/shakespeare --prompt "To be, or not to be" --out maps/gpt2

Translator: ``cross_layer<i>.png`` (every head of layer i over the source tokens, rows the generated
French tokens, and the head average) and ``cross_layers.png`` (each layer's average). GPT-2:
``self_layer<i>.png`` and ``self_layers.png`` likewise, and ``logit_lens.png`` (the top next token
and its probability at every layer and position). Tokens are labelled with their text.
"""

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer attention-map")
    ap.add_argument("--model", required=True, help="translator run directory (--text) or GPT-2 model (--prompt)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--text", help="an English sentence for the translator")
    which.add_argument("--prompt", help="a prompt for GPT-2")
    ap.add_argument("--beam", type=cli.at_least(1), default=1, help="translator: beam size of the translation")
    ap.add_argument("--tokenizer", help="GPT-2: tokenizer directory, when the model has none")
    ap.add_argument("--out", required=True, help="directory for the PNG files")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), args.debug)


def run(args) -> int:
    from pathlib import Path

    from jaxformer import plots
    from jaxformer.errors import InputError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.text is not None:
        from jaxformer.translator.translate import TranslationPipeline
        from jaxformer.translator.inspect import cross_attention

        if not args.text.strip():
            raise InputError("--text is empty")
        src, tgt, maps = cross_attention(TranslationPipeline.load(args.model), args.text, args.beam)
        print(f"translation: {''.join(tgt[:-1]).strip()}")
        for i, layer in enumerate(maps):
            written.append(plots.attention_grid(out / f"cross_layer{i}.png", layer, tgt, src,
                                                  f"cross-attention, decoder layer {i}: {args.text!r}"))
        written.append(plots.layer_averages(out / "cross_layers.png", maps, tgt, src,
                                              "cross-attention (average of heads) per decoder layer"))
    else:
        import numpy as np

        from jaxformer.gpt2.inspect import hf_outputs, logit_lens
        from jaxformer.gpt2.pretrained import load_pretrained
        from jaxformer.gpt2.tokenizer import GPT2Tokenizer

        config, params, tok = load_pretrained(args.model, scan_layers=False)
        tok = GPT2Tokenizer.from_dir(args.tokenizer) if args.tokenizer else tok or GPT2Tokenizer.gpt2()
        ids = tok.encode(args.prompt)
        if not ids or len(ids) > config.n_positions or max(ids) >= config.vocab_size:
            raise InputError(f"--prompt must give 1 to {config.n_positions} tokens in the model's vocabulary "
                             f"(it gives {len(ids)})")
        tokens = np.asarray([ids], np.int32)
        texts = [tok.decode([i]) for i in ids]
        maps = np.asarray(hf_outputs(params, tokens, config=config)["attentions"][:, 0])  # [L, H, t, t]
        for i, layer in enumerate(maps):
            written.append(plots.attention_grid(out / f"self_layer{i}.png", layer, texts, texts,
                                                  f"self-attention, layer {i}: {args.prompt!r}"))
        written.append(plots.layer_averages(out / "self_layers.png", maps, texts, texts,
                                              "self-attention (average of heads) per layer"))
        top, prob = logit_lens(params, tokens, config=config)
        top_texts = [[tok.decode([int(i)]) for i in row] for row in np.asarray(top[:, 0])]
        written.append(plots.logit_lens(out / "logit_lens.png", texts, top_texts, np.asarray(prob[:, 0]),
                                          f"logit lens: {args.prompt!r}"))
    print(f"wrote {len(written)} PNG files to {out}")
    return 0
