"""Hypothesis against a running server: JSON bodies (and bytes that are not JSON), headers, methods
and paths, generated, sent to every endpoint. Never a 5xx, never a hang (a deadline on every
request, streams read to their end), and afterwards the engine still answers what generate()
gives, having compiled nothing."""

import collections
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxformer.gpt2.generate import generate
from jaxformer.gpt2.pretrained import load_pretrained
from jaxformer.gpt2.tokenizer import GPT2Tokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEY = "fuzz-key"
DEADLINE = 60  # seconds for any one request, its stream included
STATUSES: collections.Counter = collections.Counter()  # what the fuzzed requests got
PATHS = ["/v1/completions", "/v1/translations", "/v1/models", "/health", "/metrics", "/", "/v1/nope", "/v1/"]
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "logprobs",
          "echo", "ignore_eos", "best_of", "stream_options", "input", "beam_size", "suffix", "user"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 140),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                           max_leaves=20)
token_lists = st.lists(st.integers(-5, 50300), max_size=20)
field_values = st.one_of(json_values, token_lists, st.lists(token_lists, max_size=3), st.sampled_from(
    ["hf-small0", "fuzz-translator", "Hello world.", "", "\x00", "😀" * 30]))
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=8).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.none())
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
headers = st.fixed_dictionaries({}, optional={
    "Authorization": st.one_of(st.just(f"Bearer {KEY}"), header_text, st.just("Bearer")),
    "Content-Type": st.one_of(st.just("application/json"), header_text),
    "X-Request-Id": header_text,
    "Accept": header_text,
    "Content-Length": st.integers(0, 300).map(str),
    "X-Fuzz": header_text,
})
wild = st.tuples(st.sampled_from(["POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS"]),
                 st.one_of(st.sampled_from(PATHS), st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                           max_size=30).map(lambda p: "/" + p)),
                 bodies, headers)
# nearly valid bodies: a prompt (or sentences) and a few settings, in range or not
settings_ = st.dictionaries(st.sampled_from(FIELDS[2:15]), st.one_of(
    st.integers(-2, 20), st.floats(-1, 3), st.booleans(), st.text(max_size=5),
    st.lists(st.text(max_size=4), max_size=5), json_values), max_size=2)
prompts = st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(0, 50256), min_size=1, max_size=20))
completion_bodies = st.builds(lambda prompt, m, extra: {"prompt": prompt, "max_tokens": m, **extra},
                              prompts, st.integers(1, 20), settings_)
translation_bodies = st.builds(lambda text, beam: {"input": text, "beam_size": beam},
                               st.one_of(st.text(max_size=30), st.lists(st.text(max_size=30), max_size=4)),
                               st.integers(0, 3))
any_body = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=8)
# a request with the key to a JSON route: what reaches the parsers and the engine
keyed = st.one_of(
    st.tuples(st.just("/v1/completions"), st.one_of(completion_bodies, completion_bodies, any_body)),
    st.tuples(st.just("/v1/translations"), st.one_of(translation_bodies, any_body))).flatmap(
    lambda case: headers.map(lambda h: ("POST", case[0], json.dumps(case[1]).encode(), {
        **{k: v for k, v in h.items() if k != "Content-Length"}, "Authorization": f"Bearer {KEY}"})))


@pytest.fixture(scope="module")
def server(hf_dir, translator_dir, tmp_path_factory):
    path, _ = hf_dir("small")
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "jaxformer", "serve", "--gpt2", str(path), "--translator", str(translator_dir),
           "--port", str(port), "--slots", "4", "--max-queue", "16", "--max-beam", "2", "--translator-batch", "4",
           "--api-key", KEY, "--body-seconds", "2", "--access-log", "none"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            health = send(port, "GET", "/health", None, {})[1]
            break
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    yield dict(port=port, path=path, name=path.name, log=log, health=json.loads(health))
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def send(port: int, method: str, path: str, body: bytes | None, hdrs: dict) -> tuple[int, bytes]:
    """(status, whole body), all of it within DEADLINE seconds (an assertion error beyond)."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in hdrs.items():
            conn.putheader(name, value)
        if body is not None and "Content-Length" not in hdrs:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        data = b""
        while chunk := r.read1(65536) if method != "HEAD" else b"":
            data += chunk
            assert time.monotonic() - start < DEADLINE, f"{method} {path}: no end after {DEADLINE} s"
        return r.status, data
    except TimeoutError:
        raise AssertionError(f"{method} {path} {hdrs} {body!r:.200}: no answer within {DEADLINE} s") from None
    finally:
        conn.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(st.one_of(keyed, keyed, wild))
def test_no_request_gets_a_5xx_or_hangs(server, case):
    method, path, body, hdrs = case
    try:
        status, data = send(server["port"], method, path, body, hdrs)
    except (ConnectionError, http.client.RemoteDisconnected):  # the server may cut a malformed request off
        STATUSES["disconnected"] += 1
        return
    STATUSES[status] += 1
    assert status < 500, (method, path, hdrs, body, status, data[:500])
    if data.startswith(b"data: "):  # a stream: whole, without an error event
        assert data.rstrip().endswith(b"data: [DONE]"), data[-300:]
        assert b'"server_error"' not in data, data[-500:]


def test_the_engine_serves_on_and_compiled_nothing(server):
    """Run after the fuzz: a greedy completion equals generate(), and the process compiled nothing
    since it listened. The fuzz reached the engine (200s), the parsers (400s) and the keys (401s)."""
    print(f"\nstatuses of the fuzzed requests: {dict(STATUSES)}")
    assert all(STATUSES[s] for s in (200, 400, 401))
    prompt = "After the storm"
    body = json.dumps(dict(model=server["name"], prompt=prompt, max_tokens=12, temperature=0)).encode()
    status, data = send(server["port"], "POST", "/v1/completions", body,
                        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert status == 200, data
    config, params, _ = load_pretrained(server["path"], scan_layers=False)
    tok = GPT2Tokenizer.gpt2()
    want = generate(params, config, [tok.encode(prompt)], max_new_tokens=12, greedy=True, stop_at_eos=True)[0]
    want = want[:-1] if want and want[-1] == config.eos_token_id else want
    assert json.loads(data)["choices"][0]["text"] == tok.decode(want)
    health = json.loads(send(server["port"], "GET", "/health", None, {})[1])
    assert health["compilations"] == server["health"]["compilations"] and health["compilations_while_serving"] == 0
    assert "Traceback" not in server["log"].read_text()
