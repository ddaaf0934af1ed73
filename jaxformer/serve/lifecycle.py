"""The server's life under uvicorn: connection deadlines, and a graceful stop on SIGTERM.

* :class:`GuardedH11`: a client must send a whole request line and headers within
  ``head_seconds`` of connecting or of its previous response, or the connection is closed (uvicorn
  alone waits forever for a slowly sent head); h11 caps the head's size; idle keep-alive
  connections close after ``keep_alive_seconds``; beyond ``max_connections`` new ones get 503.
* :class:`DrainingServer`: the first SIGTERM (or SIGINT) starts the drain on a thread: new requests
  get 503 with ``Retry-After`` (the listening socket stays open, so clients hear why), running
  sequences may finish for ``drain_seconds``, then the rest end with an error event in their
  streams and the server exits with status 0. A second signal exits at once.
"""

import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from jaxformer.serve.limits import Limits


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head (``config.head_seconds``)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        self.loop.call_later(self.config.head_seconds, self._expire, self.cycle)

    def _expire(self, cycle) -> None:
        """Closes the connection when no new request has begun since the deadline was set."""
        waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first stop signal runs ``drain()`` (on a thread) before exiting."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self.drain, self.draining = drain, False

    def handle_exit(self, sig, frame) -> None:
        # Not uvicorn's: it would raise the signal again after the shutdown (exit status -15).
        if self.draining:
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        threading.Thread(target=self._drain_then_exit, name="jaxformer-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        try:
            self.drain()
        finally:
            self.should_exit = True


def drain(app, seconds: float, poll: float = 0.05) -> None:
    """Stops ``app`` taking requests, lets those in flight finish for ``seconds``, then ends the
    sequences and translations still running or waiting (their clients hear "shutdown")."""
    gate = app.state.gate
    gate.draining = True
    deadline = time.monotonic() + seconds
    while gate.in_flight and time.monotonic() < deadline:
        time.sleep(poll)
    for served in app.state.models:
        served.model.shutdown()
    deadline = time.monotonic() + 10  # the error events and last responses go out
    while gate.in_flight and time.monotonic() < deadline:
        time.sleep(poll)


def serve(app, host: str, port: int, limits: Limits, drain_seconds: float) -> bool:
    """Runs ``app`` on ``host:port`` until a stop signal has drained it; False when it never started."""
    config = uvicorn.Config(app, host=host, port=port, http=GuardedH11, log_level="warning", lifespan="off",
                            timeout_keep_alive=limits.keep_alive_seconds, limit_concurrency=limits.max_connections,
                            h11_max_incomplete_event_size=limits.max_header_bytes, timeout_graceful_shutdown=5)
    config.head_seconds = limits.head_seconds
    server = DrainingServer(config, lambda: drain(app, drain_seconds))
    server.run()
    return server.started
