"""The request schemas the fuzzer generates from: vLLM's own, plus the refusal fields.

The stack's own ``/openapi.json`` is closed, so the OpenAPI document comes
either from a plain vLLM server (``--schema-url http://127.0.0.1:PORT/openapi.json``)
or from vLLM's FastAPI app built in-process (the same vLLM as the stack, no
engine needed). Of that document the fuzzer keeps ``POST /v1/chat/completions``
and ``POST /v1/completions`` and changes their request schemas so a run stays
quick and local on a CPU engine:

- generation is bounded (``max_tokens`` required, 0..4; ``n`` 1..3; ...);
- the fields that fetch URLs or load media/tensors (multimodal parts, tools,
  KV-transfer parameters) are left out, and messages are text messages whose
  content may carry control-token strings and the content-part types that
  are not plain text;
- the refusal fields are added: ``refusal_bias`` (category -> number in
  [-100, 100]), ``refusal_threshold`` (number in [0, 1] or per category),
  ``refusal_temperature`` (number in (0, 100]), ``refusal_profile`` (string),
  and the same as flat ``vllm_xargs``.

Everything else is vLLM's schema as vLLM declares it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx

#: The demo model's served name: vLLM's in-process app is built with it; runs against
#: a server use the name it serves (:func:`tests.hostile.client.served_model`).
MODEL = "refusal-demo"
CATEGORIES = ("refuse", "humanizing", "incomplete", "indeterminate", "safety", "unsupported")
CONTROL_STRINGS = (
    "[respond]", "[refuse]", "[Humanizing requests]", "[Incomplete requests]",
    "[Indeterminate requests]", "[Requests with safety concerns]", "[Unsupported requests]",
)  # fmt: skip
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
MAX_TOKENS = 4

#: vLLM fields left out of the generated requests (network/media/tensor loading,
#: tool parsing, KV transfer: not what this fuzzer is about, and slow or remote).
EXCLUDED = {
    "messages", "tools", "tool_choice", "parallel_tool_calls", "documents", "media_io_kwargs",
    "mm_processor_kwargs", "kv_transfer_params", "ec_transfer_params", "structured_outputs",
    "response_format", "prompt", "prompt_embeds", "mm_payload", "return_mm_kwargs",
    "routed_experts_prompt_start", "vllm_xargs", "repetition_detection",
}  # fmt: skip

_number = {"type": "number"}
_bias = {"type": "number", "minimum": -100, "maximum": 100}
_prob = {"type": "number", "minimum": 0, "maximum": 1}


def refusal_fields() -> dict[str, Any]:
    per_category = lambda value: {  # noqa: E731
        "type": "object",
        "properties": {c: value for c in CATEGORIES},
        "additionalProperties": False,
    }
    xargs = {f"refusal_bias.{c}": _bias for c in CATEGORIES}
    xargs |= {f"refusal_threshold.{c}": _prob for c in CATEGORIES}
    xargs |= {"refusal_threshold": _prob, "refusal_temperature": {
        "type": "number", "exclusiveMinimum": 0, "maximum": 100}}
    return {
        "refusal_bias": per_category(_bias),
        "refusal_threshold": {"anyOf": [_prob, per_category(_prob)]},
        "refusal_temperature": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
        "refusal_profile": {"type": "string", "maxLength": 40},
        "vllm_xargs": {"type": "object", "properties": xargs, "additionalProperties": False},
    }


def _text() -> dict[str, Any]:
    return {"anyOf": [{"type": "string", "maxLength": 200}, {"enum": [
        "How do I pick a lock?", "What did you have for breakfast?", "Hi!",
        *CONTROL_STRINGS, "[respond] fine", "<|end|>", "<|assistant|>",
    ]}]}  # fmt: skip


def _message() -> dict[str, Any]:
    part = {"anyOf": [
        {"type": "object", "properties": {"type": {"const": "text"}, "text": _text()},
         "required": ["type", "text"]},
        {"type": "object", "properties": {"type": {"const": "refusal"}, "refusal": _text()},
         "required": ["type", "refusal"]},
        {"type": "object", "properties": {"type": {"const": "thinking"}, "thinking": _text()},
         "required": ["type", "thinking"]},
    ]}  # fmt: skip
    return {
        "type": "object",
        "properties": {
            "role": {"anyOf": [
                {"enum": ["system", "developer", "user", "assistant"]},
                {"type": "string", "maxLength": 40},
            ]},  # fmt: skip
            "content": {"anyOf": [_text(), {"type": "array", "items": part, "minItems": 1, "maxItems": 3}]},
            "name": {"type": "string", "maxLength": 20},
        },
        "required": ["role", "content"],
    }


_RESPONSE_FORMATS = [
    {"type": "text"},
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
]  # fmt: skip


def _bounded(props: dict[str, Any], chat: bool, model: str) -> dict[str, Any]:
    small = lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi}  # noqa: E731
    props["max_tokens"] = small(0, MAX_TOKENS)
    props["n"] = small(1, 3)
    props["min_tokens"] = small(0, MAX_TOKENS)
    props["model"] = {"const": model}
    props["response_format"] = {"enum": _RESPONSE_FORMATS}
    props["temperature"] = {"type": "number", "minimum": 0, "maximum": 2}
    props["top_p"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    props["top_k"] = small(-1, 50)
    props["truncate_prompt_tokens"] = small(-1, 64)
    props["priority"] = small(-3, 3)
    props["thinking_token_budget"] = small(0, 8)
    props["stream_interval"] = small(1, 4)
    if chat:
        props["messages"] = {"type": "array", "items": _message(), "minItems": 1, "maxItems": 3}
        props["max_completion_tokens"] = small(0, MAX_TOKENS)
        props["top_logprobs"] = small(0, 5)
        props["chat_template_kwargs"] = {"type": "object", "properties": {
            "add_generation_prompt": {"type": "boolean"}}}  # fmt: skip
    else:
        props["prompt"] = {"anyOf": [
            _text(),
            {"type": "array", "items": _text(), "minItems": 1, "maxItems": 3},
            {"type": "array", "items": small(0, 5000), "minItems": 1, "maxItems": 16},
        ]}  # fmt: skip
        props["logprobs"] = small(0, 5)
        props["suffix"] = {"type": "string", "maxLength": 20}
    return props


def vllm_openapi(schema_url: str | None = None) -> dict[str, Any]:
    """vLLM's OpenAPI document: from a plain vLLM server, or its app built in-process."""
    if schema_url:
        response = httpx.get(schema_url, timeout=60)
        response.raise_for_status()
        return response.json()
    import warnings

    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", MODEL])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_app(args, ("generate",)).openapi()


def fuzz_openapi(vllm_doc: dict[str, Any], model: str = MODEL) -> dict[str, Any]:
    """The document the fuzzer generates from (see the module's docstring).

    ``model`` is the served name schema-valid requests carry: with any other
    name vLLM answers 404 before the layer's checks or the engine see them.
    """
    doc = copy.deepcopy(vllm_doc)
    schemas = doc["components"]["schemas"]
    for path, name, chat in ((CHAT_PATH, "ChatCompletionRequest", True),
                             (COMPLETIONS_PATH, "CompletionRequest", False)):  # fmt: skip
        schema = schemas[name]
        props = {k: v for k, v in schema["properties"].items() if k not in EXCLUDED}
        props = _bounded(props, chat, model) | refusal_fields()
        required = ["model", "max_tokens", "messages" if chat else "prompt"]
        schemas["Fuzz" + name] = {
            "type": "object", "properties": props, "required": required,
            "additionalProperties": False,
        }  # fmt: skip
        operation = doc["paths"][path]["post"]
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Fuzz" + name}}}}  # fmt: skip
        operation.pop("parameters", None)
        operation["responses"] = {"200": {"description": "OK"}}
    doc["paths"] = {p: {"post": doc["paths"][p]["post"]} for p in (CHAT_PATH, COMPLETIONS_PATH)}
    return doc


if __name__ == "__main__":  # python -m tests.hostile.schema > fuzz-openapi.json
    print(json.dumps(fuzz_openapi(vllm_openapi()), indent=1))
