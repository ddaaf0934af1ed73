"""Building batches ahead of the step on a background thread, so that loading never stalls the accelerator."""

import queue
import threading
from collections.abc import Callable, Iterable

_DONE = object()


class Prefetcher:
    """Iterates ``fn(step)`` for ``step`` in ``steps``, each computed up to ``depth`` items ahead on
    one background thread (a bounded queue: at most ``depth`` results wait). An exception in ``fn``
    is re-raised in the consumer at the item where it occurred. ``close()`` (or leaving a ``with``
    block) stops the thread; iterating to the end closes it too.

        with Prefetcher(lambda s: windows.train_batch(seed, s, accum, batch), range(start, steps)) as batches:
            for step, batch in zip(range(start, steps), batches): ...
    """

    def __init__(self, fn: Callable, steps: Iterable, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth={depth}: must be >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._work, args=(fn, iter(steps)), daemon=True, name="prefetch")
        self._thread.start()

    def _work(self, fn, steps) -> None:
        try:
            for step in steps:
                if not self._put((True, fn(step))):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((False, e))
            return
        self._put((True, _DONE))

    def _put(self, item) -> bool:
        """Puts ``item`` unless closed meanwhile (then False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        ok, value = self._queue.get()
        if value is _DONE or not ok:
            self.close()
            if ok:
                raise StopIteration
            raise value
        return value

    def close(self) -> None:
        """Stops the background thread and waits for it (at most the time of one ``fn`` call)."""
        self._finished = True
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
