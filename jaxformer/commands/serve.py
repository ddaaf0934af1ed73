"""Serve GPT-2 and/or the translator over HTTP: OpenAI's completions API, translations, a web page.

    jaxformer serve --gpt2 runs/shakespeare --translator runs/tr --port 8000
    jaxformer serve --gpt2 gpt2 --lora french=runs/fr-lora --lora sql=adapters/sql
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "shakespeare", "prompt": "To be", "max_tokens": 20, "temperature": 0}'

MODEL as generate.py (--gpt2: a jaxformer checkpoint or run, a Hugging Face directory or hub id)
and translate.py (--translator: a training run) take it; its name in requests and /v1/models is
the directory's base name. --lora NAME=ADAPTER (a PEFT directory or a jaxformer LoRA run for the
--gpt2 base; repeatable) serves the base with that adapter as the model NAME, unmerged: requests
for every adapter and for the base are batched together in the same decoding steps. GPT-2
requests are continuously batched over --slots decoding slots; up to --max-queue more sequences
wait, beyond that requests get 429 with Retry-After. All shapes
(GPT-2's, and the translator's for beam sizes 1 to --max-beam) are compiled before the server
starts listening, into a persistent compilation cache (--compile-cache) that makes the next start
fast; /health counts compilations and /metrics gives Prometheus metrics.

With --api-key (or JAXFORMER_API_KEY, keys separated by commas) /v1/* needs the header
"Authorization: Bearer KEY"; without a key the server listens only on a loopback address unless
--insecure. SIGTERM drains: new requests get 503, running ones have --drain-seconds to finish, the
rest end with an error event, and the server exits with status 0.
"""

import dataclasses
import ipaddress
import os
import sys

from jaxformer.commands import cli
from jaxformer.serve.limits import Limits

KEY_ENV = "JAXFORMER_API_KEY"


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer serve")
    ap.add_argument("--gpt2", help="GPT-2 model to serve for /v1/completions")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=ADAPTER",
                    help="serve a LoRA adapter on the --gpt2 base as model NAME (repeatable)")
    ap.add_argument("--translator", help="translator run directory to serve for /v1/translations")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=cli.at_least(1), default=8000)
    ap.add_argument("--slots", type=cli.at_least(1), default=8, help="GPT-2 sequences decoded together")
    ap.add_argument("--max-queue", type=cli.at_least(0), default=64, help="sequences that may wait for a slot")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="GPT-2 weights as read while decoding")
    ap.add_argument("--quantize", choices=["int8"], help="GPT-2 weights as int8 with a scale per output")
    ap.add_argument("--max-beam", type=cli.at_least(1), default=4, help="largest translation beam size (default 4)")
    ap.add_argument("--translator-batch", type=cli.at_least(1), default=8,
                    help="sentences translated together at most (default 8)")
    ap.add_argument("--no-warmup", action="store_true", help="compile shapes on first use instead of at start")
    ap.add_argument("--api-key", action="append", metavar="KEY",
                    help=f"an accepted API key (repeatable; default: ${KEY_ENV}, comma-separated)")
    ap.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    ap.add_argument("--drain-seconds", type=cli.number_in(0, 3600), default=30.0,
                    help="on SIGTERM, seconds running requests have to finish (default 30)")
    ap.add_argument("--compile-cache", metavar="DIR",
                    help="persistent compilation cache (default: JAX's configured one, else "
                         "~/.cache/jaxformer/jit; none: off)")
    ap.add_argument("--access-log", default="-", metavar="PATH",
                    help="JSON-lines access log: a file, - for stderr (default), none")
    cli.add_config_flags(ap, Limits, title="limits per request, key and connection")
    args = ap.parse_args(argv)
    if args.lora and not args.gpt2:
        ap.error("--lora serves an adapter on a base: give --gpt2 BASE")
    if not args.gpt2 and not args.translator:
        ap.error("give --gpt2 MODEL, --translator MODEL, or both")
    if args.dtype and args.quantize:
        ap.error("give --dtype or --quantize, not both")
    if args.api_key is None:  # the one environment variable a command reads: keys stay out of `ps`
        args.api_key = [k.strip() for k in os.environ.get(KEY_ENV, "").split(",") if k.strip()]
    return cli.run(lambda: serve(args), args.debug)


def model_name(path: str) -> str:
    from pathlib import Path
    return Path(path.rstrip("/")).name or path


def lora_names(specs: list[str], base: str) -> dict[str, str]:
    """``{name: adapter directory}`` of the --lora flags (``NAME=DIR``, or ``DIR``: its base name)."""
    from jaxformer.errors import InputError

    out = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or model_name(path)
        if not name or not path:
            raise InputError(f"--lora {spec!r}: give NAME=ADAPTER_DIRECTORY")
        if name == base or name in out:
            raise InputError(f"--lora {spec!r}: the model name {name!r} is taken; give another NAME=")
        out[name] = path
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(args) -> None:
    """InputError for an open server on the network, or a port that is taken."""
    import socket

    from jaxformer.errors import InputError

    if not args.api_key and not is_loopback(args.host) and not args.insecure:
        raise InputError(f"refusing to listen on {args.host} without an API key: give --api-key KEY (or "
                         f"${KEY_ENV}), or --insecure to serve anyone who can reach it")
    if any(not k or k != k.strip() for k in args.api_key):
        raise InputError("--api-key: a key must be non-empty, without surrounding spaces")
    with socket.socket() as s:  # a clear message rather than uvicorn's when the port is taken
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
        except OSError as e:
            raise InputError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None


def use_compile_cache(choice: str | None) -> str | None:
    """Turns JAX's persistent compilation cache on (every program, however quick) or off."""
    from pathlib import Path

    import jax

    if choice == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = choice or jax.config.jax_compilation_cache_dir or str(Path.home() / ".cache" / "jaxformer" / "jit")
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path


def load_models(args) -> list:
    import time

    from jaxformer.serve.app import Served

    models = []
    if args.gpt2:
        from jaxformer.gpt2.peft import load_adapter
        from jaxformer.gpt2.pretrained import load_pretrained
        from jaxformer.gpt2.tokenizer import GPT2Tokenizer
        from jaxformer.serve.engine import Engine

        t0 = time.perf_counter()
        weights = args.quantize or {"float32": "float", "bfloat16": "bfloat16"}.get(args.dtype)
        base = model_name(args.gpt2)
        config, params, tok = load_pretrained(args.gpt2, weights=weights, scan_layers=False)
        adapters = {name: load_adapter(path, config) for name, path in lora_names(args.lora, base).items()}
        engine = Engine(params, config, slots=args.slots, max_queue=args.max_queue, warmup=not args.no_warmup,
                        adapters=adapters)
        tok = tok or GPT2Tokenizer.gpt2()
        models.append(Served(base, "completion", engine, tok))
        models += [Served(name, "completion", engine, tok, adapter=i, parent=base)
                   for i, name in enumerate(engine.adapters, 1)]
        lora = f", LoRA adapters {', '.join(engine.adapters)}" if adapters else ""
        print(f"GPT-2 {base}: {config.n_layer} layers, {args.slots} slots{lora}, compiled in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.translator:
        from jaxformer.serve.translations import TranslationWorker
        from jaxformer.translator.translate import TranslationPipeline

        t0 = time.perf_counter()
        pipeline = TranslationPipeline.load(args.translator, batch_size=args.translator_batch)
        shapes = 0 if args.no_warmup else pipeline.warm_up(range(1, args.max_beam + 1))
        models.append(Served(model_name(args.translator), "translation",
                             TranslationWorker(pipeline, args.max_queue, args.max_beam)))
        print(f"translator {models[-1].name}: beam sizes 1-{args.max_beam}, {shapes} shapes compiled in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return models


def serve(args) -> int:
    import uvicorn  # noqa: F401  (first, so that a missing serve extra is named before anything loads)

    from jaxformer.errors import InputError
    from jaxformer.serve import lifecycle
    from jaxformer.serve.app import create_app

    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits) if hasattr(args, f.name)})
    check_listen(args)
    cache = use_compile_cache(args.compile_cache)
    log = (sys.stderr if args.access_log == "-" else None if args.access_log == "none"
           else open(args.access_log, "a", buffering=1))
    models = load_models(args)
    names = ", ".join(m.name for m in models)
    keys = f"{len(args.api_key)} API key(s)" if args.api_key else "no API key"
    print(f"serving {names} on http://{args.host}:{args.port}/ ({keys}; compilation cache {cache}; SIGTERM or "
          "Ctrl-C drains and stops)", file=sys.stderr, flush=True)
    started = lifecycle.serve(create_app(models, tuple(args.api_key), limits, log), args.host, args.port, limits,
                              args.drain_seconds)
    for m in models:
        if m.task == "completion" and not m.adapter:  # adapters share their base's engine
            m.model.close()
    if not started:
        raise InputError(f"the server did not start on {args.host}:{args.port}; see the messages above")
    print("stopped", file=sys.stderr, flush=True)
    return 0
