"""Where the kit caches what it builds (converted bases, built models).

The same directory the gateway's settings name (``REFUSAL_GATEWAY_CACHE_DIR``,
default ``~/.cache/refusal-gateway``): the environment variable is the
contract between the two packages, so the kit never imports the gateway's
settings (which would make the gateway and its training kit one knot).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "REFUSAL_GATEWAY_CACHE_DIR"


def cache_root(given: Path | None = None) -> Path:
    """``given``, else the environment's cache directory, else the default."""
    if given is not None:
        return given
    value = os.environ.get(CACHE_DIR_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "refusal-gateway"
