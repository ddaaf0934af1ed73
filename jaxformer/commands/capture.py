"""Capture GPT-2's insides for a prompt, in Hugging Face's conventions, optionally with heads ablated.

    jaxformer capture --model DIR --prompt "The cat sat on the" --out acts.npz --ablate 3.5 --ablate 0.1

Writes float32 arrays (batch dimension dropped): ``token_ids`` [t] (int32), ``logits`` [t, vocab],
``hidden_states`` [n_layer + 1, t, n_embd] (entry 0: the embedding sum; the last: after the final
LayerNorm, as ``output_hidden_states``) and ``attentions`` [n_layer, n_head, t, t] (probabilities,
as ``output_attentions``). ``--ablate L.H`` zeroes head H of layer L (its slice of the input to the
attention output projection); every array then reflects the ablation. DIR as `jaxformer generate` takes it.
"""

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer capture")
    ap.add_argument("--model", required=True, help="jaxformer checkpoint or run directory, HF directory or hub id")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", required=True, help="the .npz file to write")
    ap.add_argument("--ablate", action="append", default=[], metavar="L.H", help="zero head H of layer L (repeatable)")
    ap.add_argument("--tokenizer", help="tokenizer directory, when the model has none")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), args.debug)


def parse_heads(specs: list[str]) -> list[tuple[int, int]]:
    from jaxformer.errors import InputError

    heads = []
    for spec in specs:
        layer, sep, head = spec.partition(".")
        if not sep or not layer.isdigit() or not head.isdigit():
            raise InputError(f"--ablate {spec!r}: expected LAYER.HEAD, e.g. 3.5")
        heads.append((int(layer), int(head)))
    return heads


def run(args) -> int:
    import numpy as np

    from jaxformer.nn import taps
    from jaxformer.errors import InputError
    from jaxformer.gpt2.inspect import hf_outputs
    from jaxformer.gpt2.pretrained import load_pretrained
    from jaxformer.gpt2.tokenizer import GPT2Tokenizer

    out = cli.check_output(args.out, args.overwrite)
    heads = parse_heads(args.ablate)
    config, params, tok = load_pretrained(args.model, scan_layers=False)
    edits = taps.ablate_heads(config.n_layer, config.n_head, heads) if heads else None
    tok = GPT2Tokenizer.from_dir(args.tokenizer) if args.tokenizer else tok or GPT2Tokenizer.gpt2()
    ids = tok.encode(args.prompt)
    if not ids:
        raise InputError("--prompt is empty: give at least one token")
    if len(ids) > config.n_positions:
        raise InputError(f"--prompt has {len(ids)} tokens, beyond the model's n_positions={config.n_positions}")
    if max(ids) >= config.vocab_size:
        raise InputError(f"--prompt: token ids must lie in [0, {config.vocab_size}) for this model")
    got = hf_outputs(params, np.asarray([ids], np.int32), edits, config=config)
    arrays = dict(token_ids=np.asarray(ids, np.int32), logits=got["logits"][0], hidden_states=got["hidden_states"][:, 0],
                  attentions=got["attentions"][:, 0])
    arrays = {k: np.asarray(v, np.int32 if k == "token_ids" else np.float32) for k, v in arrays.items()}
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(out)
    print(f"wrote {out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items())
          + (f"; heads ablated: {', '.join(f'{layer}.{h}' for layer, h in heads)}" if heads else ""))
    return 0
