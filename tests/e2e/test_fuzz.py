"""Schema fuzzing against the real stack: a few hundred generated requests, none may hurt it.

schemathesis generates chat and completions requests from vLLM's own request
schemas plus the refusal fields (tests/hostile/schema.py), half of them
schema-valid, half schema-violating. Every one must get a complete answer or a
4xx in OpenAI's error envelope; none may get a 5xx or a broken answer, and the
engine must still be the same, healthy process afterwards. The command
``python -m tests.hostile.fuzz --url URL --requests N`` runs thousands.
"""

from __future__ import annotations

import pytest

from tests.hostile import fuzz

from .server import Server

pytestmark = pytest.mark.e2e

REQUESTS = 300


def test_generated_requests_get_an_answer_or_an_enveloped_4xx(server: Server) -> None:
    tally, restarts = fuzz.run(server.base_url, REQUESTS, concurrency=4, log=server.log, seed=12)
    report = tally.report(restarts, "fuzz")
    print(report)
    assert tally.requests == REQUESTS, report
    assert tally.kinds["ok"] > 0 and tally.kinds["4xx"] > 0, report  # both sides were reached
    assert tally.kinds["5xx"] == 0, report
    assert tally.kinds["bad_4xx"] == 0, report
    assert tally.kinds["broken"] == 0, report
    assert restarts == 0, report
