"""The hand-over of the shared socket from the launcher's standby to vLLM's server.

The standby answers 503 while vLLM is down; the layer, inside vLLM's API
server, creates the serving file as the app's startup completes (just before
uvicorn accepts). From then on the standby must leave every connection to
vLLM: a client that saw vLLM's /health answer 200 must never get the
standby's 503 (CI once did, on the first request after start).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from refusal_gateway.middleware import announce_serving
from refusal_gateway.standby import Standby, listening_socket


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_once_the_serving_file_exists_the_standby_leaves_connections_to_vllm(
    tmp_path: Path,
) -> None:
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    serving = tmp_path / "serving"
    standby = Standby(sock, retry_after_s=3, serving_file=serving)
    try:
        standby.resume("starting", reason="starting")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as early:
            early.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
            assert early.recv(64).startswith(b"HTTP/1.1 503")  # vLLM is not up: the standby answers
        serving.touch()  # what the layer does as vLLM's app finishes starting
        with socket.create_connection(("127.0.0.1", port), timeout=5) as late:
            late.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wait_until(lambda: not standby.answering)
            # The connection waits in the backlog for vLLM (here: this test) to accept it.
            sock.setblocking(True)
            sock.settimeout(5)
            conn, _ = sock.accept()
            with conn:
                assert conn.recv(64).startswith(b"POST /v1/completions")
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            assert late.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        standby.close()
        sock.close()


def test_resuming_forgets_the_serving_file_of_the_vllm_that_died(tmp_path: Path) -> None:
    sock = listening_socket("127.0.0.1", 0)
    serving = tmp_path / "serving"
    serving.touch()
    standby = Standby(sock, retry_after_s=3, serving_file=serving)
    try:
        standby.resume("restarting")
        assert not serving.exists()
        assert standby.answering
    finally:
        standby.close()
        sock.close()


def test_the_layer_creates_the_serving_file_before_startup_completes(tmp_path: Path) -> None:
    serving = tmp_path / "serving"
    sent: list[tuple[str, bool]] = []

    async def send(message) -> None:
        sent.append((message["type"], serving.exists()))

    announcing = announce_serving(send, str(serving))
    asyncio.run(announcing({"type": "lifespan.startup.failed", "message": "x"}))
    asyncio.run(announcing({"type": "lifespan.startup.complete"}))
    assert sent == [("lifespan.startup.failed", False), ("lifespan.startup.complete", True)]
    # Outside the launcher (no file named) the lifespan's send is left as it is.
    assert announce_serving(send, None) is send
