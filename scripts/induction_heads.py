"""Find GPT-2's induction and previous-token heads with repeated random tokens, and confirm by ablation.

    python scripts/induction_heads.py --model runs/shakespeare --out maps/heads --json heads.json

Each of ``--batch`` sequences is ``--length`` random tokens followed by the same tokens again. A
head's *induction score* is the mean attention a token in the second half pays to the token right
after its earlier occurrence (offset ``length - 1`` back); its *previous-token score* the mean
attention to the token just before. A model that copies in context predicts the second half far
better than the first; ablating (zeroing) its induction heads should take that away. Printed: the
scores of every head, and the loss on each half with no head, the top induction heads, and as many
other heads ablated. ``scores.png``: the two scores as layer x head heatmaps.
"""

import sys

from jaxformer import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--model", required=True, help="GPT-2: jaxformer checkpoint or run directory, HF directory")
    ap.add_argument("--length", type=cli.at_least(2), default=50, help="random tokens before the repeat")
    ap.add_argument("--batch", type=cli.at_least(1), default=32, help="sequences")
    ap.add_argument("--top", type=cli.at_least(1), default=2, help="induction heads to ablate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="directory for scores.png")
    ap.add_argument("--json", help="write the scores and losses here")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), args.debug)


def run(args) -> int:
    import json
    from pathlib import Path

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxformer import taps
    from jaxformer.errors import InputError
    from jaxformer.gpt2.model import GPT2
    from jaxformer.gpt2.pretrained import load_pretrained

    config, params, _ = load_pretrained(args.model, scan_layers=False)
    if 2 * args.length > config.n_positions:
        raise InputError(f"--length {args.length}: twice it exceeds the model's n_positions={config.n_positions}")
    rng = np.random.default_rng(args.seed)
    half = rng.integers(0, min(config.vocab_size, 50000), (args.batch, args.length)).astype(np.int32)
    tokens = np.concatenate([half, half], axis=1)
    n = args.length

    @jax.jit
    def forward(edits):
        logits, got = taps.apply(GPT2(config), params, tokens, edits=edits, capture="h/attn/pattern")
        logp = jax.nn.log_softmax(logits[0], axis=-1)
        nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # [b, 2n - 1]
        return nll[:, :n - 1].mean(), nll[:, n:].mean(), got["h/attn/pattern"]  # first, second half

    first, second, pattern = forward(None)
    pattern = np.asarray(pattern)  # [L, b, H, 2n, 2n]
    q = np.arange(n, 2 * n)
    induction = pattern[:, :, :, q, q - n + 1].mean(axis=(1, 3))  # [L, H]
    previous = pattern[:, :, :, np.arange(1, 2 * n), np.arange(2 * n - 1)].mean(axis=(1, 3))
    order = np.argsort(-induction, axis=None)
    top = [tuple(int(x) for x in np.unravel_index(i, induction.shape)) for i in order[:args.top]]
    others = [tuple(int(x) for x in np.unravel_index(i, induction.shape)) for i in order[::-1][:args.top]]
    rows = [("none", [], float(first), float(second))]
    for name, heads in (("top induction heads", top), ("lowest-scoring heads", others)):
        f, s, _ = forward(taps.ablate_heads(config.n_layer, config.n_head, heads))
        rows.append((name, heads, float(f), float(s)))

    print(f"{'layer.head':>10} {'induction':>10} {'previous-token':>15}")
    for layer in range(config.n_layer):
        for head in range(config.n_head):
            print(f"{layer:>6}.{head:<3} {induction[layer, head]:>10.3f} {previous[layer, head]:>15.3f}")
    print(f"\n{'ablated':<22} {'heads':<22} {'loss, 1st half':>15} {'loss, 2nd half':>15}")
    for name, heads, f, s in rows:
        print(f"{name:<22} {' '.join(f'{a}.{b}' for a, b in heads) or '-':<22} {f:>15.3f} {s:>15.3f}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        Path(args.out).mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * config.n_head, 1.8 + 0.5 * config.n_layer))
        for ax, score, title in zip(axes, (induction, previous), ("induction score", "previous-token score")):
            im = ax.imshow(score, cmap="magma", vmin=0, vmax=1)
            ax.set(xlabel="head", ylabel="layer", title=title, xticks=range(config.n_head), yticks=range(config.n_layer))
            for (layer, head), v in np.ndenumerate(score):
                ax.text(head, layer, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black",
                        fontsize=8)
        fig.colorbar(im, ax=axes, shrink=0.8)
        fig.savefig(Path(args.out) / "scores.png", dpi=110, bbox_inches="tight")
        print(f"wrote {Path(args.out) / 'scores.png'}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            length=n, batch=args.batch, induction=induction.round(4).tolist(), previous=previous.round(4).tolist(),
            ablations=[dict(ablated=name, heads=[f"{a}.{b}" for a, b in heads], loss_first_half=f, loss_second_half=s)
                       for name, heads, f, s in rows]), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
