"""What a training run records, shared by the trainers: ``metrics.jsonl`` (its curves are drawn by
:func:`jaxformer.plots.curves`)."""

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
