"""The door every request passes (ASGI middleware): its id, the drain, the API keys, the body's limits,
and afterwards its metrics and access-log line.

In order: a request gets an id (the client's ``X-Request-Id`` when it is short and plain, else a new
one; the response carries it); while the server drains it is answered 503 with ``Retry-After``;
headers beyond the limit get 431; ``/v1/*`` needs ``Authorization: Bearer KEY`` when keys are set
(401 otherwise; keys are compared as SHA-256 digests with :func:`hmac.compare_digest`, every key
every time); the body is read whole before the route runs, refused with 413 from its
``Content-Length`` or as soon as the bytes read pass the limit, and with 408 when it has not
arrived by the deadline.
"""

import asyncio
import dataclasses
import hashlib
import hmac
import re
import time
import uuid

from jaxformer.serve.limits import Limits
from jaxformer.serve.metrics import AccessLog, ServerMetrics, route
from jaxformer.serve.protocol import APIError, shutting_down

CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class Keys:
    """The accepted API keys; :meth:`identify` gives a key's id (a digest prefix, never the key)."""

    def __init__(self, keys: tuple[str, ...] = ()):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: bytes | None) -> str | None:
        """The id of the key in an ``Authorization: Bearer KEY`` header; None when it is no key of ours."""
        scheme, _, token = (authorization or b"").partition(b" ")
        given = hashlib.sha256(token.strip()).digest()
        found = None
        for digest in self._digests:  # no early exit: the time does not say which key matched
            if hmac.compare_digest(given, digest) and scheme.lower() == b"bearer":
                found = digest.hex()[:12]
        return found


@dataclasses.dataclass
class GateState:
    """What the gate shares with the rest of the server: its settings, the drain flag, and the
    requests in flight (the drain waits for them)."""

    keys: Keys
    limits: Limits
    metrics: ServerMetrics
    log: AccessLog
    draining: bool = False
    in_flight: int = 0


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


class Gate:
    """ASGI middleware: see the module docstring. ``scope["state"]`` gets ``request_id`` and ``key_id``;
    a route may leave ``usage`` there for the access log."""

    def __init__(self, app, state: GateState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        info = scope.setdefault("state", {})
        info["request_id"] = rid
        status = [499]  # until a response starts: the client left first

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        start, gate = time.monotonic(), self.state
        gate.in_flight += 1
        try:
            await self._pass(scope, receive, send_with_id, headers, info)
        except Exception:
            status[0] = 500 if status[0] == 499 else status[0]
            raise
        finally:
            gate.in_flight -= 1
            self._record(scope, info, status[0], time.monotonic() - start)

    async def _pass(self, scope, receive, send, headers: dict, info: dict) -> None:
        """Answers the request's refusal, or hands it to the app with its body read."""
        try:
            info["key_id"] = self._check(scope, headers)
            body = await self._read_body(receive, headers)
        except APIError as e:
            return await e.response()(scope, receive, send)
        except ClientGone:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # waits for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check(self, scope, headers: dict) -> str | None:
        """The caller's key id (None without keys); APIError while draining, for headers too large
        (h11 caps only a head that arrives in pieces) or a wrong key."""
        if self.state.draining:
            raise shutting_down()
        limit = self.state.limits.max_header_bytes
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + len(scope.get("raw_path", b"")) > limit:
            raise APIError(431, f"the request's headers pass {limit} bytes (--max-header-bytes)",
                           code="headers_too_large")
        keys = self.state.keys
        if not keys or not scope["path"].startswith("/v1/"):
            return None
        key_id = keys.identify(headers.get(b"authorization"))
        if key_id is None:
            raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return key_id

    async def _read_body(self, receive, headers: dict) -> bytes:
        limit, seconds = self.state.limits.max_body_bytes, self.state.limits.body_seconds
        too_large = APIError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)",
                             code="request_too_large")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            raise too_large
        loop = asyncio.get_running_loop()
        deadline, chunks, size = loop.time() + seconds, [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {seconds:g} s (--body-seconds)",
                               code="request_timeout") from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise too_large
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _record(self, scope, info: dict, status: int, seconds: float) -> None:
        self.state.metrics.http.labels(route(scope["path"]), str(status)).inc()
        usage = info.get("usage") or {}
        self.state.log.write(request_id=info["request_id"], method=scope["method"], path=scope["path"][:200],
                             status=status, duration_s=round(seconds, 4), key=info.get("key_id"),
                             prompt_tokens=usage.get("prompt_tokens"),
                             completion_tokens=usage.get("completion_tokens"))
