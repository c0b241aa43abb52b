"""The harness itself (no server): the stack's clients pin the ``answer`` profile."""

from __future__ import annotations

import json

import httpx

from .conftest import PROFILE, _with_profile, acceptance_violations


def _post(content: bytes, content_type: str = "application/json") -> httpx.Request:
    return httpx.Request("POST", "http://x/v1/chat/completions", content=content,
                         headers={"Content-Type": content_type})  # fmt: skip


def test_profile_added_to_json_object_bodies():
    sent = _with_profile(_post(json.dumps({"model": "m", "n": 1}).encode()))
    body = json.loads(sent.read())
    assert body == {"model": "m", "n": 1, "refusal_profile": PROFILE}
    assert int(sent.headers["content-length"]) == len(sent.read())


def test_other_bodies_sent_unchanged():
    for content in (b"[1, 2]", b"42", b"null", b"not json{{{"):
        assert _with_profile(_post(content)).read() == content
    own = json.dumps({"refusal_profile": "strict"}).encode()
    assert _with_profile(_post(own)).read() == own
    form = _post(b"a=1", "application/x-www-form-urlencoded")
    assert _with_profile(form).read() == b"a=1"
    get = httpx.Request("GET", "http://x/v1/models")
    assert _with_profile(get) is get


def test_acceptance_rule():
    results = {
        "a": {"plain": "passed", "stack": "passed"},
        "b": {"plain": "passed", "stack": "FAIL"},
        "c": {"plain": "xfail", "stack": "xfail"},
        "d": {"plain": "passed"},  # stack not run (-k plain)
        "e": {"plain": "FAIL", "stack": "FAIL"},
        "f": {"plain": "passed", "stack": "ERROR"},
    }
    assert acceptance_violations(results) == ["b", "f"]
