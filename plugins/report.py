"""Decision reports: the model's own control-token probabilities, sent to the gateway.

The gateway needs, for every request, what the model itself wanted at the
decision step (to say whether bias or threshold *forced* the emitted token, and
to export the refusal-probability histogram). Asking vLLM for logprobs on every
request would do it, but vLLM then builds logprob objects for every generated
token (measured: ~25-30 % fewer streamed tokens/s here). The processor already
holds the logits of the decision step, so it sends the K probabilities once per
request instead: one small datagram per decision step to the abstract Unix
socket named in the request (``refusal_report_to``), keyed by
``refusal_report_id``. Engine and gateway run in one container or pod; when
they do not, the datagram is dropped and the gateway reports ``unknown``.

Sending never blocks the engine: the socket is non-blocking, a full or missing
receiver drops the report. On an accelerator the probabilities are copied to
pinned host memory without a sync and sent by a background thread once the
copy has landed, so no decoding step waits for it.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections import defaultdict
from collections.abc import Sequence

import torch

from .wire import encode, socket_address

logger = logging.getLogger(__name__)

#: A report: destination address and id, one per decision row.
Target = tuple[str, str]


def control_probabilities(
    logits: torch.Tensor, rows: torch.Tensor, ctrl_ids: torch.Tensor
) -> torch.Tensor:
    """[n, K] softmax(logits)[ctrl] of ``rows`` over the whole vocabulary (T = 1).

    Called before bias or threshold touch the logits: the model's own view.
    """
    selected = logits.index_select(0, rows)
    lse = torch.logsumexp(selected, dim=1, keepdim=True)
    return (selected.index_select(1, ctrl_ids) - lse).exp_()


class DecisionReporter:
    """Sends decision reports from inside the engine; never raises into vLLM."""

    def __init__(self, device: torch.device | str = "cpu"):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._asynchronous = torch.device(device).type != "cpu"
        self._queue: queue.SimpleQueue | None = None
        self._warned: set[str] = set()
        self.sent = 0
        self.dropped = 0

    def send(self, targets: Sequence[Target], probabilities: torch.Tensor) -> None:
        """Report ``probabilities`` [n, K] for the rows whose targets are given."""
        if not self._asynchronous:
            self._deliver(targets, probabilities.tolist())
            return
        host = torch.empty(probabilities.shape, dtype=probabilities.dtype, pin_memory=True)
        host.copy_(probabilities, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        if self._queue is None:
            self._queue = queue.SimpleQueue()
            threading.Thread(target=self._drain, name="refusal-reports", daemon=True).start()
        self._queue.put((event, host, list(targets)))

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            event, host, targets = self._queue.get()
            try:
                event.synchronize()
                self._deliver(targets, host.tolist())
            except Exception:  # a report is never worth an engine crash
                logger.exception("refusal decision report failed")

    def _deliver(self, targets: Sequence[Target], rows: list[list[float]]) -> None:
        by_address: dict[str, list[tuple[str, list[float]]]] = defaultdict(list)
        for (address, report_id), probs in zip(targets, rows, strict=True):
            by_address[address].append((report_id, probs))
        for address, entries in by_address.items():
            try:
                self._sock.sendto(encode(entries), socket_address(address))
                self.sent += len(entries)
            except OSError as e:  # no receiver (other host), full buffer: drop it
                self.dropped += len(entries)
                if address not in self._warned:
                    self._warned.add(address)
                    logger.warning("refusal decision reports to %s dropped: %s", address, e)
