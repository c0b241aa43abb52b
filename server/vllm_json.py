"""vLLM's own JSON documents (events and completions), read and written again fast.

The layer re-encodes every response event it rewrites (the ones up to each
choice's decision, every one of a refused or logprobs-carrying choice) and
every non-streamed completion. ``msgspec`` — a dependency of vLLM, so present
wherever the layer runs — does that about 8x faster than the standard
library (``python -m bench layer`` measures the layer's share). Only vLLM's
output goes through here: client request bodies keep the standard parser,
whose NaN/Infinity and huge-integer handling the 400s rely on
(:func:`refusal_gateway.gateway.parse_body`).

A document ``msgspec`` cannot read (a ``NaN`` or ``-Infinity`` literal, a lone
surrogate escape) falls back to the standard library both ways, so it comes
out as it would have before; ``msgspec`` never writes a document it did not
read. Output is compact (no spaces after separators), as vLLM's own.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class Document:
    """One parsed document and the codec that read it (which writes it again)."""

    __slots__ = ("value", "fast")

    def __init__(self, value: Any, fast: bool) -> None:
        self.value = value
        self.fast = fast

    def encode(self) -> bytes:
        if self.fast:
            try:
                return _encoder.encode(self.value)
            except (UnicodeEncodeError, OverflowError, TypeError):
                pass  # something the layer put in that msgspec cannot write: the slow path
        try:
            return json.dumps(self.value, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate: escaped, as vLLM sent it
            return json.dumps(self.value).encode()


def decode(raw: bytes) -> Document:
    """``raw`` parsed; ``ValueError`` for what is not JSON at all (as ``json.loads``)."""
    try:
        return Document(_decoder.decode(raw), True)
    except (msgspec.DecodeError, RecursionError):
        return Document(json.loads(raw), False)
