"""A LiteLLM proxy pre-call hook doing what our gateway layer does before vLLM sees a request.

Runs inside the LiteLLM proxy (its own venv, ``.venv-bench``), so it imports
nothing of this project: it checks the refusal fields (categories, finite
numbers in range, known profile, no other ``refusal_*`` field: 400 otherwise),
merges the profile, defuses control-token strings in every message, and hands
the settings to vLLM as flat ``vllm_xargs`` in ``extra_body`` — the work of
``refusal_gateway.refusal``/``policy`` for a chat request, written again for a
proxy. Behind it runs plain vLLM: no processor reads those settings, so this
peer measures the cost of a gateway *process* doing the validation, not the
refusal decision itself.
"""

from __future__ import annotations

import json
import math
import os

from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

CONTROL_TOKENS = json.loads(os.environ.get("BENCH_CONTROL_TOKENS", "[]"))
CATEGORIES = set(json.loads(os.environ.get("BENCH_CATEGORIES", "[]"))) | {"refuse"}
PROFILES = json.loads(os.environ.get("BENCH_PROFILES", "{}"))
FIELDS = {"refusal_bias", "refusal_threshold", "refusal_temperature", "refusal_profile"}
#: vLLM request fields LiteLLM does not know: sent on in extra_body.
PASS_THROUGH = ("ignore_eos", "vllm_xargs", "skip_special_tokens", "return_token_ids")
WORD_JOINER = "\u2060"


def _bad(param: str, message: str) -> HTTPException:
    return HTTPException(status_code=400, detail={
        "error": {"message": message, "type": "invalid_request_error", "param": param,
                  "code": "invalid_refusal_field"}})  # fmt: skip


def _number(value, param: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(param, "must be a number")
    value = float(value)
    if not math.isfinite(value) or value > high or value < low or (low_open and value <= low):
        raise _bad(param, f"must be in [{low}, {high}]")
    return value


def _bias(value, param: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _bad(param, "must be an object")
    out = {}
    for key, v in value.items():
        if key not in CATEGORIES:
            raise _bad(f"{param}.{key}", "unknown category")
        out[key] = _number(v, f"{param}.{key}", -100.0, 100.0)
    return out


def _threshold(value, param: str) -> dict[str, float]:
    if not isinstance(value, dict):
        return {"refuse": _number(value, param, 0.0, 1.0)}
    out = {}
    for key, v in value.items():
        if key not in CATEGORIES:
            raise _bad(f"{param}.{key}", "unknown category")
        out[key] = _number(v, f"{param}.{key}", 0.0, 1.0)
    return out


def _defuse(text: str) -> str:
    for token in CONTROL_TOKENS:
        if token in text:
            text = text.replace(token, token[0] + WORD_JOINER + token[1:])
    return text


def _defuse_messages(messages) -> None:
    for message in messages or []:
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = _defuse(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = _defuse(part["text"])


class RefusalHook(CustomLogger):
    async def async_pre_call_hook(self, user_api_key_dict, cache, data: dict, call_type):
        unknown = [k for k in data if k.startswith("refusal_") and k not in FIELDS]
        if unknown:
            raise _bad(unknown[0], "unknown refusal field")
        settings: dict[str, float] = {}
        profile = data.pop("refusal_profile", None)
        if profile is not None:
            if not isinstance(profile, str) or profile not in PROFILES:
                raise _bad("refusal_profile", "unknown profile")
            base = PROFILES[profile]
            for key, v in _bias(base.get("refusal_bias", {}), "profile").items():
                settings[f"refusal_bias.{key}"] = v
            if "refusal_threshold" in base:
                for key, v in _threshold(base["refusal_threshold"], "profile").items():
                    settings[f"refusal_threshold.{key}"] = v
        if "refusal_bias" in data:
            for key, v in _bias(data.pop("refusal_bias"), "refusal_bias").items():
                settings[f"refusal_bias.{key}"] = settings.get(f"refusal_bias.{key}", 0.0) + v
        if "refusal_threshold" in data:
            for key, v in _threshold(data.pop("refusal_threshold"), "refusal_threshold").items():
                settings[f"refusal_threshold.{key}"] = v
        if "refusal_temperature" in data:
            settings["refusal_temperature"] = _number(
                data.pop("refusal_temperature"), "refusal_temperature", 0.01, 100.0)
        _defuse_messages(data.get("messages"))
        extra = dict(data.get("extra_body") or {})
        for key in PASS_THROUGH:
            if key in data:
                extra[key] = data.pop(key)
        if settings:
            extra["vllm_xargs"] = {**extra.get("vllm_xargs", {}), **settings}
        if extra:
            data["extra_body"] = extra
        return data


handler = RefusalHook()
