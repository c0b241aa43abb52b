"""``python -m bench layer``: the layer's own CPU per request, without an engine or a socket.

Through a real server, the layer's cost (≈ 0.5 ms of API-server CPU per
streamed request) is smaller than what two starts of plain vLLM differ by on
these 2 cores, and a profiler attached to a loaded server mostly samples
uvicorn and the event loop. Here the real middleware runs in-process, in
front of a stand-in engine (an ASGI app that reads and parses the body as
vLLM does, sends the decision report the processor would, and answers with
vLLM's event shapes: the control token first, then ``tokens - 1`` words). The
same stand-in runs alone (plain) and behind the layer, with and without
refusal fields, interleaved round by round, so the difference is the layer's
CPU and nothing else: no network, no engine, no other process. ``--profile``
prints where that CPU goes (cProfile, the layer's functions only).

It measures the layer, not vLLM: the stand-in's own cost is a lower bound of
vLLM's API server (which also tokenises, schedules and detokenises), so the
ratio here overstates the layer's share; the absolute difference is the figure.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import pstats
import re
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_plugins.params import REPORT_ADDRESS_PREFIX
from refusal_plugins.wire import encode, socket_address

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch quietly".split()
REFUSED = "(refused) "  # the stand-in answers a prompt starting so with a refusal token
PROMPT = "Explain in two sentences why the sky looks blue on a clear afternoon."


@dataclass
class Case:
    """One request shape the layer sees."""

    name: str
    stream: bool
    fields: dict[str, Any] = field(default_factory=dict)
    layer: bool = True
    prompt_words: int = 0  # words added to the prompt (≈ tokens)
    n: int = 1
    refused: bool = False  # the stand-in answers with a refusal token (every event rewritten)

    @property
    def plain(self) -> str:
        """The name of the plain case this one is measured against."""
        return _name("plain", self.stream, self.prompt_words, self.n, self.refused)


FIELDS = {"refusal_bias": {"refuse": -1.0}, "refusal_threshold": 0.6}


def _name(what: str, stream: bool, prompt_words: int = 0, n: int = 1, refused: bool = False) -> str:
    growth = (f", prompt +{prompt_words} words" if prompt_words else "") + (f", n={n}" if n > 1 else "")
    return f"{what}, {'streamed' if stream else 'not streamed'}{growth}{', refused' if refused else ''}"


def cases(prompt_words: tuple[int, ...] = (1000, 4000), n_values: tuple[int, ...] = (8,)) -> list[Case]:
    """Plain, the layer and the layer with refusal fields; a refusal; growth in prompt length and n."""
    out = []
    for stream in (False, True):
        out.append(Case(_name("plain", stream), stream, layer=False))
        out.append(Case(_name("layer", stream), stream))
        out.append(Case(_name("layer + fields", stream), stream, FIELDS))
    out.append(Case(_name("plain", True, refused=True), True, layer=False, refused=True))
    out.append(Case(_name("layer", True, refused=True), True, refused=True))
    growth = [(w, 1) for w in prompt_words] + [(0, n) for n in n_values]
    for words, n in growth:
        out.append(Case(_name("plain", True, words, n), True, layer=False, prompt_words=words, n=n))
        out.append(Case(_name("layer + fields", True, words, n), True, FIELDS, prompt_words=words, n=n))
    return out


class StandInEngine:
    """vLLM's chat route as far as the API server's share of the work goes.

    It reads and parses the body, sends the processor's decision report when
    the request asks for one, and answers with the event shapes vLLM writes
    (one JSON document per token, streamed, or one message). The first token
    is the control token, as a refusal-token model's; with the default
    ``skip_special_tokens`` (plain vLLM) its text is empty, as vLLM's.
    """

    def __init__(self, control_texts: tuple[str, str], tokens: int, width: int):
        self.control_texts = control_texts  # (respond, a refusal)
        self.tokens = tokens
        self.width = width
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def _report(self, xargs: dict[str, Any]) -> None:
        target = xargs.get("refusal_report_to")
        if isinstance(target, str) and target.startswith(REPORT_ADDRESS_PREFIX):
            probabilities = [0.9] + [0.1 / (self.width - 1)] * (self.width - 1)
            datagram = encode([(xargs["refusal_report_id"], probabilities)])
            self.sock.sendto(datagram, socket_address(target))

    async def __call__(self, scope, receive, send) -> None:
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.loads(b"".join(parts))
        self._report(body.get("vllm_xargs") or {})
        refused = body["messages"][0]["content"].startswith(REFUSED)
        first = "" if body.get("skip_special_tokens", True) else self.control_texts[refused]
        words = [first] + [" " + WORDS[i % len(WORDS)] for i in range(self.tokens - 1)]
        head = {"id": "chatcmpl-0", "created": 1764900000, "model": body.get("model")}
        choices = range(body.get("n") or 1)
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})  # fmt: skip
            events = [{**head, "object": "chat.completion.chunk", "choices": [
                {"index": c, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None}]} for c in choices]  # fmt: skip
            for i, word in enumerate(words):
                last = i == len(words) - 1
                events.extend({**head, "object": "chat.completion.chunk", "choices": [
                    {"index": c, "delta": {"content": word}, "logprobs": None,
                     "finish_reason": "length" if last else None,
                     **({"stop_reason": None} if last else {})}]} for c in choices)  # fmt: skip
            for event in events:
                data = b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        payload = json.dumps({**head, "object": "chat.completion", "choices": [
            {"index": c, "message": {"role": "assistant", "content": "".join(words)},
             "logprobs": None, "finish_reason": "length", "stop_reason": None} for c in choices],
            "usage": {"prompt_tokens": 20, "completion_tokens": self.tokens,
                      "total_tokens": 20 + self.tokens}}).encode()  # fmt: skip
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})


def control_texts(manifest) -> tuple[str, str]:
    """The manifest's ``[respond]`` text and its first refusal token's."""
    respond = next(t.text for t in manifest.tokens if t.key == "respond")
    return respond, next(t.text for t in manifest.tokens if t.key != "respond")


def _scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions",
            "headers": [(b"content-type", b"application/json")], "query_string": b""}  # fmt: skip


async def _one(app, body: bytes) -> bytes:
    """The response body ``app`` writes for one request (as a client would read it)."""
    sent = iter([{"type": "http.request", "body": body, "more_body": False}])
    parts: list[bytes] = []

    async def receive():
        try:
            return next(sent)
        except StopIteration:
            await asyncio.sleep(3600)  # a client that stays: no disconnect

    async def send(message):
        parts.append(message.get("body", b""))

    await app(_scope(), receive, send)
    return b"".join(parts)


async def _batch(app, body: bytes, requests: int, concurrency: int) -> None:
    for start in range(0, requests, concurrency):
        await asyncio.gather(*(_one(app, body) for _ in range(min(concurrency, requests - start))))


def _body(case: Case, model: str, tokens: int) -> bytes:
    prompt = (REFUSED if case.refused else "") + PROMPT + "".join(" " + WORDS[i % len(WORDS)] for i in range(case.prompt_words))
    return json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": tokens, "stream": case.stream, "n": case.n, **case.fields}).encode()  # fmt: skip


def check_work(loop: asyncio.AbstractEventLoop, apps: dict[bool, Any], bodies: dict[str, bytes],
               all_cases: list[Case], control_texts: tuple[str, ...]) -> None:  # fmt: skip
    """Each case does the work it is named after, or the figures would mean nothing.

    Behind the layer, every answer carries a ``refusal_decision`` per choice (so the
    engine's report was read and the decision judged) and no control-token text
    outside the decision itself;
    plain answers carry neither.
    """
    for case in all_cases:
        out = loop.run_until_complete(_one(apps[case.layer], bodies[case.name]))
        decisions = out.count(b'"refusal_decision"')
        expected = case.n if case.layer else 0
        text = re.sub(rb'"token":\s*"[^"]*"', b"", out)  # the decision names its token
        leaked = any(t.encode() in text for t in control_texts)
        refusals = out.count(b'"refused":true') + out.count(b'"refused": true')
        if decisions != expected or leaked or b'"error"' in out or refusals != (case.n if case.refused and case.layer else 0):
            raise RuntimeError(f"{case.name}: {decisions} decisions (expected {expected}): {out[:300]!r}")


def _cpu_per_request(run: Callable[[], None], requests: int) -> float:
    start = time.process_time()
    run()
    return (time.process_time() - start) / requests * 1e6


def measure(model_dir: Path, tokens: int = 16, requests: int = 2000, rounds: int = 5,
            concurrency: int = 64, profile: bool = False, prompt_words: tuple[int, ...] = (1000, 4000),
            n_values: tuple[int, ...] = (8,)) -> dict[str, Any]:  # fmt: skip
    """µs of CPU per request for every case, round by round (cases interleaved)."""
    import logging

    from refusal_gateway.middleware import Gateway, RefusalGatewayMiddleware
    from refusal_gateway.settings import GatewaySettings
    from refusal_plugins.vocab import RefusalManifest

    settings = GatewaySettings(model=str(model_dir))
    manifest = RefusalManifest.load(model_dir)
    gateway = Gateway(settings, manifest, model_dir=model_dir, registry=_registry())
    engine = StandInEngine(control_texts(manifest), tokens, len(manifest.tokens))
    layered = RefusalGatewayMiddleware(engine, gateway=gateway)
    logging.getLogger("refusal_gateway").setLevel(logging.INFO)  # the access log, as served
    loop = asyncio.new_event_loop()
    apps = {True: layered, False: engine}
    all_cases = cases(prompt_words, n_values)
    bodies = {c.name: _body(c, settings.model_name(), tokens) for c in all_cases}
    check_work(loop, apps, bodies, all_cases, control_texts(manifest))
    for case in all_cases:  # warm-up: first-call imports and caches
        loop.run_until_complete(_batch(apps[case.layer], bodies[case.name], min(200, requests), concurrency))
    rows: dict[str, list[float]] = {c.name: [] for c in all_cases}
    for _ in range(rounds):
        for case in all_cases:
            rows[case.name].append(_cpu_per_request(lambda c=case: loop.run_until_complete(
                _batch(apps[c.layer], bodies[c.name], requests, concurrency)), requests))  # fmt: skip
    report: dict[str, Any] = {"tokens": tokens, "requests": requests, "rounds": rounds,
                              "concurrency": concurrency, "cases": {}}  # fmt: skip
    for case in all_cases:
        values = rows[case.name]
        report["cases"][case.name] = {"median_us": statistics.median(values), "plain": case.plain,
                                      "min_us": min(values), "max_us": max(values), "rounds_us": values}  # fmt: skip
    if profile:
        report["profile"] = {}
        for case in (c for c in all_cases if c.layer and not c.prompt_words and c.n == 1):
            profiler = cProfile.Profile()
            profiler.enable()
            loop.run_until_complete(_batch(layered, bodies[case.name], requests, concurrency))
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
            stats.print_stats(25)
            report["profile"][case.name] = out.getvalue()
    loop.close()
    return report


def _registry():
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def markdown(report: dict[str, Any]) -> str:
    table = report["cases"]
    lines = [f"Layer CPU in-process ({report['tokens']} tokens, {report['requests']} requests × "
             f"{report['rounds']} rounds, concurrency {report['concurrency']}; µs of CPU per request)", "",
             "| case | median | min–max | layer's own (median − plain) |", "|---|---|---|---|"]  # fmt: skip
    for name, row in table.items():
        plain = table[row["plain"]]["median_us"]
        own = "" if name == row["plain"] else f"{row['median_us'] - plain:+.0f}"
        lines.append(f"| {name} | {row['median_us']:.0f} | {row['min_us']:.0f}–{row['max_us']:.0f} | {own} |")
    return "\n".join(lines) + "\n"
