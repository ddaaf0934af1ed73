"""What a training run records, shared by the trainers: JSONL metrics and PNG curves."""

import json
from pathlib import Path

import jax


class MetricsLog:
    """One JSON object per line in ``path``, each with at least ``step``; the records stay in
    ``records`` for plotting. A resumed run (``resume_step``) keeps the lines up to that step and
    drops the ones a killed run wrote after its last checkpoint; a fresh run starts the file anew.
    Only process 0 writes the file (every process keeps ``records``)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path, self.records, self.writer = Path(path), [], jax.process_index() == 0
        if not self.writer:
            return
        if resume_step is not None and self.path.is_file():
            self.records = [r for r in map(_parse, self.path.read_text().splitlines())
                            if r is not None and r["step"] <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.writer:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _parse(line: str) -> dict | None:
    """A record, or None for a line a killed process left half-written."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


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
