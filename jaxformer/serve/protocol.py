"""The wire format: requests parsed from JSON bodies, OpenAI's error body, and the response objects.

:func:`parse_completion` turns a ``/v1/completions`` body into a frozen :class:`CompletionRequest`
(or raises :class:`APIError` naming the bad field); the builders below make the completion object,
its server-sent-event chunks and the usage object.
"""

import dataclasses
import json
import time
import uuid

from fastapi.responses import JSONResponse

from jaxformer.serve.engine import TOP_LOGPROBS, QueueFull
from jaxformer.serve.limits import Limits

MAX_N = 16


class APIError(Exception):
    """An error answered with OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``."""

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


def shutting_down() -> APIError:
    """503 for a request that arrives, or is still running, while the server drains before exiting."""
    return APIError(503, "the server is shutting down; retry on another instance or after its restart",
                    code="server_shutting_down", kind="server_error", headers={"Retry-After": "5"})


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def field(body: dict, name: str, kind, default, check=None, why: str = ""):
    """``body[name]`` (``default`` when absent or null), of type ``kind`` (an int is a float too) and
    passing ``check``; else APIError naming it, with ``why``."""
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok or (check is not None and not check(value)):
        raise APIError(400, f"{name}={value!r}: {why or 'invalid value'}", param=name, code="invalid_value")
    return value


# --- requests ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A validated ``/v1/completions`` request (defaults in :func:`parse_completion`); ``prompts`` as token ids."""

    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int  # 0 (with echo): only the prompt is scored
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: off
    n: int  # sequences per prompt
    seed: int | None
    logprobs: int | None  # alternatives per token; None: no logprobs
    ignore_eos: bool
    stream: bool
    echo: bool  # the prompt is part of the text (and of the logprobs)
    stop: tuple[str, ...]
    include_usage: bool  # a usage chunk ends a stream


def _prompts(body: dict, tokenizer) -> list[list[int]]:
    prompt = body.get("prompt")

    def token_ids(p) -> bool:
        return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and token_ids(prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or token_ids(p) for p in prompt):
        raise APIError(400, "prompt: give a string, a list of strings, token ids or lists of token ids",
                       param="prompt")
    return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompt]


def _stops(body: dict, limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > limits.max_stops or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop: give a string or up to {limits.max_stops} non-empty strings (--max-stops)",
                       param="stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise APIError(400, f"stop: a stop string may have up to {limits.max_stop_chars} characters "
                            "(--max-stop-chars)", param="stop")
    return tuple(stop)


def parse_completion(body: dict, config, tokenizer, limits: Limits = Limits()) -> CompletionRequest:
    """The request in ``body`` for a GPT-2 of ``config`` (vocabulary, context); APIError on a bad field."""
    stop = _stops(body, limits)  # before the prompts: cheap checks first
    ids = _prompts(body, tokenizer)
    echo = field(body, "echo", bool, False)
    request = CompletionRequest(
        prompts=tuple(map(tuple, ids)),
        max_tokens=field(body, "max_tokens", int, 16, lambda v: v >= (0 if echo else 1),
                         "must be >= 1 (0 only with echo)"),
        temperature=field(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "must lie in [0, 2]"),
        top_p=field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "must lie in (0, 1]"),
        top_k=field(body, "top_k", int, 0, lambda v: v >= 0, "must be >= 0 (0: off)"),
        n=field(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"must lie in [1, {MAX_N}]"),
        seed=field(body, "seed", int, None, lambda v: 0 <= v < 2**31, "must lie in [0, 2^31)"),
        logprobs=field(body, "logprobs", int, None, lambda v: 0 <= v <= TOP_LOGPROBS,
                       f"must lie in [0, {TOP_LOGPROBS}]"),
        ignore_eos=field(body, "ignore_eos", bool, False),
        stream=field(body, "stream", bool, False),
        echo=echo,
        stop=stop,
        include_usage=field(body, "stream_options", dict, {}).get("include_usage", False) is True,
    )
    field(body, "best_of", int, None, lambda v: v == 1, "best_of is not supported")
    vocab, context = config.vocab_size, config.n_positions
    for i, p in enumerate(ids):
        if not p:
            raise APIError(400, f"prompt {i} is empty: give at least one token", param="prompt")
        if min(p) < 0 or max(p) >= vocab:
            raise APIError(400, f"prompt {i}: token ids must lie in [0, {vocab})", param="prompt")
        if len(p) + request.max_tokens > context:
            raise APIError(400, f"prompt {i} has {len(p)} tokens; with max_tokens={request.max_tokens} that "
                                f"exceeds the model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
    return request


def parse_translation(body: dict, max_beam: int, limits: Limits = Limits()) -> tuple[list[str], int]:
    """(the sentences, the beam size) of a ``/v1/translations`` body (beam sizes 1 .. ``max_beam``)."""
    text = body.get("input")
    sentences = [text] if isinstance(text, str) else text
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
        raise APIError(400, "input: give a sentence or a non-empty list of sentences", param="input")
    if len(sentences) > limits.max_translation_inputs:
        raise APIError(400, f"input: {len(sentences)} sentences; a request may have up to "
                            f"{limits.max_translation_inputs} (--max-translation-inputs)", param="input")
    for i, s in enumerate(sentences):
        if len(s) > limits.max_translation_chars:
            raise APIError(400, f"input {i} has {len(s)} characters; a sentence may have up to "
                                f"{limits.max_translation_chars} (--max-translation-chars)", param="input",
                           code="context_length_exceeded")
    beam = field(body, "beam_size", int, min(4, max_beam), lambda v: 1 <= v <= max_beam,
                 f"must lie in [1, {max_beam}] (the server's --max-beam)")
    return sentences, beam


# --- responses -----------------------------------------------------------------------------------------

def response_head(model: str) -> dict:
    """The fields every object of one completion response shares (id, object, created, model)."""
    return dict(id=f"cmpl-{uuid.uuid4().hex[:24]}", object="text_completion", created=int(time.time()), model=model)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens)


def choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return dict(text=text, index=index, logprobs=logprobs, finish_reason=finish_reason)


def completion(head: dict, choices: list[dict], usage: dict) -> dict:
    """The completion object of a non-streamed response."""
    return {**head, "choices": choices, "usage": usage}


def chunk(head: dict, choices: list[dict], usage: dict | None = None) -> str:
    """One server-sent event of a streamed response (``choices`` empty in the final usage chunk)."""
    return event({**head, "choices": choices, **({"usage": usage} if usage is not None else {})})


def event(obj: dict | str) -> str:
    """A server-sent event carrying ``obj`` as JSON (a string as is: ``[DONE]``)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
