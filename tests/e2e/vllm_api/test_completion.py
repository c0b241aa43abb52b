# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM (Apache-2.0, copyright contributors to the vLLM project):
#   tests/entrypoints/openai/completion/test_completion.py
# Each case runs against a URL (plain vLLM and the stack, see conftest.py) on the demo
# model instead of facebook/opt-125m. Adapted: upstream's prompt-token counts of opt-125m
# are computed with the demo tokenizer; the server is not started with
# --enable-prompt-tokens-details (so `prompt_tokens_details` is not asserted); the echo
# regex escapes the prompt (the demo model's special tokens contain "|"); the cases that
# need the model to go on for several tokens (single, streaming, parallel) send their text
# formatted with the demo model's chat template: on a bare prompt the demo model (a chat
# model) ends at once, where opt-125m goes on; test_prompt_logprobs_completion caps
# max_tokens (upstream generates to the model's limit).
"""vLLM text completions API cases, plain vLLM vs the stack."""

from __future__ import annotations

import re

import openai
import pytest
from openai import BadRequestError

from .common import chat_prompt

pytestmark = pytest.mark.e2e

IDS = [0, 0, 0, 0, 0]


# upstream: test_single_completion
def test_single_completion(client, target, tokenizer):
    prompt = chat_prompt(tokenizer, "Hello, my name is")
    completion = client.completions.create(
        model=target.model, prompt=prompt, max_tokens=5, temperature=0.0
    )
    assert completion.id is not None
    assert completion.choices is not None and len(completion.choices) == 1
    choice = completion.choices[0]
    assert len(choice.text) >= 5
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5
    # test using token IDs (upstream's [0]*5; the demo model ends at once on <|pad|>s)
    completion = client.completions.create(
        model=target.model, prompt=tokenizer.encode(prompt), max_tokens=5, temperature=0.0
    )
    assert len(completion.choices[0].text) >= 1
    assert completion.choices[0].prompt_logprobs is None


# upstream: test_completion_truncation_side_controls_prompt_truncation
def test_completion_truncation_side_controls_prompt_truncation(client, target):
    prompt_token_ids = list(range(8))
    right = client.completions.create(
        model=target.model, prompt=prompt_token_ids, max_tokens=1, temperature=0.0,
        extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4,
                    "truncation_side": "right"},
    )  # fmt: skip
    assert right.choices[0].prompt_token_ids == prompt_token_ids[:4]
    left = client.completions.create(
        model=target.model, prompt=prompt_token_ids, max_tokens=1, temperature=0.0,
        extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4,
                    "truncation_side": "left"},
    )  # fmt: skip
    assert left.choices[0].prompt_token_ids == prompt_token_ids[-4:]


# upstream: test_no_logprobs
def test_no_logprobs(client, target):
    completion = client.completions.create(
        model=target.model, prompt=IDS, max_tokens=5, temperature=0.0, logprobs=None
    )
    assert completion.choices[0].logprobs is None


# upstream: test_zero_logprobs
def test_zero_logprobs(client, target):
    completion = client.completions.create(
        model=target.model, prompt=IDS, max_tokens=5, temperature=0.0, logprobs=0
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.top_logprobs is not None
    assert len(choice.logprobs.top_logprobs[0]) == 1


# upstream: test_some_logprobs
def test_some_logprobs(client, target):
    completion = client.completions.create(
        model=target.model, prompt=IDS, max_tokens=5, temperature=0.0, logprobs=5
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.top_logprobs is not None
    assert 5 <= len(choice.logprobs.top_logprobs[0]) <= 6


# upstream: test_too_many_completion_logprobs
def test_too_many_completion_logprobs(client, target):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=target.model, prompt=IDS, max_tokens=5, temperature=0.0, logprobs=21
        )
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        stream = client.completions.create(
            model=target.model, prompt=IDS, max_tokens=5, temperature=0.0, logprobs=30,
            stream=True,
        )  # fmt: skip
        for _ in stream:
            ...
    # the server should still work afterwards
    completion = client.completions.create(
        model=target.model, prompt=IDS, max_tokens=5, temperature=0.0
    )
    assert len(completion.choices[0].text) >= 0


# upstream: test_prompt_logprobs_completion
@pytest.mark.parametrize("prompt_logprobs", [-1, 0, 1, None])
def test_prompt_logprobs_completion(client, target, prompt_logprobs):
    params: dict = {
        "prompt": ["A robot may not injure another robot", "My name is"],
        "model": target.model, "max_tokens": 5,
    }  # fmt: skip
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(BadRequestError):
            client.completions.create(**params)
    else:
        completion = client.completions.create(**params)
        if prompt_logprobs is not None:
            assert completion.choices[0].prompt_logprobs is not None
            assert len(completion.choices[0].prompt_logprobs) > 0
            assert completion.choices[1].prompt_logprobs is not None
            assert len(completion.choices[1].prompt_logprobs) > 0
        else:
            assert completion.choices[0].prompt_logprobs is None


# upstream: test_completion_streaming
def test_completion_streaming(client, target, tokenizer):
    prompt = chat_prompt(tokenizer, "What is an LLM?")
    single = client.completions.create(
        model=target.model, prompt=prompt, max_tokens=5, temperature=0.0
    )
    single_output = single.choices[0].text
    stream = client.completions.create(
        model=target.model, prompt=prompt, max_tokens=5, temperature=0.0, stream=True
    )
    chunks: list[str] = []
    finish_reason_count = 0
    for chunk in stream:
        chunks.append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    # finish reason should only return in last block
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == "length"
    assert chunk.choices[0].text
    assert "".join(chunks) == single_output


# upstream: test_parallel_no_streaming
def test_parallel_no_streaming(client, target, tokenizer):
    n, max_tokens = 3, 50
    completion = client.completions.create(
        model=target.model, prompt=chat_prompt(tokenizer, "What is an LLM?"), max_tokens=max_tokens, n=n,
        temperature=1.0, stream=False, logprobs=0, seed=42,
    )  # fmt: skip
    num_completions = len(completion.choices)
    assert num_completions == n, f"Num completions {num_completions} but expected {n}."
    completion_repeats: dict[str, int] = {}
    output_token_lengths = set()
    for idx, choice in enumerate(completion.choices):
        assert choice.index == idx, f"Index {choice.index} but expected {idx}."
        assert choice.finish_reason is not None, "None finish_reason is invalid."
        completion_repeats[choice.text] = completion_repeats.get(choice.text, 0) + 1
        output_token_lengths.add(len(choice.logprobs.tokens))
    # Assert subrequests finished at different times
    assert len(output_token_lengths) > 1
    num_unique = len(completion_repeats)
    if num_unique != n:
        repeats = {txt: num for (txt, num) in completion_repeats.items() if num > 1}
        raise AssertionError(
            f"Expected {n} unique completions, got {num_unique}; repeats: {repeats}."
        )


# upstream: test_parallel_streaming
def test_parallel_streaming(client, target, tokenizer):
    n, max_tokens = 3, 50
    stream = client.completions.create(
        model=target.model, prompt=chat_prompt(tokenizer, "What is an LLM?"), max_tokens=max_tokens, n=n,
        temperature=1.0, stream=True, seed=42,
    )  # fmt: skip
    chunks: list[list[str]] = [[] for _ in range(n)]
    finish_reason_count = 0
    for chunk in stream:
        index = chunk.choices[0].index
        chunks[index].append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == n, (
        f"Expected {n} completions with valid indices and finish_reason."
    )
    completion_repeats: dict[str, int] = {}
    chunk_lengths = set()
    for chunk_list in chunks:
        chunk_lengths.add(len(chunk_list))
        assert len(chunk_list) <= max_tokens
        text = "".join(chunk_list)
        completion_repeats[text] = completion_repeats.get(text, 0) + 1
    # Assert subrequests finished at different times
    assert len(chunk_lengths) > 1
    num_unique = len(completion_repeats)
    if num_unique != n:
        repeats = {txt: num for (txt, num) in completion_repeats.items() if num > 1}
        raise AssertionError(f"{num_unique} unique completions, expected {n}; repeats: {repeats}")


# upstream: test_completion_stream_options
def test_completion_stream_options(client, target):
    common = {"model": target.model, "prompt": "What is the capital of France?",
              "max_tokens": 5, "temperature": 0.0}  # fmt: skip

    for options in (
        {"include_usage": False, "continuous_usage_stats": False},
        {"include_usage": False, "continuous_usage_stats": True},
        {},
    ):
        for chunk in client.completions.create(**common, stream=True, stream_options=options):
            assert chunk.usage is None, options

    stream = client.completions.create(
        **common, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": False},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices[0].finish_reason is None:
            assert chunk.usage is None
        else:
            assert chunk.usage is None
            final_chunk = next(stream)
            assert final_chunk.usage is not None
            assert final_chunk.usage.prompt_tokens > 0
            assert final_chunk.usage.completion_tokens > 0
            assert final_chunk.usage.total_tokens == (
                final_chunk.usage.prompt_tokens + final_chunk.usage.completion_tokens
            )
            assert final_chunk.choices == []

    stream = client.completions.create(
        **common, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )  # fmt: skip
    for chunk in stream:
        assert chunk.usage is not None
        assert chunk.usage.prompt_tokens > 0
        assert chunk.usage.completion_tokens > 0
        assert chunk.usage.total_tokens == (
            chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        )
        if chunk.choices[0].finish_reason is not None:
            final_chunk = next(stream)
            assert final_chunk.usage is not None
            assert final_chunk.usage.prompt_tokens > 0
            assert final_chunk.usage.completion_tokens > 0
            assert final_chunk.usage.total_tokens == (
                final_chunk.usage.prompt_tokens + final_chunk.usage.completion_tokens
            )
            assert final_chunk.choices == []

    for options in (
        {"include_usage": None},
        {"include_usage": True},
        {"continuous_usage_stats": None},
        {"continuous_usage_stats": True},
    ):
        with pytest.raises(BadRequestError):
            client.completions.create(**common, stream=False, stream_options=options)


# upstream: test_batch_completions
@pytest.mark.parametrize("prompts", [["Hello, my name is"] * 2, [IDS] * 2], ids=["text", "ids"])
def test_batch_completions(client, target, prompts):
    batch = client.completions.create(
        model=target.model, prompt=prompts, max_tokens=5, temperature=0.0
    )
    assert len(batch.choices) == 2
    assert batch.choices[0].text == batch.choices[1].text

    # test n = 2
    beam = dict(model=target.model, prompt=prompts, n=2, max_tokens=5, temperature=0.0,
                # NOTE: this has to be true for n > 1 in vLLM, but not for the official client.
                extra_body=dict(use_beam_search=True))  # fmt: skip
    if target.name == "stack":
        # Adapted: vLLM's beam search runs one-token sub-requests of its own, without the
        # request's logits-processor arguments and ranked by raw logprobs, so no refusal
        # decision could be made: the stack refuses it rather than serve around the policy.
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.completions.create(**beam)
        assert excinfo.value.body["param"] == "use_beam_search"
    else:
        batch = client.completions.create(**beam)
        assert len(batch.choices) == 4
        assert batch.choices[0].text != batch.choices[1].text, "beam search should differ"
        assert batch.choices[0].text == batch.choices[2].text, "two copies of the same prompt"
        assert batch.choices[1].text == batch.choices[3].text, "two copies of the same prompt"

    # test streaming
    batch = client.completions.create(
        model=target.model, prompt=prompts, max_tokens=5, temperature=0.0, stream=True
    )
    texts = [""] * 2
    for chunk in batch:
        assert len(chunk.choices) == 1
        choice = chunk.choices[0]
        texts[choice.index] += choice.text
    assert texts[0] == texts[1]


# upstream: test_echo_logprob_completion
@pytest.mark.parametrize("logprobs_arg", [1, 0])
@pytest.mark.parametrize("prompt", ["Hello, my name is", IDS], ids=["text", "ids"])
def test_echo_logprob_completion(client, target, tokenizer, logprobs_arg, prompt):
    completion = client.completions.create(
        model=target.model, prompt=prompt, max_tokens=5, temperature=0.0, echo=True,
        logprobs=logprobs_arg,
    )  # fmt: skip
    prompt_text = tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
    assert re.search(r"^" + re.escape(prompt_text), completion.choices[0].text)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.text_offset) > 5
    assert len(logprobs.token_logprobs) > 5 and logprobs.token_logprobs[0] is None
    assert len(logprobs.top_logprobs) > 5 and logprobs.top_logprobs[0] is None
    for top_logprobs in logprobs.top_logprobs[1:]:
        assert max(logprobs_arg, 1) <= len(top_logprobs) <= logprobs_arg + 1
    assert len(logprobs.tokens) > 5


# upstream: test_invalid_json_schema
def test_invalid_json_schema(client, target):
    invalid_json_schema = {
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
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=target.model,
            prompt="Generate a JSON with the brand, model and car_type of the most iconic car from the 90's",
            extra_body={"structured_outputs": {"json": invalid_json_schema}},
        )


# upstream: test_invalid_regex
def test_invalid_regex(client, target):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=target.model,
            prompt="Generate an email address for Alan Turing, who works in Enigma.",
            extra_body={"structured_outputs": {"regex": r"[.*"}, "stop": ["\n"]},
        )


# upstream: test_invalid_grammar
def test_invalid_grammar(client, target):
    invalid_simplified_sql_grammar = """
        root ::= select_statementinvalidsyntax

        select_statement ::= "SELECT " column " from " table " where " condition

        column ::= "col_1 " | "col_2 "

        table ::= "table_1 " | "table_2 "

        condition ::= column "= " number

        number ::= "1 " | "2 "
    """
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(
            model=target.model,
            prompt="Generate an SQL query to show the 'username' and 'email' from the 'users' table.",
            extra_body={"structured_outputs": {"grammar": invalid_simplified_sql_grammar}},
        )
