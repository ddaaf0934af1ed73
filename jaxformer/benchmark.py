"""What every ``scripts/bench_*.py`` shares: one timing rule, stated once, and where it ran.

Timing rule: each contender first runs once untimed (compilation, caches), then ``repeats`` timed
passes; the contenders' passes are interleaved, so that a change of load on the machine hits them
alike, and the statistic is each contender's best (minimum) pass: the least disturbed measurement
of the same work.
"""

import json
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
