"""Both vLLM adapters over the shared core, driven the way vLLM drives them (CPU tensors)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from refusal_plugins.params import RefusalParamError
from refusal_plugins.v1 import RefusalLogitsProcessor
from refusal_plugins.v2 import RefusalLogitsProcessorV2
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

from .helpers import categorical_manifest

VOCAB = 120
IDS = categorical_manifest().ids  # 100..105; respond = 100, safety = 104
SAFETY, HUMANIZING, RESPOND = 104, 101, 100


@pytest.fixture
def config(tmp_path):
    categorical_manifest().save(tmp_path)
    return SimpleNamespace(
        model_config=SimpleNamespace(model=str(tmp_path), tokenizer=str(tmp_path)),
        scheduler_config=SimpleNamespace(max_num_seqs=8),
    )


def params(**extra) -> SamplingParams:
    return SamplingParams(extra_args=extra or None)


def update(size, added=(), removed=(), moved=()):
    return BatchUpdate(batch_size=size, added=list(added), removed=list(removed), moved=list(moved))


def test_v1_first_position_then_ban(config):
    proc = RefusalLogitsProcessor(config, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False
    out0: list[int] = []
    out1: list[int] = []
    proc.update_state(update(2, added=[
        (0, params(**{"refusal_bias.safety": 100.0}), [1, 2], out0),
        (1, params(), [1, 2], out1),  # no refusal args: untouched
    ]))
    logits = torch.randn(2, VOCAB)
    plain = logits[1].clone()
    proc.apply(logits)
    assert logits[0].argmax() == SAFETY
    assert torch.isinf(logits[0, :100]).all()  # decision row restricted to control tokens
    assert torch.equal(logits[1], plain)
    out0.append(SAFETY)  # vLLM appends the sampled token to the live list
    proc.update_state(None)
    logits = torch.randn(2, VOCAB)
    proc.apply(logits)
    assert torch.isinf(logits[0, IDS]).all() and torch.isfinite(logits[0, :100]).all()
    assert torch.isfinite(logits[1]).all()


def test_v1_rows_follow_moves_swaps_and_removals(config):
    proc = RefusalLogitsProcessor(config, torch.device("cpu"), False)
    outs = [[], [], []]
    proc.update_state(update(3, added=[
        (0, params(**{"refusal_bias.safety": 100.0}), None, outs[0]),
        (1, params(**{"refusal_bias.humanizing": 100.0}), None, outs[1]),
        (2, params(), None, outs[2]),
    ]))
    proc.update_state(update(3, moved=[(0, 1, MoveDirectionality.SWAP)]))
    logits = torch.randn(3, VOCAB)
    proc.apply(logits)
    assert logits[0].argmax() == HUMANIZING and logits[1].argmax() == SAFETY
    proc.update_state(update(2, removed=[1], moved=[(0, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    logits = torch.randn(2, VOCAB)
    row0 = logits[0].clone()
    proc.apply(logits)
    assert logits[1].argmax() == HUMANIZING and torch.equal(logits[0], row0)
    proc.update_state(update(1, removed=[1]))
    assert proc.table.num_active == 0


def test_v1_resumed_request_is_not_redecided(config):
    proc = RefusalLogitsProcessor(config, torch.device("cpu"), False)
    proc.update_state(update(1, added=[(0, params(**{"refusal_bias.safety": 100.0}), [1], [RESPOND, 7])]))
    logits = torch.randn(1, VOCAB)
    proc.apply(logits)
    assert torch.isinf(logits[0, IDS]).all()  # banned, not re-decided


@pytest.mark.parametrize("cls", [RefusalLogitsProcessor, RefusalLogitsProcessorV2])
def test_validate_params_rejects_bad_values(cls):
    cls.validate_params(params(**{"refusal_bias.safety": 1.0}))
    with pytest.raises(RefusalParamError):
        cls.validate_params(params(**{"refusal_bias.safety": math.nan}))


def v2_state(prompt_lens):
    n = len(prompt_lens)
    arr = np.array(prompt_lens + [0] * (8 - n), dtype=np.int32)
    return SimpleNamespace(
        device=torch.device("cpu"), max_num_reqs=8, vocab_size=VOCAB,
        prompt_len=SimpleNamespace(np=arr, gpu=torch.from_numpy(arr)),
    )


def ctx(slots, pos, seq_lens):
    slots_t = torch.tensor(slots)
    return LogitsContext(
        expanded_idx_mapping=slots_t, idx_mapping=slots_t, idx_mapping_np=np.array(slots),
        expanded_local_pos=torch.zeros(len(slots), dtype=torch.long),
        input_ids=torch.zeros(len(slots), dtype=torch.long), pos=torch.tensor(pos),
        seq_lens_upper_bound_np=np.array(seq_lens),
    )


def test_v2_decides_by_position_and_keys_state_by_slot(config):
    state = v2_state([5, 3, 4])
    proc = RefusalLogitsProcessorV2(config, state)
    assert proc.add_request(0, params(**{"refusal_bias.safety": 100.0}))
    assert not proc.add_request(1, params())
    assert proc.add_request(2, params(**{"refusal_threshold.refuse": 0.0, "refusal_bias.humanizing": 50.0}))
    proc.apply_staged_writes()
    # Rows are reordered: row 0 -> slot 2 (first position), row 1 -> slot 1, row 2 -> slot 0
    # (slot 0 at its first position too: pos = prompt_len - 1).
    logits = torch.randn(3, VOCAB)
    plain = logits[1].clone()
    proc.apply(logits, ctx([2, 1, 0], [3, 2, 4], [4, 3, 5]))
    probs = torch.softmax(logits, dim=-1)
    assert probs[0, HUMANIZING] == 1.0  # forced by the threshold
    assert logits[2].argmax() == SAFETY
    assert torch.equal(logits[1], plain)
    # Next step: slot 0 is past its decision position; slot 2 too.
    logits = torch.randn(2, VOCAB)
    proc.apply(logits, ctx([0, 2], [5, 4], [6, 5]))
    assert torch.isinf(logits[:, IDS]).all()
    # A recycled slot is fully reset by add_request.
    assert not proc.add_request(0, params())
    logits = torch.randn(1, VOCAB)
    before = logits.clone()
    proc.apply(logits, ctx([0], [9], [10]))
    assert torch.equal(logits, before)


class Receiver:
    """The gateway's end of decision reports: an abstract datagram socket."""

    def __init__(self):
        import socket
        import uuid

        self.name = f"@test-reports/{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(2)

    def reports(self) -> dict[str, list[float]]:
        import json

        return dict(json.loads(self.sock.recv(65536))["reports"])


def own_probabilities(row: torch.Tensor) -> list[float]:
    return torch.softmax(row, dim=-1)[IDS].tolist()


def test_v1_reports_the_models_own_probabilities_before_bias(config):
    receiver = Receiver()
    proc = RefusalLogitsProcessor(config, torch.device("cpu"), False)
    report = {"refusal_report_to": receiver.name}
    proc.update_state(update(3, added=[
        (0, params(**{"refusal_bias.safety": 100.0, "refusal_report_id": "a"}, **report), [1], []),
        (1, params(**{"refusal_decide": 1}), [1], []),  # no report asked
        (2, params(**{"refusal_threshold.refuse": 0.0, "refusal_report_id": "c"}, **report), [1], []),
    ]))
    logits = torch.randn(3, VOCAB)
    expected = {"a": own_probabilities(logits[0]), "c": own_probabilities(logits[2])}
    proc.apply(logits)
    got = receiver.reports()
    assert got.keys() == expected.keys()
    for rid, probs in expected.items():
        assert got[rid] == pytest.approx(probs, rel=1e-5)
    assert proc.table.reporter.sent == 2


def test_v2_reports_by_slot(config):
    receiver = Receiver()
    proc = RefusalLogitsProcessorV2(config, v2_state([5, 3, 4]))
    proc.add_request(2, params(refusal_decide=1, refusal_report_to=receiver.name, refusal_report_id="s2"))
    proc.add_request(0, params(refusal_decide=1, refusal_report_to=receiver.name, refusal_report_id="s0"))
    proc.apply_staged_writes()
    logits = torch.randn(2, VOCAB)
    expected = own_probabilities(logits[0])
    # Row 0 holds slot 2 at its decision position; row 1 holds slot 0 mid-prompt.
    proc.apply(logits, ctx([2, 0], [3, 2], [4, 3]))
    got = receiver.reports()
    assert list(got) == ["s2"] and got["s2"] == pytest.approx(expected, rel=1e-5)


def test_reports_to_nowhere_are_dropped_not_raised(config):
    proc = RefusalLogitsProcessor(config, torch.device("cpu"), False)
    proc.update_state(update(1, added=[
        (0, params(refusal_decide=1, refusal_report_to="@nobody/listens", refusal_report_id="x"), [1], []),
    ]))
    proc.apply(torch.randn(1, VOCAB))
    assert proc.table.reporter.dropped == 1
