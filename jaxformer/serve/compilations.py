"""The process's XLA compilations, counted by thread: ``/health`` reports them, and the engine's
thread compiles nothing after its warm-up."""

import collections
import functools
import threading

import jax


class Compilations:
    """Counts the XLA compilations of this process by thread name (a ``jax.monitoring`` listener)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.by_thread: collections.Counter = collections.Counter()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.by_thread[threading.current_thread().name] += 1

    @property
    def total(self) -> int:
        return sum(self.by_thread.values())


@functools.cache
def compilations() -> Compilations:
    """The process's one compilation counter (created, and listening, on first use)."""
    return Compilations()
