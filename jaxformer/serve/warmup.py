"""The engine's warm-up: every shape serving can meet, compiled before the server listens."""

import numpy as np

from jaxformer.serve.engine import MIN_PROMPT, MIN_WINDOW, Engine


def windows(n_positions: int) -> list[int]:
    """The cache windows: powers of two from ``MIN_WINDOW``, the last one holding ``n_positions``."""
    out = [MIN_WINDOW]
    while out[-1] < n_positions:
        out.append(out[-1] * 2)
    return out


def warm_up(engine: Engine) -> None:
    """Compiles, for each window: the step at each bucket of rows, the prefill of each prompt length
    that fits and its insertion, the move of a sequence between slots and the resizes to the other
    windows; then the scoring of each prompt length."""
    e, sizes = engine, windows(engine.config.n_positions)
    idle = np.zeros(e.slots, np.int32)
    for w in sizes:
        cache = e._zeros(w)
        for r in e.buckets:
            cache = e._step(e.params, e._bank, cache, idle[:r], idle[:r], idle[:r], e._keys[:r],
                            idle[:r].astype(np.uint32), *e._settings([None] * r))[-1]
        p = MIN_PROMPT
        while p <= w:
            *_, k, v = e._prefill(e.params, e._bank, np.zeros((1, p), np.int32), np.int32(1), np.int32(0),
                                  np.int32(0), np.int32(0), *e._settings([None]))
            cache = e._insert(cache, k, v, np.int32(0))
            p *= 2
        cache = e._move(cache, np.int32(0), np.int32(0))
        for other in sizes:
            if other != w:
                e._resize(cache, other)
    p = MIN_PROMPT
    while p <= sizes[-1]:
        e._score(e.params, e._bank, np.zeros((1, p), np.int32), np.int32(0))
        p *= 2
