"""Find GPT-2's induction and previous-token heads with repeated random tokens, and confirm by ablation.

    jaxformer induction-heads --model runs/shakespeare --out maps/heads --json heads.json

Each of ``--batch`` sequences is ``--length`` random tokens followed by the same tokens again (drawn
from the ``--common`` most frequent tokens of a training run's data, so that the input is not out
of distribution; default: the whole vocabulary). A head's *induction score* is the mean attention a
token in the second half pays to the token right after its earlier occurrence (offset
``length - 1`` back); its *previous-token score* the mean attention to the token just before. A
model that copies in context predicts the second half far better than the first; ablating
(zeroing) its induction heads should take that away. Printed: the scores of every head, and the
loss on each half (and, for a training run, on its validation text) with no head, the top
induction heads, the top previous-token heads, and the lowest-scoring heads ablated.
``scores.png``: the two scores as layer x head heatmaps.
"""

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer induction-heads")
    ap.add_argument("--model", required=True, help="GPT-2: jaxformer checkpoint or run directory, HF directory")
    ap.add_argument("--length", type=cli.at_least(2), default=50, help="random tokens before the repeat")
    ap.add_argument("--batch", type=cli.at_least(1), default=32, help="sequences")
    ap.add_argument("--top", type=cli.at_least(1), default=2, help="heads of each kind to ablate")
    ap.add_argument("--common", type=cli.at_least(2), help="draw tokens from the run's N most frequent ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="directory for scores.png")
    ap.add_argument("--json", help="write the scores and losses here")
    args = ap.parse_args(argv)
    return cli.run(lambda: run(args), args.debug)


def run(args) -> int:
    import numpy as np

    from jaxformer.gpt2.pretrained import load_pretrained

    config, params, _ = load_pretrained(args.model, scan_layers=False)
    tokens, text = inputs(args, config)
    forward = make_forward(config, params, tokens, text)
    n = args.length
    first, second, natural, pattern = forward(None)
    pattern = np.asarray(pattern)  # [L, b, H, 2n, 2n]
    q = np.arange(n, 2 * n)
    induction = pattern[:, :, :, q, q - n + 1].mean(axis=(1, 3))  # [L, H]
    previous = pattern[:, :, :, np.arange(1, 2 * n), np.arange(2 * n - 1)].mean(axis=(1, 3))
    rows = [("none", [], float(first), float(second), float(natural))]
    rows += ablations(forward, config, induction, previous, args.top)
    report(config, induction, previous, rows)
    if args.out:
        plot_scores(args.out, config, induction, previous)
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(dict(
            length=n, batch=args.batch, induction=induction.round(4).tolist(), previous=previous.round(4).tolist(),
            ablations=[dict(ablated=name, heads=[f"{a}.{b}" for a, b in heads], loss_first_half=f, loss_second_half=s,
                            loss_text=None if np.isnan(t) else t) for name, heads, f, s, t in rows]), indent=1) + "\n")
    return 0


def inputs(args, config):
    """(tokens: int32[batch, 2 * length], the random tokens twice; text: int32[rows, 2 * length + 1]
    windows of the run's validation split, or None)."""
    from pathlib import Path

    import numpy as np

    from jaxformer.errors import InputError

    if 2 * args.length > config.n_positions:
        raise InputError(f"--length {args.length}: twice it exceeds the model's n_positions={config.n_positions}")
    data = Path(args.model) / "data"
    rng = np.random.default_rng(args.seed)
    if args.common:
        if not (data / "train.npy").is_file():
            raise InputError(f"--common needs a training run's data ({data / 'train.npy'} is missing)")
        ids, counts = np.unique(np.load(data / "train.npy"), return_counts=True)
        half = rng.choice(ids[np.argsort(-counts)][:args.common], (args.batch, args.length))
    else:
        half = rng.integers(0, config.vocab_size, (args.batch, args.length))
    tokens = np.concatenate([half, half], axis=1).astype(np.int32)
    n = args.length
    text = None
    if (data / "val.npy").is_file():  # natural text: the run's validation split
        val = np.load(data / "val.npy")
        rows = min(8, (len(val) - 1) // (2 * n))
        text = val[:rows * 2 * n + 1]
        text = np.stack([text[i * 2 * n:(i + 1) * 2 * n + 1] for i in range(rows)]).astype(np.int32) if rows else None
    return tokens, text


def make_forward(config, params, tokens, text):
    """``forward(edits) -> (loss on the first half, on the second half, on the text (NaN without),
    attention patterns float[L, b, H, 2n, 2n])``, jitted."""
    import jax
    import jax.numpy as jnp

    from jaxformer.gpt2.model import GPT2
    from jaxformer.nn import taps

    n = tokens.shape[1] // 2

    def nll(edits, x):
        logits, got = taps.apply(GPT2(config), params, x[:, :2 * n], edits=edits, capture="h/attn/pattern")
        logp = jax.nn.log_softmax(logits[0], axis=-1)
        return -jnp.take_along_axis(logp[:, :-1], x[:, 1:2 * n, None], axis=-1)[..., 0], got["h/attn/pattern"]

    @jax.jit
    def forward(edits):
        loss, pattern = nll(edits, tokens)  # [b, 2n - 1]
        natural = nll(edits, text)[0].mean() if text is not None else jnp.nan
        return loss[:, :n - 1].mean(), loss[:, n:].mean(), natural, pattern  # first half, second half

    return forward


def ablations(forward, config, induction, previous, top: int) -> list[tuple]:
    """(name, heads, losses on the first half, second half, text) with the ``top`` induction heads,
    previous-token heads, and lowest-scoring other heads ablated."""
    import numpy as np

    from jaxformer.nn import taps

    def ranked(score):
        return [tuple(int(x) for x in np.unravel_index(i, score.shape)) for i in np.argsort(-score, axis=None)]
    top_induction, top_previous = ranked(induction)[:top], ranked(previous)[:top]
    lowest = [h for h in ranked(-np.maximum(induction, previous)) if h not in top_induction + top_previous]
    rows = []
    for name, heads in (("top induction heads", top_induction), ("top previous-token heads", top_previous),
                        ("lowest-scoring other heads", lowest[:top])):
        f, s, t, _ = forward(taps.ablate_heads(config.n_layer, config.n_head, heads))
        rows.append((name, heads, float(f), float(s), float(t)))
    return rows


def report(config, induction, previous, rows: list[tuple]) -> None:
    print(f"{'layer.head':>10} {'induction':>10} {'previous-token':>15}")
    for layer in range(config.n_layer):
        for head in range(config.n_head):
            print(f"{layer:>6}.{head:<3} {induction[layer, head]:>10.3f} {previous[layer, head]:>15.3f}")
    print(f"\n{'ablated':<26} {'heads':<16} {'loss, 1st half':>15} {'loss, 2nd half':>15} {'loss, text':>11}")
    for name, heads, f, s, t in rows:
        print(f"{name:<26} {' '.join(f'{a}.{b}' for a, b in heads) or '-':<16} {f:>15.3f} {s:>15.3f} {t:>11.3f}")


def plot_scores(out: str, config, induction, previous) -> None:
    """OUT/scores.png: the two scores as layer x head heatmaps."""
    from pathlib import Path

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(out).mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * config.n_head, 1.8 + 0.5 * config.n_layer))
    for ax, score, title in zip(axes, (induction, previous), ("induction score", "previous-token score")):
        im = ax.imshow(score, cmap="magma", vmin=0, vmax=1)
        ax.set(xlabel="head", ylabel="layer", title=title, xticks=range(config.n_head), yticks=range(config.n_layer))
        for (layer, head), v in np.ndenumerate(score):
            ax.text(head, layer, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black",
                    fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(Path(out) / "scores.png", dpi=110, bbox_inches="tight")
    print(f"wrote {Path(out) / 'scores.png'}")
