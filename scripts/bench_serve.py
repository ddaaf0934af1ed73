"""Serving speed under load: jaxformer's OpenAI-compatible server against Hugging Face servers.

    python scripts/bench_serve.py --json bench_serve.json
    python scripts/bench_serve.py --only hf-serve,hf-generate --streams 1 2 --requests 1 --max-tokens 8

Every server serves the same random-weight GPT-2 124M (transformers, seed 0, saved with the GPT-2
tokenizer in a temporary directory) on 127.0.0.1, one server at a time, alone on the machine:

* jaxformer: ``jaxformer/commands/serve.py --gpt2 DIR --slots S`` (S: the largest stream count; --server-cmd
  replaces the command, e.g. to try the script against a stand-in);
* hf-serve: ``transformers serve DIR --continuous-batching --device cpu --dtype float32`` with a
  KV cache sized for the load (by default it takes 90% of the free RAM);
* hf-generate: ``model.generate`` one request at a time behind a minimal streaming endpoint (this
  script, run as a subprocess), the baseline without batching.

For each stream count N, N clients in a closed loop each send --requests streaming requests in turn
(all prompts distinct: --prompt-len random words that are one GPT-2 token each, the same prompts for
every server), greedy, with EOS ignored so that every request yields exactly --max-tokens tokens
(jaxformer and hf-generate: ``"ignore_eos": true``; hf-serve: a ``generation_config`` with
``eos_token_id=-1``). Tokens received are counted from the final ``usage`` (else the text chunks).
A pass with --warmup-requests requests per client, untimed, comes first at every stream count.

Measured per stream count: output tokens/s (all tokens received / the pass's wall time), time to
first token, time per output token after the first (per request: (last - first) / (tokens - 1)),
failed requests. hf_tok_s is the better of the two HF baselines. Exit status 1 when a server did not
start or a request failed (the results are written all the same).
"""

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from jaxformer.commands import cli
from jaxformer.benchmark import device_name, write_json
from jaxformer.errors import InputError

SERVERS = ("jaxformer", "hf-serve", "hf-generate")
HOST = "127.0.0.1"
MODEL_NAME = "gpt2-random"
DEFAULT_CMD = ("{python} {serve} --gpt2 {model} --host {host} --port {port} --slots {slots} "
               "--max-queue {max_queue}")
SERVER_CMD_FIELDS = ("python", "serve", "model", "host", "port", "slots", "max_queue")
STATISTIC = ("closed loop: N concurrent streaming clients, each request after the previous one ended; tokens/s = "
             "tokens received / wall time of the timed pass; TTFT and TPOT per request, p50/p95 over requests")


def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--streams", type=cli.at_least(1), nargs="+", default=[1, 4, 16],
                    help="concurrent clients (default: 1 4 16)")
    ap.add_argument("--requests", type=cli.at_least(1), default=2,
                    help="requests per client, one after the other (default: 2)")
    ap.add_argument("--prompt-len", type=cli.at_least(1), default=32, help="prompt tokens (default: 32)")
    ap.add_argument("--max-tokens", type=cli.at_least(1), default=64, help="new tokens per request (default: 64)")
    ap.add_argument("--warmup-requests", type=cli.at_least(0), default=1,
                    help="requests per client in the untimed pass before each stream count (default: 1)")
    ap.add_argument("--only", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    ap.add_argument("--slots", type=cli.at_least(1), help="jaxformer --slots (default: the largest stream count)")
    ap.add_argument("--server-cmd", default=DEFAULT_CMD,
                    help="the jaxformer server's command; fields {python} {serve} {model} {host} {port} {slots} "
                         "{max_queue} (default: %(default)s)")
    ap.add_argument("--jaxformer-extra", default='{"ignore_eos": true}',
                    help="JSON object merged into jaxformer's requests (default: %(default)s)")
    ap.add_argument("--cb-num-blocks", type=cli.at_least(1), help="hf-serve KV cache blocks (default: for the load)")
    ap.add_argument("--cb-max-batch-tokens", type=cli.at_least(1), help="hf-serve tokens per batch (default: sized)")
    ap.add_argument("--threads", type=cli.at_least(1), help="torch threads of the HF servers (default: torch's)")
    ap.add_argument("--startup-timeout", type=cli.at_least(1), default=600, help="seconds for a server to get ready")
    ap.add_argument("--request-timeout", type=cli.at_least(1), default=600, help="seconds for one request")
    ap.add_argument("--logs", help="keep the servers' logs in this directory (default: a temporary one)")
    ap.add_argument("--json", help="write results here")
    # Internal: this script as the hf-generate server.
    ap.add_argument("--generate-server", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.generate_server:
        return cli.run(lambda: generate_server(args.generate_server, args.port, args.threads), args.debug)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SERVERS))
    if unknown or not only:
        ap.error(f"--only {args.only!r}: choose among {', '.join(SERVERS)}")
    args.only = [s for s in SERVERS if s in only]
    if "jaxformer" in args.only:
        try:
            args.server_cmd.format(**dict.fromkeys(SERVER_CMD_FIELDS, ""))
        except (KeyError, IndexError, ValueError) as e:
            ap.error(f"--server-cmd {args.server_cmd!r}: {e!r}; the fields are {', '.join(SERVER_CMD_FIELDS)}")
    try:
        extra = json.loads(args.jaxformer_extra)
    except ValueError:
        extra = None
    if not isinstance(extra, dict):
        ap.error(f"--jaxformer-extra {args.jaxformer_extra!r}: not a JSON object")
    args.jaxformer_extra = extra
    return cli.run(lambda: bench(args), args.debug)


# --- the model and the prompts ---------------------------------------------------------------------

def make_model(path: Path) -> None:
    """Random-weight GPT-2 124M (seed 0) with the GPT-2 tokenizer files, in Hugging Face layout."""
    import torch
    import transformers

    from jaxformer.gpt2.tokenizer import GPT2_DIR

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    model.save_pretrained(path)
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


# --- servers ---------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never a proxy


def get_json(url: str, timeout: float = 10):
    with _OPENER.open(url, timeout=timeout) as r:
        return json.load(r)


class Server:
    """A server process, alone in its process group, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict, keep_log: bool):
        self.name, self.cmd, self.port, self.log_path, self.env = name, cmd, port, log, env
        self.log_name = str(log) if keep_log else "--logs DIR keeps it"
        self.url = f"http://{HOST}:{port}"
        self.proc = None

    def __enter__(self):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=True, cwd=Path(__file__).resolve().parents[1])
        return self

    def wait_ready(self, timeout: float) -> float:
        """Seconds until GET /health answers ok; an error naming the log if the server dies or is late."""
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
        try:
            return get_json(f"{self.url}/health")
        except (OSError, ValueError):
            return {}

    def tail(self, lines: int = 20) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)  # the server and whatever it started
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()


def server_command(name: str, args, model_dir: Path, port: int) -> list[str]:
    streams = max(args.streams)
    if name == "jaxformer":
        fields = dict(python=sys.executable, serve=Path(__file__).resolve().with_name("serve.py"), model=model_dir,
                      host=HOST, port=port, slots=args.slots or streams, max_queue=streams)
        return shlex.split(args.server_cmd.format(**{k: shlex.quote(str(v)) for k, v in fields.items()}))
    if name == "hf-serve":
        pages = math.ceil((args.prompt_len + args.max_tokens) / 256)  # transformers' default page size: 256 tokens
        blocks = args.cb_num_blocks or 2 * streams * pages + 4  # room beyond the scheduler's safety margin
        batch_tokens = args.cb_max_batch_tokens or max(1024, streams * args.prompt_len)
        return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--continuous-batching",
                "--device", "cpu", "--dtype", "float32", "--host", HOST, "--port", str(port),
                "--cb-num-blocks", str(blocks), "--cb-max-batch-tokens", str(batch_tokens)]
    return [sys.executable, str(Path(__file__).resolve()), "--generate-server", str(model_dir), "--port", str(port)] + (
        ["--threads", str(args.threads)] if args.threads else [])


def request_fields(name: str, args, model_dir: Path, url: str) -> dict:
    """The model name and the fields that make each server ignore EOS."""
    base = {"max_tokens": args.max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if name == "jaxformer":
        served = get_json(f"{url}/v1/models")["data"]
        model = next((m["id"] for m in served if m.get("task", "completion") == "completion"), served[0]["id"])
        return {**base, "model": model, **args.jaxformer_extra}
    if name == "hf-serve":  # the model must be named as given to `transformers serve`
        gen = {"eos_token_id": -1, "do_sample": False}
        return {**base, "model": str(model_dir), "generation_config": json.dumps(gen)}
    return {**base, "model": MODEL_NAME, "ignore_eos": True}


# --- the load --------------------------------------------------------------------------------------

def stream_request(port: int, body: dict, timeout: float) -> dict:
    """One streaming completion: arrival times of the text chunks, tokens (usage, else chunks), error."""
    import http.client

    start = time.perf_counter()
    times, usage, error = [], None, None
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body).encode(),
                     {"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            error = f"HTTP {resp.status}: {resp.read(300).decode(errors='replace')}"
        else:
            while True:
                line = resp.readline()
                if not line:
                    break
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


def run_load(port: int, fields: dict, prompts: list[str], streams: int, timeout: float) -> tuple[list[dict], float]:
    """``streams`` clients in a closed loop over ``prompts`` (client i sends prompts i, i + streams, ...)."""
    results, lock = [], threading.Lock()

    def client(i):
        for prompt in prompts[i::streams]:
            r = stream_request(port, {**fields, "prompt": prompt}, timeout)
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


def summarize(results: list[dict], wall: float, expected: int) -> dict:
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


# --- the benchmark ---------------------------------------------------------------------------------

def bench(args) -> int:
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_name()
    load_start = os.getloadavg()
    print(f"device: {device}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average {load_start[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    logs = Path(args.logs) if args.logs else work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    hf_env = {**base_env, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    runs, servers, problems = {}, {}, []
    try:
        model_dir = work / MODEL_NAME
        make_model(model_dir)
        words = one_token_words()
        for name in args.only:
            port = free_port()
            cmd = server_command(name, args, model_dir, port)
            print(f"\n== {name}: {shlex.join(cmd)}")
            info = servers[name] = dict(cmd=shlex.join(cmd), loadavg_before=os.getloadavg())
            env = base_env if name == "jaxformer" else hf_env  # --threads is for torch only
            try:
                with Server(name, cmd, port, logs / f"{name}.log", env, bool(args.logs)) as server:
                    runs[name] = measure(server, args, model_dir, words, info, problems)
            except InputError as e:
                print(f"error: {e}", file=sys.stderr)
                info["error"] = str(e)
                problems.append(f"{name}: {str(e).splitlines()[0]}")
            info["loadavg_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the model, and the logs unless --logs

    cases = compare(runs, args)
    report(cases, runs, problems)
    write_json(args.json, dict(
        device=device, torch=torch.__version__, transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(), omp_num_threads=hf_env.get("OMP_NUM_THREADS"),
        loadavg_start=load_start, loadavg_end=os.getloadavg(), cpu_count=os.cpu_count(),
        model="GPT-2 124M, random weights (transformers, seed 0), float32",
        settings=dict(streams=args.streams, requests=args.requests, prompt_len=args.prompt_len,
                      max_tokens=args.max_tokens, warmup_requests=args.warmup_requests, only=args.only,
                      server_cmd=args.server_cmd, jaxformer_extra=args.jaxformer_extra),
        servers=servers, cases=cases, jaxformer=runs.get("jaxformer"),
        baselines={n: runs[n] for n in ("hf-serve", "hf-generate") if n in runs}, problems=problems,
        load=STATISTIC))
    return 1 if problems else 0


def measure(server: Server, args, model_dir: Path, words: list[str], info: dict, problems: list[str]) -> list[dict]:
    """The load at every stream count against one running server: a row per stream count."""
    name = server.name
    info["startup_s"] = server.wait_ready(args.startup_timeout)
    info["health"] = server.health()
    print(f"ready after {info['startup_s']:.1f} s")
    fields = info["request_fields"] = request_fields(name, args, model_dir, server.url)
    rows = []
    for streams in args.streams:
        if args.warmup_requests:
            warm = make_prompts(words, streams * args.warmup_requests, args.prompt_len, 10_000 + streams)
            results, wall = run_load(server.port, fields, warm, streams, args.request_timeout)
            failed = sum(r["error"] is not None for r in results)
            print(f"  streams {streams:>3}: warm-up {wall:.1f} s, {failed} failed")
        before = server.health().get("compilations")
        prompts = make_prompts(words, streams * args.requests, args.prompt_len, streams)
        results, wall = run_load(server.port, fields, prompts, streams, args.request_timeout)
        row = dict(streams=streams, **summarize(results, wall, args.max_tokens))
        after = server.health().get("compilations")
        if isinstance(before, int) and isinstance(after, int):
            row["compilations_during"] = after - before
        rows.append(row)
        print(f"  streams {streams:>3}: {row['tok_s']:7.1f} tok/s, TTFT p50 {_fmt(row['ttft_p50_s'])} s, "
              f"TPOT p50 {_fmt(row['tpot_p50_s'], 1000)} ms, {row['tokens_received']}/{row['tokens_expected']} "
              f"tokens, {row['failed']} failed" + (f" ({'; '.join(row['errors'])})" if row["errors"] else ""))
        if row["failed"]:
            problems.append(f"{name} at {streams} streams: {row['failed']} failed requests")
        if row["short"]:
            print(f"warning: {name} at {streams} streams: {row['short']} requests did not yield {args.max_tokens} "
                  "tokens", file=sys.stderr)
    if server.proc.poll() is not None:
        problems.append(f"{name} exited during the run")
    return rows


def compare(runs: dict[str, list[dict]], args) -> list[dict]:
    """One case per stream count: jaxformer's figures against the better HF baseline."""
    cases = []
    for i, streams in enumerate(args.streams):
        jf = runs["jaxformer"][i] if len(runs.get("jaxformer", [])) > i else {}
        hf = {n: runs[n][i] for n in ("hf-serve", "hf-generate") if len(runs.get(n, [])) > i}
        best = max(hf, key=lambda n: hf[n]["tok_s"]) if hf else None
        hf_tok_s = hf[best]["tok_s"] if best else None
        case = dict(streams=streams, jaxformer_tok_s=jf.get("tok_s"), hf_tok_s=hf_tok_s,
                    speedup=jf["tok_s"] / hf_tok_s if jf and hf_tok_s else None, failed=jf.get("failed"),
                    ttft_p50_s=jf.get("ttft_p50_s"), ttft_p95_s=jf.get("ttft_p95_s"), tpot_p50_s=jf.get("tpot_p50_s"),
                    baseline=best, tokens_expected=streams * args.requests * args.max_tokens,
                    jaxformer_tokens_received=jf.get("tokens_received"))
        if "compilations_during" in jf:
            case["compilations_during"] = jf["compilations_during"]
        cases.append(case)
    return cases


def report(cases: list[dict], runs: dict[str, list[dict]], problems: list[str]) -> None:
    print(f"\n{'streams':>7} {'jaxformer tok/s':>16} {'HF tok/s':>9} {'(baseline)':>13} {'speedup':>8} "
          f"{'TTFT p50/p95 s':>15} {'TPOT p50 ms':>12} {'failed':>6}")
    for c in cases:
        ttft = f"{_fmt(c['ttft_p50_s'], digits=2)}/{_fmt(c['ttft_p95_s'], digits=2)}"
        speedup = _fmt(c["speedup"], width=7, digits=2) + ("x" if c["speedup"] else " ")
        print(f"{c['streams']:>7} {_fmt(c['jaxformer_tok_s'], width=16, digits=1)} "
              f"{_fmt(c['hf_tok_s'], width=9, digits=1)} {'(' + (c['baseline'] or '-') + ')':>13} {speedup} "
              f"{ttft:>15} {_fmt(c['tpot_p50_s'], 1000, width=12)} {_fmt(c['failed'], width=6, digits=0)}")
    for name, rows in runs.items():
        print(f"{name:>12}: " + ", ".join(f"{r['streams']} streams {r['tok_s']:.1f} tok/s "
                                           f"({r['tokens_received']}/{r['tokens_expected']} tokens)" for r in rows))
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)


def _fmt(x, scale=1, width=0, digits=None):
    if x is None:
        return f"{'-':>{width}}"
    digits = (1 if scale != 1 else 3) if digits is None else digits
    return f"{x * scale:>{width}.{digits}f}"


# --- hf-generate: model.generate one request at a time ----------------------------------------------

def generate_server(model_dir: str, port: int, threads: int | None) -> int:
    """A minimal OpenAI-style /v1/completions over ``model.generate``: streaming (one SSE event per
    token), greedy or sampled, ``ignore_eos``; one generation at a time, requests wait their turn."""
    import asyncio
    import concurrent.futures
    import uuid

    import torch
    import transformers
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers.generation.streamers import BaseStreamer

    if threads:
        torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, clean_up_tokenization_spaces=False)
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one request at a time
    app = FastAPI()
    name = Path(model_dir).name

    class Streamer(BaseStreamer):
        def __init__(self, loop, queue):
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value):
            if not self.prompt_seen:  # generate() first passes the prompt
                self.prompt_seen = True
                return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

        def end(self):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    class Cancelled(transformers.StoppingCriteria):
        def __init__(self, event):
            self.event = event

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)

    def error(status, message):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [name]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "transformers",
                                            "task": "completion"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
            ids = tok(body["prompt"], return_tensors="pt")["input_ids"]
            max_tokens = int(body.get("max_tokens", 16))
            temperature = float(body.get("temperature", 1.0))
        except (ValueError, KeyError, TypeError) as e:
            return error(400, f"bad request: {e!r}")
        loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        stop = transformers.StoppingCriteriaList([Cancelled(cancel)])
        kw = dict(max_new_tokens=max_tokens, pad_token_id=tok.eos_token_id, use_cache=True,
                  streamer=Streamer(loop, queue), stopping_criteria=stop)
        if body.get("ignore_eos"):
            kw["min_new_tokens"] = max_tokens
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p", 1.0)),
                      top_k=int(body.get("top_k", 0)))
        else:
            kw.update(do_sample=False)

        def work():
            if cancel.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, None)
                return
            try:
                with torch.inference_mode():
                    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            except Exception as e:  # reported to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, e)

        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        worker.submit(work)

        def chunk(text, finish=None, usage=None):
            c = {"id": rid, "object": "text_completion", "created": created, "model": name,
                 "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(c if usage is None else {**c, 'choices': [], 'usage': usage})}\n\n"

        async def events():
            n = 0
            try:
                while True:
                    item = await queue.get()
                    if item is None:
                        break
                    if isinstance(item, Exception):
                        yield f"data: {json.dumps({'error': {'message': repr(item), 'type': 'server_error'}})}\n\n"
                        return
                    for t in item:
                        n += 1
                        yield chunk(tok.decode([t]))
                yield chunk("", "length" if n >= max_tokens else "stop")
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk("", usage={"prompt_tokens": ids.shape[1], "completion_tokens": n,
                                           "total_tokens": ids.shape[1] + n})
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, n = "", 0
        async for event in events():
            if event.startswith("data: {"):
                c = json.loads(event[6:])
                if c.get("choices"):
                    text += c["choices"][0]["text"]
                    n += bool(c["choices"][0]["text"])
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": n, "total_tokens": ids.shape[1] + n}}

    uvicorn.run(app, host=HOST, port=port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
