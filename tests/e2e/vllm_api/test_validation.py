# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM (Apache-2.0, copyright contributors to the vLLM project):
#   tests/entrypoints/openai/chat_completion/test_chat_logit_bias_validation.py
#   tests/entrypoints/openai/chat_completion/test_chat_stop_token_ids_validation.py
#   tests/entrypoints/openai/chat_completion/test_non_object_body_validation.py
#   tests/entrypoints/openai/completion/test_prompt_validation.py (HTTP cases)
#   tests/entrypoints/openai/completion/test_empty_prompt_list.py
#   tests/entrypoints/openai/basic/test_basic.py (HTTP cases)
# Each case runs against a URL (plain vLLM and the stack, see conftest.py) on the demo
# model. Adapted: the vocabulary size is read from the demo model's config instead of
# building a vLLM ModelConfig; the protocol-level cases (ChatCompletionRequest /
# CompletionRequest.model_validate) are sent as HTTP bodies, where the contract is a 4xx
# in vLLM's error envelope, never a 500. Left out of test_basic.py: request cancellation
# and server load (timing/flag dependent), the mocked health check (not HTTP).
"""vLLM request-validation cases: bad requests get a 4xx, good ones are served."""

from __future__ import annotations

import json

import openai
import pytest
from refusal_plugins.vocab import RefusalManifest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vocab_size(demo_model_dir) -> int:
    return json.loads((demo_model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def control_ids(demo_model_dir) -> list[int]:
    return RefusalManifest.load(demo_model_dir).ids


# upstream: test_chat_logit_bias_validation.py::test_chat_logit_bias_valid
# Adapted: upstream's "largest valid id" (vocab_size - 1) is a control token of a refusal-token
# model. The stack refuses control ids in logit_bias (they would steer the refusal decision past
# the policy and the API key's bounds; refusal_bias is the door for that) and takes any other id.
def test_chat_logit_bias_valid(client, target, vocab_size, control_ids):
    messages = [{"role": "user", "content": "Testing valid logit bias"}]
    if target.name == "stack":
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.chat.completions.create(model=target.model, messages=messages, max_tokens=5,
                                           logit_bias={str(max(control_ids)): 1.0})
        assert excinfo.value.body["param"] == "logit_bias"
    largest = max(set(range(vocab_size)) - set(control_ids)) if target.name == "stack" else (
        vocab_size - 1)
    completion = client.chat.completions.create(
        model=target.model, messages=messages, max_tokens=5, logit_bias={str(largest): 1.0},
    )  # fmt: skip
    assert completion.choices[0].message.content is not None


# upstream: test_chat_logit_bias_validation.py::test_chat_logit_bias_invalid
def test_chat_logit_bias_invalid(client, target, vocab_size):
    invalid_token_id = vocab_size + 1
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=target.model,
            messages=[{"role": "user", "content": "Testing invalid logit bias"}],
            max_tokens=5, logit_bias={str(invalid_token_id): 1.0},
        )  # fmt: skip
    error_message = str(excinfo.value)
    assert excinfo.value.status_code == 400
    assert str(invalid_token_id) in error_message
    assert str(vocab_size) in error_message


# upstream: test_chat_logit_bias_validation.py::test_chat_logit_bias_non_integer_key
def test_chat_logit_bias_non_integer_key(client, target):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=target.model,
            messages=[{"role": "user", "content": "Testing invalid logit bias key"}],
            max_tokens=5, logit_bias={"not_a_token_id": 50},
        )  # fmt: skip
    error_message = str(excinfo.value)
    assert excinfo.value.status_code == 400
    assert "not_a_token_id" in error_message
    assert "logit_bias" in error_message


# upstream: test_chat_logit_bias_validation.py::test_chat_logit_bias_non_numeric_value
def test_chat_logit_bias_non_numeric_value(client, target):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=target.model,
            messages=[{"role": "user", "content": "Testing invalid logit bias value"}],
            max_tokens=5, logit_bias={"1": "not_a_number"},  # type: ignore
        )  # fmt: skip
    assert excinfo.value.status_code == 400
    assert "logit_bias" in str(excinfo.value)


# upstream: test_chat_logit_bias_validation.py::test_chat_logit_bias_multiple_non_integer_keys
def test_chat_logit_bias_multiple_non_integer_keys(client, target):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=target.model,
            messages=[{"role": "user", "content": "Testing multiple bad keys"}],
            max_tokens=5, logit_bias={"bad1": 50.0, "bad2": 20.0},
        )  # fmt: skip
    error_message = str(excinfo.value)
    assert excinfo.value.status_code == 400
    assert "bad1" in error_message
    assert "bad2" in error_message


# upstream: test_chat_stop_token_ids_validation.py::test_chat_stop_token_ids_valid
# Adapted like test_chat_logit_bias_valid: a control id is the decision, not a stop token.
def test_chat_stop_token_ids_valid(client, target, vocab_size, control_ids):
    messages = [{"role": "user", "content": "Testing valid stop token ids"}]
    if target.name == "stack":
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.chat.completions.create(model=target.model, messages=messages, max_tokens=5,
                                           extra_body={"stop_token_ids": [max(control_ids)]})
        assert excinfo.value.body["param"] == "stop_token_ids"
    largest = max(set(range(vocab_size)) - set(control_ids)) if target.name == "stack" else (
        vocab_size - 1)
    completion = client.chat.completions.create(
        model=target.model, messages=messages, max_tokens=5,
        extra_body={"stop_token_ids": [largest]},
    )  # fmt: skip
    assert completion.choices[0].message.content is not None


# upstream: test_chat_stop_token_ids_validation.py::test_chat_stop_token_ids_out_of_vocab
def test_chat_stop_token_ids_out_of_vocab(client, target, vocab_size):
    invalid_token_id = vocab_size + 1
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=target.model, messages=[{"role": "user", "content": "Testing stop token ids"}],
            max_tokens=5, extra_body={"stop_token_ids": [invalid_token_id]},
        )  # fmt: skip
    error_message = str(excinfo.value)
    assert excinfo.value.status_code == 400
    assert str(invalid_token_id) in error_message
    assert str(vocab_size) in error_message


# upstream: test_chat_stop_token_ids_validation.py::test_chat_stop_token_ids_negative
def test_chat_stop_token_ids_negative(client, target):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=target.model, messages=[{"role": "user", "content": "Testing stop token ids"}],
            max_tokens=5, extra_body={"stop_token_ids": [-1]},
        )  # fmt: skip
    assert excinfo.value.status_code == 400


# upstream: test_non_object_body_validation.py::test_chat_completion_request_rejects_non_object_body
@pytest.mark.parametrize(
    "body",
    [b"this is not valid json{{{", b'["not", "an", "object"]', b"42", b"null"],
    ids=["not_json", "list", "number", "null"],
)
def test_chat_completion_request_rejects_non_object_body(target, body):
    response = target.http().post(
        target.url_for("v1", "chat", "completions"), content=body,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])


# upstream: test_non_object_body_validation.py::test_chat_completion_request_cache_salt_still_validated_on_dict
def test_chat_completion_request_cache_salt_still_validated_on_dict(client, target):
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        client.chat.completions.create(
            model=target.model, messages=[{"role": "user", "content": "hello"}],
            max_tokens=5, extra_body={"cache_salt": ""},
        )  # fmt: skip


# upstream: test_prompt_validation.py::test_empty_prompt
def test_empty_prompt(client, target):
    with pytest.raises(
        openai.BadRequestError,
        match="Either prompt or prompt_embeds must be provided and non-empty.",
    ):
        client.completions.create(
            model=target.model, prompt=None, max_tokens=5, temperature=0.0,  # type: ignore
            extra_body={"prompt_embeds": []},
        )  # fmt: skip


# upstream: test_prompt_validation.py::test_out_of_vocab_token_ids
def test_out_of_vocab_token_ids(client, target):
    with pytest.raises(openai.BadRequestError, match=".*out of vocabulary.*"):
        client.completions.create(
            model=target.model, prompt=[999999], max_tokens=5, temperature=0.0
        )


# upstream: test_empty_prompt_list.py::test_empty_prompt_list_rejected (vLLM 0.32's message
# is "You must pass at least one prompt"; upstream's newer one names prompt_embeds)
def test_empty_prompt_list_rejected(client, target):
    with pytest.raises(openai.BadRequestError, match="prompt or prompt_embeds|at least one prompt"):
        client.completions.create(model=target.model, prompt=[], max_tokens=5)


# upstream: test_empty_prompt_list.py::test_nonempty_prompt_list_ok
def test_nonempty_prompt_list_ok(client, target):
    completion = client.completions.create(model=target.model, prompt=["hello"], max_tokens=5)
    assert len(completion.choices) == 1


# upstream: test_basic.py::test_show_version
def test_show_version(target):
    from vllm.version import __version__ as VLLM_VERSION

    response = target.http().get(target.url_for("version"))
    response.raise_for_status()
    assert response.json() == {"version": VLLM_VERSION}


# upstream: test_basic.py::test_check_health
def test_check_health(target):
    assert target.http().get(target.url_for("health")).status_code == 200


# upstream: test_basic.py::test_request_wrong_content_type
def test_request_wrong_content_type(client, target):
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(
            messages=[{"role": "user", "content": "Write a long story"}], model=target.model,
            max_tokens=10000, extra_headers={"Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
