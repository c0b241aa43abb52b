"""A Llama whose control-token logits also read the middle of the network.

Why: a decision head on the residual stream halfway up SmolLM2 (the inputs of
decoder layers 12, 16 and 20 of 30) separates harmful from benign prompts of
sources it never saw better than one on the final hidden state (docs/quality).
The final state's head folds into the output projection's control-token rows;
a middle-layer head cannot, because vLLM computes logits from the final state
alone. This class keeps the layers' inputs beside the final state and adds
``cat(h_mid) @ W.T`` to the control-token logits in ``compute_logits``.

How it fits vLLM's V1 runner: ``forward`` returns ``cat([final, *h_mid], -1)``
(``[tokens, (1 + layers) * hidden]``); the runner only indexes that tensor by
the positions it samples and hands the rows to ``compute_logits``, which
splits them again. The middle states come from Llama's own
auxiliary-hidden-state hook (the one EAGLE-3 uses, which returns them in layer
order), so the decoder stack and its compiled graph are vLLM's, unchanged.

A built model opts in through its ``config.json``: ``architectures`` names
this class and ``refusal_head`` gives ``{"layers": [L, ...], "token_ids":
[...]}`` (``"layer": L`` for one, as models built before several layers
were read say); the weights ``refusal_head.weight`` ``[K, layers * hidden]``,
columns in the order of ``layers``, sit in
``refusal_head.safetensors`` beside the model's (Hugging Face loaders ignore
that file, vLLM's loads every ``*.safetensors``). Pipeline parallelism and
speculative decoding are not supported with it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM

from .registry import ARCHITECTURE, HEAD_WEIGHT, head_spec


class RefusalLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` + a linear control-token head on some layers' inputs."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        layers, ids = head_spec(getattr(config, "refusal_head", None), config.num_hidden_layers,
                                config.vocab_size)  # fmt: skip
        self._hidden = config.hidden_size
        self.model._set_aux_hidden_state_layers(tuple(layers))
        dtype = vllm_config.model_config.dtype
        self.refusal_head = nn.Parameter(
            torch.zeros(len(ids), len(layers) * config.hidden_size, dtype=dtype), requires_grad=False
        )
        self.register_buffer("refusal_token_ids", torch.tensor(ids, dtype=torch.long),
                             persistent=False)  # fmt: skip

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        out = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        if not isinstance(out, tuple):  # pipeline stage output: not supported
            raise NotImplementedError(f"{ARCHITECTURE} runs on one pipeline stage only")
        final, aux = out
        return torch.cat([final, *aux], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        final, middle = hidden_states[:, : self._hidden], hidden_states[:, self._hidden :]
        logits = super().compute_logits(final.contiguous())
        if logits is None:
            return None
        extra = middle.to(self.refusal_head.dtype) @ self.refusal_head.T
        logits[:, self.refusal_token_ids] += extra.to(logits.dtype)
        return logits

    def compute_logits_local(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{ARCHITECTURE} does not support tensor-parallel argmax")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        found: list[torch.Tensor] = []

        def rest():
            for name, tensor in weights:
                if name == HEAD_WEIGHT:
                    found.append(tensor)
                else:
                    yield name, tensor

        loaded = super().load_weights(rest())
        if len(found) != 1 or tuple(found[0].shape) != tuple(self.refusal_head.shape):
            shapes = [tuple(t.shape) for t in found]
            raise ValueError(f"{HEAD_WEIGHT} {tuple(self.refusal_head.shape)} expected, got {shapes}")
        with torch.no_grad():
            self.refusal_head.copy_(found[0].to(self.refusal_head.dtype))
        return loaded | {"refusal_head"}

