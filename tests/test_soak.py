"""The soak as CI runs it: ``scripts/soak_serve.py`` for 30 seconds with 8 clients against a small
GPT-2 and a tiny translator, with the checks of the long run (every greedy and seeded answer equal
to generate()'s, every translation to translate()'s, no 5xx, no hang, no compilation after warm-up,
resident memory flat, exit status 0 after SIGTERM)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_soak_passes_every_check(hf_dir, translator_dir, tmp_path):
    path, _ = hf_dir("small")
    report_path, log = tmp_path / "soak.json", tmp_path / "serve.log"
    cmd = [sys.executable, str(ROOT / "scripts" / "soak_serve.py"), "--minutes", "0.5", "--warmup-minutes", "0.25",
           "--clients", "8", "--slots", "4", "--max-queue", "8", "--gpt2", str(path), "--translator",
           str(translator_dir), "--request-timeout", "60", "--json", str(report_path), "--log", str(log)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr + log.read_text()[-3000:]
    report = json.loads(report_path.read_text())
    assert report["wrong_answers"] == report["server_errors"] == report["hangs"] == report["unexpected"] == 0
    assert report["compilations_after_warmup"] == 0 and report["server_exit_status"] == 0
    assert report["rss_end_mb"] - report["rss_start_mb"] < 50
    by_kind = report["requests_by_kind"]
    for kind in ("stream", "full", "n2", "stop", "sampled", "translate", "disconnect"):
        assert by_kind[kind].get("ok", 0) > 0, kind
    for kind in ("malformed", "oversized", "wrong_key"):
        assert by_kind[kind].get("refused", 0) > 0, kind
    assert set(report["latency_s"]) == {"p50", "p95", "p99"}
