"""vLLM V1 ``LogitsProcessor`` adapter (the V1 model runner; vLLM's CPU default).

Register with ``--logits-processors refusal_plugins.v1:RefusalLogitsProcessor``.

The persistent batch tells us about added/removed/moved rows; each row's
settings go into the shared :class:`~refusal_plugins.core.RefusalTable`. A
row is at its decision position while its output list is empty: the list is
a live reference owned by vLLM, so we only watch the few rows still waiting
for their first token (chunked-prefill rows included: their samples are
discarded by vLLM, so deciding for them early is harmless).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from .core import RefusalTable, apply_rows
from .params import engine_params, parse_refusal_params
from .vocab import RefusalManifest

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)


def load_manifest(vllm_config: VllmConfig) -> RefusalManifest:
    """The manifest of the served model (next to its weights or tokenizer)."""
    model_config = vllm_config.model_config
    for candidate in (model_config.model, model_config.tokenizer):
        try:
            return RefusalManifest.load(candidate)
        except FileNotFoundError:
            continue
    return RefusalManifest.load(model_config.model)  # raises with the hint


class RefusalLogitsProcessor(LogitsProcessor):
    """Per-request refusal bias / threshold at the first position, ban after it."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_refusal_params(sampling_params.extra_args)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        manifest = load_manifest(vllm_config)
        max_rows = vllm_config.scheduler_config.max_num_seqs
        self.table = RefusalTable(manifest, max_rows, device)
        self._pending: dict[int, list[int]] = {}  # row -> live output list
        self._decide_mask = torch.zeros(max_rows, dtype=torch.bool, device=device)
        self._decide_rows: torch.Tensor | None = None
        self._decide_slots: list[int] = []
        self._ban_mask = torch.zeros(max_rows, dtype=torch.bool, device=device)
        self._device = device
        self._masks_stale = False
        logger.info(
            "refusal logits processor (V1): %s scheme, control ids %s",
            manifest.scheme,
            manifest.ids,
        )

    def is_argmax_invariant(self) -> bool:
        # Bias and thresholds change the argmax: greedy batches must call us.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self._apply_batch_update(batch_update)
        decided = [row for row, out in self._pending.items() if out]
        for row in decided:
            del self._pending[row]
        if decided:
            self._masks_stale = True

    def _apply_batch_update(self, bu: BatchUpdate) -> None:
        for row in bu.removed:
            self.table.clear(row)
            self._pending.pop(row, None)
        for row, params, _prompt, output in bu.added:
            active = self.table.write(row, engine_params(params.extra_args))
            if active and not output:
                self._pending[row] = output
            else:
                self._pending.pop(row, None)
        for a, b, direction in bu.moved:
            if direction == MoveDirectionality.SWAP:
                self.table.swap(a, b)
                pa, pb = self._pending.pop(a, None), self._pending.pop(b, None)
                if pa is not None:
                    self._pending[b] = pa
                if pb is not None:
                    self._pending[a] = pb
            else:
                self.table.move(a, b)
                moved = self._pending.pop(a, None)
                self._pending.pop(b, None)
                if moved is not None:
                    self._pending[b] = moved
        self._masks_stale = True

    def _refresh_masks(self) -> None:
        rows = sorted(self._pending)
        self._decide_slots = rows
        self._decide_mask.zero_()
        if rows:
            idx = torch.tensor(rows, dtype=torch.long, device=self._device)
            self._decide_mask[idx] = True
            self._decide_rows = idx
        else:
            self._decide_rows = None
        active = self.table.tensors()["active"]
        torch.logical_and(active, ~self._decide_mask, out=self._ban_mask)
        self._masks_stale = False

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.table.num_active == 0:
            return logits
        if self._masks_stale:
            self._refresh_masks()
        n = logits.shape[0]
        return apply_rows(
            self.table,
            logits,
            None,
            self._decide_mask[:n],
            self._ban_mask[:n],
            self._decide_rows,
            self._decide_slots,
        )
