"""Checks of a generation request's own vLLM fields that touch the refusal decision.

Split from :mod:`.protocol` (which takes the refusal fields out and rewrites
the body) because these guard the decision from the other side: token-id
fields may not name control tokens, a grammar-constrained request is
recognised, and ``n`` is counted before the body reaches vLLM.
"""

from __future__ import annotations

from typing import Any

from .errors import bad_request
from .refusal import ControlText

#: ``response_format`` types that constrain the first token with a grammar.
STRUCTURED_FORMATS = frozenset({"json_object", "json_schema", "structural_tag"})


def check_token_ids(body: dict[str, Any], control: ControlText) -> None:
    """Token-id fields may not name control tokens (they are the model's decision)."""
    ids = control.ids
    bias = body.get("logit_bias")
    if isinstance(bias, dict):
        for key in bias:
            if _as_id(key) in ids:
                raise bad_request(
                    f"logit_bias may not name control token {key}: use refusal_bias",
                    param="logit_bias",
                )
    for name in ("stop_token_ids", "logprob_token_ids"):
        values = body.get(name)
        if isinstance(values, list) and ids.intersection(values):
            raise bad_request(f"{name} may not contain control tokens {sorted(ids)}", param=name)
    allowed = body.get("allowed_token_ids")
    if isinstance(allowed, list) and not ids.issubset(allowed):
        raise bad_request(
            "allowed_token_ids must include every control token "
            f"{sorted(ids)}: the first token is the model's decision",
            param="allowed_token_ids",
        )


def _as_id(key: Any) -> int | None:
    try:
        return int(key)
    except (TypeError, ValueError):
        return None


def is_structured(body: dict[str, Any]) -> bool:
    """Whether the request constrains its output with a grammar (JSON mode and kin)."""
    fmt = body.get("response_format")
    typed = isinstance(fmt, dict) and fmt.get("type") in STRUCTURED_FORMATS
    return typed or bool(body.get("structured_outputs"))


def choice_count(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if n < 1:  # its JSON type was checked in fields.check_fields
        raise bad_request(f"n must be at least 1, got {n}", param="n")
    return n
