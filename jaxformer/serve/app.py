"""The HTTP face of the server (FastAPI): OpenAI's completions API for GPT-2, translations, a page.

Routes: ``POST /v1/completions`` (OpenAI's fields; ``stream`` sends server-sent events, one per
piece of text, then ``data: [DONE]``; ``echo`` with ``logprobs`` scores the prompt, and
``max_tokens`` 0 then generates nothing), ``GET /v1/models``, ``POST /v1/translations``,
``GET /health`` (``compilations``: in the process; ``compilations_while_serving``: by the decoding
and translation threads after their warm-up, which stays 0), ``GET /metrics`` (Prometheus),
``GET /`` (the page). Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``,
with 400 (a bad request), 401 (no valid API key), 404 (an unknown model or route), 408 and 413 (a
body too slow or too large), 429 (the queue or the key's streams are full, with ``Retry-After``),
503 (draining before exit, with ``Retry-After``). Extensions: ``top_k``, ``ignore_eos`` (generate
``max_tokens`` whatever EOS), ``translation`` models. A LoRA adapter served on a GPT-2 base is a
completion model of its own name (``parent``: the base's in ``/v1/models``), decoded by the base's
engine in the same steps as the base's requests. Every request passes
:class:`~jaxformer.serve.gate.Gate` first.
"""

import collections
import dataclasses
import sys
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from jaxformer.serve.compilations import compilations
from jaxformer.serve.completions import full_response, stream_response, submit_completion
from jaxformer.serve.engine import ENGINE_THREAD
from jaxformer.serve.gate import Gate, GateState, Keys
from jaxformer.serve.limits import Limits
from jaxformer.serve.metrics import AccessLog, ServerMetrics
from jaxformer.serve.protocol import APIError, busy, parse_completion, parse_json, parse_translation, shutting_down
from jaxformer.serve.sequence import QueueFull, ShuttingDown
from jaxformer.serve.translations import TRANSLATOR_THREAD

PAGE = Path(__file__).with_name("page.html")
SERVING_THREADS = (ENGINE_THREAD, TRANSLATOR_THREAD)
routes = APIRouter()


@dataclasses.dataclass
class Served:
    """A model the server holds: its name (the directory's base name, or an adapter's given name)
    and task; an adapter is its engine's ``adapter`` row on the ``parent`` base."""

    name: str
    task: str  # "completion" | "translation"
    model: object  # Engine or TranslationWorker
    tokenizer: object = None  # GPT2Tokenizer, for completions
    adapter: int = 0  # the engine's LoRA adapter (0: the base alone)
    parent: str | None = None  # an adapter's base model
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


class Streams:
    """The streamed completions open per key id, at most ``limit`` each (429 beyond)."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, collections.Counter()

    def acquire(self, key: str | None) -> None:
        if self.open[key] >= self.limit:
            raise APIError(429, f"this key has {self.open[key]} streams open, the most it may "
                                "(--max-streams-per-key); retry when one ends", code="rate_limit_exceeded",
                           kind="requests", headers={"Retry-After": "1"})
        self.open[key] += 1

    def release(self, key: str | None) -> None:
        self.open[key] -= 1
        if not self.open[key]:
            del self.open[key]


def create_app(models: list[Served], keys: tuple[str, ...] = (), limits: Limits = Limits(),
               access_log=sys.stderr) -> FastAPI:
    """The FastAPI app serving ``models``; ``keys``: the accepted API keys (none: ``/v1`` is open);
    ``access_log``: a text stream for the JSON-lines access log (None: none)."""
    app = FastAPI(title="jaxformer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    app.state.limits = limits
    app.state.streams = Streams(limits.max_streams_per_key)
    metrics = ServerMetrics(engines(models), SERVING_THREADS)
    app.state.metrics = metrics
    app.state.gate = GateState(Keys(keys), limits, metrics, AccessLog(access_log))
    app.add_middleware(Gate, state=app.state.gate)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.include_router(routes)
    return app


async def api_error(request: Request, e: APIError):
    return e.response()


async def http_error(request: Request, e: HTTPException):
    code = "not_found" if e.status_code == 404 else None
    return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code).response()


async def server_error(request: Request, e: Exception):  # a bug: still an OpenAI error body
    return APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()


def engines(models: list[Served]) -> list:
    """The completion engines, once each (adapters share their base's)."""
    return list({id(m.model): m.model for m in models if m.task == "completion"}.values())


def find(models: list[Served], body: dict, task: str) -> Served:
    """The model ``body`` names (the first of ``task`` when it names none)."""
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise APIError(400, f"model={name!r}: give the model's name", param="model", code="invalid_value")
    served = [m for m in models if m.task == task and name in (None, m.name)]
    if served:
        return served[0]
    if name is None:
        raise APIError(404, f"no {task} model is served", param="model", code="model_not_found")
    names = [m.name for m in models if m.task == task]
    raise APIError(404, f"the model {name!r} does not exist; {task} models: {names}", param="model",
                   code="model_not_found")


async def read(request: Request, task: str) -> tuple[dict, Served]:
    """The request's JSON body and the model it names."""
    body = parse_json(await request.body())
    return body, find(request.app.state.models, body, task)


@routes.get("/", response_class=HTMLResponse)
async def page():
    return PAGE.read_text(encoding="utf-8")


@routes.get("/health")
async def health(request: Request):
    models = request.app.state.models
    running, counts = engines(models), compilations()
    return dict(status="ok", models=[m.name for m in models], compilations=counts.total,
                compilations_while_serving=sum(counts.by_thread[t] for t in SERVING_THREADS),
                slots=sum(e.slots for e in running), active=sum(e.active for e in running),
                queued=sum(e.queued for e in running))


@routes.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@routes.get("/v1/models")
async def list_models(request: Request):
    def entry(m: Served) -> dict:
        extra = dict(max_beam=m.model.max_beam) if m.task == "translation" else {}
        if m.parent is not None:
            extra.update(parent=m.parent, root=m.parent)
        return dict(id=m.name, object="model", created=m.created, owned_by="jaxformer", task=m.task, **extra)
    return dict(object="list", data=[entry(m) for m in request.app.state.models])


@routes.post("/v1/translations")
async def translations(request: Request):
    body, served = await read(request, "translation")
    sentences, beam = parse_translation(body, served.model.max_beam, request.app.state.limits)
    why = served.model.too_long(sentences)
    if why:
        raise APIError(400, why, param="input", code="context_length_exceeded")
    try:
        out = await served.model.translate(sentences, beam)
    except QueueFull as e:
        raise busy(e) from None
    except ShuttingDown:
        raise shutting_down() from None
    request.app.state.metrics.sentences.inc(len(sentences))
    return dict(object="translation", model=served.name, translations=out)


@routes.post("/v1/completions")
async def completions(request: Request):
    body, served = await read(request, "completion")
    app = request.app.state
    parsed = parse_completion(body, served.model.config, served.tokenizer, app.limits)
    key = request.state.key_id
    if parsed.stream:
        app.streams.acquire(key)

    def on_close(run) -> None:
        app.metrics.completion(run, time.monotonic())
        request.state.usage = run.usage()
        if parsed.stream:
            app.streams.release(key)

    try:
        run = submit_completion(parsed, served.name, served.model, served.tokenizer, on_close, served.adapter)
    except Exception:
        if parsed.stream:
            app.streams.release(key)
        raise
    if parsed.stream:
        return stream_response(run)
    try:
        return await full_response(run, request.is_disconnected)
    finally:
        run.close()
