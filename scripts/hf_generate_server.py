"""Hugging Face ``model.generate`` one request at a time behind a minimal OpenAI-style endpoint: the
baseline without batching of scripts/bench_serve.py, which starts it.

    python scripts/hf_generate_server.py MODEL_DIR --port 8000

POST /v1/completions: ``prompt``, ``max_tokens``, ``temperature`` (0: greedy; else sampled with
``top_p`` and ``top_k``), ``ignore_eos``, ``stream`` (one SSE event per token) and
``stream_options.include_usage``. One generation at a time: later requests wait their turn, and a
client that disconnects stops its generation. GET /health and /v1/models answer as
``jaxformer serve`` does; the model is named after its directory.
"""

import asyncio
import concurrent.futures
import json
import sys
import threading
import time
import uuid
from pathlib import Path

from jaxformer.commands import cli


def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("model", help="Hugging Face model directory (weights and tokenizer files)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=cli.at_least(1), default=8000)
    ap.add_argument("--threads", type=cli.at_least(1), help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    return cli.run(lambda: serve(args), args.debug)


def serve(args) -> int:
    import torch
    import transformers
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.model, clean_up_tokenization_spaces=False)
    uvicorn.run(make_app(model, tok, Path(args.model).name), host=args.host, port=args.port, log_level="warning")
    return 0


def make_app(model, tok, name: str):
    """The FastAPI app: /health, /v1/models and /v1/completions over one generating thread."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one request at a time
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [name]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "transformers",
                                            "task": "completion"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
            ids = tok(body["prompt"], return_tensors="pt")["input_ids"]
            kw = generation_kwargs(body, tok.eos_token_id)
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": {"message": f"bad request: {e!r}", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        completion = Completion(tok, name, ids.shape[1], kw["max_new_tokens"], include_usage)
        worker.submit(completion.generate, model, ids, kw)
        if body.get("stream"):
            return StreamingResponse(completion.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await completion.response()

    return app


def generation_kwargs(body: dict, eos_token_id: int) -> dict:
    """``model.generate``'s arguments for a request body."""
    max_tokens = int(body.get("max_tokens", 16))
    temperature = float(body.get("temperature", 1.0))
    kw = dict(max_new_tokens=max_tokens, pad_token_id=eos_token_id, use_cache=True, do_sample=temperature > 0)
    if body.get("ignore_eos"):
        kw["min_new_tokens"] = max_tokens
    if temperature > 0:
        kw.update(temperature=temperature, top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", 0)))
    return kw


class Completion:
    """One request: ``generate`` on the worker thread streams its tokens here (``put``/``end``, as a
    transformers streamer), and the event loop turns them into SSE events or one response."""

    def __init__(self, tok, name: str, prompt_tokens: int, max_tokens: int, include_usage: bool):
        self.tok, self.prompt_tokens, self.max_tokens = tok, prompt_tokens, max_tokens
        self.include_usage = include_usage
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                     "model": name}
        self.loop, self.queue, self.cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        self.prompt_seen = False

    def generate(self, model, ids, kw: dict) -> None:
        """Runs on the worker thread; nothing if the client left while the request waited."""
        import torch
        import transformers

        if self.cancel.is_set():
            self.end()
            return
        try:
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), streamer=self,
                               stopping_criteria=transformers.StoppingCriteriaList([self.left]), **kw)
        except Exception as e:  # reported to the client as an error event
            self._send(e)

    def left(self, input_ids, scores, **kwargs):
        """generate()'s stopping criterion: the client disconnected."""
        import torch

        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool)

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self._send(value.reshape(-1).tolist())

    def end(self) -> None:
        self._send(None)

    def _send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _chunk(self, text: str, finish: str | None = None, usage: dict | None = None) -> str:
        c = {**self.head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(c if usage is None else {**c, 'choices': [], 'usage': usage})}\n\n"

    def _usage(self, n: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    async def events(self):
        """The SSE events: a chunk per token, the finish, the usage if asked, [DONE]. Leaving stops the generation."""
        n = 0
        try:
            while (item := await self.queue.get()) is not None:
                if isinstance(item, Exception):
                    yield f"data: {json.dumps({'error': {'message': repr(item), 'type': 'server_error'}})}\n\n"
                    return
                for t in item:
                    n += 1
                    yield self._chunk(self.tok.decode([t]))
            yield self._chunk("", "length" if n >= self.max_tokens else "stop")
            if self.include_usage:
                yield self._chunk("", usage=self._usage(n))
            yield "data: [DONE]\n\n"
        finally:
            self.cancel.set()

    async def response(self) -> dict:
        """The whole completion as one response body."""
        text, n = "", 0
        async for event in self.events():
            if event.startswith("data: {"):
                c = json.loads(event[6:])
                if c.get("choices"):
                    text += c["choices"][0]["text"]
                    n += bool(c["choices"][0]["text"])
        return {**self.head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                "usage": self._usage(n)}


if __name__ == "__main__":
    sys.exit(main())
