"""The HTTP face of the server (FastAPI): OpenAI's completions API for GPT-2, translations, a page.

Routes: ``POST /v1/completions`` (OpenAI's fields; ``stream`` sends server-sent events, one per
token, then ``data: [DONE]``), ``GET /v1/models``, ``POST /v1/translations``, ``GET /health``
(``compilations``: in the process; ``compilations_while_serving``: by the decoding loop after its
warm-up, which stays 0), ``GET /`` (the page). Errors use OpenAI's body, ``{"error": {"message", "type", "param",
"code"}}``, with 400 (a bad request), 404 (an unknown model or route), 429 (the queue is full,
with ``Retry-After``). Extensions: ``top_k``, ``ignore_eos`` (generate ``max_tokens`` whatever
EOS), ``translation`` models.

Text is assembled per sequence on the engine's thread: the tokens decoded so far, less a tail that
could still become a stop sequence or is an unfinished UTF-8 character, are what the client has
been sent; a stop sequence ends the sequence (``finish_reason: "stop"``) and is not included.
"""

import asyncio
import json
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jaxformer.errors import InputError
from jaxformer.serve.engine import (
    ENGINE_THREAD,
    TOP_LOGPROBS,
    Engine,
    QueueFull,
    Sampling,
    Sequence,
    compilations,
    new_seed,
    notify,
)

PAGE = Path(__file__).with_name("page.html")
MAX_N, MAX_STOPS = 16, 4


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def busy(e: QueueFull) -> APIError:
    return APIError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded", kind="requests",
                    headers={"Retry-After": "1"})


def engine_failed() -> APIError:
    return APIError(500, "the decoding engine failed; see the server's log", kind="server_error")


@dataclass
class Served:
    """A model the server holds: its name (the directory's base name) and task."""

    name: str
    task: str  # "completion" | "translation"
    model: object  # Engine or Translations
    tokenizer: object = None  # GPT2Tokenizer, for completions
    created: int = field(default_factory=lambda: int(time.time()))


# --- request fields -----------------------------------------------------------------------------------

def _field(body: dict, name: str, kind, default, check=None, why: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok or (check is not None and not check(value)):
        raise APIError(400, f"{name}={value!r}: {why or 'invalid value'}", param=name, code="invalid_value")
    return value


def parse_completion(body: dict, engine: Engine, tokenizer) -> tuple[list[list[int]], dict]:
    """(the prompts as token ids, the settings) of a completions request; APIError on a bad field."""
    prompt = body.get("prompt")
    def token_ids(p) -> bool:
        return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and token_ids(prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or token_ids(p) for p in prompt):
        raise APIError(400, "prompt: give a string, a list of strings, token ids or lists of token ids",
                       param="prompt")
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompt]
    vocab, context = engine.config.vocab_size, engine.config.n_positions
    settings = dict(
        max_tokens=_field(body, "max_tokens", int, 16, lambda v: v >= 1, "must be >= 1"),
        temperature=_field(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "must lie in [0, 2]"),
        top_p=_field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "must lie in (0, 1]"),
        top_k=_field(body, "top_k", int, 0, lambda v: v >= 0, "must be >= 0 (0: off)"),
        n=_field(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"must lie in [1, {MAX_N}]"),
        seed=_field(body, "seed", int, None, lambda v: 0 <= v < 2**31, "must lie in [0, 2^31)"),
        logprobs=_field(body, "logprobs", int, None, lambda v: 0 <= v <= TOP_LOGPROBS, f"must lie in [0, {TOP_LOGPROBS}]"),
        ignore_eos=_field(body, "ignore_eos", bool, False),
        stream=_field(body, "stream", bool, False),
        echo=_field(body, "echo", bool, False, lambda v: not v, "echo is not supported"),
        best_of=_field(body, "best_of", int, None, lambda v: v == 1, "best_of is not supported"),
    )
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop: give a string or up to {MAX_STOPS} non-empty strings", param="stop")
    settings["stop"] = stop
    settings["include_usage"] = _field(body, "stream_options", dict, {}).get("include_usage", False) is True
    for i, p in enumerate(ids):
        if not p:
            raise APIError(400, f"prompt {i} is empty: give at least one token", param="prompt")
        if min(p) < 0 or max(p) >= vocab:
            raise APIError(400, f"prompt {i}: token ids must lie in [0, {vocab})", param="prompt")
        if len(p) + settings["max_tokens"] > context:
            raise APIError(400, f"prompt {i} has {len(p)} tokens; with max_tokens={settings['max_tokens']} that "
                                f"exceeds the model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
    return ids, settings


# --- one sequence's text ---------------------------------------------------------------------------------

class Choice:
    """A sequence's text as it grows; ``push`` is called on the engine's thread for every token and
    returns the new text to send (possibly empty)."""

    def __init__(self, index: int, tokenizer, stops: list[str], want_logprobs: int | None, end_id: int | None):
        """end_id: the token that ends the sequence (EOS, unless ignored): counted, never shown."""
        self.index, self.tokenizer, self.stops, self.want_logprobs = index, tokenizer, stops, want_logprobs
        self.end_id = end_id
        self.ids: list[int] = []  # the tokens shown (without the end token)
        self.count = 0  # every generated token, as usage counts them
        self.sent = ""  # text the client has
        self.stopped = False
        self.finish_reason: str | None = None
        self.logprobs = dict(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])

    def push(self, token) -> tuple[str, dict | None]:
        self.count += 1
        if token.id == self.end_id:
            return "", None
        self.ids.append(token.id)
        text = self.tokenizer.decode(self.ids)
        for stop in self.stops:
            at = text.find(stop, max(0, len(self.sent) - len(stop)))
            if at >= 0:
                text, self.stopped = text[:at], True
        safe = len(text)
        if not self.stopped:
            while safe > len(self.sent) and text[safe - 1] == "\ufffd":  # an unfinished UTF-8 character
                safe -= 1
            for stop in self.stops:  # a tail that may still grow into a stop sequence
                for k in range(min(len(stop) - 1, safe - len(self.sent)), 0, -1):
                    if text[safe - k:safe] == stop[:k]:
                        safe -= k
                        break
        delta = text[len(self.sent):safe]
        offset = len(self.sent)
        self.sent += delta
        if self.want_logprobs is None:
            return delta, None
        piece = self.tokenizer.decode([token.id])
        top = {self.tokenizer.decode([i]): lp for i, lp in zip(token.top_ids[:self.want_logprobs],
                                                                token.top_logprobs[:self.want_logprobs])}
        lp = dict(tokens=[piece], token_logprobs=[token.logprob], top_logprobs=[top], text_offset=[offset])
        for key in self.logprobs:
            self.logprobs[key] += lp[key]
        return delta, lp

    def flush(self) -> str:
        """At the end: what was held back (no stop sequence came)."""
        if self.stopped:
            return ""
        rest = self.tokenizer.decode(self.ids)[len(self.sent):]
        self.sent += rest
        return rest


# --- translations ----------------------------------------------------------------------------------------

class Translations:
    """A worker thread translating queued requests; waiting requests with the same beam size are
    translated together (one batch through the jitted search)."""

    def __init__(self, model, max_queue: int = 64):
        self.model, self.max_queue = model, max_queue
        self._jobs: list = []
        self._busy = False
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="jaxformer-translator", daemon=True).start()

    def submit(self, sentences: list[str], beam: int, done) -> None:
        """Queues a request; ``done(translations or exception)`` is called on the worker's thread."""
        with self._cv:
            if len(self._jobs) >= self.max_queue + (not self._busy):  # an idle worker takes one at once
                raise QueueFull(f"{len(self._jobs)} translation requests are waiting")
            self._jobs.append((sentences, beam, done))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                beam = self._jobs[0][1]
                batch = [j for j in self._jobs if j[1] == beam]
                self._jobs = [j for j in self._jobs if j[1] != beam]
                self._busy = True
            sentences = [s for j in batch for s in j[0]]
            try:
                out = self.model.translate(sentences, beam_size=beam)
            except Exception as e:  # a bug: every waiting request hears of it
                traceback.print_exc()
                out = e
            i = 0
            for job_sentences, _, done in batch:
                notify(done, out if isinstance(out, Exception) else out[i:i + len(job_sentences)])
                i += len(job_sentences)
            with self._cv:
                self._busy = False


# --- the app ---------------------------------------------------------------------------------------------

def create_app(models: list[Served]) -> FastAPI:
    """The FastAPI app serving ``models``."""
    app = FastAPI(title="jaxformer", docs_url=None, redoc_url=None, openapi_url=None)
    by_name = {m.name: m for m in models}

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):  # a bug: still an OpenAI error body
        return APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code).response()

    def find(body: dict, task: str) -> Served:
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise APIError(400, f"model={name!r}: give the model's name", param="model", code="invalid_value")
        if name is None:
            served = [m for m in models if m.task == task]
            if not served:
                raise APIError(404, f"no {task} model is served", param="model", code="model_not_found")
            return served[0]
        if name not in by_name or by_name[name].task != task:
            names = [m.name for m in models if m.task == task]
            raise APIError(404, f"the model {name!r} does not exist; {task} models: {names}", param="model",
                           code="model_not_found")
        return by_name[name]

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return body

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        engines = [m.model for m in models if m.task == "completion"]
        counts = compilations()
        return dict(status="ok", models=[m.name for m in models], compilations=counts.total,
                    compilations_while_serving=counts.by_thread[ENGINE_THREAD],
                    slots=sum(e.slots for e in engines), active=sum(e.active for e in engines),
                    queued=sum(e.queued for e in engines))

    @app.get("/v1/models")
    async def list_models():
        return dict(object="list", data=[dict(id=m.name, object="model", created=m.created, owned_by="jaxformer",
                                              task=m.task) for m in models])

    @app.post("/v1/translations")
    async def translations(request: Request):
        body = await read_json(request)
        served = find(body, "translation")
        text = body.get("input")
        sentences = [text] if isinstance(text, str) else text
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
            raise APIError(400, "input: give a sentence or a non-empty list of sentences", param="input")
        beam = _field(body, "beam_size", int, 4, lambda v: 1 <= v <= 16, "must lie in [1, 16]")
        loop, result = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()
        try:
            served.model.submit(sentences, beam, lambda out: loop.call_soon_threadsafe(result.set_result, out))
        except QueueFull as e:
            raise busy(e) from None
        out = await result
        if isinstance(out, Exception):
            raise out
        return dict(object="translation", model=served.name, translations=out)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        served = find(body, "completion")
        engine: Engine = served.model
        ids, s = parse_completion(body, engine, served.tokenizer)
        seed = s["seed"] if s["seed"] is not None else new_seed()
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        choices, seqs = [], []
        for p, prompt in enumerate(ids):
            for j in range(s["n"]):
                index = p * s["n"] + j
                choice = Choice(index, served.tokenizer, s["stop"], s["logprobs"],
                                None if s["ignore_eos"] else engine.eos_id)
                choices.append(choice)

                def emit(token, c=choice):
                    delta, lp = c.push(token)
                    if delta or lp:
                        loop.call_soon_threadsafe(events.put_nowait, (c, delta, lp, None))

                def finish(reason, c=choice):
                    c.finish_reason = "stop" if reason == "stop" else reason
                    loop.call_soon_threadsafe(events.put_nowait, (c, c.flush(), None, c.finish_reason))

                sampling = Sampling(max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                                    top_k=s["top_k"], seed=seed, ignore_eos=s["ignore_eos"])
                # row `index` of a request, as generate() numbers its rows
                seqs.append(Sequence(prompt, sampling, index, emit, finish, should_stop=lambda c=choice: c.stopped))
        try:
            engine.submit(seqs)
        except QueueFull as e:
            raise busy(e) from None
        except InputError as e:  # more sequences than the engine can ever hold
            raise APIError(400, str(e), param="n", code="invalid_value") from None
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        prompt_tokens = sum(len(p) for p in ids) * s["n"]

        def chunk(c, text, lp, reason) -> dict:
            return dict(id=rid, object="text_completion", created=created, model=served.name,
                        choices=[dict(text=text, index=c.index, logprobs=lp, finish_reason=reason)])

        def usage() -> dict:
            done = sum(c.count for c in choices)
            return dict(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)

        if s["stream"]:
            async def stream():
                open_choices = len(choices)
                try:
                    while open_choices:
                        c, text, lp, reason = await events.get()
                        open_choices -= reason is not None
                        if reason == "error":
                            yield f"data: {json.dumps(engine_failed().body())}\n\n"
                            continue
                        yield f"data: {json.dumps(chunk(c, text, lp, reason))}\n\n"
                    if s["include_usage"]:
                        yield "data: " + json.dumps(dict(id=rid, object="text_completion", created=created,
                                                         model=served.name, choices=[], usage=usage())) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # a client that went away (cancelled, or the generator closed): free its slots
                    if open_choices:
                        engine.cancel(seqs)
            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        open_choices = len(choices)
        while open_choices:
            try:
                _, _, _, reason = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(seqs)
                    return JSONResponse({}, status_code=499)
                continue
            open_choices -= reason is not None
        if any(c.finish_reason == "error" for c in choices):
            raise engine_failed()
        return dict(id=rid, object="text_completion", created=created, model=served.name,
                    choices=[dict(text=c.sent, index=c.index, finish_reason=c.finish_reason,
                                  logprobs=c.logprobs if s["logprobs"] is not None else None) for c in choices],
                    usage=usage())

    return app
