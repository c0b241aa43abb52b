"""Pure tensor logic of the refusal controls, shared by the V1 and V2 adapters.

At a request's decision position (its first generated token) the logits of the
control tokens get the request's bias; the row is then restricted to control
tokens, and the paper's threshold rule may force the decision. At every later
position the control tokens are banned. Rows of requests without refusal
settings are never written (their logits stay bit-identical).

Order of operations (documented in the README):
  1. bias: ``logit[c] += bias[refuse] + bias[c]`` for each refusal category c;
  2. threshold (only where one is set): p = softmax(biased logits / T) over the
     whole vocabulary; c* = the most likely refusal category; if c* has a
     threshold, emit c* when p[c*] >= threshold[c*], else ``respond``; if c*
     has none, the (biased) model chooses;
  3. restrict the decision row to control tokens; a forced decision leaves a
     single finite logit, so temperature, top-p/top-k and seeds cannot undo it.
Tokens already at -inf (a grammar or structured-output mask) are never
revived: a masked token is never forced, and a row whose control tokens are
all masked is left to the mask.

Everything is vectorised over rows: the cheap part (bias and ban, K columns)
runs over the whole batch, the full-vocabulary part only over decision rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .params import (
    BIAS_LIMIT,
    DEFAULT_TEMPERATURE,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    RefusalParams,
)
from .report import DecisionReporter, Target, control_probabilities
from .vocab import REFUSE_KEY, RefusalManifest

NEG_INF = float("-inf")


def bias_and_ban(
    logits: torch.Tensor,
    ctrl_ids: torch.Tensor,
    bias: torch.Tensor,
    decide: torch.Tensor,
    ban: torch.Tensor,
) -> None:
    """Add ``bias`` [B, K] to control logits of ``decide`` rows, ban them in ``ban`` rows.

    Rows in neither mask are written back with their own values (bit-identical).
    """
    ctrl = logits.index_select(1, ctrl_ids)
    new = torch.where(decide.unsqueeze(1), ctrl + bias, ctrl)
    new.masked_fill_(ban.unsqueeze(1), NEG_INF)
    logits.index_copy_(1, ctrl_ids, new)


def decide(
    logits: torch.Tensor,
    rows: torch.Tensor,
    ctrl_ids: torch.Tensor,
    threshold: torch.Tensor,
    inv_temp: torch.Tensor,
    with_threshold: bool = True,
) -> None:
    """Apply the threshold rule and the control-token restriction to ``rows``.

    Args:
        logits: [B, V], already biased by :func:`bias_and_ban`; edited in place.
        rows: [n] long indices of the decision rows.
        ctrl_ids: [K] control-token ids, ``respond`` first.
        threshold: [n, K] per-row thresholds, NaN where a category is not
            controlled (column 0, ``respond``, is always NaN).
        inv_temp: [n] 1 / T of the thresholding softmax.
        with_threshold: False when no row has a threshold (the caller knows it
            on the host): the full-vocabulary softmax is then skipped.

    Only K columns are gathered; the one full-row pass is the restriction.
    """
    ctrl = logits[rows.unsqueeze(1), ctrl_ids.unsqueeze(0)]
    allowed = ctrl > NEG_INF
    final_ctrl = ctrl
    if with_threshold:
        refusal = ctrl[:, 1:]
        c_star = refusal.argmax(dim=1, keepdim=True)
        # p[c*] = softmax(logits / T)[c*], over the whole vocabulary as in the paper.
        scaled = logits.index_select(0, rows).mul_(inv_temp.unsqueeze(1))
        lse = torch.logsumexp(scaled, dim=1, keepdim=True)
        p_star = torch.exp(refusal.gather(1, c_star) * inv_temp.unsqueeze(1) - lse)
        thr_star = threshold[:, 1:].gather(1, c_star)
        forced_col = torch.where(p_star >= thr_star, c_star + 1, torch.zeros_like(c_star))
        # p is NaN only when the row has no finite logit left (a mask, or
        # logits beyond float32 after 1/T): then the model's own choice stands.
        force = ~torch.isnan(thr_star) & ~torch.isnan(p_star) & allowed.gather(1, forced_col)
        one_hot = torch.zeros_like(allowed).scatter_(1, forced_col, True)
        forced_ctrl = torch.full_like(ctrl, NEG_INF).masked_fill_(one_hot, 0.0)
        final_ctrl = torch.where(force, forced_ctrl, ctrl)
    # Rows whose control tokens are all masked are left to the mask.
    logits.index_fill_(0, rows[allowed.any(dim=1)], NEG_INF)
    logits[rows.unsqueeze(1), ctrl_ids.unsqueeze(0)] = final_ctrl


def _clamp(value: float, low: float, high: float, fallback: float) -> float:
    """``value`` within [low, high]; ``fallback`` for NaN or a non-number."""
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        return fallback
    if math.isnan(value):
        return fallback
    return min(max(value, low), high)


class RefusalTable:
    """Per-slot refusal settings as preallocated tensors, written on batch changes.

    Settings are written to host tensors (cheap single-element writes) and
    mirrored to the device once per step when something changed, so a batch
    change costs one copy rather than one transfer per request.
    """

    def __init__(self, manifest: RefusalManifest, max_rows: int, device: torch.device):
        self.manifest = manifest
        self.device = torch.device(device)
        k = len(manifest.tokens)
        self.ctrl_ids = torch.tensor(manifest.ids, dtype=torch.long, device=self.device)
        # Column of each refusal key; the general key covers every category.
        self._columns: dict[str, list[int]] = {
            t.key: [i] for i, t in enumerate(manifest.tokens) if i > 0
        }
        self._columns[REFUSE_KEY] = list(range(1, k))
        self._host = {
            "bias": torch.zeros(max_rows, k),
            "threshold": torch.full((max_rows, k), math.nan),
            "inv_temp": torch.ones(max_rows),
            "active": torch.zeros(max_rows, dtype=torch.bool),
        }
        self._dev = self._host if self.device.type == "cpu" else {
            name: t.to(self.device) for name, t in self._host.items()
        }
        self._dirty = False
        self.num_active = 0
        self.num_thresholds = 0  # active slots with a threshold: the softmax stage runs
        # Where each slot's decision is reported (host only: strings).
        self.targets: list[Target | None] = [None] * max_rows
        self.reporter = DecisionReporter(self.device)

    # -- writes (host side, on batch changes) --------------------------------
    def write(self, slot: int, params: RefusalParams) -> bool:
        """Store ``params`` in ``slot``; return whether the slot is active.

        Never raises on values that passed :func:`parse_refusal_params`, and
        clamps anything else into the validated ranges first: an exception
        here would kill the engine and every request in flight with it.
        """
        self.clear(slot)
        if not params.active:
            return False
        h = self._host
        for key, value in params.bias.items():
            for col in self._columns.get(key, ()):
                h["bias"][slot, col] += _clamp(value, -BIAS_LIMIT, BIAS_LIMIT, 0.0)
        # The general threshold first, so a category's own threshold wins.
        for key in sorted(params.threshold, key=lambda k: k != REFUSE_KEY):
            for col in self._columns.get(key, ()):
                h["threshold"][slot, col] = _clamp(params.threshold[key], 0.0, 1.0, math.nan)
        temperature = _clamp(
            params.effective_temperature, MIN_TEMPERATURE, MAX_TEMPERATURE, DEFAULT_TEMPERATURE
        )
        h["inv_temp"][slot] = 1.0 / temperature
        h["active"][slot] = True
        if params.report_to is not None and params.report_id is not None:
            self.targets[slot] = (params.report_to, params.report_id)
        self.num_active += 1
        self.num_thresholds += bool((~torch.isnan(h["threshold"][slot])).any())
        return True

    def clear(self, slot: int) -> None:
        self._forget(slot)
        self._reset(slot)

    def _forget(self, slot: int) -> None:
        """Drop ``slot``'s occupant from the counts (before it is overwritten)."""
        if self._host["active"][slot]:
            self.num_active -= 1
            self.num_thresholds -= bool((~torch.isnan(self._host["threshold"][slot])).any())

    def move(self, src: int, dst: int) -> None:
        """One-way move: ``dst`` takes ``src``'s settings, ``src`` becomes empty."""
        self._forget(dst)  # dst's old occupant is overwritten
        for t in self._host.values():
            t[dst] = t[src]
        self.targets[dst] = self.targets[src]
        self._reset(src)

    def _reset(self, slot: int) -> None:
        h = self._host
        h["bias"][slot] = 0.0
        h["threshold"][slot] = math.nan
        h["inv_temp"][slot] = 1.0
        h["active"][slot] = False
        self.targets[slot] = None
        self._dirty = True

    def swap(self, a: int, b: int) -> None:
        for t in self._host.values():
            t[[a, b]] = t[[b, a]]
        self.targets[a], self.targets[b] = self.targets[b], self.targets[a]
        self._dirty = True

    @property
    def active_host(self):
        """Host (numpy) view of the per-slot active flags, for sync-free early exits."""
        return self._host["active"].numpy()

    # -- reads (device side, in apply) ---------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Device tensors of the settings, synced if they changed since last read."""
        if self._dirty and self._dev is not self._host:
            for name, t in self._host.items():
                self._dev[name].copy_(t, non_blocking=True)
        self._dirty = False
        return self._dev


def apply_rows(
    table: RefusalTable,
    logits: torch.Tensor,
    slots: torch.Tensor | None,
    decide_mask: torch.Tensor,
    ban_mask: torch.Tensor,
    decide_rows: torch.Tensor | None,
    decide_slots: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run both stages for a batch whose row r holds slot ``slots[r]``.

    ``slots`` None means row r is slot r (the V1 persistent batch).
    ``decide_rows`` are the indices where ``decide_mask`` is set, or None when
    no row is at its decision position (the full-vocabulary stage is skipped).
    ``decide_slots`` are the same rows' slots on the host, when known: rows
    whose request asked for a decision report get the model's own
    control-token probabilities sent before bias or threshold touch them.
    """
    if decide_rows is not None and decide_slots is not None:
        report(table, logits, decide_rows, decide_slots)
    t = table.tensors()
    n = logits.shape[0]
    bias = t["bias"][:n] if slots is None else t["bias"].index_select(0, slots)
    bias_and_ban(logits, table.ctrl_ids, bias, decide_mask, ban_mask)
    if decide_rows is not None and decide_rows.numel():
        slot_of_row = decide_rows if slots is None else slots.index_select(0, decide_rows)
        decide(
            logits,
            decide_rows,
            table.ctrl_ids,
            t["threshold"].index_select(0, slot_of_row),
            t["inv_temp"].index_select(0, slot_of_row),
            with_threshold=table.num_thresholds > 0,
        )
    return logits


def report(
    table: RefusalTable,
    logits: torch.Tensor,
    decide_rows: torch.Tensor,
    decide_slots: Sequence[int],
) -> None:
    """Send decision reports for the decision rows that asked for one."""
    wanted = [i for i, slot in enumerate(decide_slots) if table.targets[slot] is not None]
    if not wanted:
        return
    rows = decide_rows if len(wanted) == len(decide_slots) else decide_rows[wanted]
    probabilities = control_probabilities(logits, rows, table.ctrl_ids)
    targets = [table.targets[decide_slots[i]] for i in wanted]
    table.reporter.send(targets, probabilities)  # type: ignore[arg-type]
