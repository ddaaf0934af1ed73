"""The continuous-batching engine in-process (the HTTP server on top: test_serve.py): sequences that
join and leave at different times give exactly ``generate()``'s tokens, a full queue is refused,
a cancel frees the slot, steps shrink as sequences leave (compaction), a shutdown ends everything,
and nothing compiles after the warm-up."""

import threading
import time

import numpy as np
import pytest
import torch

from jaxformer.errors import InputError
from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.serve.compilations import compilations
from jaxformer.serve.engine import ENGINE_THREAD, Engine, QueueFull, Sampling, Sequence
from jaxformer.serve.translations import TranslationWorker


@pytest.fixture(scope="module")
def engine(hf_dir):
    config, params, _ = load_pretrained(hf_dir("tiny")[0], scan_layers=False)
    e = Engine(params, config, slots=2, max_queue=2)
    yield e
    e.close()


def wait_idle(engine: Engine, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.active and not engine.queued:
            return True
        time.sleep(0.01)
    return False


def sequence(prompt, sampling, index=0):
    tokens, done = [], threading.Event()
    box = {}

    def finish(reason):
        box["reason"] = reason
        done.set()
    return Sequence(prompt, sampling, index, lambda t: tokens.append(t.id), finish), tokens, done, box


@pytest.mark.slow
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
def test_steps_shrink_as_sequences_leave_and_outputs_equal_generate(hf_dir):
    """16 slots (steps of 1, 4 or 16 rows): six sequences start in slots 0-5; when the five short
    ones end, the long one in slot 5 moves to slot 0 and the steps run one row, and every sequence
    still gives generate()'s tokens. The move is compiled at warm-up."""
    config, params, _ = load_pretrained(hf_dir("tiny")[0], scan_layers=False)
    e = Engine(params, config, slots=16, max_queue=0)
    try:
        before = compilations().by_thread[ENGINE_THREAD]
        rng = np.random.default_rng(1)
        prompts = [rng.integers(0, 999, 4 + i).tolist() for i in range(6)]
        runs = [sequence(p, Sampling(40 if i == 5 else 3, temperature=0, ignore_eos=True), i)
                for i, p in enumerate(prompts)]
        long, seen = runs[5][0], []
        emit = long.emit
        long.emit = lambda t: (seen.append((long.slot, e.step_rows)), emit(t))
        e.submit([r[0] for r in runs])
        for _, _, done, _ in runs:
            assert done.wait(60)
        slots = [slot for slot, _ in seen]
        assert slots[0] == 5 and slots[-1] == 0, seen
        assert max(rows for _, rows in seen) == 16 and [rows for _, rows in seen[-5:]] == [1] * 5, seen
        for p, (seq, tokens, _, _) in zip(prompts, runs):
            assert tokens == generate(params, config, [p], max_new_tokens=seq.sampling.max_tokens, greedy=True,
                                      stop_at_eos=False)[0]
        assert compilations().by_thread[ENGINE_THREAD] == before
    finally:
        e.close()


@pytest.mark.slow
def test_full_queue_is_refused_and_cancel_frees_the_slot(engine):
    long = [sequence([1, 2, 3], Sampling(100, temperature=0, ignore_eos=True), i) for i in range(4)]
    engine.submit([long[0][0], long[1][0]])  # both slots
    deadline = time.monotonic() + 30
    while engine.active < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.submit([long[2][0]])  # both queue places, in two requests
    engine.submit([long[3][0]])
    with pytest.raises(QueueFull):
        engine.submit([sequence([4], Sampling(2))[0]])
    engine.cancel([s for s, *_ in long])
    assert wait_idle(engine, 30)
    assert {box["reason"] for *_, box in long} == {"cancelled"}
    with pytest.raises(Exception, match="exceeds the context of 128"):
        engine.submit([sequence(list(range(100)), Sampling(50))[0]])


@pytest.mark.slow
def test_free_slots_take_queued_requests_and_oversized_requests_are_refused(engine):
    assert wait_idle(engine, 30)
    runs = [sequence([5, 6], Sampling(30, temperature=0, ignore_eos=True), i) for i in range(4)]
    engine.submit([s for s, *_ in runs[:2]])  # two slots ...
    engine.submit([s for s, *_ in runs[2:]])  # ... and two queue places, whether or not the first have started
    for _, _, done, _ in runs:
        assert done.wait(60)
    with pytest.raises(InputError, match="at most 2 running and 2 waiting"):
        engine.submit([sequence([1], Sampling(2), i)[0] for i in range(5)])


@pytest.mark.slow
def test_a_sequence_that_fails_to_start_ends_with_error_and_the_engine_keeps_serving(engine):
    assert wait_idle(engine, 30)
    bad, _, done, box = sequence([1, 2], Sampling(4, seed=2**40))  # no int32 seed: the prefill call fails
    engine.submit([bad])
    assert done.wait(60) and box["reason"] == "error"
    good, tokens, done, _ = sequence([7, 8, 9], Sampling(6, temperature=0, ignore_eos=True))
    engine.submit([good])
    assert done.wait(60)
    assert tokens == generate(engine.params, engine.config, [[7, 8, 9]], max_new_tokens=6, greedy=True,
                              stop_at_eos=False)[0]
    assert wait_idle(engine, 30) and engine.queued == 0


@pytest.mark.slow
def test_prompt_scores_equal_torch_and_take_no_slot(engine, hf_dir):
    """``scored`` with ``max_tokens`` 0: the prompt's log-probabilities are log-softmax of the HF
    PyTorch model's logits; three such sequences with two slots all finish, none holding a slot."""
    torch_model = hf_dir("tiny")[1]
    prompts = [[5, 17, 300, 2, 999, 41], list(range(1, 40)), [7, 7]]
    got, runs = {}, []
    for i, prompt in enumerate(prompts):
        seq, tokens, done, box = sequence(prompt, Sampling(0))
        seq.scored = lambda t, i=i: got.__setitem__(i, t)
        runs.append((seq, tokens, done, box))
    engine.submit([r[0] for r in runs])
    for i, (prompt, (_, tokens, done, box)) in enumerate(zip(prompts, runs)):
        assert done.wait(60) and box["reason"] == "length" and tokens == []
        with torch.no_grad():
            logp = torch.log_softmax(torch_model(torch.tensor([prompt])).logits[0].double(), -1).numpy()
        assert [t.id for t in got[i]] == prompt and got[i][0].logprob is None
        want = [logp[j, t] for j, t in enumerate(prompt[1:])]
        np.testing.assert_allclose([t.logprob for t in got[i][1:]], want, atol=1e-4)
        assert [t.top_ids[0] for t in got[i][1:]] == logp[:-1].argmax(-1).tolist()
    assert wait_idle(engine, 30) and compilations().by_thread[ENGINE_THREAD] == 0


@pytest.mark.slow
def test_shutdown_ends_running_and_waiting_sequences(hf_dir):
    """``shutdown()``: the sequences in slots and in the queue end with "shutdown"; so does one
    submitted afterwards."""
    config, params, _ = load_pretrained(hf_dir("tiny")[0], scan_layers=False)
    engine = Engine(params, config, slots=2, max_queue=3)
    runs = [sequence([1, 2, 3], Sampling(100, temperature=0, ignore_eos=True), i) for i in range(4)]
    engine.submit([r[0] for r in runs])
    engine.shutdown()
    late = sequence([4, 5], Sampling(5))
    engine.submit([late[0]])
    for _, _, done, box in runs + [late]:
        assert done.wait(30) and box["reason"] == "shutdown"
    assert wait_idle(engine, 30)
    engine.close()


def test_translation_queue_counts_the_idle_worker():
    """--max-queue 0: a request reaches an idle worker; a second one while it works is refused."""
    release, started = threading.Event(), threading.Event()

    class Slow:
        def translate(self, sentences, beam_size):
            started.set()
            release.wait(30)
            return [s.upper() for s in sentences]

    got = []
    worker = TranslationWorker(Slow(), max_queue=0)
    worker.submit(["a"], 1, got.append)
    assert started.wait(30)
    with pytest.raises(QueueFull):
        worker.submit(["b"], 1, got.append)
    release.set()
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [["A"]]
