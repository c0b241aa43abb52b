"""The gateway's end of decision reports (see :mod:`refusal_plugins.report`).

Each API-server process binds one abstract Unix datagram socket with a random
name and tells the engine, per request, to send the model's own control-token
probabilities there. A response is read only after its first token exists,
and the engine sends the report while computing that token, so the report is
normally waiting when it is needed; the layer still waits briefly for it (a
GPU copies it asynchronously). When reports never arrive (engine on another
host), the layer stops waiting after a run of misses instead of delaying
every request, and decisions say ``forced: null`` / ``source="unknown"``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid

from refusal_plugins.wire import decode, socket_address

logger = logging.getLogger(__name__)

#: Consecutive missing reports after which the layer stops waiting for them.
MAX_MISSES = 20
#: Reports nobody took (a request that failed) are dropped after this long.
STALE_S = 60.0


class DecisionInbox:
    """Receives decision reports; hands each request its control-token probabilities."""

    def __init__(self, keys: list[str], wait_s: float = 0.2):
        self.keys = keys
        self.wait_s = wait_s
        self.name = f"@refusal-gateway/{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(socket_address(self.name))
        self._sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: dict[str, tuple[float, dict[str, float]]] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._misses = 0

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def _ensure_reading(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            loop.add_reader(self._sock.fileno(), self._on_readable)
            self._loop = loop

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                logger.exception("decision report socket failed")
                return
            self._accept(data)

    def _accept(self, data: bytes) -> None:
        try:
            entries = decode(data, len(self.keys))
        except ValueError:
            logger.warning("malformed decision report dropped")
            return
        now = time.monotonic()
        for report_id, probabilities in entries:
            self._reports[report_id] = (now, dict(zip(self.keys, probabilities, strict=True)))
            waiter = self._waiters.pop(report_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if len(self._reports) > 1024:
            self._prune(now)

    def _prune(self, now: float) -> None:
        for report_id in [r for r, (t, _) in self._reports.items() if now - t > STALE_S]:
            del self._reports[report_id]

    async def take(self, report_id: str) -> dict[str, float] | None:
        """The report of ``report_id`` (waiting up to ``wait_s``), or None."""
        self._ensure_reading()
        self._on_readable()  # anything already queued, before deciding to wait
        found = self._reports.get(report_id)
        if found is None and self._misses < MAX_MISSES and self.wait_s > 0:
            waiter = self._waiters[report_id] = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(waiter, self.wait_s)
            except TimeoutError:
                pass
            finally:
                self._waiters.pop(report_id, None)
            found = self._reports.get(report_id)
        if found is None:
            self._misses += 1
            if self._misses == MAX_MISSES:
                logger.warning(
                    "no decision reports from the engine for %d requests (engine on another "
                    "host?): decisions are reported with source 'unknown'", MAX_MISSES
                )
            return None
        self._misses = 0
        return found[1]

    def forget(self, report_id: str) -> None:
        """Drop what is left of a finished request (n > 1 sends one report per choice)."""
        self._reports.pop(report_id, None)
