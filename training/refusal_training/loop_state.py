"""The state of a training loop between two steps, and who may save it.

Its own module because it is the contract between the loop (:mod:`.sft`) and
the checkpoints (:mod:`.checkpoints`): what must be saved, besides weights
and optimizer, for a resumed run to see exactly the batches and random
numbers an uninterrupted one would have. torch is imported only inside the
functions, so the checkpoint code can name these types without loading it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class LoopState:
    """Everything besides weights and optimizer that decides the next steps.

    ``batches`` is the rest of the current epoch and ``rng_state`` the batch
    shuffler's state: with both restored, a resumed run sees exactly the
    batches an uninterrupted run would have seen.
    """

    step: int = 0  # steps done
    losses: list[float] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)
    rng_state: Any = None  # random.Random.getstate() of the batch shuffler
    torch_rng_state: Any = None  # torch.get_rng_state() (dropout, if any)
    cuda_rng_state: Any = None  # torch.cuda.get_rng_state_all() where CUDA is used


class Checkpointer(Protocol):
    """Saves and restores a training run (``refusal-gateway train`` writes directories)."""

    def restore(self, model, optimizer) -> LoopState | None:
        """Load the latest checkpoint into ``model`` and ``optimizer``; None to start fresh."""
        ...

    def after_step(self, model, optimizer, state: LoopState, total_steps: int) -> None:
        """Called after every optimizer step; saves when it is time to."""
        ...


def capture_rng(state: LoopState, rng: random.Random) -> None:
    """Record the shuffler's and torch's random states in ``state``."""
    import torch

    state.rng_state = rng.getstate()
    state.torch_rng_state = torch.get_rng_state()
    state.cuda_rng_state = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def restore_rng(state: LoopState, rng: random.Random) -> None:
    """Put back the random states :func:`capture_rng` recorded."""
    import torch

    rng.setstate(state.rng_state)
    torch.set_rng_state(state.torch_rng_state)
    if state.cuda_rng_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng_state)
