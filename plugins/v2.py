"""vLLM Model Runner V2 ``LogitsProcessor`` adapter (vLLM's GPU default).

Register with ``--logits-processors refusal_plugins.v2:RefusalLogitsProcessorV2``
(the launcher picks this class whenever the V2 runner is in use; it can also be
forced on CPU with ``VLLM_USE_V2_MODEL_RUNNER=1``, which the tests do).

V2 keys state by request slot and tells us each row's position, so the decision
position is exact on the device (``pos == prompt_len - 1``); the host-side copy
of the same condition only decides whether the full-vocabulary stage runs, so
steady-state decoding never synchronises with the device.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from .core import RefusalTable, apply_rows
from .params import engine_params, parse_refusal_params
from .v1 import load_manifest

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RefusalLogitsProcessorV2(LogitsProcessor):
    """The same refusal controls as :class:`RefusalLogitsProcessor`, for Model Runner V2."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_refusal_params(sampling_params.extra_args)

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState):
        manifest = load_manifest(vllm_config)
        self.table = RefusalTable(manifest, req_states.max_num_reqs, req_states.device)
        self._req_states = req_states
        self._active_np = self.table.active_host
        logger.info(
            "refusal logits processor (V2): %s scheme, control ids %s",
            manifest.scheme,
            manifest.ids,
        )

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        # Slots are recycled without notice: write() fully resets the slot.
        return self.table.write(req_idx, engine_params(sampling_params.extra_args))

    def apply_staged_writes(self) -> None:
        self.table.tensors()

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        req_slots = ctx.idx_mapping_np
        active_reqs = self._active_np[req_slots]
        if not active_reqs.any():
            return logits
        slots = ctx.expanded_idx_mapping
        prompt_len = self._req_states.prompt_len
        active = self.table.tensors()["active"].index_select(0, slots)
        row_prompt_len = prompt_len.gpu.to(slots.device).index_select(0, slots)
        decide_mask = active & (ctx.pos == row_prompt_len - 1)
        ban_mask = active & (ctx.pos >= row_prompt_len)
        host_decide = active_reqs & (ctx.seq_lens_upper_bound_np == prompt_len.np[req_slots])
        decide_rows, decide_slots = None, None
        if host_decide.any():
            if logits.shape[0] == len(req_slots):  # one row per request
                rows_np = np.flatnonzero(host_decide)
                decide_rows = torch.from_numpy(rows_np).to(logits.device)
                decide_slots = req_slots[rows_np].tolist()
            else:  # speculative rows: find them on the device (no reports then)
                decide_rows = decide_mask.nonzero().squeeze(1)
        return apply_rows(
            self.table, logits, slots, decide_mask, ban_mask, decide_rows, decide_slots
        )
