# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM (Apache-2.0, copyright contributors to the vLLM project):
#   tests/entrypoints/openai/basic/test_return_token_ids.py
# Each case runs against a URL (plain vLLM and the stack, see conftest.py) on the demo
# model. Adapted: the tool-use case sends its tools with tool_choice="none" (neither server
# runs a tool parser; the case is about token ids, not tool calls); the streaming half of
# test_comparison_with_prompt_logprobs_and_logprobs and of the emoji chat case are split
# out as their own cases, so the table shows which half fails.
"""vLLM ``return_token_ids`` cases: the ids must agree with the text."""

from __future__ import annotations

import pytest

from .common import chat_ids, without_stop

pytestmark = pytest.mark.e2e

EMOJI_PROMPT = "Complete this sentence with emojis: I love coding 🚀"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                             "description": "The unit of temperature"},
                },
                "required": ["location"],
            },
        },
    }
]  # fmt: skip
EMOJI_CHAT = [
    {"role": "system", "content": "You like to use emojis in your responses."},
    {"role": "user", "content": "Repeat after me: I love cats 🐱"},
]


# upstream: test_basic_completion_with_emoji
def test_basic_completion_with_emoji(client, target, tokenizer):
    completion = client.completions.create(
        model=target.model, prompt=EMOJI_PROMPT, max_tokens=10, temperature=0, logprobs=1,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    completion_dict = completion.model_dump()
    assert "prompt_token_ids" in completion_dict["choices"][0]
    assert isinstance(completion.choices[0].prompt_token_ids, list)
    encoded_tokens = tokenizer.encode(EMOJI_PROMPT)
    ids = completion.choices[0].prompt_token_ids
    assert any(
        ids[i : i + len(encoded_tokens)] == encoded_tokens
        for i in range(len(ids) - len(encoded_tokens) + 1)
    )
    assert completion.choices[0].token_ids is not None
    assert isinstance(completion.choices[0].token_ids, list)
    assert len(completion.choices[0].token_ids) > 0
    # Verify decoding works correctly
    decoded_text = tokenizer.decode(completion.choices[0].token_ids)
    assert decoded_text.startswith(completion.choices[0].text)

    completion_without = client.completions.create(
        model=target.model, prompt=EMOJI_PROMPT, max_tokens=10, temperature=0, logprobs=1,
        extra_body={"return_token_ids": False},
    )  # fmt: skip
    completion_without_dict = completion_without.model_dump()
    assert completion_without_dict["choices"][0].get("token_ids") is None
    assert completion_without_dict.get("prompt_token_ids") is None


# upstream: test_chat_completion_with_tool_use
def test_chat_completion_with_tool_use(client, target, tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather like in Paris?"},
    ]
    common = {"model": target.model, "messages": messages, "tools": TOOLS, "tool_choice": "none",
              "max_tokens": 100, "temperature": 0, "logprobs": True}  # fmt: skip
    response = client.chat.completions.create(**common, extra_body={"return_token_ids": True})
    assert response.choices[0].token_ids is not None
    assert isinstance(response.choices[0].token_ids, list)
    assert response.prompt_token_ids is not None
    assert isinstance(response.prompt_token_ids, list)
    prompt_text = tokenizer.decode(response.prompt_token_ids)
    assert "You are a helpful assistant" in prompt_text
    assert "What's the weather like in Paris?" in prompt_text
    response_text = tokenizer.decode(response.choices[0].token_ids)
    assert len(response_text) > 0
    assert response.choices[0].message.content is not None

    response_without = client.chat.completions.create(
        **common, extra_body={"return_token_ids": False}
    )
    assert response_without.choices[0].token_ids is None
    assert response_without.prompt_token_ids is None


# upstream: test_comparison_with_prompt_logprobs_and_logprobs (non-streaming half)
def test_comparison_with_prompt_logprobs_and_logprobs(client, target, tokenizer):
    completion = client.completions.create(
        model=target.model, prompt="Hello, world! How are you today?", max_tokens=20,
        temperature=0, echo=True, logprobs=1,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True,
                    "prompt_logprobs": 1},
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.token_ids is not None
    assert choice.prompt_token_ids is not None
    assert choice.prompt_logprobs is not None
    assert choice.logprobs is not None
    logprobs_token_ids = [
        int(t.removeprefix("token_id:"))
        for t in choice.logprobs.tokens
        if t.startswith("token_id:")
    ]
    # With echo=True the logprobs hold prompt and response tokens: token_ids is their suffix
    assert len(choice.token_ids) < len(logprobs_token_ids)
    assert logprobs_token_ids[-len(choice.token_ids) :] == choice.token_ids
    if choice.prompt_token_ids:
        assert "Hello, world" in tokenizer.decode(choice.prompt_token_ids)
    if choice.token_ids:
        # (the demo model stops at once on this bare prompt: its EOS is left out, being
        # never part of the text; upstream's model does not stop within 20 tokens)
        response_text = tokenizer.decode(without_stop(tokenizer, choice.token_ids))
        assert choice.text.endswith(response_text)


# upstream: test_comparison_with_prompt_logprobs_and_logprobs (streaming half)
def test_comparison_with_prompt_logprobs_and_logprobs_streaming(client, target):
    stream = client.completions.create(
        model=target.model, prompt="Tell me a short fact about Python:", max_tokens=30,
        temperature=0, stream=True, echo=False, logprobs=1,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    streamed_prompt_token_ids: list[int] = []
    streamed_token_ids: list[int] = []
    streamed_logprob_token_ids: list[int] = []
    first_chunk = True
    for chunk in stream:
        for token_str in chunk.choices[0].logprobs.tokens:
            if token_str.startswith("token_id:"):
                streamed_logprob_token_ids.append(int(token_str.removeprefix("token_id:")))
        if first_chunk:
            streamed_prompt_token_ids = chunk.choices[0].prompt_token_ids
            first_chunk = False
        streamed_token_ids += chunk.choices[0].token_ids
    assert len(streamed_prompt_token_ids) > 0
    assert streamed_token_ids == streamed_logprob_token_ids


# upstream: test_chat_completion_with_emoji_and_token_ids (non-streaming half)
def test_chat_completion_with_emoji_and_token_ids(client, target, tokenizer):
    response = client.chat.completions.create(
        model=target.model, messages=EMOJI_CHAT, max_tokens=50, temperature=0, logprobs=True,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    response_dict = response.model_dump()
    assert response.choices[0].token_ids is not None
    assert "prompt_token_ids" in response_dict
    assert response.choices[0].message.content is not None
    decoded_prompt = tokenizer.decode(response.prompt_token_ids)
    assert "You like to use emojis in your responses" in decoded_prompt
    assert "I love cats 🐱" in decoded_prompt
    decoded_response = tokenizer.decode(response.choices[0].token_ids)
    assert len(decoded_response) > 0


# upstream: test_chat_completion_with_emoji_and_token_ids (streaming half)
def test_chat_completion_with_emoji_and_token_ids_streaming(client, target, tokenizer):
    decoded_prompt = tokenizer.decode(chat_ids(tokenizer, EMOJI_CHAT))
    stream = client.chat.completions.create(
        model=target.model, messages=EMOJI_CHAT, max_tokens=50, temperature=0, stream=True,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    collected_content = ""
    collected_token_ids: list[int] = []
    first_chunk = True
    for chunk in stream:
        if first_chunk:
            assert chunk.prompt_token_ids is not None
            assert isinstance(chunk.prompt_token_ids, list)
            assert tokenizer.decode(chunk.prompt_token_ids) == decoded_prompt
            first_chunk = False
        else:
            assert "prompt_token_ids" not in chunk.model_dump(), (
                "Subsequent chunks should not have prompt_token_ids"
            )
        if chunk.choices:
            if chunk.choices[0].delta.content:
                collected_content += chunk.choices[0].delta.content
            if "token_ids" in chunk.choices[0].model_dump():
                collected_token_ids.extend(chunk.choices[0].token_ids)
    assert len(collected_content) > 0
    assert len(collected_token_ids) > 0
    assert len(tokenizer.decode(collected_token_ids)) > 0
