"""The middle-layer decision head of a built model, outside vLLM (transformers).

vLLM serves it with :class:`refusal_plugins.model.RefusalLlamaForCausalLM`; the
offline tools (``score``, ``calibrate``) load the same model with transformers,
which knows nothing of it. :func:`attach` gives them the same control-token
logits: it captures the inputs of the head's layers at the decision position
and adds ``cat(h) @ W.T`` to the control tokens' logits, as the served model does.
"""

from __future__ import annotations

import json
from pathlib import Path

from refusal_plugins.registry import ARCHITECTURE, HEAD_FILE, HEAD_WEIGHT, head_spec


def spec(model_dir: Path) -> dict | None:
    """``config.json``'s ``refusal_head``, checked as vLLM's class checks it, as
    ``{"layers": [...], "token_ids": [...]}``; None for a model without one."""
    config = json.loads((model_dir / "config.json").read_text())
    if ARCHITECTURE not in config.get("architectures", []):
        return None
    layers, ids = head_spec(config.get("refusal_head"), config["num_hidden_layers"],
                            config["vocab_size"])  # fmt: skip
    return {"layers": layers, "token_ids": ids}


class Reached(Exception):
    """Raised by a :class:`LayerInput` that stops the pass: the layers above are not needed."""


class LayerInput:
    """The input of decoder layer ``layer`` of a transformers Llama (the residual stream,
    Hugging Face's ``hidden_states[layer]``, every position) on each forward pass.

    With ``stop`` the pass ends there by raising :class:`Reached` (feature
    extraction needs nothing above the layer); the caller catches it."""

    def __init__(self, model, layer: int, stop: bool = False):
        layers = model.model.layers
        if not 0 < layer < len(layers):  # 0 is the embeddings; the last is the final state
            raise ValueError(f"layer {layer} is not a middle layer (1..{len(layers) - 1})")
        self.value = None
        self._stop = stop
        layers[layer].register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        self.value = args[0] if args else kwargs["hidden_states"]
        if self._stop:
            raise Reached


class MiddleHead:
    """Captures the head's layer inputs on each forward pass; :meth:`add_to` applies the head."""

    def __init__(self, model, model_dir: Path, head: dict):
        from safetensors.torch import load_file

        self.weight = load_file(str(model_dir / HEAD_FILE))[HEAD_WEIGHT].float()
        self.ids = list(head["token_ids"])
        self._inputs = [LayerInput(model, layer) for layer in head["layers"]]

    def add_to(self, logits):
        """``logits`` [batch, vocab] at the last position of the last forward pass (edited);
        left-padded batches: the last position is every row's decision position."""
        import torch

        middle = torch.cat([i.value[:, -1].float() for i in self._inputs], dim=-1)
        logits[:, self.ids] += middle @ self.weight.T
        return logits


def attach(model, model_dir: Path) -> MiddleHead | None:
    """The model's middle head hooked into ``model`` (a transformers Llama), or None."""
    head = spec(model_dir)
    return None if head is None else MiddleHead(model, model_dir, head)
