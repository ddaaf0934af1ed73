"""What the engine decodes: a sequence with its sampling settings and callbacks, its tokens, and the
queue's refusal."""

import dataclasses
import traceback
from typing import Callable


@dataclasses.dataclass
class Sampling:
    """One sequence's settings. temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ignore_eos: bool = False


@dataclasses.dataclass
class Token:
    """One token: its id, log-probability and the ``TOP_LOGPROBS`` best alternatives (a prompt's
    first token has none: logprob None)."""

    id: int
    logprob: float | None
    top_ids: list[int]
    top_logprobs: list[float]


class Sequence:
    """One generated sequence (a request has ``n`` of them). The engine calls ``emit(token)`` for each
    token and ``finish(reason)`` once (``"stop"``: EOS, ``"length"``: the token limit or the
    context's end, ``"cancelled"``, ``"error"``: a bug in the engine, ``"shutdown"``: the server is
    exiting); ``should_stop()`` lets the caller end it (a stop sequence). With ``scored``, the
    prompt's tokens with their log-probabilities go to ``scored(tokens)`` before the first
    generated token (``max_tokens`` 0: nothing is generated). ``adapter``: the engine's LoRA adapter
    for it (0: the base alone)."""

    def __init__(self, prompt: list[int], sampling: Sampling, index: int,
                 emit: Callable[[Token], None], finish: Callable[[str], None],
                 should_stop: Callable[[], bool] = lambda: False,
                 scored: Callable[[list[Token]], None] | None = None, adapter: int = 0):
        self.prompt, self.sampling, self.index, self.adapter = prompt, sampling, index, adapter
        self.emit, self.finish, self.should_stop, self.scored = emit, finish, should_stop, scored
        self.generated = 0
        self.cancelled = False
        self.slot: int | None = None


class QueueFull(RuntimeError):
    """The engine's queue holds ``max_queue`` sequences; try again later."""


class ShuttingDown(RuntimeError):
    """The server is draining before it exits: new work is refused."""


def notify(callback, *args) -> bool:
    """Calls a sequence's callback; one that fails (e.g. its event loop closed) is logged and does
    not stop the engine. Returns whether it succeeded."""
    try:
        callback(*args)
        return True
    except Exception:
        traceback.print_exc()
        return False
