"""ASGI middleware in front of the endpoint's FastAPI app: what a request passes before
anything parses it.

:class:`BodyLimit` refuses request bodies over a limit with a 413 the client can read. A
client such as Python's urllib writes the whole body before it reads anything; a server
that answers early and closes leaves that client with a reset connection instead of the
answer. So the rest of an oversized body is read and dropped (up to ``DRAIN_BYTES``)
before the 413 goes out.

:class:`KeyGate` refuses protected paths without one of the API keys with a 401, before
the body is validated: a client without a key learns nothing about its request.

:class:`CrossOrigin` lets browser apps on other origins call the endpoint (CORS), when
origins are set: it answers their preflights before the key gate, since a browser sends
no key with a preflight.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence

from starlette.middleware.cors import CORSMiddleware

from spam_gpt.api_keys import KeyCheck

DRAIN_BYTES = 256 * 2**20  # past this, the connection is closed without reading on


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 before anything parses them."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await refuse(send, 400, "Content-Length is not a number")
            return
        if declared is not None and int(declared) > self.limit:
            if int(declared) <= DRAIN_BYTES:
                await self.drain(receive)
            await self.too_large(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.limit:
                if more:
                    await self.drain(receive)
                await self.too_large(send)
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def too_large(self, send) -> None:
        await refuse(send, 413, f"request body exceeds {self.limit:,} bytes")

    @staticmethod
    async def drain(receive) -> None:
        """Read and drop the body's rest (up to about DRAIN_BYTES), so that the client
        gets to read the answer."""
        read = 0
        while read <= DRAIN_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class KeyGate:
    """Refuse requests to ``protected`` paths that lack ``Authorization: Bearer KEY`` with
    one of the keys of ``key_check()``. A middleware rather than a FastAPI dependency,
    whose machinery (the bearer scheme and the check) took about 5 % of the replica's
    time per batched request: without it 0.74 ms of CPU against 0.78 (tiny, concurrency
    32); with the gate 0.75-0.77."""

    def __init__(self, app, protected: Collection[str], key_check: Callable[[], KeyCheck]):
        self.app = app
        self.protected = frozenset(protected)
        self.key_check = key_check

    async def __call__(self, scope, receive, send) -> None:
        guarded = scope["type"] == "http" and route_path(scope) in self.protected
        if guarded and not self.key_check().allows(bearer_token(scope.get("headers") or [])):
            await refuse(send, 401, KEY_REFUSAL, [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


KEY_REFUSAL = "this endpoint needs an API key: send Authorization: Bearer KEY"


class CrossOrigin:
    """CORS for the origins of ``origins()`` (``*``: any), answering every preflight and
    naming the origin on every answer, refusals included, so that a browser app can read
    its 401 or 422. With no origins the endpoint answers as it would without this gate,
    and browsers keep other origins out."""

    def __init__(self, app, origins: Callable[[], Sequence[str]]):
        self.app = app
        self.origins = origins
        self.cors = None  # built on the first request: the replica sets its origins first

    async def __call__(self, scope, receive, send) -> None:
        if self.cors is None:
            origins = list(self.origins())
            self.cors = self.app
            if origins:
                self.cors = CORSMiddleware(
                    self.app,
                    allow_origins=origins,
                    allow_methods=["GET", "POST"],
                    allow_headers=["authorization", "content-type"],
                    max_age=600,
                )
        await self.cors(scope, receive, send)


def check_origins(origins: Sequence[str]) -> list[str]:
    """``origins`` as browsers send them (scheme, host, port: no path), or an error that
    shows the form: ``https://app.example.com/`` would match no request at all."""
    checked = []
    for origin in origins:
        scheme, _, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not rest or "/" in rest):
            raise ValueError(
                f"allowed origin {origin!r}: give a browser origin, scheme and host (and "
                "port), such as https://app.example.com or http://localhost:3000, or * for any"
            )
        checked.append(origin)
    return checked


def route_path(scope) -> str:
    """The path the app routes on: without the prefix it is mounted under
    (``root_path``), which matches whole path segments only, as in Starlette."""
    path, prefix = scope["path"], scope.get("root_path", "").rstrip("/")
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix) :] or "/"
    return path


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, if there is one."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() != "bearer":
                return None
            return token.strip() or None
    return None


async def refuse(
    send, status: int, reason: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer ``{"error": reason}`` with ``status``."""
    payload = json.dumps({"error": reason}).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})
