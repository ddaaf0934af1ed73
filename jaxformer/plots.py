"""Every picture jaxformer draws (matplotlib, PNG, written atomically): training curves, and what
the models do inside: attention heatmaps and the logit lens.

Tokens are labelled with their text (``repr``-style escapes for newlines and tabs), so a reader
sees which word attends to which.
"""

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def label(text: str) -> str:
    """A token's text for an axis label: whitespace made visible, long tokens cut."""
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= 14 else text[:13] + "…"


def _panel(tokens: int) -> float:
    """Inches for a heatmap side of ``tokens`` labelled cells (readable, bounded)."""
    return min(8.0, max(3.0, 0.22 * tokens + 1.2))


def _save(fig, path: Path, dpi: int = 110, bbox_inches: str | None = "tight") -> Path:
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches=bbox_inches)
    _plt().close(fig)
    tmp.replace(path)
    return path


def curves(path: str | Path, panels: list[dict], records: list[dict]) -> None:
    """One panel per dict ``{"title", "ylabel", "series": [(label, key, style), ...]}``; each series
    plots ``record[key]`` against ``record["step"]`` over the records that have ``key``.
    The PNG is written to a temporary file and renamed into place."""
    fig, axes = _plt().subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, key, style in panel["series"]:
            rows = [r for r in records if key in r]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=label)
        ax.set(xlabel="step", ylabel=panel.get("ylabel", ""), title=panel["title"])
        ax.legend()
    fig.tight_layout()
    _save(fig, path, dpi=100, bbox_inches=None)


def attention_grid(path, maps, rows: list[str], cols: list[str], title: str) -> Path:
    """One layer's attention: a panel per head and one for the head average.

    maps: float[H, len(rows), len(cols)], the probabilities of each query (row) over the keys
    (columns), e.g. generated target tokens over source tokens for cross-attention."""
    plt = _plt()
    maps = np.asarray(maps, np.float32)
    panels = list(maps) + [maps.mean(0)]
    names = [f"head {h}" for h in range(len(maps))] + ["average of heads"]
    n_cols = min(4, len(panels))
    n_rows = -(-len(panels) // n_cols)
    w, h = _panel(len(cols)), _panel(len(rows))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(w * n_cols, h * n_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, m, name in zip(axes.flat, panels, names):
        ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(cols)), [label(c) for c in cols], rotation=90, fontsize=8)
        ax.set_yticks(range(len(rows)), [label(r) for r in rows], fontsize=8)
        ax.set_title(name, fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)


def layer_averages(path, maps, rows: list[str], cols: list[str], title: str) -> Path:
    """Every layer's head-averaged attention side by side; maps: float[L, H, rows, cols]."""
    plt = _plt()
    maps = np.asarray(maps, np.float32).mean(1)
    fig, axes = plt.subplots(1, len(maps), figsize=(_panel(len(cols)) * len(maps), _panel(len(rows))), squeeze=False)
    for i, (ax, m) in enumerate(zip(axes[0], maps)):
        ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(cols)), [label(c) for c in cols], rotation=90, fontsize=8)
        ax.set_yticks(range(len(rows)), [label(r) for r in rows], fontsize=8)
        ax.set_title(f"layer {i}", fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)


def logit_lens(path, tokens: list[str], top: list[list[str]], prob, title: str) -> Path:
    """The logit lens: for each layer (rows, bottom: embeddings, top: the model's output) and
    position (columns, labelled with the input token), the top next token as text, coloured by its
    probability. top: [L + 1][t] token texts; prob: float[L + 1, t]."""
    plt = _plt()
    prob = np.asarray(prob, np.float32)
    n_layers, t = prob.shape
    fig, ax = plt.subplots(figsize=(min(24.0, max(4.0, 0.55 * t + 1.5)), max(2.5, 0.42 * n_layers + 1.2)))
    im = ax.imshow(prob, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for layer in range(n_layers):
        for pos in range(t):
            ax.text(pos, layer, label(top[layer][pos]), ha="center", va="center", fontsize=7,
                    color="white" if prob[layer, pos] > 0.6 else "black")
    ax.set_xticks(range(t), [label(x) for x in tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(n_layers), ["embed"] + [f"after {i}" for i in range(n_layers - 2)] + ["output"], fontsize=8)
    ax.set_xlabel("input token (the prediction is for the next one)")
    ax.set_ylabel("residual stream after layer")
    fig.colorbar(im, ax=ax, label="probability of the top token")
    ax.set_title(title)
    return _save(fig, path)
