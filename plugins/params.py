"""Per-request refusal settings, read from ``SamplingParams.extra_args``.

Over REST, vLLM's ``vllm_xargs`` only carries flat scalars, so the gateway
flattens ``{"refusal_bias": {"safety": 3}}`` into ``"refusal_bias.safety": 3``.
Offline users of ``vllm.LLM`` may pass the nested form; both are accepted.
Parsing and validation are one function so the frontend (``validate_params``,
which turns errors into HTTP 400) and the engine (``add_request``) can never
disagree on what a request means.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .vocab import ALL_REFUSAL_KEYS

logger = logging.getLogger(__name__)

BIAS_FIELD = "refusal_bias"
THRESHOLD_FIELD = "refusal_threshold"
TEMPERATURE_FIELD = "refusal_temperature"
#: Engine-only flag the gateway always sets: act as a refusal-token request
#: (control token first, none later) even with no bias or threshold.
DECIDE_FIELD = "refusal_decide"
#: Engine-only fields the gateway sets: where the processor sends the model's
#: own control-token probabilities at the decision step (an abstract Unix
#: socket, ``@name``) and under which id (see :mod:`refusal_plugins.report`).
REPORT_TO_FIELD = "refusal_report_to"
REPORT_ID_FIELD = "refusal_report_id"
ENGINE_FIELDS = (DECIDE_FIELD, REPORT_TO_FIELD, REPORT_ID_FIELD)
FIELDS = (BIAS_FIELD, THRESHOLD_FIELD, TEMPERATURE_FIELD, *ENGINE_FIELDS)
#: Only abstract-namespace sockets: a request can never make the engine write
#: to a path on the filesystem.
REPORT_ADDRESS_PREFIX = "@"
MAX_REPORT_FIELD_LEN = 128

BIAS_LIMIT = 100.0  # same range as OpenAI's logit_bias
#: The paper's default temperature for the thresholding softmax.
DEFAULT_TEMPERATURE = 1.0
#: Bounds of the thresholding temperature. The processor multiplies logits by
#: 1 / T in float32: below ~3e-39 that factor is not even representable (a
#: request once killed the engine that way), and far above 1 / MIN the scaled
#: logits of a real model could overflow. 0.01 sharpens the softmax a hundredfold,
#: more than any use of the rule needs.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0


class RefusalParamError(ValueError):
    """A bad refusal argument; ``param`` names it (``refusal_bias.safety``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RefusalParams:
    """The refusal controls of one request (empty means: leave it alone)."""

    bias: Mapping[str, float] = field(default_factory=dict)
    threshold: Mapping[str, float] = field(default_factory=dict)
    #: None: not given (the default applies, and a profile's own value survives a merge).
    temperature: float | None = None
    decide: bool = False
    report_to: str | None = None
    report_id: str | None = None

    @property
    def effective_temperature(self) -> float:
        return DEFAULT_TEMPERATURE if self.temperature is None else self.temperature

    @property
    def active(self) -> bool:
        return bool(self.decide or self.bias or self.threshold)


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RefusalParamError(name, f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        raise RefusalParamError(name, f"{name} must be a finite number, got a huge integer") from None
    if not math.isfinite(value):
        raise RefusalParamError(name, f"{name} must be finite, got {value}")
    if not low <= value <= high:
        raise RefusalParamError(
            name, f"{name} must be between {low:g} and {high:g}, got {value:g}"
        )
    return value


def _per_key(name: str, entries: Mapping[str, Any], low: float, high: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in entries.items():
        if key not in ALL_REFUSAL_KEYS:
            raise RefusalParamError(
                f"{name}.{key}",
                f"{name}.{key}: unknown category {key!r}; expected one of "
                f"{sorted(ALL_REFUSAL_KEYS)}",
            )
        out[key] = _number(f"{name}.{key}", value, low, high)
    return out


def _collect(extra_args: Mapping[str, Any]) -> dict[str, Any]:
    """Group flat ``field.key`` entries and nested ``field: {...}`` under each field."""
    grouped: dict[str, Any] = {}
    for raw_key, value in extra_args.items():
        if not isinstance(raw_key, str) or not raw_key.startswith("refusal_"):
            continue  # other plugins' arguments
        name, dot, sub = raw_key.partition(".")
        if name not in FIELDS:
            raise RefusalParamError(
                raw_key, f"unknown refusal argument {raw_key!r}; expected one of {list(FIELDS)}"
            )
        if name in (TEMPERATURE_FIELD, *ENGINE_FIELDS):
            if dot:
                raise RefusalParamError(raw_key, f"{name} takes a single value, not {raw_key!r}")
            grouped[name] = value
            continue
        bucket = grouped.setdefault(name, {})
        if dot:
            if sub in bucket:
                raise RefusalParamError(raw_key, f"{raw_key} given twice")
            bucket[sub] = value
        elif isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                if sub_key in bucket:
                    raise RefusalParamError(f"{name}.{sub_key}", f"{name}.{sub_key} given twice")
                bucket[str(sub_key)] = sub_value
        elif name == THRESHOLD_FIELD:
            # One number: a threshold for every refusal category.
            bucket["refuse"] = value
        else:
            raise RefusalParamError(
                name, f"{name} must be an object of category -> number, got {type(value).__name__}"
            )
    return grouped


def parse_refusal_params(extra_args: Mapping[str, Any] | None) -> RefusalParams:
    """Validate and parse refusal settings; raise :class:`RefusalParamError` naming the field."""
    if not extra_args:
        return RefusalParams()
    grouped = _collect(extra_args)
    if not grouped:
        return RefusalParams()
    bias = _per_key(BIAS_FIELD, grouped.get(BIAS_FIELD, {}), -BIAS_LIMIT, BIAS_LIMIT)
    threshold = _per_key(THRESHOLD_FIELD, grouped.get(THRESHOLD_FIELD, {}), 0.0, 1.0)
    temperature = None
    if TEMPERATURE_FIELD in grouped:
        temperature = _number(
            TEMPERATURE_FIELD, grouped[TEMPERATURE_FIELD], MIN_TEMPERATURE, MAX_TEMPERATURE
        )
    decide = False
    if DECIDE_FIELD in grouped:
        decide = grouped[DECIDE_FIELD]
        if decide not in (0, 1) or isinstance(decide, float):
            raise RefusalParamError(DECIDE_FIELD, f"{DECIDE_FIELD} must be 0, 1, true or false")
        decide = bool(decide)
    report_to = _text(REPORT_TO_FIELD, grouped.get(REPORT_TO_FIELD))
    report_id = _text(REPORT_ID_FIELD, grouped.get(REPORT_ID_FIELD))
    if report_to is not None and not report_to.startswith(REPORT_ADDRESS_PREFIX):
        raise RefusalParamError(
            REPORT_TO_FIELD,
            f"{REPORT_TO_FIELD} must be an abstract socket name starting with "
            f"{REPORT_ADDRESS_PREFIX!r}",
        )
    if (report_to is None) != (report_id is None):
        raise RefusalParamError(
            REPORT_TO_FIELD, f"{REPORT_TO_FIELD} and {REPORT_ID_FIELD} go together"
        )
    return RefusalParams(
        bias=bias,
        threshold=threshold,
        temperature=temperature,
        decide=decide,
        report_to=report_to,
        report_id=report_id,
    )


def engine_params(extra_args: Mapping[str, Any] | None) -> RefusalParams:
    """What the engine applies: the parsed settings, never an exception.

    vLLM validates every request with the processor's ``validate_params``
    before it reaches the engine, so a parse error here means that check was
    skipped (an offline caller). Raising would kill the engine and every
    request in flight; a request with settings we cannot read gets the
    model's own decision instead (control token first, nothing forced).
    """
    try:
        return parse_refusal_params(extra_args)
    except Exception:  # noqa: BLE001 - the engine must not die on one request
        logger.warning("unreadable refusal settings reached the engine; the model decides")
        return RefusalParams(decide=True)


def _text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REPORT_FIELD_LEN:
        raise RefusalParamError(
            name, f"{name} must be a string of 1 to {MAX_REPORT_FIELD_LEN} characters"
        )
    return value


def flatten_refusal_params(params: RefusalParams) -> dict[str, float | str]:
    """The ``vllm_xargs`` form of ``params`` (flat ``field.key`` scalars)."""
    flat: dict[str, float | str] = {f"{BIAS_FIELD}.{k}": v for k, v in params.bias.items()}
    flat.update({f"{THRESHOLD_FIELD}.{k}": v for k, v in params.threshold.items()})
    if params.active and params.temperature is not None:
        flat[TEMPERATURE_FIELD] = params.temperature
    if params.decide:
        flat[DECIDE_FIELD] = 1
    if params.report_to is not None and params.report_id is not None:
        flat[REPORT_TO_FIELD] = params.report_to
        flat[REPORT_ID_FIELD] = params.report_id
    return flat
