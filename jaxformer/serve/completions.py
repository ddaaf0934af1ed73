"""One ``/v1/completions`` request in flight: its sequences in the engine, and its response.

Each choice's text is assembled on the engine's thread (:class:`~jaxformer.serve.text.ChoiceText`)
and handed to the request's event loop as events ``(choice, text, logprobs, finish_reason)``;
a streamed response sends one chunk per event, a plain one waits for every choice to finish.
:meth:`Completion.close` runs once when the response is over, however it ended: it cancels the
sequences still running and calls the request's ``on_close`` (metrics, the stream count).
"""

import asyncio
import dataclasses
import os
import time
from typing import Callable

from fastapi.responses import JSONResponse, StreamingResponse

from jaxformer.errors import InputError
from jaxformer.serve import protocol
from jaxformer.serve.engine import Engine
from jaxformer.serve.protocol import APIError, CompletionRequest
from jaxformer.serve.sequence import QueueFull, Sampling, Sequence, Token
from jaxformer.serve.text import ChoiceText

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


@dataclasses.dataclass
class Completion:
    """A submitted request: its choices (in index order), their sequences, their events, and when
    they arrived and produced their first and latest tokens (``times[i]``: monotonic seconds)."""

    request: CompletionRequest
    engine: Engine
    head: dict  # protocol.response_head
    choices: list[ChoiceText]
    seqs: list[Sequence]
    events: asyncio.Queue
    arrival: float
    times: list[list[float | None]]
    on_close: Callable[["Completion"], None] | None = None
    closed: bool = False

    def usage(self) -> dict:
        prompt_tokens = sum(len(p) for p in self.request.prompts) * self.request.n
        return protocol.usage(prompt_tokens, sum(c.count for c in self.choices))

    def close(self) -> None:
        """Ends the response: cancels unfinished sequences, then ``on_close(self)`` (once)."""
        if self.closed:
            return
        self.closed = True
        if any(c.finish_reason is None for c in self.choices):
            self.engine.cancel(self.seqs)
        if self.on_close is not None:
            self.on_close(self)


def submit_completion(request: CompletionRequest, model: str, engine: Engine, tokenizer,
                      on_close: Callable[[Completion], None] | None = None, adapter: int = 0) -> Completion:
    """Queues the request's sequences (choice ``p * n + j``: sample ``j`` of prompt ``p``, drawn as
    row ``p * n + j`` of ``generate()``), with the engine's LoRA ``adapter`` (0: none); APIError
    when the engine cannot take them."""
    loop, events, arrival = asyncio.get_running_loop(), asyncio.Queue(), time.monotonic()

    def post(choice: ChoiceText, text: str, logprobs: dict | None, reason: str | None = None) -> None:
        if text or logprobs or reason:
            loop.call_soon_threadsafe(events.put_nowait, (choice, text, logprobs, reason))

    seed = request.seed if request.seed is not None else new_seed()
    sampling = Sampling(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                        top_k=request.top_k, seed=seed, ignore_eos=request.ignore_eos)
    end_id = None if request.ignore_eos else engine.eos_id
    score = request.echo and request.logprobs is not None  # the engine scores the prompt
    choices, seqs, times = [], [], []
    for index, prompt in enumerate(p for p in request.prompts for _ in range(request.n)):
        choice = ChoiceText(index, tokenizer, request.stop, request.logprobs, end_id)
        if request.echo and not score:
            post(choice, *choice.echo([Token(t, None, [], []) for t in prompt]))
        choices.append(choice)
        times.append([None, None])
        seqs.append(_sequence(choice, list(prompt), sampling, post, score, times[-1], adapter))
    try:
        engine.submit(seqs)
    except QueueFull as e:
        raise protocol.busy(e) from None
    except InputError as e:  # more sequences than the engine can ever hold
        raise APIError(400, str(e), param="n", code="invalid_value") from None
    return Completion(request, engine, protocol.response_head(model), choices, seqs, events, arrival, times,
                      on_close)


def _sequence(choice: ChoiceText, prompt: list[int], sampling: Sampling, post, score: bool,
              times: list, adapter: int) -> Sequence:
    """The engine's sequence for ``choice``: the text of its tokens (and scored prompt), and its
    end, go to ``post(choice, text, logprobs, finish_reason)`` from the engine's thread; ``times``
    gets the monotonic times of its first and latest tokens."""
    def emit(token: Token) -> None:
        times[1] = time.monotonic()
        times[0] = times[0] or times[1]
        post(choice, *choice.push(token))

    return Sequence(prompt, sampling, choice.index, emit=emit,
                    finish=lambda reason: post(choice, choice.finish(reason), None, choice.finish_reason),
                    should_stop=lambda: choice.stopped,
                    scored=(lambda tokens: post(choice, *choice.echo(tokens))) if score else None, adapter=adapter)


FAILURES = {"error": protocol.engine_failed, "shutdown": protocol.shutting_down}  # reason -> the error


class _Stream(StreamingResponse):
    """A streamed response that closes its completion however it ends (the client gone before the
    first chunk included, when the body's generator never starts)."""

    def __init__(self, run: Completion, content):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


def stream_response(run: Completion) -> StreamingResponse:
    """Server-sent events: a chunk per piece of text, a usage chunk when asked, then ``[DONE]``; a
    choice that failed (or was ended by the shutdown) sends an error event instead of its end."""
    async def events():
        open_choices = len(run.choices)
        while open_choices:
            c, text, logprobs, reason = await run.events.get()
            open_choices -= reason is not None
            if reason in FAILURES:
                yield protocol.event(FAILURES[reason]().body())
                continue
            yield protocol.chunk(run.head, [protocol.choice(c.index, text, logprobs, reason)])
        if run.request.include_usage:
            yield protocol.chunk(run.head, [], run.usage())
        yield protocol.event("[DONE]")

    return _Stream(run, events())


async def full_response(run: Completion, is_disconnected) -> dict | JSONResponse:
    """The completion object once every choice has finished (499 when the client went away); the
    caller closes ``run``."""
    open_choices = len(run.choices)
    while open_choices:
        try:
            *_, reason = await asyncio.wait_for(run.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await is_disconnected():
                return JSONResponse({}, status_code=499)
            continue
        open_choices -= reason is not None
    for reason, error in FAILURES.items():
        if any(c.finish_reason == reason for c in run.choices):
            raise error()
    logprobs = run.request.logprobs is not None
    return protocol.completion(run.head, [protocol.choice(c.index, c.text, c.logprobs if logprobs else None,
                                                          c.finish_reason) for c in run.choices], run.usage())
