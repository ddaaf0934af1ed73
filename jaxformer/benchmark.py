"""What every ``scripts/bench_*.py`` shares: the timing rules, stated once, and where it ran.

Timing rule: each contender first runs once untimed (compilation, caches), then ``repeats`` timed
passes; the contenders' passes are interleaved, so that a change of load on the machine hits them
alike, and the statistic is each contender's best (minimum) pass: the least disturbed measurement
of the same work.

Servers (``scripts/bench_serve.py``, ``bench_lora.py``, ``soak_serve.py``) are measured under load
instead: :func:`closed_loop` (:data:`LOAD_STATISTIC`), each server a :class:`ServerProcess` on
:data:`HOST`, serving the model :func:`make_model` writes.
"""

import contextlib
import http.client
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

STATISTIC = "best of interleaved timed passes, after one untimed warm-up"
LOAD_STATISTIC = ("closed loop: N concurrent streaming clients, each request after the previous one ended; tokens/s = "
                  "tokens received / wall time of the timed pass; TTFT and TPOT per request, p50/p95 over requests")


def best_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Seconds of each function's best pass (see the module docstring)."""
    if warmup:
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def train_steps(step: Callable, state, batches: list) -> Callable[[int], None]:
    """``run(n)``: n calls ``state, metrics = step(state, batch)`` over ``batches`` in turn, then a
    wait for the metrics (the loss must be finite); ``run.state()`` is the latest state."""
    box = [state]

    def run(n: int) -> None:
        for i in range(n):
            box[0], metrics = step(box[0], batches[i % len(batches)])
        jax.block_until_ready(metrics)
        assert np.isfinite(float(metrics["loss"]))

    run.state = lambda: box[0]
    return run


def device_name() -> str:
    """The first JAX device in words: the CPU model and core count, or the accelerator's kind."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        model = platform.processor()
        if Path("/proc/cpuinfo").is_file():
            model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                          if line.startswith("model name")), model)
        return f"cpu: {model} ({os.cpu_count()} cores)"
    return f"{d.platform}: {d.device_kind}"


def copy_bandwidth(nbytes: int = 1 << 29) -> tuple[float, float]:
    """(all-threads, one-thread) bytes/s of a large array copy, counting bytes read + written (the
    STREAM convention). On the CPU the copy runs on ``os.cpu_count()`` threads (numpy releases the
    GIL); on an accelerator it is a jitted device copy (one-thread: NaN)."""
    if jax.devices()[0].platform != "cpu":
        x = jnp.ones(nbytes // 4, jnp.float32)
        copy = jax.jit(lambda a: a + 0.0)
        t = best_times({"copy": lambda: copy(x).block_until_ready()}, 5)["copy"]
        return 2 * nbytes / t, float("nan")
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)

    def copy(threads):
        edges = np.linspace(0, len(src), threads + 1).astype(int)
        pool = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in zip(edges, edges[1:])]
        for th in pool:
            th.start()
        for th in pool:
            th.join()

    t = best_times({"many": lambda: copy(os.cpu_count()), "one": lambda: copy(1)}, 5)
    return 2 * nbytes / t["many"], 2 * nbytes / t["one"]


def write_json(path: str | Path | None, result: dict) -> None:
    """Writes ``result`` (with the timing rule added) as JSON, when a path is given."""
    if path:
        Path(path).write_text(json.dumps({**result, "statistic": STATISTIC}, indent=1) + "\n")
        print(f"wrote {path}")


# --- servers under load ----------------------------------------------------------------------------

HOST = "127.0.0.1"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never a proxy


def make_model(path: Path) -> None:
    """Random-weight GPT-2 124M (transformers, seed 0) with the GPT-2 tokenizer files, in Hugging
    Face layout."""
    import torch
    import transformers

    from jaxformer.gpt2.tokenizer import GPT2_DIR

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().save_pretrained(path)
    for f in GPT2_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)


def one_token_words() -> list[str]:
    """GPT-2 tokens " word" (lowercase ASCII letters) that encode back to themselves alone: a prompt
    joining n of them is exactly n tokens."""
    from jaxformer.gpt2.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.gpt2()
    vocab = tok.tokenizer.get_vocab()
    words = sorted(" " + t[1:] for t in vocab
                   if t.startswith("Ġ") and len(t) > 2 and t[1:].isascii() and t[1:].isalpha() and t[1:].islower())
    ids = tok.tokenizer.encode_batch(words, add_special_tokens=False)
    return [w for w, e in zip(words, ids, strict=True) if len(e.ids) == 1]


def make_prompts(words: list[str], count: int, length: int, seed: int) -> list[str]:
    rng = np.random.RandomState(seed)
    return ["".join(words[i] for i in rng.randint(0, len(words), length)) for _ in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10):
    with _OPENER.open(url, timeout=timeout) as r:
        return json.load(r)


class ServerProcess:
    """A server's command as a subprocess alone in its process group (what it starts goes with it),
    its output in ``log``; as a context manager, stopped at the end. ``name`` and ``log_name`` say
    which server and where its log is in errors."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None, name: str = "the server",
                 log_name: str | None = None):
        self.cmd, self.port, self.log_path, self.name = cmd, port, Path(log), name
        self.log_name, self.url = log_name or str(log), f"http://{HOST}:{port}"
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, cwd=Path(__file__).resolve().parents[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop(20)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until GET /health answers ok; an error naming the log if the server dies or is late."""
        from jaxformer.errors import InputError

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise InputError(f"{self.name} exited with status {self.proc.returncode} before it was ready; "
                                 f"its log ({self.log_name}) ends:\n{self.tail()}")
            try:
                health = get_json(f"{self.url}/health", timeout=5)
                if not isinstance(health, dict) or health.get("status", "ok") == "ok":
                    return time.monotonic() - start
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise InputError(f"{self.name} was not ready after {timeout} s; its log ({self.log_name}) ends:\n{self.tail()}")

    def health(self) -> dict:
        """GET /health, or {} when it does not answer."""
        try:
            health = get_json(f"{self.url}/health")
            return health if isinstance(health, dict) else {}
        except (OSError, ValueError):
            return {}

    def wait_idle(self, timeout: float) -> bool:
        """Whether /health says nothing is running or queued within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if h and not h.get("active") and not h.get("queued"):
                return True
            time.sleep(0.2)
        return False

    def rss_mb(self) -> float:
        """Resident memory (VmRSS) in MB (Linux)."""
        from jaxformer.errors import InputError

        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise InputError("no VmRSS in /proc: the server's memory is read there (Linux)")

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM to the group, then the exit status (None: it had to be killed)."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return None
        finally:
            self.log.close()

    def tail(self, lines: int = 30) -> str:
        if not self.log.closed:
            self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def stream_completion(host: str, port: int, body: dict, timeout: float) -> dict:
    """One streaming POST /v1/completions: arrival times of the first and last text chunks, tokens
    (the final ``usage``, else the text chunks), chunks, error (None when it succeeded)."""
    start = time.perf_counter()
    times, usage, error = [], None, None
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body).encode(),
                     {"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            error = f"HTTP {resp.status}: {resp.read(300).decode(errors='replace')}"
        else:
            while line := resp.readline():
                if time.perf_counter() - start > timeout:
                    error = f"not finished after {timeout} s"
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    error = f"error event: {event['error']}"
                    break
                usage = event.get("usage") or usage
                if any(c.get("text") for c in event.get("choices") or []):
                    times.append(time.perf_counter() - start)
    except (OSError, http.client.HTTPException, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") is not None else len(times)
    if error is None and not times:
        error = "no text received"
    return dict(ttft=times[0] if times else None, last=times[-1] if times else None, tokens=tokens, chunks=len(times),
                error=error)


def closed_loop(host: str, port: int, fields: dict | list[dict], prompts: list[str], streams: int,
                timeout: float) -> tuple[list[dict], float]:
    """(a :func:`stream_completion` result per prompt, wall seconds) of ``streams`` clients in a closed
    loop over ``prompts``: client i sends prompts i, i + streams, ..., each after the previous one ended,
    with the request ``fields`` (a list: client i's are ``fields[i % len(fields)]``, e.g. its model)."""
    results, lock = [], threading.Lock()
    per_client = fields if isinstance(fields, list) else [fields]

    def client(i):
        for prompt in prompts[i::streams]:
            r = stream_completion(host, port, {**per_client[i % len(per_client)], "prompt": prompt}, timeout)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout * math.ceil(len(prompts) / streams) + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    wall = time.perf_counter() - start
    with lock:
        results = list(results)
    results += [dict(ttft=None, last=None, tokens=0, chunks=0, error="client still running at the deadline")] * (
        len(prompts) - len(results))
    return results, wall


def summarize_load(results: list[dict], wall: float, expected: int) -> dict:
    """Tokens/s, failures and p50/p95 of TTFT and TPOT (per request: (last - first) / (tokens - 1))
    of a :func:`closed_loop` pass whose requests should each yield ``expected`` tokens."""
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] for r in ok]
    tpot = [(r["last"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    received = sum(r["tokens"] for r in results)
    return dict(tok_s=received / wall, wall_s=wall, requests=len(results), failed=len(results) - len(ok),
                tokens_expected=expected * len(results), tokens_received=received,
                short=sum(r["tokens"] != expected for r in ok),
                ttft_p50_s=pct(ttft, 50), ttft_p95_s=pct(ttft, 95), tpot_p50_s=pct(tpot, 50), tpot_p95_s=pct(tpot, 95),
                errors=sorted({r["error"] for r in results if r["error"]})[:3])
