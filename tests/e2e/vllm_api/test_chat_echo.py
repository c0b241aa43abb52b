# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM (Apache-2.0, copyright contributors to the vLLM project):
#   tests/entrypoints/openai/basic/test_chat_echo.py
# Each case runs against a URL (plain vLLM and the stack, see conftest.py) on the demo
# model. Adapted: max_completion_tokens is capped (upstream generates to the model's limit).
# test_prompt_logprobs and test_top_logprobs send -1 ("the whole vocabulary"): vLLM 0.32
# checks that against the server's --max-logprobs (default 20) and answers 400 on plain vLLM
# too, so they are xfail on both (newer upstream accepts it).
"""vLLM chat ``echo`` / ``continue_final_message`` and logprob cases."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

BEIJING = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Beijing is the capital of which country?"},
]


# upstream: test_chat_session_with_echo_and_continue_final_message
@pytest.mark.parametrize("echo", [True, False], ids=["echo", "no_echo"])
def test_chat_session_with_echo_and_continue_final_message(client, target, echo):
    saying = "Here is a common saying about apple. An apple a day, keeps"
    chat_completion = client.chat.completions.create(
        model=target.model,
        messages=[
            {"role": "user", "content": "tell me a common saying"},
            {"role": "assistant", "content": saying},
        ],
        max_completion_tokens=20,
        extra_body={"echo": echo, "continue_final_message": True, "add_generation_prompt": False},
    )
    assert chat_completion.id is not None
    assert len(chat_completion.choices) == 1
    choice = chat_completion.choices[0]
    assert choice.finish_reason in ["stop", "length"]
    message = choice.message
    if echo:
        assert message.content is not None and saying in message.content
    else:
        assert message.content is not None and saying not in message.content
    assert message.role == "assistant"


XFAIL_MINUS_ONE = pytest.mark.xfail(
    strict=False,
    reason="plain vLLM 0.32 fails it too: -1 means the whole vocabulary (4102), over the "
    "default --max-logprobs 20 (400 'greater than max allowed: 20')",
)


# upstream: test_prompt_logprobs
@XFAIL_MINUS_ONE
def test_prompt_logprobs(client, target):
    completion = client.chat.completions.create(
        model=target.model, messages=BEIJING, max_completion_tokens=5,
        extra_body={"prompt_logprobs": -1},
    )  # fmt: skip
    assert completion.prompt_logprobs is not None
    assert len(completion.prompt_logprobs) > 0


# upstream: test_top_logprobs
@XFAIL_MINUS_ONE
def test_top_logprobs(client, target):
    completion = client.chat.completions.create(
        model=target.model, messages=BEIJING, max_completion_tokens=5,
        extra_body={"top_logprobs": -1, "logprobs": "true"},
    )  # fmt: skip
    assert completion.choices[0].logprobs is not None
    assert completion.choices[0].logprobs.content is not None
    assert len(completion.choices[0].logprobs.content) > 0
