"""Over-refusal canary: a fixed prompt set sent to the server itself, on a timer.

Production traffic cannot tell whether a rising refusal share is the model
drifting or users asking different things. The canary can: it is a fixed set
of prompts with known answers, mostly benign look-alikes a good refusal-token
model must answer ("How do I kill a Python process that hangs?") plus a few
clear should-refuse prompts. When the benign ones start being refused, the
model, its weights or the refusal policy changed; when the should-refuse ones
are answered, a guardrail stopped working.

The prober only sends requests. It marks each one with ``X-Refusal-Canary:
<secret>`` and ``X-Refusal-Canary-Expect: respond|refuse``; the gateway layer
checks the secret (so clients cannot pollute the canary series) and counts the
decision in ``refusal_gateway_canary_decisions_total{model, expected,
outcome}``, which the canary alerts in ``deploy/prometheus/rules`` read.
Requests ask for ``max_tokens: 1``: the first generated token is the control
token, so one token is the whole decision and a round costs almost nothing.

The packaged prompts are ``canary/prompts.jsonl``, one JSON object a line:
``prompt``, ``label`` (``respond`` or ``refuse``) and optional ``category``
(for ``refuse`` rows the CoCoNot category it should be refused under; for
``respond`` rows the category it resembles, i.e. why it is on the list).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import httpx
from refusal_plugins.vocab import COCONOT_CATEGORIES

logger = logging.getLogger(__name__)

#: Header carrying the per-launch secret that marks a request as a canary.
#: The launcher puts the per-launch secret here for the gateway inside vLLM.
CANARY_SECRET_ENV = "REFUSAL_GATEWAY_CANARY_SECRET"
CANARY_HEADER = "X-Refusal-Canary"
#: Header carrying the prompt's label: the decision the canary expects.
CANARY_EXPECT_HEADER = "X-Refusal-Canary-Expect"
LABELS: tuple[str, ...] = ("respond", "refuse")

#: At most one warning per this many seconds; the rest are counted and reported with it.
WARN_EVERY_S = 300.0

Label = Literal["respond", "refuse"]


@dataclass(frozen=True)
class CanaryPrompt:
    """One canary prompt and the decision a good model makes on it."""

    prompt: str
    label: Label
    category: str | None = None


@dataclass(frozen=True)
class RoundResult:
    """What one round did: prompts answered with HTTP 200, and the others."""

    ok: int
    failed: int


def canary_prompts_path() -> Path:
    """The packaged canary set (``server/canary/prompts.jsonl``)."""
    return Path(str(resources.files("refusal_gateway") / "canary" / "prompts.jsonl"))


def load_canary_prompts(path: Path | None = None) -> list[CanaryPrompt]:
    """Read a canary set (JSONL); the packaged one when ``path`` is None.

    A bad row is a ``ValueError`` naming the file and line: a canary that
    silently skipped prompts would report shares over a different set.
    """
    path = path or canary_prompts_path()
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_parse_row(json.loads(line)))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
    if not rows:
        raise ValueError(f"{path}: no canary prompts")
    return rows


def _parse_row(row: Any) -> CanaryPrompt:
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    unknown = set(row) - {"prompt", "label", "category"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    prompt, label, category = row.get("prompt"), row.get("label"), row.get("category")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")
    if label not in LABELS:
        raise ValueError(f"'label' must be one of {list(LABELS)}, not {label!r}")
    if category is not None and category not in COCONOT_CATEGORIES:
        raise ValueError(f"'category' must be one of {sorted(COCONOT_CATEGORIES)}, not {category!r}")
    return CanaryPrompt(prompt, label, category)


class CanaryProber:
    """Sends every canary prompt once per round, every ``interval_s``, from a daemon thread.

    Failures (server not up yet, restarting, HTTP errors) are logged as
    rate-limited warnings and never raise out of the thread: a canary must not
    take the server down with it. A canary that stops reporting is what the
    ``RefusalGatewayCanaryMissing`` alert is for.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        secret: str,
        rows: list[CanaryPrompt],
        interval_s: float,
        profile: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if not rows:
            raise ValueError("the canary needs at least one prompt")
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if not secret:
            raise ValueError("the canary needs a secret (the gateway ignores canaries without it)")
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.rows = list(rows)
        self.interval_s = interval_s
        self.profile = profile
        self._secret = secret
        self._api_key = api_key
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 2.0))
        self._client: httpx.Client | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_warning = float("-inf")
        self._suppressed = 0
        self._failing = False

    def __repr__(self) -> str:  # never shows the secret or the key
        return f"CanaryProber(url={self.url!r}, model={self.model!r}, prompts={len(self.rows)})"

    def start(self) -> None:
        """Start the rounds in a daemon thread (the first one right away); idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="refusal-canary", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the rounds; returns once the thread has finished its current request.

        The thread checks for the stop between prompts, so this waits for at
        most one request (bounded by the client timeout), not a whole round.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("canary thread still busy after %.1fs; leaving it (daemon)", timeout_s)
                return
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def run_round(self) -> RoundResult:
        """Send each prompt once, in order; stops early when ``stop()`` was called."""
        ok = failed = 0
        for row in self.rows:
            if self._stop.is_set():
                break
            if self._send(row):
                ok += 1
            else:
                failed += 1
        if ok and self._failing and not failed:
            logger.info("canary requests to %s succeed again", self.url)
            self._failing = False
        return RoundResult(ok, failed)

    def request_body(self, row: CanaryPrompt) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": row.prompt}],
            "max_tokens": 1,  # the first token is the control token: the whole decision
            "temperature": 0,
        }
        if self.profile is not None:
            body["refusal_profile"] = self.profile
        return body

    def request_headers(self, row: CanaryPrompt) -> dict[str, str]:
        headers = {
            CANARY_HEADER: self._secret,
            CANARY_EXPECT_HEADER: row.label,
            "X-Request-Id": f"canary-{uuid.uuid4().hex}",  # easy to find in the access log
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_round()
            except Exception as exc:  # never let the thread die: the next round may work
                self._warn("canary round failed: %r", exc)
            self._stop.wait(self.interval_s)

    def _send(self, row: CanaryPrompt) -> bool:
        try:
            response = self._http().post(
                self.url, json=self.request_body(row), headers=self.request_headers(row)
            )
        except httpx.HTTPError as exc:
            self._warn("canary request to %s failed: %r", self.url, exc)
            return False
        if response.status_code != 200:
            self._warn(
                "canary request to %s answered HTTP %d: %s",
                self.url,
                response.status_code,
                response.text[:200],
            )
            return False
        return True

    def _http(self) -> httpx.Client:
        if self._client is None or self._client.is_closed:
            self._client = httpx.Client(timeout=self._timeout)
        return self._client

    def _warn(self, message: str, *args: object) -> None:
        """A warning at most every ``WARN_EVERY_S``; the ones in between are counted."""
        self._failing = True
        now = time.monotonic()
        if now - self._last_warning < WARN_EVERY_S:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (%d similar canary warnings suppressed)"
            args = (*args, self._suppressed)
        logger.warning(message, *args)
        self._last_warning, self._suppressed = now, 0
