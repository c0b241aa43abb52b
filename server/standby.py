"""The launcher's listening socket, and the 503 answers given on it while vLLM is down.

The launcher binds the public port once and hands the listening socket to
every vLLM process it starts (:mod:`refusal_gateway.vllm_entry`), so the port
never closes: while vLLM is loading, restarting after a crash or waiting out
the back-off, :class:`Standby` accepts on the same socket and answers every
request with 503 in OpenAI's error envelope and ``Retry-After``, instead of a
refused connection. Once vLLM's server is about to accept (the layer creates
the serving file, :data:`~refusal_gateway.settings.SERVING_FILE_ENV`, as the
app's startup completes) or the launcher has seen it healthy, the standby stops
accepting and vLLM's own server is the only one taking connections. Nothing here is on the
request path of a healthy server.

``GET /metrics`` is the one exception to the 503: with :class:`LauncherMetrics`
the standby answers it with 200 and the launcher's own series (engine state,
restarts, these 503s by reason), so Prometheus keeps scraping a replica that is
loading or restarting (``up == 1``, ``refusal_gateway_engine_up == 0``) and
``up == 0`` means the process itself is gone.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from pathlib import Path

from .errors import unavailable
from .launcher_metrics import CONTENT_TYPE, LauncherMetrics

logger = logging.getLogger(__name__)

#: The standby lets a connection wait this long before taking it, so that a
#: vLLM server that is already accepting (before the launcher has noticed it is
#: healthy) gets it first.
DEFER_S = 0.05
#: How long the standby waits for a request's head before answering anyway.
READ_TIMEOUT_S = 2.0
MAX_HEAD_BYTES = 65536


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """Bind ``host:port`` for the launcher's lifetime; inheritable by vLLM."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    # Non-blocking for both owners (the flag is shared with vLLM's copy): an
    # accept that vLLM won must not block the standby.
    sock.setblocking(False)
    return sock


def unavailable_response(message: str, retry_after_s: int) -> bytes:
    """A complete HTTP/1.1 503 with OpenAI's error envelope and Retry-After."""
    body = unavailable(message, "engine_unavailable", retry_after_s).body()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after_s}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def metrics_response(body: bytes) -> bytes:
    """A complete HTTP/1.1 200 carrying Prometheus' text exposition."""
    head = (
        "HTTP/1.1 200 OK\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def is_metrics_request(head: bytes) -> bool:
    """Whether the request line is ``GET /metrics`` (query string allowed)."""
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) < 2 or line[0] != b"GET":
        return False
    return line[1].split(b"?", 1)[0] in (b"/metrics", b"/metrics/")


class Standby:
    """Answers 503 on the shared listening socket while switched on
    (and ``GET /metrics`` with the launcher's series when given them)."""

    def __init__(
        self,
        sock: socket.socket,
        retry_after_s: int,
        metrics: LauncherMetrics | None = None,
        serving_file: Path | None = None,
    ):
        self._sock = sock
        self._serving_file = serving_file
        self._retry_after_s = retry_after_s
        self._metrics = metrics
        self._on = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._message = "The model server is starting; retry shortly."
        self._thread = threading.Thread(target=self._run, name="standby-503", daemon=True)
        self._thread.start()

    def resume(self, message: str, reason: str = "restarting") -> None:
        """Start answering 503 with ``message`` (vLLM is not serving).

        ``reason`` is the engine state (``starting``, ``restarting``,
        ``stopping``): the launcher metrics record it, and the 503s are counted
        under it.
        """
        with self._lock:
            self._message = message
        if self._serving_file is not None:
            self._serving_file.unlink(missing_ok=True)  # the vLLM that made it is gone
        if self._metrics is not None:
            self._metrics.set_state(reason)
        self._on.set()

    def pause(self) -> None:
        """Stop accepting: vLLM's server takes every connection from now on."""
        self._on.clear()

    @property
    def answering(self) -> bool:
        """Whether the standby is taking connections (and answering 503) now."""
        return self._on.is_set()

    def _vllm_accepting(self) -> bool:
        """vLLM's server has started (or is starting) to accept: leave connections to it."""
        if self._serving_file is None or not self._serving_file.exists():
            return False
        self.pause()
        return True

    def close(self) -> None:
        self._closed.set()
        self._on.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            while not self._closed.is_set():
                if not self._on.wait(timeout=0.5):
                    continue
                if self._closed.is_set():
                    return
                if not selector.select(timeout=0.2):
                    continue
                self._closed.wait(DEFER_S)
                self._accept_pending()

    def _accept_pending(self) -> None:
        while self._on.is_set() and not self._closed.is_set():
            if self._vllm_accepting():
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # nothing left, or vLLM (sharing the socket) took it
            except OSError:
                if not self._closed.is_set():
                    logger.exception("standby accept failed")
                return
            with self._lock:
                message = self._message
            threading.Thread(target=self._answer, args=(conn, message), daemon=True).start()

    def _answer(self, conn: socket.socket, message: str) -> None:
        with conn:
            try:
                conn.setblocking(True)
                conn.settimeout(READ_TIMEOUT_S)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
                if self._metrics is not None and is_metrics_request(head):
                    conn.sendall(metrics_response(self._metrics.exposition()))
                    conn.shutdown(socket.SHUT_WR)
                else:
                    conn.sendall(unavailable_response(message, self._retry_after_s))
                    conn.shutdown(socket.SHUT_WR)
                    if self._metrics is not None:
                        self._metrics.standby_answered()
                # Drain what the client still sends (its body) so closing does not reset.
                while conn.recv(65536):
                    pass
            except OSError:
                pass
