"""The ASGI gates in front of the endpoint, driven as an ASGI server would drive them."""

from __future__ import annotations

import asyncio
import json

import pytest

from spam_gpt.api_keys import KeyCheck
from spam_gpt.gates import BodyLimit, CrossOrigin, KeyGate, bearer_token

KEY = "k3y-for-tests"


async def downstream(scope, receive, send) -> None:
    """The app behind the gates: answers 200 with the body it read."""
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def ask(app, path: str, body: bytes = b"{}", root_path: str = "", **headers: str):
    """Status, headers and body of one request through ``app``."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": root_path.rstrip("/") + path,
        "root_path": root_path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    answer: dict = {"body": b""}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], dict(message["headers"])
        else:
            answer["body"] += message["body"]

    asyncio.run(app(scope, receive, send))
    return answer["status"], answer["headers"], answer["body"]


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (f"Bearer {KEY}", KEY),
        (f"bearer   {KEY}  ", KEY),
        (f"Basic {KEY}", None),
        ("Bearer", None),
        ("Bearer ", None),
        (KEY, None),
    ],
)
def test_the_bearer_token_is_read_as_http_says(value, token):
    assert bearer_token([(b"authorization", value.encode())]) == token
    assert bearer_token([(b"Authorization", value.encode())]) == token


def test_no_authorization_header_is_no_token():
    assert bearer_token([(b"content-type", b"application/json")]) is None


@pytest.mark.parametrize("prefix", ["", "/", "/spam", "/spam/"])
def test_protected_paths_need_a_key_under_any_route_prefix(prefix):
    gate = KeyGate(downstream, {"/classify"}, key_check=lambda: KeyCheck([KEY]))
    status, headers, body = ask(gate, "/classify", root_path=prefix)
    assert status == 401 and headers[b"www-authenticate"] == b"Bearer"
    assert "Authorization: Bearer KEY" in json.loads(body)["error"]
    assert ask(gate, "/classify", root_path=prefix, Authorization="Bearer wrong")[0] == 401
    assert ask(gate, "/classify", b"hi", prefix, Authorization=f"Bearer {KEY}")[::2] == (200, b"hi")
    assert ask(gate, "/healthz", b"ok", root_path=prefix)[::2] == (200, b"ok")


def test_an_open_endpoint_lets_every_request_through():
    gate = KeyGate(downstream, {"/classify"}, key_check=lambda: KeyCheck([]))
    assert ask(gate, "/classify", b"hi")[::2] == (200, b"hi")


def test_an_oversized_body_without_a_key_is_told_413_not_401():
    """The body limit runs outside the key gate, so a client that writes its whole body
    first (urllib) reads why it was refused."""
    from spam_gpt.serving import api

    # outermost first: CORS preflights are answered before anything reads a request
    assert [m.cls for m in api.user_middleware] == [CrossOrigin, BodyLimit, KeyGate]
    gate = KeyGate(downstream, {"/classify"}, key_check=lambda: KeyCheck([KEY]))
    app = BodyLimit(gate, limit=10)
    status, _, body = ask(app, "/classify", b"x" * 11)
    assert status == 413 and "exceeds 10 bytes" in json.loads(body)["error"]
    assert ask(app, "/classify", b"x" * 10)[0] == 401
