# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM (Apache-2.0, copyright contributors to the vLLM project):
#   tests/entrypoints/openai/chat_completion/test_chat_completion.py
# Each case runs against a URL (plain vLLM and the stack, see conftest.py) on the demo
# model instead of Qwen2.5-1.5B-Instruct. Adapted: the invalid-schema/regex/grammar cases send
# one short prompt ("Say hello") instead of their task prompts (the request must be
# rejected before any generation); the truncation sides run in one loop.
"""vLLM chat completions: prompt truncation and structured-output validation."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.e2e


def _rejected(client, target, structured_outputs: dict, **extra) -> None:
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.chat.completions.create(
            model=target.model, messages=[{"role": "user", "content": "Say hello"}],
            extra_body={"structured_outputs": structured_outputs, **extra},
        )  # fmt: skip


# upstream: test_chat_completion_truncation_side_controls_prompt_truncation
def test_chat_completion_truncation_side_controls_prompt_truncation(client, target):
    messages = [
        {"role": "user", "content": "Summarize how prompt truncation works in one sentence."}
    ]
    common = {"model": target.model, "messages": messages, "max_tokens": 1, "temperature": 0.0}
    full = client.chat.completions.create(**common, extra_body={"return_token_ids": True})
    full_token_ids = full.prompt_token_ids
    assert full_token_ids is not None
    assert len(full_token_ids) > 4
    for side, expected in (("right", full_token_ids[:4]), ("left", full_token_ids[-4:])):
        completion = client.chat.completions.create(
            **common,
            extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4,
                        "truncation_side": side},
        )  # fmt: skip
        assert completion.prompt_token_ids == expected, side


# upstream: test_invalid_json_schema
def test_invalid_json_schema(client, target):
    schema = {
        "$defs": {"CarType": {"enum": ["sedan", "SUV", "Truck", "Coupe"], "title": "CarType",
                              "type": "string"}},
        "properties": {
            "brand": {"title": "Brand", "type": "string"},
            "model": {"title": "Model", "type": "string"},
            "car_type": {"$ref": "#/$defs/CarType"},
            "foo": "bar",
        },
        "required": ["brand", "model", "car_type"],
        "title": "CarDescription",
        "type": "object",
    }  # fmt: skip
    _rejected(client, target, {"json": schema})


# upstream: test_invalid_regex
def test_invalid_regex(client, target):
    _rejected(client, target, {"regex": r"[.*"}, stop=["\n"])


# upstream: test_invalid_grammar
def test_invalid_grammar(client, target):
    grammar = """
        root ::= select_statementinvalidsyntax

        select_statement ::= "SELECT " column " from " table " where " condition

        column ::= "col_1 " | "col_2 "

        table ::= "table_1 " | "table_2 "

        condition ::= column "= " number

        number ::= "1 " | "2 "
    """
    _rejected(client, target, {"grammar": grammar})


# upstream: test_empty_grammar
def test_empty_grammar(client, target):
    _rejected(client, target, {"grammar": ""})
