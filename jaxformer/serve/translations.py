"""The translation worker: one thread translating queued requests, those with the same beam size
together (one batch through the translator's jitted beam search)."""

import asyncio
import threading
import traceback

from jaxformer.serve.sequence import QueueFull, ShuttingDown, notify

TRANSLATOR_THREAD = "jaxformer-translator"  # the worker's thread (compilations there: after warm-up)


class TranslationWorker:
    """Translates queued requests on its own thread with ``model.translate(sentences, beam_size)``.

    max_queue: requests waiting beyond which :meth:`submit` raises :class:`QueueFull` (an idle
    worker takes one at once). max_beam: the largest beam size served.
    """

    def __init__(self, model, max_queue: int = 64, max_beam: int = 4):
        self.model, self.max_queue, self.max_beam = model, max_queue, max_beam
        self._jobs: list = []
        self._busy = self._closed = False
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name=TRANSLATOR_THREAD, daemon=True).start()

    def too_long(self, sentences: list[str]) -> str | None:
        """Why a sentence is too long for the model (its tokens beyond ``max_len``), or None."""
        from jaxformer.translator import tokenizer as tk

        room = self.model.config.max_len - 1  # and EOS
        for i, ids in enumerate(tk.encode(self.model.tokenizer, sentences)):
            if len(ids) > room:
                return f"input {i} has {len(ids)} tokens; this translator reads at most {room} (its max_len)"
        return None

    def submit(self, sentences: list[str], beam: int, done) -> None:
        """Queues a request; ``done(translations or exception)`` is called on the worker's thread."""
        with self._cv:
            if self._closed:
                raise ShuttingDown("the translator is shutting down")
            if len(self._jobs) >= self.max_queue + (not self._busy):
                raise QueueFull(f"{len(self._jobs)} translation requests are waiting")
            self._jobs.append((sentences, beam, done))
            self._cv.notify()

    def shutdown(self) -> None:
        """Refuses new requests and answers the waiting ones with :class:`ShuttingDown` (the batch
        being translated finishes)."""
        with self._cv:
            self._closed, jobs, self._jobs = True, self._jobs, []
        for *_, done in jobs:
            notify(done, ShuttingDown("the server is shutting down"))

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
