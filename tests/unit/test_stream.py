"""The SSE rewriter: decisions split across chunks and bytes, refusals, n > 1."""

from __future__ import annotations

import pytest
from refusal_gateway.protocol import RequestPlan
from refusal_gateway.refusal import COMPLETION_TEXT, ControlText, Decision
from refusal_gateway.scrub import Specials
from refusal_gateway.stream import StreamRewriter
from refusal_plugins.params import RefusalParams

from .helpers import categorical_manifest, chunk, parse_sse, sse


def recorder(decisions: list[Decision]):
    def record(decision: Decision, probabilities):
        decisions.append(decision)
        return decision.to_json(probabilities)

    return record


def plan(n: int = 1, **kw) -> RequestPlan:
    return RequestPlan(stream=True, n=n, params=RefusalParams(decide=True), **kw)


def run(
    body: bytes, n: int = 1, copy: bool = False, piece: int | None = None, shape=None,
    specials=None, **kw,
):
    decisions: list[Decision] = []
    extra = {"shape": shape} if shape else {}
    rewriter = StreamRewriter(
        ControlText(categorical_manifest()), plan(n, **kw), copy, recorder(decisions),
        specials=specials, **extra,
    )
    step = piece or len(body)
    out = b"".join(rewriter.feed(body[i : i + step]) for i in range(0, len(body), step))
    out += rewriter.close()
    return parse_sse(out), decisions


def texts(events, field="content", index=0):
    return "".join(
        (c["delta"].get(field) or "")
        for e in events if isinstance(e, dict)
        for c in e["choices"] if c["index"] == index
    )


RESPOND = sse(
    chunk(0, "", role=True), chunk(0, "[res"), chunk(0, "pond]"), chunk(0, " Paris"),
    chunk(0, " is nice.", finish="stop"), "[DONE]",
)
REFUSE = sse(
    chunk(0, "", role=True), chunk(0, "[Requests with safety concerns]"), chunk(0, " I can't"),
    chunk(0, " help.", finish="stop"), "[DONE]",
)


@pytest.mark.parametrize("piece", [None, 1, 7, 64])
def test_respond_token_split_across_chunks_never_leaks(piece):
    events, decisions = run(RESPOND, piece=piece)
    assert texts(events) == " Paris is nice."  # exactly the text after the token
    assert [d.key for d in decisions] == ["respond"]
    assert events[-1] == "[DONE]"
    decided = [c for e in events if isinstance(e, dict) for c in e["choices"] if "refusal_decision" in c]
    assert decided[0]["refusal_decision"] | {"forced": None, "probabilities": None} == {
        "token": "[respond]", "category": None, "refused": False, "forced": None, "probabilities": None,
    }


@pytest.mark.parametrize("piece", [None, 3])
def test_refusal_text_moves_to_delta_refusal(piece):
    events, decisions = run(REFUSE, piece=piece)
    assert texts(events, "refusal") == " I can't help."
    assert texts(events, "content") == ""
    assert decisions[0].refused and decisions[0].key == "safety"
    events, _ = run(REFUSE, copy=True)
    assert texts(events, "content") == " I can't help."


def test_choices_are_tracked_independently():
    body = sse(
        chunk(0, "[respond]"), chunk(1, "[Humanizing"), chunk(0, " Yes"), chunk(1, " requests] I"),
        chunk(1, " am an AI.", finish="stop"), chunk(0, ".", finish="stop"), "[DONE]",
    )
    events, decisions = run(body, n=2)
    assert texts(events, "content", 0) == " Yes."
    assert texts(events, "refusal", 1) == " I am an AI."
    assert sorted(d.key for d in decisions) == ["humanizing", "respond"]


def test_stream_ending_before_a_token_completes_still_decides():
    events, decisions = run(sse(chunk(0, "[resp", finish="length"), "[DONE]"))
    assert decisions[0].key == "none"
    assert texts(events) == "[resp"


def test_passthrough_after_all_choices_respond_keeps_bytes():
    tail = b'data: {"not": "parsed", "choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
    decisions: list[Decision] = []
    rewriter = StreamRewriter(ControlText(categorical_manifest()), plan(), False, recorder(decisions))
    rewriter.feed(sse(chunk(0, "[respond] hi")))
    assert rewriter.feed(tail) == tail


def test_echo_passes_the_prompt_and_reads_the_decision_after_it():
    body = sse(
        chunk(0, "", role=True), chunk(0, "Once upon a time ["), chunk(0, "there"),
        chunk(0, "[Requests with safety"), chunk(0, " concerns] No.", finish="stop"), "[DONE]",
    )
    for piece in (None, 5):
        events, decisions = run(body, piece=piece, echo=True)
        assert [d.key for d in decisions] == ["safety"]
        assert texts(events, "content") == "Once upon a time [there"
        assert texts(events, "refusal") == " No."


def test_logprobs_alternatives_lose_control_tokens_in_every_event():
    late = chunk(0, " b")
    late["choices"][0]["logprobs"] = {"content": [{"token": " b", "logprob": -0.1, "top_logprobs": [
        {"token": "[respond]", "logprob": -3.7}, {"token": " b", "logprob": -0.1}]}]}
    events, _ = run(sse(chunk(0, "[respond] a"), late, "[DONE]"), logprobs=True)
    tops = events[1]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["token"] for t in tops] == [" b"]


def test_token_ids_lose_the_control_id_and_specials_are_hidden_on_request():
    first = chunk(0, "[respond] hi")
    first["choices"][0]["token_ids"] = [100, 7, 8]  # 100: [respond] in the test manifest
    end = chunk(0, "<|end|>", finish="stop")
    end["choices"][0]["token_ids"] = [1]
    body = sse(first, end, "[DONE]")
    events, _ = run(body, specials=Specials(["<|end|>"]))
    assert events[0]["choices"][0]["token_ids"] == [7, 8]
    assert texts(events) == " hi"
    events, _ = run(body, specials=Specials(["<|end|>"]), skip_special=False)
    assert texts(events) == " hi<|end|>"


def test_text_completions_stream_with_several_prompts():
    def text_chunk(index, text, finish=None):
        return {"choices": [{"index": index, "text": text, "finish_reason": finish}]}

    body = sse(text_chunk(0, "[respond] a"), text_chunk(1, "[Humanizing requests] b"),
               text_chunk(1, "c", "stop"), text_chunk(0, "d", "stop"), "[DONE]")
    events, decisions = run(body, n=2, shape=COMPLETION_TEXT)
    got = {i: "".join(c["text"] for e in events if isinstance(e, dict) for c in e["choices"]
                      if c["index"] == i) for i in (0, 1)}
    assert got == {0: " ad", 1: " bc"}
    assert sorted(d.key for d in decisions) == ["humanizing", "respond"]
