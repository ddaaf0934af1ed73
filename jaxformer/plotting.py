"""Training curves as a PNG, shared by the trainers (matplotlib, no display needed)."""

from pathlib import Path


def plot_curves(path: str | Path, panels: list[dict], records: list[dict]) -> None:
    """One panel per dict ``{"title", "ylabel", "series": [(label, key, style), ...]}``; each series
    plots ``record[key]`` against ``record["step"]`` over the records that have ``key``.
    The PNG is written to a temporary file and renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, key, style in panel["series"]:
            rows = [r for r in records if key in r]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=label)
        ax.set(xlabel="step", ylabel=panel.get("ylabel", ""), title=panel["title"])
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
