"""Which top-level request fields reach vLLM, in which JSON types: default deny.

vLLM's request models drop unknown fields silently and coerce lax types
(``"n": "2"`` and ``"n": 4.0`` both become 2). Either would let a request
mean something other than what the layer planned for — ``n`` decides how many
choices the layer watches for a control token — so every top-level field has
a decision here:

* passed on, after a strict JSON type check derived from vLLM's own field
  annotation (an ``int`` field takes only JSON integers, a ``float`` field
  only numbers, a ``bool`` field only ``true``/``false``);
* checked by the layer (:mod:`refusal_gateway.protocol` reads them);
* refused with a reason (a 400 naming the field).

A field vLLM knows but this table does not (a vLLM upgrade added it) is
refused until someone decides about it; ``tests/unit/test_fields.py`` fails
on such a field, so the upgrade cannot open a hole silently.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from .errors import bad_request

Kind = Literal["chat", "completion"]
JsonType = Literal["integer", "number", "boolean", "string", "integers"]

#: Fields refused outright, with the reason the client reads.
REFUSED: dict[str, str] = {
    "chat_template": "a request may not bring its own chat template (it could spell control "
    "tokens); the server's template is used",
    "prompt_embeds": "prompt embeddings bypass the checks on prompt text",
    "use_beam_search": "beam search runs requests of its own that skip the refusal decision",
    "kv_transfer_params": "set by the serving system (disaggregated prefill), not by clients",
    "ec_transfer_params": "set by the serving system (encoder cache transfer), not by clients",
    "return_token_offsets": "token offsets would count the hidden control token",
}
#: Fields refused only when true-ish (false/null are the default and harmless).
REFUSED_WHEN_SET = frozenset({"use_beam_search", "return_token_offsets", "prompt_embeds"})

#: Fields the layer reads or rewrites itself (see protocol.py).
CHECKED = frozenset({
    "messages", "prompt", "n", "stream", "echo", "logprobs", "top_logprobs", "prompt_logprobs",
    "return_token_ids", "return_tokens_as_token_ids", "skip_special_tokens", "vllm_xargs",
    "logit_bias", "allowed_token_ids", "stop_token_ids", "logprob_token_ids", "bad_words",
    "response_format", "structured_outputs", "model",
})  # fmt: skip

#: Fields passed on to vLLM as they are, after the strict type check.
PASSED = frozenset({
    # OpenAI's own sampling and output fields
    "frequency_penalty", "presence_penalty", "max_tokens", "max_completion_tokens", "seed",
    "stop", "stream_options", "temperature", "top_p", "user", "tools", "tool_choice",
    "parallel_tool_calls", "suffix", "reasoning_effort", "include_reasoning",
    # vLLM's sampling extensions
    "top_k", "min_p", "repetition_penalty", "length_penalty", "min_tokens", "ignore_eos",
    "include_stop_str_in_output", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "truncation_side", "add_special_tokens", "add_generation_prompt", "continue_final_message",
    "chat_template_kwargs", "documents", "mm_processor_kwargs", "media_io_kwargs",
    "mm_payload", "return_mm_kwargs", "return_prompt_text", "priority", "request_id",
    "session_id", "cache_salt", "stream_interval", "watermarking", "repetition_detection",
    "thinking_token_budget", "routed_experts_prompt_start",
})  # fmt: skip

#: Chat fields the chat template never renders: the tokenizer's special tokens
#: in them are the client's intent (``stop: ["<|im_end|>"]``), so only control
#: tokens are defused there; everywhere else they are text (:mod:`.refusal`).
UNRENDERED = frozenset({"model", "stop", "bad_words", "response_format", "structured_outputs"})

#: Our own top-level fields (taken out before vLLM sees the body).
OWN = frozenset({"refusal_bias", "refusal_threshold", "refusal_temperature", "refusal_profile"})

DECIDED = frozenset(REFUSED) | CHECKED | PASSED


@dataclass(frozen=True)
class FieldRule:
    name: str
    json_type: JsonType | None  # None: a structured value vLLM validates itself
    nullable: bool
    #: vLLM bounds this number itself (``ge``/``le``): its own 400 names the bound.
    bounded: bool = False


def _json_type(annotation: Any) -> tuple[JsonType | None, bool]:
    """The strict JSON type of a pydantic annotation, and whether null is allowed."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _json_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            json_type, _ = _json_type(rest[0])
            return json_type, len(rest) < len(args)
        return None, type(None) in args
    if annotation is bool:
        return "boolean", False
    if annotation is int:
        return "integer", False
    if annotation is float:
        return "number", False
    if annotation is str:
        return "string", False
    if origin is list and typing.get_args(annotation) == (int,):
        return "integers", False
    return None, False


def _vllm_models() -> dict[Kind, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"chat": ChatCompletionRequest, "completion": CompletionRequest}


@cache
def field_rules(kind: Kind) -> dict[str, FieldRule]:
    """Every field vLLM's request model of ``kind`` has, with its strict JSON type."""
    model = _vllm_models()[kind]
    rules = {}
    for name, info in model.model_fields.items():
        json_type, nullable = _json_type(info.annotation)
        bounded = any(hasattr(m, "ge") or hasattr(m, "le") for m in info.metadata)
        rules[info.alias or name] = FieldRule(name, json_type, nullable, bounded)
    return rules


#: Integers must fit the engine's 64-bit tensors (a bigger one could only overflow there).
INT64 = 2**63


def _type_ok(value: Any, json_type: JsonType, bounded: bool = False) -> bool:
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return bounded or -INT64 <= value < INT64  # vLLM's own bound answers a bounded one
    if json_type == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an integer beyond any float
            return False
    if json_type == "string":
        return isinstance(value, str)
    return isinstance(value, list) and all(_type_ok(v, "integer") for v in value)


_TYPE_WORDS = {
    "integer": "a 64-bit integer",
    "number": "a finite number",
    "boolean": "true or false",
    "string": "a string",
    "integers": "a list of integers",
}


def check_fields(body: dict[str, Any], kind: Kind) -> None:
    """400 for an unknown, undecided, refused or wrongly typed top-level field."""
    rules = field_rules(kind)
    for name, value in body.items():
        if name in OWN:
            continue
        rule = rules.get(name)
        if rule is None:
            raise bad_request(
                f"unknown field {name!r}: this server does not accept it (vLLM would ignore "
                "it silently)",
                param=name,
                code="unknown_field",
            )
        if name in REFUSED and (name not in REFUSED_WHEN_SET or value):
            raise bad_request(f"{name} is not accepted here: {REFUSED[name]}", param=name,
                              code="unsupported_field")  # fmt: skip
        if name not in DECIDED:
            raise bad_request(
                f"{name} is not accepted here yet: refusal-gateway has not reviewed this "
                "vLLM field",
                param=name,
                code="unsupported_field",
            )
        if value is None:
            if rule.nullable or rule.json_type is None:
                continue
            raise bad_request(f"{name} may not be null", param=name)
        if rule.json_type is not None and not _type_ok(value, rule.json_type, rule.bounded):
            raise bad_request(
                f"{name} must be {_TYPE_WORDS[rule.json_type]}, got {_describe(value)}",
                param=name,
                code="invalid_type",
            )


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return f"the number {value!r}" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, int):
        return "an integer"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
