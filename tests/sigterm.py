"""Helper shared by the trainers' tests: run a training command and stop it with SIGTERM."""

import signal
import subprocess
import time
from pathlib import Path


def sigterm_after_logging(cmd: list[str], out: Path, lines: int = 3, **popen_kw) -> tuple[int, str]:
    """Starts ``cmd``, sends SIGTERM once ``out/metrics.jsonl`` has ``lines`` lines, and checks the
    run exits 0 with the message naming the step and ``--resume``. Returns (that step, stderr)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, **popen_kw)
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= lines):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "SIGTERM: stopped after step" in err and "--resume" in err
    return int(err.split("stopped after step ")[1].split()[0]), err
