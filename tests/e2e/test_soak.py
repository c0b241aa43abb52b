"""The soak's smoke: 200 mixed requests (some cancelled, some hostile) against the real stack.

Nothing may be lost (each request gets a complete answer, a 4xx in OpenAI's
envelope, or is cancelled by the client), no 5xx, no engine restart. Memory
is sampled and reported but not judged on so short a run; the command
``python -m tests.hostile.soak --url URL --requests 10000`` does that.
"""

from __future__ import annotations

import pytest

from tests.hostile import soak

from .server import Server

pytestmark = pytest.mark.e2e

REQUESTS = 200


def test_mixed_and_hostile_requests_lose_nothing(server: Server) -> None:
    tally, restarts, memory = soak.run(server.base_url, REQUESTS, concurrency=8, pid=server.pid,
                                       log=server.log, seed=7)  # fmt: skip
    text, _ = soak.report(tally, restarts, memory)
    print(text)
    assert tally.requests == REQUESTS, text
    assert tally.kinds["cancelled"] > 0 and tally.kinds["4xx"] > 0 and tally.kinds["ok"] > 0, text
    assert tally.kinds["5xx"] == 0, text
    assert tally.kinds["bad_4xx"] == 0, text
    assert tally.kinds["broken"] == 0, text
    assert restarts == 0, text
