"""Optimisers (SGD, Adam, AdamW, AGD) and learning-rate schedules, built by name.

AGD is Automatic Gradient Descent (Bernstein, Mingard, Huang, Azizan & Yue 2023,
"Automatic Gradient Descent: Deep Learning without Hyperparameters", arXiv:2304.05187).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

__all__ = [
    "AGD",
    "OPTIMIZERS",
    "SCHEDULERS",
    "agd_init_",
    "build_optimizer",
    "build_scheduler",
]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def _dims(p: Tensor) -> tuple[int, int]:
    """(d_l, d_{l-1}) of a weight viewed as a matrix (out, in·kh·kw·…)."""
    return p.shape[0], p[0].numel()


def _scale(p: Tensor) -> float:
    """√(d_l / d_{l−1}) of a weight viewed as a matrix."""
    d_out, d_in = _dims(p)
    return math.sqrt(d_out / d_in)


class AGD(Optimizer):
    r"""Automatic Gradient Descent (Bernstein et al. 2023, arXiv:2304.05187, Algorithm 1).

    For the L weight matrices :math:`W_l \in \mathbb{R}^{d_l \times d_{l-1}}` (parameters with
    ``ndim >= 2``; a conv weight ``(out, in, kh, kw)`` is read as the matrix
    ``(out, in·kh·kw)``), one step is

    .. math::
        G &= \frac1L \sum_{l=1}^L \sqrt{d_l/d_{l-1}}\,\|\nabla_{W_l}\mathcal L\|_F \\
        \eta &= \log\frac{1 + \sqrt{1 + 4G}}{2} \\
        W_l &\leftarrow W_l - \mathrm{gain}\cdot\frac{\eta}{L}\,\sqrt{d_l/d_{l-1}}\,
               \frac{\nabla_{W_l}\mathcal L}{\|\nabla_{W_l}\mathcal L\|_F}

    so every layer moves by a relative spectral amount ≈ η/L, with η set automatically from
    the gradient sizes: there is no learning rate. ``gain`` (1 in the paper) multiplies η; it
    is stored as each parameter group's ``"lr"`` so that ``torch.optim.lr_scheduler``
    schedules act on it.

    The paper's reference code normalises a conv weight per kernel position (``kh·kw``
    separate ``out × in`` matrices, each ``√(out/in)/√(kh·kw)``); here the whole flattened
    matrix is normalised at once with the same scale ``√(out/(in·kh·kw))``; the two coincide
    for linear layers.

    Parameters with ``ndim < 2`` (biases, BatchNorm affine parameters), which the original AGD
    does not have, take a plain gradient step with the same step size:
    ``b ← b − gain·(η/L)·∇b``. Matrices whose gradient is ``None`` are not counted in L;
    a zero gradient contributes 0 to G and leaves its matrix unchanged.

    Initialise the network with :func:`agd_init_` (orthogonal, scaled by √(d_l/d_{l−1})),
    as the paper does: the step-size derivation assumes weights of that scale.

    Args:
        params: parameters or parameter groups.
        gain: multiplier of η (default 1).

    Attributes:
        last_eta: η of the last step (before ``gain``).
        last_G: G of the last step.
    """

    def __init__(self, params: ParamsT, *, gain: float = 1.0) -> None:
        if gain <= 0:
            raise ValueError(f"Expected `gain` > 0, but got {gain}")
        super().__init__(params, {"lr": gain})
        self.last_eta = 0.0
        self.last_G = 0.0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one AGD step; returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices = [
            p for g in self.param_groups for p in g["params"] if p.grad is not None and p.ndim >= 2
        ]
        num_layers = len(matrices)
        if num_layers == 0:
            return loss
        norms = {p: torch.linalg.vector_norm(p.grad) for p in matrices}
        G = sum(_scale(p) * norms[p] for p in matrices) / num_layers  # 0-d tensor
        G = float(G)
        eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
        self.last_G, self.last_eta = G, eta
        for group in self.param_groups:
            step = group["lr"] * eta / num_layers
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim >= 2:
                    norm = norms[p]
                    if norm > 0:
                        p.add_(p.grad, alpha=-step * _scale(p) / float(norm))
                else:
                    p.add_(p.grad, alpha=-step)
        return loss


@torch.no_grad()
def agd_init_(module: nn.Module) -> nn.Module:
    r"""AGD's initialisation, in place: every weight matrix semi-orthogonal, scaled.

    For each parameter with ``ndim >= 2`` read as the matrix ``(d_l, d_{l-1})`` (conv weights
    flattened to ``(out, in·kh·kw)``): :math:`W_l \leftarrow \sqrt{d_l/d_{l-1}}\;Q` with Q a
    random semi-orthogonal matrix (``torch.nn.init.orthogonal_``, all singular values 1), so
    :math:`\|W_l\|_* = \sqrt{d_l/d_{l-1}}`. Vectors (biases, BatchNorm) are left as they are.
    Uses torch's global RNG. Returns ``module``.
    """
    for p in module.parameters():
        if p.ndim >= 2:
            nn.init.orthogonal_(p)
            p.mul_(_scale(p))
    return module


# --------------------------------------------------------------------------- factories


OPTIMIZERS = ("sgd", "adam", "adamw", "agd")
"""Optimiser names accepted by :func:`build_optimizer`."""


def build_optimizer(
    name: str,
    params: ParamsT,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    gain: float = 1.0,
) -> Optimizer:
    """Build an optimiser by name.

    ==========  ==============================================================  ===============
    name        optimiser                                                       uses
    ==========  ==============================================================  ===============
    ``sgd``     ``torch.optim.SGD`` (heavy-ball momentum, L2 weight decay)      lr, momentum,
                                                                                weight_decay
    ``adam``    ``torch.optim.Adam`` (L2 weight decay)                          lr, betas,
                                                                                weight_decay
    ``adamw``   ``torch.optim.AdamW`` (decoupled weight decay)                  lr, betas,
                                                                                weight_decay
    ``agd``     :class:`AGD` — no learning rate, momentum or weight decay       gain
    ==========  ==============================================================  ===============

    Args:
        name: one of :data:`OPTIMIZERS`.
        params: parameters or parameter groups.
        lr: learning rate (not used by ``agd``, whose step size is automatic).
        momentum: SGD momentum.
        weight_decay: weight decay.
        betas: Adam/AdamW coefficients.
        gain: AGD's multiplier of its automatic step size.

    Raises:
        ValueError: unknown name.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; choose from {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return AGD(params, gain=gain)


SCHEDULERS = ("none", "step", "multistep", "cosine")
"""Schedule names accepted by :func:`build_scheduler`."""


def build_scheduler(
    name: str | None,
    optimizer: Optimizer,
    *,
    total_steps: int,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    step_size: int | None = None,
) -> sched.LRScheduler:
    """Build a learning-rate schedule by name.

    ``total_steps`` and the other step counts are in the unit in which the caller calls
    ``scheduler.step()`` (optimiser steps or epochs).

    ============  ============================================================================
    name          schedule
    ============  ============================================================================
    ``none``      constant (``None`` means the same)
    ``step``      ``StepLR``: × ``gamma`` every ``step_size`` (default ``total_steps // 3``)
    ``multistep`` ``MultiStepLR``: × ``gamma`` at each of ``milestones`` (default
                  ``[total_steps // 3, 2 * total_steps // 3]``)
    ``cosine``    ``CosineAnnealingLR`` from the initial rate to 0 over ``total_steps``
    ============  ============================================================================

    With :class:`AGD` the schedule scales ``gain``.

    Raises:
        ValueError: unknown name or a non-positive ``total_steps``.
    """
    name = "none" if name is None else name
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}'; choose from {', '.join(SCHEDULERS)}")
    if total_steps < 1:
        raise ValueError(f"Expected `total_steps` >= 1, but got {total_steps}")
    if name == "none":
        return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if name == "step":
        size = step_size if step_size is not None else max(1, total_steps // 3)
        return sched.StepLR(optimizer, step_size=size, gamma=gamma)
    if name == "multistep":
        if milestones is None:
            milestones = [max(1, total_steps // 3), max(1, 2 * total_steps // 3)]
        return sched.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    return sched.CosineAnnealingLR(optimizer, T_max=total_steps)
