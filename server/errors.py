"""One OpenAI error envelope and one way to send it from the ASGI layer.

Every refusal-layer rejection goes through :func:`send_error`, so clients see
``{"error": {"message", "type", "param", "code"}}`` with OpenAI's ``type``
strings, whatever went wrong (vLLM's own errors keep vLLM's shape).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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
