"""Training losses on a head's logits: cross-entropy and dot regression, by name.

Every head of :mod:`gnc.heads` returns logits ``z = W h + b`` (``b = −W μ_G`` for the ETF
heads, no ``b`` without bias), so both losses are functions of ``(logits, targets)`` alone
and serve every method alike.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "classification_loss", "dot_regression"]

LOSSES = ("ce", "dr")
"""Loss names accepted by :func:`classification_loss`: cross-entropy, dot regression."""


def dot_regression(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Dot-regression loss: the true class's logit regressed onto 1.

    .. math::
        \mathcal L = \frac{1}{2B}\sum_{i=1}^{B} \big(w_{y_i}^\top h_i + b_{y_i} - 1\big)^2
                   = \frac{1}{2B}\sum_{i=1}^{B} \big(z_{i,y_i} - 1\big)^2

    ``w_yᵀh + b_y`` is exactly the logit of the true class, so the loss reads it from the
    logits instead of from ``(h, W, b)``: this is the released code's ``DotRegressionLoss``
    (which takes the τ-normalised features, ``W`` and ``b``) for every head — with the
    ETF heads' training bias ``−W μ_G`` (μ_G the batch mean, through which the gradient also
    flows, as it does for cross-entropy), and with ``b = 0`` under ``bias=False``. The other
    logits get no gradient. With unit-norm rows ``w_c`` and features on the sphere of radius
    τ, ``w_yᵀh ≤ τ``, so the target 1 is reachable only for ``τ ≥ 1`` (minus the bias).

    Args:
        logits: (B, K) logits of a head.
        targets: (B,) class indices.

    Returns:
        The 0-d loss (mean over the batch).
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"Expected `logits` (B, K) and `targets` (B,), but got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    dot = logits.gather(1, targets.long().unsqueeze(1)).squeeze(1)  # (B,) = w_yᵀh + b_y
    return 0.5 * (dot - 1).square().mean()


def classification_loss(name: str, logits: Tensor, targets: Tensor) -> Tensor:
    """The training loss ``name`` (``"ce"``: cross-entropy, ``"dr"``: :func:`dot_regression`)
    of ``logits`` (B, K) against ``targets`` (B,), averaged over the batch."""
    if name == "ce":
        return F.cross_entropy(logits, targets)
    if name == "dr":
        return dot_regression(logits, targets)
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
