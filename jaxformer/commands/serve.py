"""Serve GPT-2 and/or the translator over HTTP: OpenAI's completions API, translations, a web page.

    jaxformer serve --gpt2 runs/shakespeare --translator runs/tr --port 8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "shakespeare", "prompt": "To be", "max_tokens": 20, "temperature": 0}'

MODEL as generate.py (--gpt2: a jaxformer checkpoint or run, a Hugging Face directory or hub id)
and translate.py (--translator: a training run) take it; its name in requests and /v1/models is
the directory's base name. GPT-2 requests are continuously batched over --slots decoding slots;
up to --max-queue more sequences wait, beyond that requests get 429 with Retry-After. All shapes
are compiled before the server starts listening (/health counts compilations).
"""

import sys

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__, "jaxformer serve")
    ap.add_argument("--gpt2", help="GPT-2 model to serve for /v1/completions")
    ap.add_argument("--translator", help="translator run directory to serve for /v1/translations")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=cli.at_least(1), default=8000)
    ap.add_argument("--slots", type=cli.at_least(1), default=8, help="GPT-2 sequences decoded together")
    ap.add_argument("--max-queue", type=cli.at_least(0), default=64, help="sequences that may wait for a slot")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="GPT-2 weights as read while decoding")
    ap.add_argument("--quantize", choices=["int8"], help="GPT-2 weights as int8 with a scale per output")
    ap.add_argument("--no-warmup", action="store_true", help="compile shapes on first use instead of at start")
    args = ap.parse_args(argv)
    if not args.gpt2 and not args.translator:
        ap.error("give --gpt2 MODEL, --translator MODEL, or both")
    if args.dtype and args.quantize:
        ap.error("give --dtype or --quantize, not both")
    return cli.run(lambda: serve(args), args.debug)


def model_name(path: str) -> str:
    from pathlib import Path
    return Path(path.rstrip("/")).name or path


def serve(args) -> int:
    import socket
    import time

    import uvicorn

    from jaxformer.errors import InputError
    from jaxformer.serve.app import Served, create_app
    from jaxformer.serve.engine import Engine
    from jaxformer.serve.translations import TranslationWorker

    with socket.socket() as s:  # a clear message rather than uvicorn's when the port is taken
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
        except OSError as e:
            raise InputError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    models = []
    if args.gpt2:
        from jaxformer.gpt2.pretrained import load_pretrained
        from jaxformer.gpt2.tokenizer import GPT2Tokenizer

        t0 = time.perf_counter()
        weights = args.quantize or {"float32": "float", "bfloat16": "bfloat16"}.get(args.dtype)
        config, params, tok = load_pretrained(args.gpt2, weights=weights, scan_layers=False)
        engine = Engine(params, config, slots=args.slots, max_queue=args.max_queue, warmup=not args.no_warmup)
        models.append(Served(model_name(args.gpt2), "completion", engine, tok or GPT2Tokenizer.gpt2()))
        print(f"GPT-2 {models[-1].name}: {config.n_layer} layers, {args.slots} slots, compiled in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.translator:
        from jaxformer.translator.translate import TranslationPipeline

        models.append(Served(model_name(args.translator), "translation",
                             TranslationWorker(TranslationPipeline.load(args.translator), args.max_queue)))
    names = ", ".join(m.name for m in models)
    print(f"serving {names} on http://{args.host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(models), host=args.host, port=args.port,
                log_level="warning", lifespan="off")
    return 0
