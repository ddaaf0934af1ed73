"""What lets a run stop cleanly: a SIGTERM/SIGINT guard that lets the current step finish, and the
flag exchange that makes all processes stop at the same step (checkpoints: :mod:`jaxformer.train.checkpoints`).
"""

import signal

import jax


class StopRequested:
    """Context manager turning SIGTERM/SIGINT into a flag the training loop polls between steps.

    ``bool(guard)`` is True once a signal arrived (``guard.signal`` names it); a second SIGINT
    while stopping raises KeyboardInterrupt as usual. Previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def __bool__(self) -> bool:
        return self.signal is not None


def any_process(flag: bool) -> bool:
    """True if ``flag`` is set on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(jax.numpy.int32(flag)).max())
