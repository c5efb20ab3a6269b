"""Optimisers (SGD, Adam, AdamW, AGD) and learning-rate schedules, built by name.

AGD is Automatic Gradient Descent (Bernstein, Mingard, Huang, Azizan & Yue 2023,
"Automatic Gradient Descent: Deep Learning without Hyperparameters", arXiv:2304.05187).
"""

from __future__ import annotations

import itertools
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
    "PER_STEP_SCHEDULES",
    "SCHEDULERS",
    "agd_init_",
    "embedding_weights",
    "build_optimizer",
    "build_scheduler",
    "check_optimizer_state",
    "check_resume_length",
    "schedule_spans_the_run",
]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def _scale(p: Tensor, transposed: bool = False) -> float:
    """AGD's scale of a weight ``(d_l, d_{l−1}, k₁, …)``: √(d_l/d_{l−1}) / √(k₁·…).

    For a matrix √(d_l/d_{l−1}); for a conv weight the scale of each of its P = k₁·… kernel
    positions, √(out/in)/√P, which equals √(out/(in·P)). ``transposed``: a matrix stored
    ``(d_{l−1}, d_l)``, as an ``nn.Embedding`` table (:func:`embedding_weights`).
    """
    if transposed:
        return math.sqrt(p.shape[1] / p.shape[0])
    return math.sqrt(p.shape[0] / p[0].numel())


def embedding_weights(module: nn.Module) -> list[Tensor]:
    """The ``nn.Embedding`` tables of ``module``: an ``(N, d)`` table E is the map
    ``h = Eᵀ e_i`` from a one-hot ``e_i``, so AGD reads it transposed, ``d_l × d_{l−1} =
    d × N`` (the unconstrained features of ``ufm``)."""
    return [m.weight for m in module.modules() if isinstance(m, nn.Embedding)]


def position_factor(p: Tensor, n: Tensor, transposed: bool = False) -> Tensor:
    """AGD's ``s_l / ‖g_p‖`` per kernel position of ``p`` (``n``: those gradient norms); a zero
    slice stays put (0, not 0/0)."""
    return torch.where(n > 0, _scale(p, transposed) / n.clamp_min(torch.finfo(n.dtype).tiny),
                       torch.zeros_like(n))


def _position_norms(g: Tensor) -> Tensor:
    """Frobenius norms of the ``out × in`` slices ``g[:, :, i, j, …]``, one per kernel
    position, shaped ``(1, 1, k₁, …)`` to broadcast against ``g`` (a matrix: its norm, (1, 1))."""
    return torch.linalg.vector_norm(g, dim=(0, 1), keepdim=True)


class AGD(Optimizer):
    r"""Automatic Gradient Descent (Bernstein et al. 2023, arXiv:2304.05187, Algorithm 1).

    For the L weights (parameters with ``ndim >= 2``) read as matrices
    :math:`W_{l,p} \in \mathbb{R}^{d_l \times d_{l-1}}` — a linear weight is one matrix
    (P = 1); a conv weight ``(out, in, k₁, …)`` is P = k₁·… matrices ``out × in``, one per
    kernel position p — with :math:`s_l = \sqrt{d_l/d_{l-1}}/\sqrt{P_l}`, one step is

    .. math::
        G &= \frac1L \sum_{l=1}^L s_l \sum_{p=1}^{P_l} \|\nabla_{W_{l,p}}\mathcal L\|_F \\
        \eta &= \log\frac{1 + \sqrt{1 + 4G}}{2} \\
        W_{l,p} &\leftarrow W_{l,p} - \mathrm{gain}\cdot\frac{\eta}{L}\, s_l\,
               \frac{\nabla_{W_{l,p}}\mathcal L}{\|\nabla_{W_{l,p}}\mathcal L\|_F}

    so every matrix moves by a relative spectral amount ≈ η/L, with η set automatically from
    the gradient sizes: there is no learning rate. ``gain`` (1 in the paper; the Guiding
    Neural Collapse paper's released scripts use 10) multiplies η; it is stored as each
    parameter group's ``"lr"`` so that ``torch.optim.lr_scheduler`` schedules act on it.

    Conv weights are treated per kernel position, as in the Guiding Neural Collapse paper's
    released AGD: :func:`agd_init_` makes each ``out × in`` slice semi-orthogonal with
    singular values s_l, and each slice's step is normalised by its own gradient norm.
    Reading the conv as one ``out × (in·P)`` matrix with the same scale s_l = √(out/(in·P))
    (what this class did before) gives that whole matrix singular values s_l, √P times
    smaller than the per-position initialisation gives it when out ≤ in, a larger G (the sum
    of the P slice norms is up to √P times their joint norm), and one step of Frobenius size
    s_l·η/L for the whole weight instead of √P·s_l·η/L; the released gain of 10 is tuned for
    the per-position reading. For linear layers the two coincide.

    Parameters with ``ndim < 2`` (biases, BatchNorm affine parameters), which the original AGD
    does not have (the released code refuses them; train with ``--no-bias`` to have none),
    take a plain gradient step with the same step size: ``b ← b − gain·(η/L)·∇b``. Weights
    whose gradient is ``None`` are not counted in L; a zero gradient (of a weight or of one
    kernel position) contributes 0 to G and leaves its slice unchanged.

    Initialise the network with :func:`agd_init_` (orthogonal, scaled by s_l), as the paper
    does: the step-size derivation assumes weights of that scale.

    Args:
        params: parameters or parameter groups.
        gain: multiplier of η (default 1).
        transposed: weights stored ``(d_{l−1}, d_l)`` (:func:`embedding_weights`).

    Attributes:
        last_eta: η of the last step (before ``gain``).
        last_G: G of the last step.
    """

    def __init__(self, params: ParamsT, *, gain: float = 1.0,
                 transposed: Iterable[Tensor] = ()) -> None:
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"Expected `gain` to be finite and > 0, but got {gain}")
        super().__init__(params, {"lr": gain})
        self._transposed = {id(p) for p in transposed}
        self.last_eta = 0.0
        self.last_G = 0.0

    def is_transposed(self, p: Tensor) -> bool:
        """Whether ``p`` is stored ``(d_{l−1}, d_l)`` (given as ``transposed``)."""
        return id(p) in self._transposed

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
        norms = {p: _position_norms(p.grad) for p in matrices}  # (1, 1, k₁, …) each
        G = float(sum(_scale(p, self.is_transposed(p)) * norms[p].sum()
                      for p in matrices)) / num_layers  # one sync
        eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
        self.last_G, self.last_eta = G, eta
        for group in self.param_groups:
            step = group["lr"] * eta / num_layers
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim >= 2:
                    p.add_(p.grad * position_factor(p, norms[p], self.is_transposed(p)),
                           alpha=-step)
                else:
                    p.add_(p.grad, alpha=-step)
        return loss


@torch.no_grad()
def agd_init_(module: nn.Module) -> nn.Module:
    r"""AGD's initialisation, in place: every weight slice semi-orthogonal, scaled.

    For each parameter with ``ndim >= 2``, shaped ``(d_l, d_{l−1}, k₁, …)``: each of its
    P = k₁·… ``d_l × d_{l−1}`` slices (one per kernel position; a matrix is its own single
    slice) becomes :math:`s_l\,Q` with Q a random semi-orthogonal matrix
    (``torch.nn.init.orthogonal_``, all singular values 1) and
    :math:`s_l = \sqrt{d_l/d_{l-1}}/\sqrt{P}`, as the released code does (see :class:`AGD`).
    A matrix thus gets :math:`\|W_l\|_* = \sqrt{d_l/d_{l-1}}` (an ``nn.Embedding`` table read
    transposed, :func:`embedding_weights`). Vectors (biases, BatchNorm) are left as they are.
    Uses torch's global RNG. Returns ``module``.
    """
    transposed = {id(w) for w in embedding_weights(module)}
    for p in module.parameters():
        if p.ndim < 2:
            continue
        d_out, d_in = p.shape[:2]
        for pos in itertools.product(*(range(k) for k in p.shape[2:])):
            # a fresh contiguous matrix per slice: orthogonal_ cannot write a strided view
            q = nn.init.orthogonal_(torch.empty(d_out, d_in, dtype=p.dtype, device=p.device))
            p[(slice(None), slice(None), *pos)] = q
        p.mul_(_scale(p, id(p) in transposed))
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
    transposed: Iterable[Tensor] = (),
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
        lr: learning rate (not used by ``agd``, whose step size is automatic; the training
            loop passes its ``lr`` as ``gain``).
        momentum: SGD momentum.
        weight_decay: weight decay.
        betas: Adam/AdamW coefficients.
        gain: AGD's multiplier of its automatic step size.
        transposed: AGD's weights stored ``(d_{l−1}, d_l)`` (:func:`embedding_weights`).

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
    return AGD(params, gain=gain, transposed=transposed)


SCHEDULERS = ("none", "step", "multistep", "cosine", "onecycle")
"""Schedule names accepted by :func:`build_scheduler`."""

PER_STEP_SCHEDULES = ("onecycle",)
"""Schedules stepped after every optimiser step (``total_steps`` = epochs × steps per epoch);
the others are stepped once per epoch (``total_steps`` = epochs)."""

ONECYCLE_DIV_FACTOR = 25.0  # initial lr = max lr / 25 (the released code's default)
ONECYCLE_FINAL_DIV_FACTOR = 1e4  # final lr = initial lr / 1e4 (the released code's default)
ONECYCLE_PCT_START = 0.3  # fraction of the steps spent rising to the max lr


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
    ``scheduler.step()``: epochs for all but the :data:`PER_STEP_SCHEDULES`, optimiser steps
    for those (the training loop does so).

    ============  ============================================================================
    name          schedule
    ============  ============================================================================
    ``none``      constant (``None`` means the same)
    ``step``      ``StepLR``: × ``gamma`` every ``step_size`` (default ``total_steps // 3``)
    ``multistep`` ``MultiStepLR``: × ``gamma`` at each of ``milestones`` (default
                  ``[total_steps // 3, 2 * total_steps // 3]``)
    ``cosine``    ``CosineAnnealingLR`` from the initial rate to 0 over ``total_steps``
    ``onecycle``  ``OneCycleLR`` with the optimiser's rate as the *maximum* ``η_max``, the
                  released code's settings: three phases with cosine annealing,
                  ``η_max/25 → η_max`` over the first 30% of ``total_steps``, back to
                  ``η_max/25`` by 60%, then to ``η_max/(25·10⁴)`` at the end; the momentum
                  (SGD) or β₁ (Adam/AdamW) cycles inversely between 0.95 and 0.85 (torch's
                  defaults, replacing the optimiser's own) when the optimiser has one (SGD
                  with momentum 0 and AGD keep theirs)
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
            # distinct: a milestone twice is two decays at once (epochs 2: [1, 1] gave γ²)
            milestones = sorted({max(1, total_steps // 3), max(1, 2 * total_steps // 3)})
        return sched.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if name == "onecycle":
        # cycling a momentum of 0 would switch momentum on: only cycle one that is in use
        cycle = bool(optimizer.defaults.get("momentum", 0)) or "betas" in optimizer.defaults
        return sched.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps, pct_start=ONECYCLE_PCT_START, anneal_strategy="cos",
            cycle_momentum=cycle, div_factor=ONECYCLE_DIV_FACTOR,
            final_div_factor=ONECYCLE_FINAL_DIV_FACTOR, three_phase=True,
        )
    return sched.CosineAnnealingLR(optimizer, T_max=total_steps)


def schedule_spans_the_run(name: str | None, *, milestones: Sequence[int] | None = None,
                           step_size: int | None = None) -> bool:
    """Whether the schedule ``name`` (:func:`build_scheduler`) takes its shape from the run's
    length: cosine and onecycle always, step and multistep when their decays are left to
    their defaults. A run with such a schedule cannot be resumed with other ``epochs``: its
    checkpointed schedule keeps the length it started with."""
    if name in ("cosine", "onecycle"):
        return True
    return (name == "step" and step_size is None) or (name == "multistep" and milestones is None)


def check_resume_length(run_dir: object, cfg: Any, started: int) -> None:
    """Refuse to resume the run at ``run_dir``, started with ``started`` epochs, with
    ``cfg.epochs`` (a :class:`gnc.config.TrainConfig`) when its schedule takes its shape from
    the length (:func:`schedule_spans_the_run`): the checkpointed schedule would keep the old
    length (a cosine at 0 at epoch ``started``, then rising again), so the run would be
    neither the one it started as nor one of ``cfg.epochs`` epochs."""
    if schedule_spans_the_run(cfg.schedule, milestones=cfg.milestones,
                              step_size=cfg.step_every):
        raise ValueError(
            f"cannot resume {run_dir} with epochs={cfg.epochs}: its {cfg.schedule} schedule "
            f"spans the {started} epochs it was started with (--until-epoch stops a run "
            "early; delete the run to redo it)")


def check_optimizer_state(optimizer: Optimizer) -> None:
    """``ValueError`` unless every hyperparameter of every group has the type of the
    optimiser's default (a bool, a finite number, a tuple of them) and every state tensor
    that is not a scalar has its parameter's shape: what ``load_state_dict`` does not check
    and the first step would fail on."""
    def fits(value: object, default: object) -> bool:
        if isinstance(default, bool):
            return isinstance(value, bool)
        if isinstance(default, (int, float)):
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value))
        if isinstance(default, tuple):
            return isinstance(value, (tuple, list)) and len(value) == len(default) and all(
                fits(v, d) for v, d in zip(value, default, strict=True))
        return True

    for i, group in enumerate(optimizer.param_groups):
        for key, default in optimizer.defaults.items():
            if key in group and not fits(group[key], default):
                raise ValueError(f"param group {i}: {key} = {group[key]!r}")
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != p.shape:
                raise ValueError(f"{key} of shape {tuple(value.shape)} for a parameter of "
                                 f"shape {tuple(p.shape)}")
