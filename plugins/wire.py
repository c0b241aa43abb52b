"""The decision-report datagram, shared by both ends (no torch, no vLLM).

The engine's processor (:mod:`refusal_plugins.report`) sends the model's own
control-token probabilities at the decision step; the gateway
(:mod:`refusal_gateway.reports`) receives them. One module defines the
address and the format, so the two ends cannot drift apart, and the gateway
imports it without pulling torch into the API server's import of the layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from .params import REPORT_ADDRESS_PREFIX

#: One report per decision row: (report id, probabilities in manifest order).
Entry = tuple[str, list[float]]


def socket_address(name: str) -> str:
    """``@name`` (what travels in a request) -> the abstract socket address."""
    if not name.startswith(REPORT_ADDRESS_PREFIX):
        raise ValueError(f"not an abstract socket name: {name!r}")
    return "\0" + name[len(REPORT_ADDRESS_PREFIX) :]


def encode(entries: Sequence[tuple[str, Sequence[float]]]) -> bytes:
    """One datagram: ``{"reports": [[id, [p_0, ..., p_K-1]], ...]}`` in manifest order."""
    clean = [[rid, [p if math.isfinite(p) else 0.0 for p in probs]] for rid, probs in entries]
    return json.dumps({"reports": clean}, separators=(",", ":")).encode()


def decode(data: bytes, width: int) -> list[Entry]:
    """The well-formed entries of one datagram with ``width`` probabilities each.

    Raises ValueError for a datagram that is not a report at all.
    """
    try:
        entries = json.loads(data)["reports"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError("malformed decision report") from e
    out: list[Entry] = []
    for entry in entries if isinstance(entries, list) else []:
        if not (isinstance(entry, list) and len(entry) == 2):
            continue
        report_id, probabilities = entry
        if isinstance(report_id, str) and isinstance(probabilities, list) and len(
            probabilities
        ) == width and all(isinstance(p, (int, float)) for p in probabilities):
            out.append((report_id, [float(p) for p in probabilities]))
    return out
