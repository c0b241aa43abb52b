"""Run vLLM's OpenAI server on the listening socket the launcher inherited to it.

    python -m refusal_gateway.vllm_entry <vLLM's api_server arguments>

vLLM binds its port itself (``create_server_socket``, before the engine
loads). The launcher instead binds the port once for its whole life so that
it can answer 503 while vLLM is down (:mod:`refusal_gateway.standby`); this
entry point hands that socket to vLLM by replacing ``create_server_socket``
for the launcher's address, then runs vLLM's own ``__main__`` unchanged.
Without ``REFUSAL_GATEWAY_LISTEN_FD`` it is exactly vLLM's entry point.
"""

from __future__ import annotations

import logging
import os
import runpy
import socket
import sys

LISTEN_FD_ENV = "REFUSAL_GATEWAY_LISTEN_FD"
VLLM_SERVER = "vllm.entrypoints.openai.api_server"


def adopt_listening_socket(fd: int) -> None:
    """Make vLLM serve on ``fd`` (already bound and listening) for its own address."""
    from vllm.entrypoints.launchers import launcher as vllm_launcher

    inherited = socket.socket(fileno=fd)
    port = inherited.getsockname()[1]
    create = vllm_launcher.create_server_socket

    def create_server_socket(addr: tuple[str, int], *, reuse_port: bool) -> socket.socket:
        if addr[1] == port:
            return inherited
        return create(addr, reuse_port=reuse_port)

    vllm_launcher.create_server_socket = create_server_socket


def configure_logging() -> None:
    """Give the layer's loggers (``refusal_gateway.*``, the access log included) a handler.

    vLLM configures only its own ``vllm`` logger, so without this the layer's
    INFO lines (its route report, one access line per request) would be lost.
    """
    layer = logging.getLogger("refusal_gateway")
    if not layer.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        layer.addHandler(handler)
        layer.setLevel(logging.INFO)
        layer.propagate = False


def main() -> None:
    configure_logging()
    fd = os.environ.pop(LISTEN_FD_ENV, None)  # vLLM's own subprocesses must not see it
    if fd is not None:
        adopt_listening_socket(int(fd))
    sys.argv[0] = VLLM_SERVER
    runpy.run_module(VLLM_SERVER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
