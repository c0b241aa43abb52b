"""vLLM ``general_plugins`` entry point: the model class of middle-layer decision heads.

Import-light (vLLM loads general plugins in every process, the API server
included): the class itself, in :mod:`refusal_plugins.model`, is imported
only when a model names it in ``architectures``.
"""

from __future__ import annotations

ARCHITECTURE = "RefusalLlamaForCausalLM"
HEAD_WEIGHT = "refusal_head.weight"
HEAD_FILE = "refusal_head.safetensors"


def head_spec(spec: object, num_layers: int, vocab_size: int) -> tuple[list[int], list[int]]:
    """``config.refusal_head`` checked: the layers (ascending, distinct, each a
    middle one) and the control-token ids (distinct, in the vocabulary)."""
    if not isinstance(spec, dict) or "token_ids" not in spec or ("layer" in spec) == ("layers" in spec):
        raise ValueError(f"{ARCHITECTURE} needs config.refusal_head = "
                         "{'layers': [int, ...], 'token_ids': [int, ...]}")  # fmt: skip
    raw = spec["layers"] if "layers" in spec else [spec["layer"]]
    if not isinstance(raw, list) or not raw or not all(type(x) is int for x in raw):
        raise ValueError("refusal_head.layers must be a non-empty list of integers")
    if raw != sorted(set(raw)) or not all(0 < x < num_layers for x in raw):
        raise ValueError(f"refusal_head.layers {raw} must ascend, without repeats, "
                         f"within 1..{num_layers - 1}")  # fmt: skip
    ids = spec["token_ids"]
    if (not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids)
            or len(set(ids)) != len(ids) or not all(0 <= i < vocab_size for i in ids)):  # fmt: skip
        raise ValueError(f"refusal_head.token_ids must be distinct ids below {vocab_size}")
    return list(raw), list(ids)


def register() -> None:
    """Make :data:`ARCHITECTURE` known to vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"refusal_plugins.model:{ARCHITECTURE}")
