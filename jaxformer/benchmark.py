"""What every ``scripts/bench_*.py`` shares: the timing rules, stated once, and where it ran.

Timing rule: each contender first runs once untimed (compilation, caches), then ``repeats`` timed
passes; the contenders' passes are interleaved, so that a change of load on the machine hits them
alike, and the statistic is each contender's best (minimum) pass: the least disturbed measurement
of the same work.

Servers (``scripts/bench_serve.py``) are measured under load instead: :func:`closed_loop`
(:data:`LOAD_STATISTIC`).
"""

import http.client
import json
import math
import os
import platform
import threading
import time
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
