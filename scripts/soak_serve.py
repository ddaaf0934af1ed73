"""Soak the server: a real ``jaxformer serve`` under a long, mixed and hostile load, every answer checked.

    python scripts/soak_serve.py --minutes 10 --clients 64 --json soak.json
    python scripts/soak_serve.py --minutes 0.5 --clients 8 --gpt2 DIR --translator DIR

The server (``python -m jaxformer serve`` on 127.0.0.1 with two API keys) serves --gpt2 (default: a
random-weight GPT-2 124M, seed 0, with the GPT-2 tokenizer, as bench_serve.py makes it) and, with
--translator, a translator. --clients threads each send requests one after another until --minutes
have passed, drawn (seeded) from a mix: streamed and plain greedy completions, ``n`` 2, stop
strings, seeded sampling, translations, streams the client drops after two events, malformed
bodies, bodies over the server's size limit, wrong keys, and /metrics scrapes.

Checked: every greedy and seeded completion against ``generate()`` on the same model, computed here
before the load starts; translations against ``TranslationPipeline.translate``; every refusal's
status (400/404 malformed, 413 oversized, 401 wrong key; 429 busy counts apart). A request slower
than --request-timeout is a hang. One request of each kind comes first, then --warmup-minutes of
the load (checked all the same), then --minutes of it. The report (stdout, and --json): requests by
kind and outcome, wrong answers (with examples), 5xx, hangs, latency percentiles of answered
requests, the server's resident memory (VmRSS) when ready, after the warm-up load (``rss_start``),
every 30 s and at the end, compilations since the server was ready (``/health``), and the server's
exit status after SIGTERM. Exit status 1 when a check fails: a wrong answer, a 5xx, a hang, an
unexpected status, a compilation after warm-up, memory growth beyond --max-growth-mb, a non-zero
server exit.
"""

import collections
import http.client
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from jaxformer.benchmark import HOST, ServerProcess, free_port, make_model
from jaxformer.commands import cli

KEYS = ("soak-key-one", "soak-key-two")
MAX_BODY = 1 << 16  # the server's --max-body-bytes in the soak
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "To be or not to be, that is",
           "Hello", "The history of the city begins with a small village on the river, where",
           "Q: What is the capital of France?\nA:", "def main():\n    ", "1, 2, 3, 4,", "ROMEO:",
           "It was the best of times, it was the worst of times, it was the age of wisdom, it was",
           "Dear Sir,", "A B C D E F G", "Breaking news:", "The fox 🦊 said «bonjour» to the 日本 crowd",
           "Once more unto the breach, dear friends, once more; or close the wall up with our English dead"]
SENTENCES = ["Hello world.", "Bonjour le monde.", "I like cheese.", "Where is the station?", "Try not to laugh."]
MAX_TOKENS = (6, 16)
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95)
MIX = {"stream": 18, "full": 14, "n2": 8, "stop": 10, "sampled": 10, "translate": 8, "disconnect": 8,
       "malformed": 8, "oversized": 3, "wrong_key": 5, "scrape": 2}
FAILING = ("wrong", "server_error", "hang", "unexpected")


def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--minutes", type=cli.number_in(0, 1440, low_open=True), default=10.0,
                    help="minutes of measured load (default 10)")
    ap.add_argument("--warmup-minutes", type=cli.number_in(0, 60), default=0.5,
                    help="minutes of the same load before memory is first measured (default 0.5)")
    ap.add_argument("--clients", type=cli.at_least(1), default=64)
    ap.add_argument("--json", metavar="PATH", help="write the report here too")
    ap.add_argument("--gpt2", help="GPT-2 model to serve (default: random-weight GPT-2 124M)")
    ap.add_argument("--translator", help="translator run directory to serve too")
    ap.add_argument("--slots", type=cli.at_least(1), default=16)
    ap.add_argument("--max-queue", type=cli.at_least(0), default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=cli.at_least(1), default=180, help="seconds before a request is a hang")
    ap.add_argument("--startup-timeout", type=cli.at_least(1), default=1800)
    ap.add_argument("--max-growth-mb", type=float, default=50.0, help="resident memory growth that fails the soak")
    ap.add_argument("--log", metavar="PATH", help="keep the server's output here")
    args = ap.parse_args(argv)
    return cli.run(lambda: soak(args), args.debug)


# --- the model and the answers it must give ---------------------------------------------------------

def references(model: str, translator: str | None, max_beam: int) -> dict:
    """What the server must answer: greedy texts by (prompt, max_tokens), seeded samples by (prompt,
    seed) for n=2 and 16 tokens, translations by (sentence, beam)."""
    from jaxformer.gpt2.generate import generate
    from jaxformer.gpt2.pretrained import load_pretrained
    from jaxformer.gpt2.tokenizer import GPT2Tokenizer

    config, params, tok = load_pretrained(model, scan_layers=False)
    tok = tok or GPT2Tokenizer.gpt2()

    def texts(out):
        return [tok.decode(o[:-1] if o and o[-1] == config.eos_token_id else o) for o in out]
    greedy, sampled = {}, {}
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt)
        for m in MAX_TOKENS:
            greedy[i, m] = texts(generate(params, config, [ids], max_new_tokens=m, greedy=True, stop_at_eos=True))[0]
        for seed in (1, 2):
            sampled[i, seed] = texts(generate(params, config, [ids] * 2, max_new_tokens=16, seed=seed,
                                              stop_at_eos=True, **SAMPLING))
    translations = {}
    if translator:
        from jaxformer.translator.translate import TranslationPipeline

        pipeline = TranslationPipeline.load(translator)
        for beam in range(1, max_beam + 1):
            for s, t in zip(SENTENCES, pipeline.translate(SENTENCES, beam_size=beam)):
                translations[s, beam] = t
    return dict(name=Path(model.rstrip("/")).name, greedy=greedy, sampled=sampled, translations=translations,
                context=config.n_positions)


def stop_case(text: str, rng: random.Random) -> tuple[str, str]:
    """A stop string from ``text`` (or one that never appears) and the text the server must give."""
    if len(text) < 4 or rng.random() < 0.2:
        return "@@never@@", text
    at = rng.randrange(1, len(text) - 2)
    stop = text[at:at + rng.randint(1, 3)]
    return stop, text[:text.find(stop)]


# --- the clients ------------------------------------------------------------------------------------

def send(port: int, method: str, path: str, body: bytes | None, headers: dict, timeout: float,
         keep_events: int | None = None):
    """(status, payload) of one request on a new connection, all of it within ``timeout`` seconds
    (TimeoutError beyond). payload: the events of a stream (JSON objects, then "[DONE]"; only the
    first ``keep_events`` when given, then the connection is dropped), else the JSON or bytes."""
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body, headers)
        r = conn.getresponse()
        kind = r.getheader("Content-Type", "")
        if not kind.startswith("text/event-stream"):
            raw = r.read()
            return r.status, json.loads(raw) if kind.startswith("application/json") else raw
        events = []
        while not (keep_events and len(events) >= keep_events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stream ran past {timeout} s")
            conn.sock.settimeout(max(0.05, deadline - time.monotonic()))
            if not (line := r.readline()):
                break
            if line.startswith(b"data: "):
                data = line[6:].strip().decode()
                events.append(data if data == "[DONE]" else json.loads(data))
        return r.status, events
    finally:
        conn.close()


def completion_texts(payload, stream: bool) -> list[str] | str:
    """The choices' texts in index order, or why the response is broken."""
    if not stream:
        return [c["text"] for c in sorted(payload["choices"], key=lambda c: c["index"])]
    if not payload or payload[-1] != "[DONE]":
        return "the stream did not end with [DONE]"
    if any("error" in e for e in payload[:-1]):
        return "server_error"
    texts = collections.defaultdict(str)
    for e in payload[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    return [texts[i] for i in sorted(texts)]


def completion_case(kind: str, refs: dict, rng: random.Random) -> tuple[dict, list[str]]:
    """A completion request of ``kind`` and the texts it must give."""
    i = rng.randrange(len(PROMPTS))
    body = dict(model=refs["name"], prompt=PROMPTS[i], temperature=0, stream=kind == "stream" or (
        kind != "full" and rng.random() < 0.5))
    if kind == "sampled":
        seed = rng.choice((1, 2))
        return {**body, **SAMPLING, "n": 2, "seed": seed, "max_tokens": 16}, refs["sampled"][i, seed]
    m = 16 if kind in ("stop", "disconnect") else rng.choice(MAX_TOKENS)
    body["max_tokens"], want = m, [refs["greedy"][i, m]]
    if kind == "n2":
        body["n"], want = 2, want * 2
    if kind == "stop":
        body["stop"], cut = stop_case(want[0], rng)
        want = [cut]
    return body, want


def malformed_case(refs: dict, rng: random.Random) -> tuple[str, bytes, set[int]]:
    """(path, body, the statuses that are right) of a malformed request."""
    name = refs["name"]
    return rng.choice([
        ("/v1/completions", b"{not json", {400}),
        ("/v1/completions", b"[1, 2]", {400}),
        ("/v1/completions", json.dumps(dict(model=name, prompt=5)).encode(), {400}),
        ("/v1/completions", json.dumps(dict(model="nope", prompt="x")).encode(), {404}),
        ("/v1/completions", json.dumps(dict(model=name, prompt="x", temperature="hot")).encode(), {400}),
        ("/v1/completions", json.dumps(dict(model=name, prompt="x", n=0)).encode(), {400}),
        ("/v1/completions", json.dumps(dict(model=name, prompt="x", max_tokens=refs["context"])).encode(), {400}),
        ("/v1/completions", "\udcff".encode("utf-8", "surrogatepass"), {400}),
        ("/v1/translations", json.dumps(dict(input=3)).encode(), {400, 404}),
        ("/v1/nowhere", b"{}", {404}),
    ])


def classify(status: int, ok: bool | None = None) -> str:
    if status == 429:
        return "busy"
    if status >= 500:
        return "server_error"
    return "unexpected" if ok is None else ("ok" if ok else "wrong")


class Load:
    """What every client shares: the server's port, the answers, the timeout; and the results,
    ``(kind, outcome, seconds, detail)`` per request."""

    def __init__(self, port: int, refs: dict, timeout: float, max_beam: int):
        self.port, self.refs, self.timeout, self.max_beam = port, refs, timeout, max_beam
        self.results: list[tuple[str, str, float, str]] = []
        self.mix = {k: w for k, w in MIX.items() if k != "translate" or refs["translations"]}

    def post(self, path: str, body: bytes, key: str, keep_events: int | None = None):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        return send(self.port, "POST", path, body, headers, self.timeout, keep_events)

    def attempt(self, kind: str, key: str, rng: random.Random) -> tuple[str, str]:
        """One request of ``kind``: (outcome, detail)."""
        try:
            return self._attempt(kind, key, rng)
        except TimeoutError as e:
            return "hang", str(e)
        except (OSError, http.client.HTTPException, ValueError) as e:
            return "unexpected", f"{type(e).__name__}: {e}"

    def _attempt(self, kind: str, key: str, rng: random.Random) -> tuple[str, str]:
        refs = self.refs
        if kind == "translate":
            beam, sentences = rng.randint(1, self.max_beam), rng.sample(SENTENCES, rng.randint(1, 3))
            status, out = self.post("/v1/translations", json.dumps(dict(input=sentences, beam_size=beam)).encode(), key)
            want = [refs["translations"][s, beam] for s in sentences]
            got = out.get("translations") if status == 200 else None
            return classify(status, got == want if status == 200 else None), f"{sentences} beam {beam}: {got}"
        if kind == "malformed":
            path, body, right = malformed_case(refs, rng)
            status, _ = self.post(path, body, key)
            return ("refused" if status in right else classify(status)), f"{path} {body[:60]!r}: {status}"
        if kind == "oversized":
            status, _ = self.post("/v1/completions", b'{"prompt": "' + b"a" * MAX_BODY + b'"}', key)
            return ("refused" if status == 413 else classify(status)), str(status)
        if kind == "wrong_key":
            status, _ = self.post("/v1/completions", b'{"prompt": "x"}', f"wrong-{rng.random()}")
            return ("refused" if status == 401 else classify(status)), str(status)
        if kind == "scrape":
            status, text = send(self.port, "GET", "/metrics", None, {}, self.timeout)
            return classify(status, b"jaxformer:generation_tokens_total" in text if status == 200 else None), ""
        body, want = completion_case(kind, refs, rng)
        status, out = self.post("/v1/completions", json.dumps(body).encode(), key, 2 if kind == "disconnect" else None)
        if status != 200 or kind == "disconnect":
            return classify(status, True if status == 200 else None), f"{status}"
        got = completion_texts(out, body["stream"])
        if got == "server_error":
            return "server_error", json.dumps(out)[:300]
        return classify(200, got == want), f"{json.dumps(body)}: got {got!r}, want {want!r}"

    def client(self, index: int, seed: int, deadline: float) -> None:
        """Requests one after another until ``deadline``; a refusal for load (429) waits a little."""
        rng = random.Random(seed * 100_003 + index)
        key, kinds, weights = KEYS[index % len(KEYS)], list(self.mix), list(self.mix.values())
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            t0 = time.monotonic()
            outcome, detail = self.attempt(kind, key, rng)
            self.results.append((kind, outcome, time.monotonic() - t0, detail))
            if outcome == "busy":
                time.sleep(rng.uniform(0.05, 0.3))

    def run(self, clients: int, seconds: float, seed: int) -> float:
        """``clients`` threads for ``seconds``; returns the wall time (the last requests included)."""
        start = time.monotonic()
        threads = [threading.Thread(target=self.client, args=(i, seed, start + seconds), daemon=True)
                   for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, start + seconds + 2 * self.timeout - time.monotonic()))
        self.stuck = sum(t.is_alive() for t in threads)  # hangs past every timeout
        return time.monotonic() - start


# --- the soak ---------------------------------------------------------------------------------------

def soak(args) -> int:
    with tempfile.TemporaryDirectory(prefix="jaxformer-soak-") as tmp:
        model = args.gpt2
        if model is None:
            model = str(Path(tmp) / "gpt2-random")
            print("making a random-weight GPT-2 124M ...", file=sys.stderr, flush=True)
            make_model(Path(model))
        max_beam = 2
        print("computing the reference answers with generate() ...", file=sys.stderr, flush=True)
        refs = references(model, args.translator, max_beam)
        port = free_port()
        cmd = [sys.executable, "-m", "jaxformer", "serve", "--gpt2", model, "--port", str(port), "--slots",
               str(args.slots), "--max-queue", str(args.max_queue), "--max-body-bytes", str(MAX_BODY),
               *[x for k in KEYS for x in ("--api-key", k)]]
        if args.translator:
            cmd += ["--translator", args.translator, "--max-beam", str(max_beam), "--translator-batch", "4"]
        server = ServerProcess(cmd, port, Path(args.log or Path(tmp) / "serve.log"))
        try:
            report = measure(server, refs, args, max_beam)
        finally:
            exit_status = server.stop()
        report["server_exit_status"] = exit_status
        return finish(report, args, exit_status)


def measure(server: ServerProcess, refs: dict, args, max_beam: int) -> dict:
    startup = server.wait_ready(args.startup_timeout)
    ready, rss_ready = server.health(), server.rss_mb()
    load = Load(server.port, refs, args.request_timeout, max_beam)
    for kind in load.mix:  # one of each
        outcome, detail = load.attempt(kind, KEYS[0], random.Random(args.seed))
        load.results.append((kind, outcome, 0.0, detail))
    print(f"server ready in {startup:.1f} s; {args.clients} clients for {args.warmup_minutes:g} + {args.minutes:g} "
          "min ...", file=sys.stderr, flush=True)
    load.run(args.clients, args.warmup_minutes * 60, args.seed + 1)
    warm = len(load.results)
    rss_start, samples, done = server.rss_mb(), [], threading.Event()

    def sample() -> None:
        while not done.wait(30):
            samples.append(round(server.rss_mb(), 1))
    threading.Thread(target=sample, daemon=True).start()
    wall = load.run(args.clients, args.minutes * 60, args.seed)
    done.set()
    idle = server.wait_idle(60)
    time.sleep(1)
    end = server.health()
    report = summarize(load.results, wall, warm)
    report["hangs"] += load.stuck
    report.update(command=" ".join(sys.argv), minutes=args.minutes, clients=args.clients, slots=args.slots,
                  startup_s=round(startup, 1), idle_after=idle, rss_ready_mb=round(rss_ready, 1),
                  rss_start_mb=round(rss_start, 1), rss_every_30s_mb=samples, rss_end_mb=round(server.rss_mb(), 1),
                  compilations_after_warmup=end["compilations"] - ready["compilations"],
                  compilations_while_serving=end["compilations_while_serving"])
    report["rss_growth_mb"] = round(report["rss_end_mb"] - report["rss_start_mb"], 1)
    return report


def percentiles(seconds: list[float]) -> dict:
    return {f"p{q}": round(float(np.percentile(seconds, q)), 3) for q in (50, 95, 99)} if seconds else {}


def summarize(results: list, wall: float, warm: int) -> dict:
    """Counts by outcome and by kind, wrong answers with examples, latencies of answered requests
    (the rate and the latencies from the measured load, after the first ``warm`` results)."""
    outcomes = collections.Counter(o for _, o, _, _ in results)
    by_kind = {k: dict(collections.Counter(o for kind, o, _, _ in results if kind == k)) for k in MIX
               if any(kind == k for kind, *_ in results)}
    measured = results[warm:]
    answered = [t for _, o, t, _ in measured if o in ("ok", "refused")]
    latency = {k: percentiles([t for kind, o, t, _ in measured if kind == k and o == "ok"]) for k in by_kind}
    examples = collections.defaultdict(list)
    for kind, o, _, detail in results:
        if o in FAILING and len(examples[o]) < 5:
            examples[o].append(f"{kind}: {detail}")
    return dict(requests=dict(total=len(results), **outcomes), requests_by_kind=by_kind,
                wrong_answers=outcomes["wrong"], server_errors=outcomes["server_error"], hangs=outcomes["hang"],
                unexpected=outcomes["unexpected"], requests_per_s=round(len(measured) / wall, 2),
                wall_s=round(wall, 1), latency_s=percentiles(answered), latency_by_kind_s=latency,
                examples=dict(examples))


def finish(report: dict, args, exit_status: int | None) -> int:
    """Prints the report, writes the JSON, and returns 1 when a check failed."""
    checks = {"no wrong answers": report["wrong_answers"] == 0, "no 5xx": report["server_errors"] == 0,
              "no hangs": report["hangs"] == 0, "no unexpected statuses": report["unexpected"] == 0,
              "no compilations after warm-up": report["compilations_after_warmup"] == 0,
              f"memory growth < {args.max_growth_mb:g} MB": report["rss_growth_mb"] < args.max_growth_mb,
              "idle at the end": report["idle_after"], "server exit status 0": exit_status == 0}
    report["failed_checks"] = [name for name, ok in checks.items() if not ok]
    r = report
    print(f"{r['clients']} clients, {r['wall_s']} s measured: {r['requests']['total']} requests in all "
          f"({r['requests_per_s']}/s measured)")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in r["requests"].items() if k != "total"))
    for kind, counts in r["requests_by_kind"].items():
        print(f"  {kind:<11} {counts}  latency {r['latency_by_kind_s'].get(kind, {})}")
    print(f"latency of answered requests: {r['latency_s']}")
    print(f"server RSS: ready {r['rss_ready_mb']} MB, after the warm-up load {r['rss_start_mb']} MB, every 30 s "
          f"{r['rss_every_30s_mb']}, end {r['rss_end_mb']} MB (growth {r['rss_growth_mb']} MB); compilations "
          f"after warm-up {r['compilations_after_warmup']}; exit status {exit_status}")
    for outcome, lines in r["examples"].items():
        print(f"{outcome}:\n  " + "\n  ".join(lines))
    print("checks: " + ("all passed" if not r["failed_checks"] else "FAILED " + ", ".join(r["failed_checks"])))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if r["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
