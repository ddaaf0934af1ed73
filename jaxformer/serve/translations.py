"""The translation worker: one thread translating queued requests, those with the same beam size
together (one batch through the translator's jitted beam search)."""

import asyncio
import threading
import traceback

from jaxformer.serve.engine import QueueFull, notify


class TranslationWorker:
    """Translates queued requests on its own thread with ``model.translate(sentences, beam_size)``.

    max_queue: requests waiting beyond which :meth:`submit` raises :class:`QueueFull` (an idle
    worker takes one at once).
    """

    def __init__(self, model, max_queue: int = 64):
        self.model, self.max_queue = model, max_queue
        self._jobs: list = []
        self._busy = False
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="jaxformer-translator", daemon=True).start()

    def submit(self, sentences: list[str], beam: int, done) -> None:
        """Queues a request; ``done(translations or exception)`` is called on the worker's thread."""
        with self._cv:
            if len(self._jobs) >= self.max_queue + (not self._busy):
                raise QueueFull(f"{len(self._jobs)} translation requests are waiting")
            self._jobs.append((sentences, beam, done))
            self._cv.notify()

    async def translate(self, sentences: list[str], beam: int) -> list[str]:
        """The translations, awaited on the caller's event loop (QueueFull at once when full)."""
        loop = asyncio.get_running_loop()
        result = loop.create_future()
        self.submit(sentences, beam, lambda out: loop.call_soon_threadsafe(result.set_result, out))
        out = await result
        if isinstance(out, Exception):
            raise out
        return out

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
