"""LoRA for ``refusal-gateway train --lora``: adapters plus trainable control-token rows.

Its own module because the adapter set-up (which modules, which embedding
rows) is the one part of a run that depends on peft; peft is imported only
when ``--lora`` is asked for.

**LoRA.** LoRA on the attention / MLP projections, i.e. every linear layer but
the output one unless ``--lora-targets`` names modules, plus the new tokens'
embedding rows; the caller merges the adapters into the base weights with
``merge_and_unload`` before saving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .control_tokens import tied_embeddings

if TYPE_CHECKING:
    from .train_options import TrainOptions

logger = logging.getLogger(__name__)


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def apply_lora(model, options: TrainOptions, control_ids: Sequence[int]):
    """Wrap ``model`` with LoRA adapters plus trainable rows for the control tokens.

    Without trainable control rows the new tokens would keep their identical
    mean initialisation and the model could not tell them apart.
    """
    from peft import LoraConfig, get_peft_model

    ids = sorted(set(control_ids))
    if tied_embeddings(model):
        trainable_tokens: list[int] | dict[str, list[int]] = ids
    else:
        trainable_tokens = {
            _module_name(model, model.get_input_embeddings()): ids,
            _module_name(model, model.get_output_embeddings()): ids,
        }
    config = LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=list(options.lora_targets) or "all-linear",
        trainable_token_indices=trainable_tokens,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA: %d trainable parameters", trainable)
    return peft_model
