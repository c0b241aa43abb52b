"""Checkpoints of ``refusal-gateway train``: save every N steps, resume exactly.

Its own module because the checkpoint format and the resume check (same
settings and data, or refuse) are a contract of their own between an
interrupted run and the next one; torch and safetensors are imported only
inside the methods.

**Checkpoints.** Every ``--checkpoint-every`` steps the trainable weights,
optimizer, RNG states and step go to ``<out>/checkpoints/step-N`` (the newest
two are kept); ``--resume`` continues from the newest one with exactly the
batches and random numbers an uninterrupted run would have used. A checkpoint
records a fingerprint of the run's settings and data (:func:`run_fingerprint`),
and resuming with different ones is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from .loop_state import LoopState
from .train_options import TrainOptions

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
KEEP_LAST_CHECKPOINTS = 2


class DirectoryCheckpointer:
    """``<out>/checkpoints/step-N``: trainable weights, optimizer, RNG states, loop state.

    Only the parameters that train are saved (all of them for a full
    fine-tune, adapters and token rows for LoRA); the rest is rebuilt from the
    base model by the same deterministic setup.
    """

    def __init__(self, root: Path, every: int, fingerprint: str, resume: bool):
        self.root, self.every, self.fingerprint, self.resume = root, every, fingerprint, resume
        self.restored_step: int | None = None

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        found = [p for p in self.root.glob("step-*") if (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))

    def restore(self, model, optimizer) -> LoopState | None:
        import torch
        from safetensors.torch import load_file

        if not self.resume:
            return None
        found = self.checkpoints()
        if not found:
            logger.info("no checkpoint under %s; starting from step 0", self.root)
            return None
        latest = found[-1]
        meta = json.loads((latest / "state.json").read_text())
        if meta["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"{latest} was written by a run with other settings or data; "
                "resume with the same options, or start over with --overwrite"
            )
        weights = load_file(latest / "trainable.safetensors")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != set(params):
            raise ValueError(f"{latest} does not match the model's trainable parameters")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name].to(param.device))
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", map_location="cpu"))
        rng = torch.load(latest / "rng.pt", weights_only=True)
        self.restored_step = meta["step"]
        logger.info("restored %s", latest)
        return LoopState(
            step=meta["step"],
            losses=meta["losses"],
            batches=meta["batches"],
            rng_state=rng["python"],
            torch_rng_state=rng["torch"],
            cuda_rng_state=rng["cuda"],
        )

    def after_step(self, model, optimizer, state: LoopState, total_steps: int) -> None:
        if self.every <= 0 or state.step % self.every or state.step >= total_steps:
            return  # the finished model is saved by the caller
        self.save(model, optimizer, state)

    def save(self, model, optimizer, state: LoopState) -> Path:
        """Write ``step-N`` atomically (a temp dir renamed), then drop old checkpoints."""
        import torch
        from safetensors.torch import save_file

        final = self.root / f"step-{state.step}"
        tmp = self.root / f".step-{state.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {
            n: p.detach().to("cpu").contiguous()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {
            "python": state.rng_state,
            "torch": state.torch_rng_state,
            "cuda": state.cuda_rng_state,
        }
        torch.save(rng, tmp / "rng.pt")
        meta = {
            "step": state.step,
            "fingerprint": self.fingerprint,
            "losses": state.losses,
            "batches": state.batches,
        }
        (tmp / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.checkpoints()[:-KEEP_LAST_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
        return final


def run_fingerprint(options: TrainOptions, texts: dict[str, str]) -> str:
    """Hash of what decides the run's numbers: settings, token texts, data, base config."""
    h = hashlib.sha256()
    skip = {
        "out",
        "resume",
        "keep_checkpoints",
        "overwrite",
        "checkpoint_every",
        "device",
        "data",
        "base",
        "save_dtype",
    }
    settings = {k: v for k, v in asdict(options).items() if k not in skip}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(texts, sort_keys=True).encode())
    for path in options.data:
        h.update(Path(path).read_bytes())
    h.update((Path(options.base) / "config.json").read_bytes())
    return h.hexdigest()[:16]
