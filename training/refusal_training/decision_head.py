"""A decision head fitted on frozen features, written into the control-token rows.

Why not fine-tune the decision: a LoRA run on a 2-core CPU learns whatever
separates its few hundred training prompts most cheaply — CoCoNot's wording,
length, alarming words — and measured on other sources it decides worse than
chance (README, Quality). A linear head over the frozen base model's own
understanding of the prompt (:mod:`.features`) is fitted in seconds on every
source at once, can be refitted without a source to measure generalisation
honestly (leave-one-source-out), and leaves the base model's answers intact.

The head is a multinomial logistic regression over the control tokens
(``respond`` first, then the refusal categories), with class-balanced weights
and an L2 penalty. vLLM computes a control token's logit as ``row · h`` with no
bias term, so the intercepts ride on a direction ``u`` with ``u · h ≈ 1`` at
every decision position (the decision position is always the same template
token, so its hidden states share a large common component; ``u`` is a ridge
fit of that constant) and the head is exactly linear in ``h``. The same direction carries
a common ``offset`` that lifts every control logit far above the ordinary
vocabulary at the decision position, so the processor's full-vocabulary
probabilities are the head's probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Head:
    """``logits = h @ weight.T + bias`` over the control tokens, in manifest order."""

    weight: np.ndarray  # [K, d]
    bias: np.ndarray  # [K]

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        z = self.logits(features)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    classes: int,
    u: np.ndarray,
    l2: float = 1e-3,
    max_iter: int = 500,
    sample_weight: np.ndarray | None = None,
) -> Head:
    """Class-balanced multinomial logistic regression (L-BFGS) whose intercepts ride on ``u``.

    ``labels`` are class indices (0 = respond). The model is
    ``logits = (h / scale) @ w.T + (h @ u) * b``: the intercept ``b`` is
    multiplied by ``h @ u`` (≈ 1, see :func:`constant_direction`) instead of
    1, so the result is exactly linear in ``h`` — what vLLM's output
    projection computes — with no folding error. ``l2`` penalises ``w`` (per
    example, on features scaled to unit variance). ``sample_weight`` (e.g. to
    give every source the same say) multiplies the class-balancing weights.
    """
    import torch

    scale = features.std(axis=0) + 1e-6
    x = torch.tensor(features / scale, dtype=torch.float64)
    s = torch.tensor(features @ u, dtype=torch.float64).unsqueeze(1)
    y = torch.tensor(labels, dtype=torch.long)
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (classes * np.maximum(counts, 1)), 0.0)
    per_row = weights[labels] * (1.0 if sample_weight is None else sample_weight)
    rw = torch.tensor(per_row / per_row.mean(), dtype=torch.float64)
    w = torch.zeros((classes, x.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        logits = x @ w.T + s * b
        loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * rw).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight = w.detach().numpy() / scale + np.outer(b.detach().numpy(), u)
    return Head(weight, np.zeros(classes))


def constant_direction(features: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """``u`` with ``features @ u ≈ 1`` (ridge least squares): how a bias rides on ``h``."""
    d = features.shape[1]
    gram = features.T @ features / len(features)
    target = features.mean(axis=0)
    return np.linalg.solve(gram + ridge * np.trace(gram) / d * np.eye(d), target)


def fold(head: Head, u: np.ndarray, offset: float) -> np.ndarray:
    """[K, d] output rows: ``head``'s logits plus a common ``offset · (h @ u)``.

    The common term changes no probability among the control tokens; it only
    lifts them all above the ordinary vocabulary at the decision position."""
    return head.weight + np.outer(np.full(len(head.weight), offset), u)


def needed_offset(
    folded_without_offset: np.ndarray,
    u: np.ndarray,
    features: np.ndarray,
    vocab_max_logits: np.ndarray,
    margin: float = 12.0,
) -> float:
    """The smallest common offset that puts the best control logit ``margin`` above the
    largest ordinary-vocabulary logit on every given decision position."""
    control = (features @ folded_without_offset.T).max(axis=1)
    lift = features @ u  # how much one unit of offset lifts each row (≈ 1)
    need = (vocab_max_logits + margin - control) / np.maximum(lift, 1e-3)
    return float(max(0.0, need.max()))
