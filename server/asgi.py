"""ASGI plumbing of the layer: request bodies in, headers, one replayed body out.

Small functions over raw ASGI messages (no Starlette request objects): the
layer must not buffer responses or add a hop, and these are all it needs.
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.types import Message, Receive, Scope

from .errors import GatewayError, bad_request

#: Longest X-Request-Id taken from a client (it is echoed back and logged).
MAX_REQUEST_ID = 256


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, None if the client left, or a 413 past ``limit`` bytes."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        size += len(part)
        if limit and size > limit:
            raise GatewayError(
                413, f"request body is larger than {limit} bytes", code="request_too_large"
            )
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


def request_id(scope: Scope) -> str:
    """The client's X-Request-Id (printable ASCII, bounded), or a new one.

    vLLM echoes it back and logs it: an unbounded or non-ASCII id would break
    clients and log lines, so such an id is a 400, not silently replaced.
    """
    given = header(scope, b"x-request-id", lower=False)
    if not given:
        return uuid.uuid4().hex
    if len(given) > MAX_REQUEST_ID or not all(0x21 <= b <= 0x7E for b in given):
        raise bad_request(
            f"X-Request-Id must be 1 to {MAX_REQUEST_ID} printable ASCII characters "
            "without spaces",
            param="X-Request-Id",
            code="invalid_header",
        )
    return given.decode()


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the rewritten body once, then the client's own events.

    Delegating afterwards keeps ``http.disconnect`` flowing to vLLM, which is
    how it cancels the engine request when a client goes away.
    """
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def header(message: Message | Scope, name: bytes, lower: bool = True) -> bytes:
    for key, value in message.get("headers", []):
        if key.lower() == name:
            return value.lower() if lower else value
    return b""


def set_header(headers: Any, name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != name] + [(name, value)]


def with_header(message: Any, name: bytes, value: bytes) -> Any:
    return {**message, "headers": set_header(message.get("headers", []), name, value)}


def with_length(scope: Scope, length: int) -> Scope:
    return with_header(scope, b"content-length", str(length).encode())
