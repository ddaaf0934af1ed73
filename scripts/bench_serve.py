"""Serving speed under load: jaxformer's OpenAI-compatible server against Hugging Face servers.

    python scripts/bench_serve.py --json bench_serve.json
    python scripts/bench_serve.py --only hf-serve,hf-generate --streams 1 2 --requests 1 --max-tokens 8

Every server serves the same random-weight GPT-2 124M (transformers, seed 0, saved with the GPT-2
tokenizer in a temporary directory) on 127.0.0.1, one server at a time, alone on the machine:

* jaxformer: ``jaxformer serve --gpt2 DIR --slots S`` (S: the largest stream count; --server-cmd replaces
  the command, e.g. to try the script against a stand-in);
* hf-serve: ``transformers serve DIR --continuous-batching --device cpu --dtype float32`` with a
  KV cache sized for the load (by default it takes 90% of the free RAM);
* hf-generate: ``model.generate`` one request at a time behind a minimal streaming endpoint
  (scripts/hf_generate_server.py), the baseline without batching.

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
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


from jaxformer.benchmark import (HOST, LOAD_STATISTIC, ServerProcess, closed_loop, device_name, free_port, get_json,
                                 make_model, make_prompts, one_token_words, summarize_load, write_json)
from jaxformer.commands import cli
from jaxformer.errors import InputError

MODEL_NAME = "gpt2-random"
DEFAULT_CMD = ("{python} -m jaxformer serve --gpt2 {model} --host {host} --port {port} --slots {slots} "
               "--max-queue {max_queue}")
SERVER_CMD_FIELDS = ("python", "model", "host", "port", "slots", "max_queue")


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
    ap.add_argument("--only", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}")
    ap.add_argument("--slots", type=cli.at_least(1), help="jaxformer --slots (default: the largest stream count)")
    ap.add_argument("--server-cmd", default=DEFAULT_CMD,
                    help="the jaxformer server's command; fields {python} {model} {host} {port} {slots} "
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
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(only) - set(CONTENDERS) or not only:
        ap.error(f"--only {args.only!r}: choose among {', '.join(CONTENDERS)}")
    args.only = [s for s in CONTENDERS if s in only]
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


# --- the contenders --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Contender:
    """A server under test: its command line, and the request fields that name its model and make it
    ignore EOS. A baseline (Hugging Face) runs torch, so --threads applies, and jaxformer is compared
    with the better baseline."""
    command: Callable[[argparse.Namespace, Path, int], list[str]]  # (args, model_dir, port)
    request_fields: Callable[[argparse.Namespace, Path, str], dict]  # (args, model_dir, url)
    baseline: bool


def jaxformer_command(args, model_dir: Path, port: int) -> list[str]:
    streams = max(args.streams)
    fields = dict(python=sys.executable, model=model_dir, host=HOST, port=port, slots=args.slots or streams,
                  max_queue=streams)
    return shlex.split(args.server_cmd.format(**{k: shlex.quote(str(v)) for k, v in fields.items()}))


def jaxformer_fields(args, model_dir: Path, url: str) -> dict:
    served = get_json(f"{url}/v1/models")["data"]
    model = next((m["id"] for m in served if m.get("task", "completion") == "completion"), served[0]["id"])
    return {"model": model, **args.jaxformer_extra}


def hf_serve_command(args, model_dir: Path, port: int) -> list[str]:
    streams = max(args.streams)
    pages = math.ceil((args.prompt_len + args.max_tokens) / 256)  # transformers' default page size: 256 tokens
    blocks = args.cb_num_blocks or 2 * streams * pages + 4  # room beyond the scheduler's safety margin
    batch_tokens = args.cb_max_batch_tokens or max(1024, streams * args.prompt_len)
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--continuous-batching",
            "--device", "cpu", "--dtype", "float32", "--host", HOST, "--port", str(port),
            "--cb-num-blocks", str(blocks), "--cb-max-batch-tokens", str(batch_tokens)]


def hf_serve_fields(args, model_dir: Path, url: str) -> dict:
    # The model must be named as given to `transformers serve`.
    return {"model": str(model_dir), "generation_config": json.dumps({"eos_token_id": -1, "do_sample": False})}


def hf_generate_command(args, model_dir: Path, port: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve().with_name("hf_generate_server.py")), str(model_dir),
            "--host", HOST, "--port", str(port)] + (["--threads", str(args.threads)] if args.threads else [])


def hf_generate_fields(args, model_dir: Path, url: str) -> dict:
    return {"model": MODEL_NAME, "ignore_eos": True}


CONTENDERS = {
    "jaxformer": Contender(jaxformer_command, jaxformer_fields, baseline=False),
    "hf-serve": Contender(hf_serve_command, hf_serve_fields, baseline=True),
    "hf-generate": Contender(hf_generate_command, hf_generate_fields, baseline=True),
}
BASELINES = tuple(name for name, c in CONTENDERS.items() if c.baseline)


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
            cmd = CONTENDERS[name].command(args, model_dir, port)
            print(f"\n== {name}: {shlex.join(cmd)}")
            info = servers[name] = dict(cmd=shlex.join(cmd), loadavg_before=os.getloadavg())
            env = hf_env if CONTENDERS[name].baseline else base_env  # --threads is for torch only
            try:
                log_name = str(logs / f"{name}.log") if args.logs else "--logs DIR keeps it"
                with ServerProcess(cmd, port, logs / f"{name}.log", env, name, log_name) as server:
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
        baselines={n: runs[n] for n in BASELINES if n in runs}, problems=problems, load=LOAD_STATISTIC))
    return 1 if problems else 0


def measure(server: ServerProcess, args, model_dir: Path, words: list[str], info: dict, problems: list[str]) -> list[dict]:
    """The load at every stream count against one running server: a row per stream count."""
    name = server.name
    info["startup_s"] = server.wait_ready(args.startup_timeout)
    info["health"] = server.health()
    print(f"ready after {info['startup_s']:.1f} s")
    fields = info["request_fields"] = {
        "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        **CONTENDERS[name].request_fields(args, model_dir, server.url)}
    rows = []
    for streams in args.streams:
        if args.warmup_requests:
            warm = make_prompts(words, streams * args.warmup_requests, args.prompt_len, 10_000 + streams)
            results, wall = closed_loop(HOST, server.port, fields, warm, streams, args.request_timeout)
            failed = sum(r["error"] is not None for r in results)
            print(f"  streams {streams:>3}: warm-up {wall:.1f} s, {failed} failed")
        before = server.health().get("compilations")
        prompts = make_prompts(words, streams * args.requests, args.prompt_len, streams)
        results, wall = closed_loop(HOST, server.port, fields, prompts, streams, args.request_timeout)
        row = dict(streams=streams, **summarize_load(results, wall, args.max_tokens))
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
        hf = {n: runs[n][i] for n in BASELINES if len(runs.get(n, [])) > i}
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


if __name__ == "__main__":
    sys.exit(main())
