"""ASGI middleware that refuses request bodies over a limit with a 413 the client can read.

A client such as Python's urllib writes the whole body before it reads anything; a server
that answers early and closes leaves that client with a reset connection instead of the
answer. So the rest of an oversized body is read and dropped (up to ``DRAIN_BYTES``)
before the 413 goes out.
"""

from __future__ import annotations

import json

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
            await self.reject(send, 400, "Content-Length is not a number")
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
        await self.reject(send, 413, f"request body exceeds {self.limit:,} bytes")

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

    @staticmethod
    async def reject(send, status: int, reason: str) -> None:
        payload = json.dumps({"error": reason}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
