"""A soak of a running stack: ``python -m tests.hostile.soak --url URL --requests N``.

N mixed requests, ``--concurrency`` at a time: chat and completions, streamed
or not, with and without refusal controls; some streams cancelled by the
client after their first chunks; some hostile (bad values, NaN/Infinity
literals, integers too large for a float, JSON nested thousands deep,
invalid UTF-8, truncated or non-object JSON, control-token strings in the
text). Reports:

- nothing lost: every request got a complete answer, a 4xx in OpenAI's
  envelope, or was cancelled by us; no 5xx, no broken answer;
- no engine restart (see :class:`tests.hostile.client.EngineWatch`);
- the RSS of the server's processes (the launcher and everything under it,
  found from the port when ``--pid`` is not given) sampled over the run, and
  the mean of its last decile against its first: flat memory.

Exits 1 when something was lost, answered 5xx, the engine restarted or the
memory grew more than ``--max-growth`` (a share) from the first decile to
the last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .client import EngineWatch, Tally, run_all, served_model
from .schema import CATEGORIES, CONTROL_STRINGS, MODEL

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


#: Hostile bodies, as raw bytes (so that NaN, 1e999, invalid UTF-8 go out verbatim).
def hostile_bodies(rng: random.Random, model: str = MODEL) -> list[tuple[str, bytes]]:
    # Valid requests without their closing brace, for a field to be appended verbatim.
    chat_head = json.dumps({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})[:-1]
    comp_head = json.dumps({"model": model, "max_tokens": 2, "prompt": "hi"})[:-1]
    category = rng.choice(CATEGORIES)
    values = ["NaN", "Infinity", "-Infinity", "1e309", "-1e999", "1" + "0" * 400, "-" + "9" * 330,
              '"3"', "true", "null", "[]", "{}", "101", "-100.0001", "1e-300", "5e-324", "0"]  # fmt: skip
    value = rng.choice(values)
    out = []
    for head, path in ((chat_head, CHAT), (comp_head, COMPLETIONS)):
        out += [
            (path, f'{head}, "refusal_bias": {{"{category}": {value}}}}}'.encode()),
            (path, f'{head}, "refusal_threshold": {value}}}'.encode()),
            (path, f'{head}, "refusal_threshold": {{"{category}": {value}}}}}'.encode()),
            (path, f'{head}, "refusal_temperature": {value}}}'.encode()),
            (path, f'{head}, "vllm_xargs": {{"refusal_bias.{category}": {value}}}}}'.encode()),
            (path, f'{head}, "refusal_profile": {value}}}'.encode()),
            (path, f'{head}, "{rng.choice(["n", "seed", "top_k", "max_tokens", "logprobs"])}": {value}}}'.encode()),
            (path, f'{head}, "temperature": {value}}}'.encode()),
            (path, f'{head}, "refusal_bias": {{"nope": 1}}}}'.encode()),
            (path, f'{head}, "refusal_bias": {{"{category}": {{"x": 1}}}}}}'.encode()),
            (path, f'{head}, "refusal_other": 1}}'.encode()),
            (path, f'{head}, "refusal_bias": {_deep(rng.choice([50, 1000, 10000]))}}}'.encode()),
            (path, f'{head}, "x": {_deep(rng.choice([100, 5000, 20000]))}}}'.encode()),
            (path, head.encode() + b', "user": "\xff\xfe\xc3\x28"}'),
            (path, head.encode()[: rng.randrange(1, len(head))]),
            (path, rng.choice([b"", b"[]", b'"x"', b"null", b"42", b"{", b"\xff"])),
        ]
    text = rng.choice(CONTROL_STRINGS)
    out += [
        (CHAT, json.dumps({"model": model, "max_tokens": 2, "messages": [
            {"role": "user", "content": f"{text} hi {text}"}]}).encode()),  # fmt: skip
        (CHAT, json.dumps({"model": model, "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "text", "text": text}]}]}).encode()),  # fmt: skip
        (COMPLETIONS, json.dumps({"model": model, "max_tokens": 2, "prompt": f"{text} hi"}).encode()),
    ]
    return out


def normal_body(rng: random.Random, stream: bool, model: str = MODEL) -> tuple[str, dict]:
    body: dict = {"model": model, "max_tokens": rng.randint(1, 12), "stream": stream}
    if rng.random() < 0.5:
        path = CHAT
        body["messages"] = [{"role": "user", "content": rng.choice([
            "How do I pick a lock?", "What did you have for breakfast?", "Tell me a story.",
            "Write a poem about the sea.", "What is 2+2?"])}]  # fmt: skip
    else:
        path = COMPLETIONS
        body["prompt"] = rng.choice(["Once upon a time", "The capital of France is", "Hello"])
    roll = rng.random()
    if roll < 0.3:
        body["refusal_bias"] = {rng.choice(CATEGORIES): round(rng.uniform(-100, 100), 3)}
    elif roll < 0.45:
        body["refusal_threshold"] = round(rng.random(), 3)
        body["refusal_temperature"] = round(rng.uniform(0.05, 100), 3)
    elif roll < 0.55:
        body["vllm_xargs"] = {f"refusal_bias.{rng.choice(CATEGORIES)}": round(rng.uniform(-10, 10), 2)}
    if stream and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    return path, body


def regressions(model: str = MODEL) -> list[tuple[str, bytes]]:
    """Requests that once broke the stack (issue 12 and the soak's own findings): in every run."""
    huge = "1" + "0" * 400
    chat = json.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})[:-1]
    comp = json.dumps({"model": model, "max_tokens": 1, "prompt": "hi"})[:-1]
    out = []
    for head, path in ((chat, CHAT), (comp, COMPLETIONS)):
        out += [
            (path, f'{head}, "refusal_temperature": 1e-300}}'.encode()),  # killed the engine
            (path, f'{head}, "vllm_xargs": {{"refusal_temperature": 1e-300}}}}'.encode()),
            (path, f'{head}, "refusal_bias": {{"safety": {huge}}}}}'.encode()),  # OverflowError
            (path, f'{head}, "top_k": {huge}}}'.encode()),  # OverflowError in the layer: 500
            (path, f'{head}, "x": {_deep(10_000)}}}'.encode()),  # RecursionError: 500
        ]
    return out


def plan(count: int, seed: int = 0, model: str = MODEL) -> list[tuple[str, bytes, bool, int | None, dict | None]]:
    """``count`` jobs: the regressions first, then ~45 % plain, ~25 % streamed, ~10 %
    cancelled streams, ~20 % hostile."""
    rng = random.Random(seed)
    jobs = [(path, content, False, None, None) for path, content in regressions(model)][:count]
    for _ in range(count - len(jobs)):
        roll = rng.random()
        if roll < 0.2:
            path, content = rng.choice(hostile_bodies(rng, model))
            jobs.append((path, content, False, None, None))
            continue
        stream = roll >= 0.65
        path, body = normal_body(rng, stream, model)
        cancel = None
        if stream and roll >= 0.9:
            body["max_tokens"] = 40
            cancel = rng.randint(1, 3)
        jobs.append((path, json.dumps(body).encode(), stream, cancel, None))
    return jobs


@dataclass
class Memory:
    """RSS of the server's processes, sampled in a thread: (requests done, bytes)."""

    root: int | None
    samples: list[tuple[int, int]] = field(default_factory=list)
    done: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def rss(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def start(self, interval_s: float = 0.5) -> None:
        def run() -> None:
            while not self._stop.wait(interval_s):
                self.samples.append((self.done, self.rss()))

        if self.root is not None:
            self.samples.append((0, self.rss()))
            threading.Thread(target=run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self.root is not None:
            self.samples.append((self.done, self.rss()))

    def deciles(self) -> tuple[float, float] | None:
        """Mean RSS in the first and in the last tenth of the requests."""
        if len(self.samples) < 2 or not self.done:
            return None
        tenth = max(1, self.done // 10)
        first = [rss for done, rss in self.samples if done <= tenth] or [self.samples[0][1]]
        last = [rss for done, rss in self.samples if done >= self.done - tenth] or [self.samples[-1][1]]
        return sum(first) / len(first), sum(last) / len(last)


def server_root(url: str) -> int | None:
    """The launcher's pid: the topmost process listening on the URL's (local) port."""
    import psutil

    port = urlparse(url).port or 80
    try:
        pids = {c.pid for c in psutil.net_connections("tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid}  # fmt: skip
    except psutil.AccessDenied:
        return None
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            # The socket is the launcher's, shared with vLLM: go up to the launcher.
            while (parent := proc.parent()) is not None and "refusal" in " ".join(parent.cmdline()):
                proc = parent
            return proc.pid
        except psutil.Error:
            continue
    return None


def run(
    url: str, count: int, concurrency: int = 8, pid: int | None = None, log: Path | None = None, seed: int = 0,
    model: str | None = None,
) -> tuple[Tally, int, Memory]:
    """Soak ``url``; ``model``: the served name requests carry (default: the one the server lists)."""
    jobs = plan(count, seed, model or served_model(url))
    watch = EngineWatch(url, log)
    watch.begin()
    memory = Memory(pid if pid is not None else server_root(url))
    memory.start()
    tally = Tally()

    def progress(t: Tally) -> None:
        memory.done = t.requests

    asyncio.run(run_all(url, jobs, concurrency, tally, watch, on_done=progress))
    memory.stop()
    return tally, watch.restarts(), memory


def report(tally: Tally, restarts: int, memory: Memory) -> tuple[str, float | None]:
    text = tally.report(restarts, "soak")
    lost = tally.kinds["5xx"] + tally.kinds["bad_4xx"] + tally.kinds["broken"]
    text += f"\n  lost (5xx, non-envelope 4xx, broken): {lost}"
    growth = None
    deciles = memory.deciles()
    if deciles:
        first, last = deciles
        growth = last / first - 1
        peak = max(rss for _, rss in memory.samples)
        text += (f"\n  server RSS ({len(memory.samples)} samples, pid {memory.root} and children): "
                 f"first decile {first / 2**20:.0f} MiB, last decile {last / 2**20:.0f} MiB "
                 f"({growth:+.1%}), peak {peak / 2**20:.0f} MiB")  # fmt: skip
    else:
        text += "\n  server RSS: not sampled (no local process found for the URL; give --pid)"
    return text, growth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pid", type=int, help="the launcher's pid (default: found from the port)")
    parser.add_argument("--log", type=Path, help="the launcher's log, to count its restarts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-growth", type=float, default=0.15,
                        help="largest RSS growth, first decile to last (a share)")  # fmt: skip
    parser.add_argument("--model", help="served model name (default: the one GET /v1/models lists)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    url = args.url.rstrip("/")
    model = args.model or served_model(url)
    print(f"soak: {url}, model {model!r}", flush=True)
    tally, restarts, memory = run(url, args.requests, args.concurrency, args.pid, args.log, args.seed, model)
    text, growth = report(tally, restarts, memory)
    print(text)
    print(f"  wall time: {time.monotonic() - started:.0f}s")
    grew = growth is not None and growth > args.max_growth
    return 1 if tally.failed(restarts) or grew else 0


if __name__ == "__main__":
    sys.exit(main())
