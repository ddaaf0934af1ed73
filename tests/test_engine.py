"""The continuous-batching engine in-process (the HTTP server on top: test_serve.py): sequences that
join and leave at different times give exactly ``generate()``'s tokens, a full queue is refused,
a cancel frees the slot, and nothing compiles after the warm-up."""

import threading
import time

import numpy as np
import pytest

from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.serve.engine import ENGINE_THREAD, Engine, QueueFull, Sampling, Sequence, compilations, wait_idle


@pytest.fixture(scope="module")
def engine(hf_dir):
    config, params, _ = load_pretrained(hf_dir("tiny")[0], scan_layers=False)
    e = Engine(params, config, slots=2, max_queue=2)
    yield e
    e.close()


def sequence(prompt, sampling, index=0):
    tokens, done = [], threading.Event()
    box = {}

    def finish(reason):
        box["reason"] = reason
        done.set()
    return Sequence(prompt, sampling, index, lambda t: tokens.append(t.id), finish), tokens, done, box


def test_sequences_joining_and_leaving_equal_generate(engine):
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 999, n).tolist(), s) for n, s in [
        (5, Sampling(12, temperature=0)), (17, Sampling(7, temperature=0.8, top_p=0.9, seed=3)),
        (30, Sampling(20, temperature=1.0, top_k=5, seed=7, ignore_eos=True)), (3, Sampling(4, temperature=0))]]
    runs = [sequence(p, s) for p, s in cases]
    for seq, *_ in runs[:2]:
        engine.submit([seq])
    runs[0][2].wait(60)
    for seq, *_ in runs[2:]:  # join while the second is still decoding
        engine.submit([seq])
    for _, _, done, _ in runs:
        assert done.wait(60)
    for (prompt, s), (_, tokens, _, box) in zip(cases, runs):
        want = generate(engine.params, engine.config, [prompt], max_new_tokens=s.max_tokens, greedy=s.temperature == 0,
                        temperature=s.temperature or 1.0, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                        stop_at_eos=not s.ignore_eos)[0]
        assert tokens == want
        assert box["reason"] == ("stop" if want[-1] == engine.eos_id and not s.ignore_eos else "length")
    assert compilations().by_thread[ENGINE_THREAD] == 0


@pytest.mark.slow
def test_full_queue_is_refused_and_cancel_frees_the_slot(engine):
    long = [sequence([1, 2, 3], Sampling(100, temperature=0, ignore_eos=True), i) for i in range(4)]
    engine.submit([long[0][0], long[1][0]])  # both slots
    deadline = time.monotonic() + 30
    while engine.active < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.submit([long[2][0], long[3][0]])  # both queue places
    with pytest.raises(QueueFull):
        engine.submit([sequence([4], Sampling(2))[0]])
    engine.cancel([s for s, *_ in long])
    assert wait_idle(engine, 30)
    assert {box["reason"] for *_, box in long} == {"cancelled"}
    with pytest.raises(Exception, match="exceeds the context of 128"):
        engine.submit([sequence(list(range(100)), Sampling(50))[0]])
