"""One OpenAI error envelope and one way to send it from the ASGI layer.

Every refusal-layer rejection goes through :func:`send_error`, so clients see
``{"error": {"message", "type", "param", "code"}}`` with OpenAI's ``type``
strings, whatever went wrong. vLLM's own errors have the same keys but not
the same values (``"type": "Bad Request"``, ``"code": 400``,
``"param": "body.stop"``); :func:`openai_shape` rewrites them, so a client
sees one error shape whoever answered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.types import Send


@dataclass
class GatewayError(Exception):
    """An error the layer answers itself, before vLLM sees the request."""

    status: int
    message: str
    param: str | None = None
    type: str = "invalid_request_error"
    code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __str__(self) -> str:
        return self.message

    def body(self) -> bytes:
        return json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        ).encode()


#: OpenAI's error ``type`` by HTTP status (others: 4xx invalid_request_error, 5xx server_error).
TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                  429: "rate_limit_error", 503: "service_unavailable_error"}  # fmt: skip
OPENAI_TYPES = frozenset({*TYPE_BY_STATUS.values(), "invalid_request_error", "server_error"})


def openai_shape(raw: bytes, status: int) -> bytes:
    """vLLM's error body with OpenAI's values; anything else unchanged.

    ``type`` becomes OpenAI's for the status unless it is one already; a
    numeric ``code`` (vLLM repeats the status there) becomes null; a
    ``param`` naming the body (``body.stop``) names the field.
    """
    try:
        document: Any = json.loads(raw)
    except ValueError:
        return raw
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return raw
    if error.get("type") not in OPENAI_TYPES:
        fallback = "invalid_request_error" if status < 500 else "server_error"
        error["type"] = TYPE_BY_STATUS.get(status, fallback)
    if not isinstance(error.get("code"), str):
        error["code"] = None
    param = error.get("param")
    if isinstance(param, str) and param.startswith("body."):
        error["param"] = param.removeprefix("body.")
    for key in ("message", "param"):
        error.setdefault(key, None)
    return json.dumps(document).encode()


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unavailable(message: str, code: str, retry_after_s: int) -> GatewayError:
    """A 503 with ``Retry-After``: the server cannot take this request now, another may."""
    return GatewayError(
        503, message, type="service_unavailable_error", code=code,
        headers=((b"retry-after", str(retry_after_s).encode()),),
    )  # fmt: skip


async def send_error(send: Send, error: GatewayError) -> None:
    body = error.body()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *error.headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
