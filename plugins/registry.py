"""vLLM ``general_plugins`` entry point: the model class of middle-layer decision heads.

Import-light (vLLM loads general plugins in every process, the API server
included): the class itself, in :mod:`refusal_plugins.model`, is imported
only when a model names it in ``architectures``.
"""

from __future__ import annotations

ARCHITECTURE = "RefusalLlamaForCausalLM"
HEAD_WEIGHT = "refusal_head.weight"
HEAD_FILE = "refusal_head.safetensors"


def register() -> None:
    """Make :data:`ARCHITECTURE` known to vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"refusal_plugins.model:{ARCHITECTURE}")
