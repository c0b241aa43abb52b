"""Which requests are the launcher's canaries: a per-launch secret, checked in constant time.

Canary traffic is synthetic: counted only in the canary series, never in the
production ones, and exempt from API keys. Only a request carrying the
launcher's secret (``REFUSAL_GATEWAY_CANARY_SECRET``) may claim that.
"""

from __future__ import annotations

import hmac
import os

from starlette.types import Scope

from .asgi import header
from .canary import CANARY_EXPECT_HEADER, CANARY_HEADER, CANARY_SECRET_ENV
from .metrics import CANARY_EXPECTED

SECRET_HEADER = CANARY_HEADER.lower().encode()
EXPECT_HEADER = CANARY_EXPECT_HEADER.lower().encode()


class CanaryCheck:
    def __init__(self, secret: bytes):
        self.secret = secret

    @classmethod
    def from_environment(cls) -> CanaryCheck:
        return cls(os.environ.get(CANARY_SECRET_ENV, "").encode())

    def expectation(self, scope: Scope) -> str | None:
        """The expected behaviour of a canary request, or None for any other request."""
        given = header(scope, SECRET_HEADER, lower=False)
        if not (self.secret and given and hmac.compare_digest(given, self.secret)):
            return None
        expected = header(scope, EXPECT_HEADER).decode("latin-1")
        return expected if expected in CANARY_EXPECTED else None
