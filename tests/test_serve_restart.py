"""A graceful restart: SIGTERM while 8 streams run (1 slot, the rest queued) stops new requests
with 503 and Retry-After while the listening socket stays open, lets running streams go on for
--drain-seconds, ends the others with an error event, and exits with status 0; a second start of the
same model reads its programs from the persistent compilation cache (both start-up times printed)."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STREAMS, SLOTS, DRAIN = 8, 1, 0.5  # more tokens than the drain can decode


def start(cmd: list[str], port: int, log: Path) -> tuple[subprocess.Popen, float]:
    """The server process and the seconds until /health answered."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            status, _, _ = request(port, "GET", "/health")
            if status == 200:
                return proc, time.monotonic() - t0
        except OSError:
            pass
        assert time.monotonic() - t0 < 600, log.read_text()
        time.sleep(0.1)


def request(port: int, method: str, path: str, body: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.headers, json.loads(r.read() or b"null")
    finally:
        conn.close()


def stream(port: int, prompt: str, events: list) -> None:
    """A streamed completion as long as the context allows; its events go to ``events``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = dict(prompt=prompt, max_tokens=120, temperature=0, ignore_eos=True, stream=True)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    events.append(r.status)
    for line in r:
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            events.append(data if data == "[DONE]" else json.loads(data))
    conn.close()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_streams_and_a_second_start_uses_the_compile_cache(hf_dir, tmp_path):
    path, _ = hf_dir("small")
    cmd = [sys.executable, "-m", "jaxformer", "serve", "--gpt2", str(path), "--slots", str(SLOTS), "--max-queue",
           str(STREAMS), "--drain-seconds", str(DRAIN), "--compile-cache", str(tmp_path / "jit"),
           "--access-log", "none"]
    port = free_port()
    proc, cold = start(cmd, port, tmp_path / "first.log")
    runs = [[] for _ in range(STREAMS)]
    threads = [threading.Thread(target=stream, args=(port, f"Stream {i} says", runs[i])) for i in range(STREAMS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while request(port, "GET", "/health")[2]["queued"] < STREAMS - SLOTS:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    status, headers, body = request(port, "POST", "/v1/completions", dict(prompt="Late", max_tokens=2))
    assert status == 503 and headers["Retry-After"] == "5" and body["error"]["code"] == "server_shutting_down"
    for t in threads:
        t.join(120)
    assert proc.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()
    finished = errored = 0
    for events in runs:
        assert events[0] == 200 and events[-1] == "[DONE]", events[:3]
        chunks = events[1:-1]
        if any("error" in e for e in chunks):
            assert chunks[-1]["error"]["code"] == "server_shutting_down"
            errored += 1
        else:
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            finished += 1
    assert errored >= 1 and finished + errored == STREAMS
    assert "stopped" in (tmp_path / "first.log").read_text()

    proc, warm = start(cmd, free_port(), tmp_path / "second.log")
    print(f"\n{finished} streams finished, {errored} ended by the shutdown; start-up {cold:.1f} s with an empty "
          f"compilation cache, {warm:.1f} s with it filled")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert warm < cold
