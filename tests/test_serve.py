"""The server as clients use it: the official ``openai`` package (plain, streamed, n, stop, seeds,
errors, echo with logprobs), lm-eval's ``local-completions`` requests, many simultaneous streams, a
full queue, disconnects, translations, limits, API keys, metrics and the access log, and the web
page in headless Chromium (hostile text included). Outputs are checked against ``generate()``, HF
PyTorch's log-probabilities and ``TranslationPipeline.translate``."""

import concurrent.futures
import contextlib
import http.client
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.gpt2.tokenizer import GPT2Tokenizer
from jaxformer.translator.translate import TranslationPipeline

pytestmark = pytest.mark.slow  # the whole module: end-to-end runs

ROOT = Path(__file__).resolve().parents[1]
SLOTS, MAX_QUEUE = 4, 2
HEAD_SECONDS, BODY_SECONDS, MAX_BEAM = 3, 2, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def server(hf_dir, translator_dir, tmp_path_factory):
    """``jaxformer serve`` in a subprocess: a small full-vocabulary GPT-2 and a tiny translator."""
    path, torch_model = hf_dir("small")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "jaxformer", "serve", "--gpt2", str(path), "--translator", str(translator_dir),
           "--port", str(port), "--slots", str(SLOTS), "--max-queue", str(MAX_QUEUE), "--max-beam", str(MAX_BEAM),
           "--translator-batch", "4", "--head-seconds", str(HEAD_SECONDS), "--body-seconds", str(BODY_SECONDS)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            health = get(f"{url}/health")
            break
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    config, params, _ = load_pretrained(path, scan_layers=False)
    yield dict(url=url, name=path.name, config=config, params=params, tok=GPT2Tokenizer.gpt2(), torch=torch_model,
               compilations=health["compilations"], translator=translator_dir.name, translator_dir=translator_dir,
               log=log)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=120)


def reference(server, prompt: str, n: int = 1, **kw) -> list[str]:
    """``generate()``'s text for the prompt (rows 0 .. n-1 of one batch, as the server numbers them)."""
    ids = server["tok"].encode(prompt)
    out = generate(server["params"], server["config"], [ids] * n, stop_at_eos=True, **kw)
    return [server["tok"].decode(o[:-1] if o and o[-1] == server["config"].eos_token_id else o) for o in out]


def test_models_and_health(server, client):
    assert {(m.id, m.task) for m in client.models.list().data} == {(server["name"], "completion"),
                                                                    (server["translator"], "translation")}
    health = get(server["url"] + "/health")
    assert health["status"] == "ok" and health["slots"] == SLOTS and health["compilations"] > 0
    assert health["compilations_while_serving"] == 0


def test_greedy_and_seeded_sampling_equal_generate(server, client):
    prompt = "The quick brown fox"
    got = client.completions.create(model=server["name"], prompt=prompt, max_tokens=20, temperature=0)
    assert got.choices[0].text == reference(server, prompt, max_new_tokens=20, greedy=True)[0]
    assert got.usage.prompt_tokens == 4 and got.usage.completion_tokens == 20
    sampled = client.completions.create(model=server["name"], prompt=prompt, max_tokens=16, temperature=0.9,
                                        top_p=0.9, seed=11, n=2, extra_body={"top_k": 40})
    want = reference(server, prompt, n=2, max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=11)
    assert [c.text for c in sorted(sampled.choices, key=lambda c: c.index)] == want
    assert want[0] != want[1]


def test_streaming_sends_the_same_text_token_by_token(server, client):
    kw = dict(model=server["name"], prompt=["Once upon a time", "To be or not"], max_tokens=12, temperature=0.7, seed=3)
    whole = client.completions.create(**kw)
    pieces = {0: [], 1: []}
    reasons = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            pieces[c.index].append(c.text)
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    for c in whole.choices:
        assert "".join(pieces[c.index]) == c.text and len(pieces[c.index]) > 3
        assert reasons[c.index] == c.finish_reason
    # prompt 1 is row 1 of the request, as in generate() with both prompts in one batch
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == [
        reference_row(server, ["Once upon a time", "To be or not"], row, max_new_tokens=12, temperature=0.7, seed=3)
        for row in (0, 1)]


def reference_row(server, prompts, row, **kw) -> str:
    ids = [server["tok"].encode(p) for p in prompts]
    out = generate(server["params"], server["config"], ids, **kw)[row]
    eos = server["config"].eos_token_id
    return server["tok"].decode(out[:-1] if out and out[-1] == eos else out)


def test_stop_sequences_and_logprobs(server, client):
    full = reference(server, "In the beginning", max_new_tokens=24, greedy=True)[0]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    got = client.completions.create(model=server["name"], prompt="In the beginning", max_tokens=24, temperature=0,
                                    stop=[stop, "@@never@@"], logprobs=3)
    c = got.choices[0]
    assert c.finish_reason == "stop" and c.text == full[:full.index(stop)]
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) >= 1
    assert all(len(t) <= 3 for t in c.logprobs.top_logprobs) and all(lp <= 0 for lp in c.logprobs.token_logprobs)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=server["name"], prompt="In the beginning", max_tokens=24, temperature=0, stop=stop, stream=True))
    assert streamed == c.text


def test_errors_surface_as_openai_exceptions(server, client):
    name = server["name"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature=3.0: must lie in"):
        client.completions.create(model=name, prompt="Hi", max_tokens=2, temperature=3)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="Hi", max_tokens=500)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="prompt 0 is empty"):
        client.completions.create(model=name, prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=name, prompt="Hi", max_tokens=2, top_p=0)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens=0: must be >= 1 \(0 only with echo\)"):
        client.completions.create(model=name, prompt="Hi", max_tokens=0)
    req = urllib.request.Request(server["url"] + "/v1/completions", b"{not json", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30)
    assert e.value.code == 400 and json.load(e.value)["error"]["code"] == "invalid_json"


def torch_logprobs(server, ids: list[int]) -> np.ndarray:
    """log-softmax of HF PyTorch's logits for ``ids``: [len(ids), vocab], float64."""
    with torch.no_grad():
        return torch.log_softmax(server["torch"](torch.tensor([ids])).logits[0].double(), -1).numpy()


def test_echo_scores_the_prompt_as_torch_does(server, client):
    """``echo`` + ``logprobs`` with ``max_tokens`` 0: the prompt's text and each token's
    log-probability given those before it (None for the first), as HF PyTorch computes them."""
    tok = server["tok"]
    ids = tok.encode("The fox 🦊 said «bonjour» to the 日本 crowd, twice.")
    got = client.completions.create(model=server["name"], prompt=ids, max_tokens=0, echo=True, logprobs=3)
    c = got.choices[0]
    assert c.text == tok.decode(ids) and c.finish_reason == "length"
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.tokens == [tok.decode([i]) for i in ids] and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = torch_logprobs(server, ids)
    err = np.abs(np.array(lp.token_logprobs[1:]) - [want[j, t] for j, t in enumerate(ids[1:])]).max()
    print(f"\n{len(ids)} prompt tokens: largest difference from PyTorch {err:.2e}")
    assert err < 1e-4
    np.testing.assert_allclose([max(top.values()) for top in lp.top_logprobs[1:]], want[:-1].max(-1), atol=1e-4)
    assert all(len(top) <= 3 for top in lp.top_logprobs[1:])
    # with generation: the prompt's text, then the completion's, in the stream as in the whole text
    kw = dict(model=server["name"], prompt="In the beginning", max_tokens=5, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(**kw).choices[0]
    assert whole.text == "In the beginning" + reference(server, "In the beginning", max_new_tokens=5, greedy=True)[0]
    assert "".join(ch.choices[0].text for ch in client.completions.create(stream=True, **kw)) == whole.text
    n = len(tok.encode("In the beginning"))
    assert len(whole.logprobs.tokens) == n + 5 and whole.logprobs.text_offset[n] == len("In the beginning")
    plain = client.completions.create(model=server["name"], prompt="In the beginning", max_tokens=0, echo=True)
    assert plain.choices[0].text == "In the beginning" and plain.choices[0].logprobs is None


def test_lm_eval_local_completions_loglikelihoods(server):
    """The requests lm-eval's ``local-completions`` model sends for log-likelihoods (echo, logprobs
    1, max_tokens 1, a batch of token-id prompts), read by its own parser: each continuation's
    summed log-probability and whether it is greedy, as HF PyTorch gives them."""
    from types import SimpleNamespace

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tok = server["tok"]
    pairs = [("The capital of France is", " Paris"), ("One, two, three,", " four, five")]
    tokens = [tok.encode(a) + tok.encode(b) for a, b in pairs]
    ctxlens = [len(tok.encode(a)) for a, _ in pairs]
    payload = LocalCompletionsAPI._create_payload(SimpleNamespace(model=server["name"]), tokens, generate=False)
    req = urllib.request.Request(server["url"] + "/v1/completions", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=120) as r:
        out = json.load(r)
    got = LocalCompletionsAPI.parse_logprobs(out, tokens=tokens, ctxlens=ctxlens)
    for (total, greedy), ids, n in zip(got, tokens, ctxlens):
        logp = torch_logprobs(server, ids)
        picked = [logp[j - 1, ids[j]] for j in range(n, len(ids))]
        assert abs(total - sum(picked)) < 1e-4 * len(picked)
        assert greedy == all(logp[j - 1].argmax() == ids[j] for j in range(n, len(ids)))


def test_many_simultaneous_streams_complete_unmixed(server, client):
    """12 streams at once over 4 slots (the rest queue as they can; a 429 is retried): each gets
    exactly its own reference text."""
    prompts = [f"Story number {i} begins with" for i in range(12)]

    def one(i):
        for _ in range(200):
            try:
                text = "".join(ch.choices[0].text for ch in client.completions.create(
                    model=server["name"], prompt=prompts[i], max_tokens=10, temperature=0.8, seed=100 + i,
                    stream=True))
                return text
            except openai.RateLimitError:
                time.sleep(0.1)
        raise AssertionError("never admitted")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, range(12)))
    for i, text in enumerate(got):
        assert text == reference(server, prompts[i], max_new_tokens=10, temperature=0.8, seed=100 + i)[0], i


def test_a_full_queue_answers_429_with_retry_after(server):
    """4 slots and 2 queue places: of 10 long requests sent at once, some are refused at once
    with 429 and Retry-After; the others complete; nothing hangs."""
    def post(i):
        body = json.dumps(dict(model=server["name"], prompt=f"Request {i}", max_tokens=60, ignore_eos=True)).encode()
        req = urllib.request.Request(server["url"] + "/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=120) as r:
                return r.status, json.load(r)["usage"]["completion_tokens"], None
        except urllib.error.HTTPError as e:
            return e.code, None, e.headers.get("Retry-After")

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(post, range(10)))
    codes = sorted(code for code, _, _ in results)
    assert codes.count(429) >= 1 and codes.count(200) >= SLOTS, results
    assert all(n == 60 for code, n, _ in results if code == 200)
    assert all(retry == "1" for code, _, retry in results if code == 429)


class FakeEngine:
    """Stands in for the engine: every sequence gets the tokens of ``text`` (20 ms apart) and ends
    with "stop"; with ``text`` None it gets "The" until it is cancelled."""

    def __init__(self, text: str | None = None):
        from jaxformer.gpt2.config import GPT2Config
        self.config, self.eos_id, self.slots = GPT2Config(), 50256, 4
        self.tokens = None if text is None else GPT2Tokenizer.gpt2().encode(text)
        self.active = self.queued = self.step_rows = 0
        self.cancelled = []

    def submit(self, seqs):
        import threading

        from jaxformer.serve.engine import Token

        def run(seq):
            for token in itertools.repeat(464) if self.tokens is None else self.tokens:
                if seq.cancelled:
                    return seq.finish("cancelled")
                seq.emit(Token(token, -1.0, [], []))
                time.sleep(0.02)
            seq.finish("stop")
        for seq in seqs:
            threading.Thread(target=run, args=(seq,), daemon=True).start()

    def cancel(self, seqs):
        for s in seqs:
            s.cancelled = True
        self.cancelled += seqs


@contextlib.contextmanager
def inprocess_server(engine, **app_kw):
    """uvicorn in a thread serving ``engine`` as the model "fake" (create_app's keywords); yields the URL."""
    import threading

    import uvicorn

    from jaxformer.serve.app import Served, create_app

    port = free_port()
    app = create_app([Served("fake", "completion", engine, GPT2Tokenizer.gpt2())], **app_kw)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True


def test_a_client_that_disconnects_frees_its_slot():
    """Through uvicorn and the openai client: a stream closed after three chunks cancels its
    sequences (here they would otherwise never end)."""
    engine = FakeEngine()
    with inprocess_server(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="fake", prompt="Endless", max_tokens=100, n=2, stream=True)
        for i, chunk in enumerate(stream):
            assert chunk.choices[0].text == "The"
            if i == 2:
                break
        assert not engine.cancelled
        stream.close()
        deadline = time.monotonic() + 10
        while len(engine.cancelled) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(engine.cancelled) == 2


def test_api_keys_guard_v1_and_the_access_log_names_keys_by_id():
    """With keys, /v1/* answers 401 (OpenAI's body, ``invalid_api_key``) to no key or a wrong one and
    serves a right one; /health and the page stay open; the access log gives a key's id, never the
    key, and the request id the response carried."""
    log = io.StringIO()
    with inprocess_server(FakeEngine("Bonjour"), keys=("key-one", "key-two"), access_log=log) as url:
        for key in ("wrong", "key-one-and-more", "KEY-ONE"):
            with pytest.raises(openai.AuthenticationError) as e:
                openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).models.list()
            assert e.value.code == "invalid_api_key"
        req = urllib.request.Request(f"{url}/v1/models")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30)
        assert e.value.code == 401 and json.load(e.value)["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="key-two", max_retries=0)
        got = client.completions.with_raw_response.create(model="fake", prompt="Hi", max_tokens=5)
        assert got.parse().choices[0].text == "Bonjour"
        request_id = got.headers["x-request-id"]
        assert get(f"{url}/health")["status"] == "ok"
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/", timeout=30) as r:
            assert r.status == 200
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert "key-one" not in log.getvalue() and "key-two" not in log.getvalue()
    ok = next(x for x in lines if x["request_id"] == request_id)
    assert ok["status"] == 200 and ok["path"] == "/v1/completions" and ok["completion_tokens"] == len(
        GPT2Tokenizer.gpt2().encode("Bonjour")) and len(ok["key"]) == 12
    assert {x["status"] for x in lines if x["path"] == "/v1/models"} == {401}
    assert all(x["key"] is None for x in lines if x["status"] == 401)


def test_streams_per_key_are_limited():
    """--max-streams-per-key 2: a key's third stream at once gets 429; another key's does not; a
    closed stream makes room."""
    from jaxformer.serve.limits import Limits

    with inprocess_server(FakeEngine(), keys=("a", "b"), limits=Limits(max_streams_per_key=2)) as url:
        clients = {k: openai.OpenAI(base_url=f"{url}/v1", api_key=k, max_retries=0) for k in "ab"}

        def open_stream(key):
            stream = clients[key].completions.create(model="fake", prompt="Hi", max_tokens=100, stream=True)
            next(iter(stream))
            return stream
        first, second = open_stream("a"), open_stream("a")
        with pytest.raises(openai.RateLimitError, match="max-streams-per-key"):
            open_stream("a")
        other = open_stream("b")
        first.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                third = open_stream("a")
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for stream in (second, other, third):
            stream.close()


HOSTILE_PROMPT = '<script>window.__pwned = "prompt script"</script><img src=x onerror="window.__pwned = 1">'
HOSTILE_TEXT = ('<img src=y onerror="window.__pwned = 2; document.title = 1">'
                '<script>window.__pwned = 3; document.title = 2</script> & <b>bold</b>')


def test_page_asks_for_the_key_once_and_shows_hostile_text_as_text(tmp_path):
    """The page in headless Chromium against a server with a key: it asks for the key, keeps it for
    the tab (a reload does not ask again), and a prompt and a continuation holding ``<script>`` and
    ``<img onerror>`` appear literally, with nothing run."""
    from page_check import check_hostile_text

    with inprocess_server(FakeEngine(HOSTILE_TEXT), keys=("page-key",)) as url:
        check_hostile_text(url, "page-key", HOSTILE_PROMPT, HOSTILE_TEXT, tmp_path / "hostile.png")


def test_translations_equal_translate(server):
    body = json.dumps(dict(model=server["translator"], input=["Hello world.", "", "Bonjour."], beam_size=2)).encode()
    req = urllib.request.Request(server["url"] + "/v1/translations", body, {"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=120) as r:
        got = json.load(r)["translations"]
    assert got == TranslationPipeline.load(server["translator_dir"]).translate(["Hello world.", "", "Bonjour."], beam_size=2)


def raw(server, data: bytes, then: bytes = b"", wait: float = 0.0, timeout: float = 30) -> bytes:
    """Sends ``data``, waits ``wait`` seconds, sends ``then``, and returns all the server sends
    until it closes the connection (or ``timeout``)."""
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        time.sleep(wait)
        with contextlib.suppress(OSError):
            sock.sendall(then)
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                out += chunk
        return out


def error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_limits_answer_4xx_in_openai_body(server):
    """A body over 1 MiB (by Content-Length, or counted while a chunked body arrives), a body too
    slow, too many or too long stop strings, too many or too long sentences, a beam beyond
    --max-beam: each a 4xx with OpenAI's body naming the limit."""
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, err = error_of(raw(server, post + b"Content-Length: 2000000\r\n\r\n"))
    assert status == 413 and "--max-body-bytes" in err["message"]
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    status, err = error_of(raw(server, post + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 17))
    assert status == 413 and err["code"] == "request_too_large"
    status, err = error_of(raw(server, post + b"Content-Length: 100\r\n\r\n{\"prompt\":", wait=BODY_SECONDS + 1))
    assert status == 408 and "--body-seconds" in err["message"]
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=60)
    for stop, limit in ((list("abcde"), "up to 4"), ("x" * 257, "256 characters")):
        with pytest.raises(openai.BadRequestError, match=limit) as e:
            client.completions.create(model=server["name"], prompt="Hi", max_tokens=2, stop=stop)
        assert e.value.param == "stop"

    def translate(body):
        req = urllib.request.Request(server["url"] + "/v1/translations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=60)
        assert e.value.code == 400
        return json.load(e.value)["error"]["message"]
    assert "up to 64" in translate(dict(input=["Hi."] * 65))
    assert "up to 2000" in translate(dict(input=["word " * 401]))
    assert "max_len" in translate(dict(input=["Hello world. " * 12]))  # more tokens than the model reads
    assert "--max-beam" in translate(dict(input="Hi.", beam_size=MAX_BEAM + 1))


def test_slow_heads_and_huge_headers_are_cut_off(server):
    """A request head still incomplete after --head-seconds: the connection is closed; headers
    beyond h11's limit: refused with 4xx; the server serves on."""
    t0 = time.monotonic()
    assert raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", then=b"X-Slow: 1\r\n",
               wait=1, timeout=HEAD_SECONDS + 10) == b""
    assert time.monotonic() - t0 < HEAD_SECONDS + 5
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n"
    assert int(raw(server, head).split()[1]) == 400  # h11: too much of an unfinished head
    assert int(raw(server, head + b"\r\n").split()[1]) == 431  # a whole head at once: the gate
    assert get(server["url"] + "/health")["status"] == "ok"


def test_metrics_request_ids_and_access_log(server):
    """/metrics in Prometheus's format with vLLM's names; a response carries the client's
    ``X-Request-Id`` (or a new one); the access log has one JSON line per request."""
    from prometheus_client.parser import text_string_to_metric_families

    body = json.dumps(dict(model=server["name"], prompt="Metrics", max_tokens=5, temperature=0)).encode()
    conn = http.client.HTTPConnection("127.0.0.1", int(server["url"].rsplit(":", 1)[1]), timeout=60)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json", "X-Request-Id": "abc-123"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("X-Request-Id") == "abc-123"
    r.read()
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert len(r.getheader("X-Request-Id")) == 32
    r.read()
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for family in text_string_to_metric_families(r.read().decode()) for x in family.samples}
    names = {name for name, _ in samples}
    for name in ("num_requests_running", "num_requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count", "request_success_total", "http_requests_total",
                 "compilations_total", "compilations_while_serving_total", "slot_occupancy", "slots", "step_rows"):
        assert f"jaxformer:{name}" in names, name
    assert samples[("jaxformer:http_requests_total", (("path", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("jaxformer:generation_tokens_total", ())] >= 5
    assert samples[("jaxformer:compilations_while_serving_total", ())] == 0
    assert samples[("jaxformer:slots", ())] == SLOTS
    deadline = time.monotonic() + 10
    while '"abc-123"' not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(json.loads(x) for x in server["log"].read_text().splitlines() if '"abc-123"' in x)
    assert {k: line[k] for k in ("method", "path", "status", "prompt_tokens", "completion_tokens", "key")} == dict(
        method="POST", path="/v1/completions", status=200, prompt_tokens=len(server["tok"].encode("Metrics")),
        completion_tokens=5, key=None)
    assert line["duration_s"] > 0 and line["time"].endswith("+00:00")


def test_page_in_headless_chromium(server, tmp_path):
    from page_check import check_page  # the browser steps; a screenshot in tmp_path

    check_page(server["url"], tmp_path / "page.png")


def test_no_compilation_after_warmup(server):
    """Every completion above (prompt lengths 1-20 tokens, 1-12 sequences at once, greedy and
    sampled, stop sequences, logprobs, scored prompts) and translation reused the shapes compiled
    at start-up: the process compiled nothing since it listened."""
    health = get(server["url"] + "/health")
    assert health["compilations_while_serving"] == 0 and health["compilations"] == server["compilations"]
