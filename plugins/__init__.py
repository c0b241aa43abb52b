"""vLLM engine plugins of refusal-gateway: the refusal logits processors.

Import-light on purpose (vLLM imports processor classes in the frontend to
validate parameters): the adapters live in ``refusal_plugins.v1`` (V1 model
runner) and ``refusal_plugins.v2`` (Model Runner V2), over ``core``.
"""
