"""Classifier heads: the paper's three methods (DESIGN §1) and its two ablations.

Every head maps features ``h`` (B×d, normalised by the caller onto the sphere of radius τ)
to logits ``W h + b`` and exposes ``.weight`` (K×d) and ``.bias`` (K; ``None`` without bias)
for the metrics:

- ``standard``: a learned linear classifier whose rows are renormalised to unit norm after
  each optimiser step (:meth:`StandardHead.after_optimizer_step`).
- ``fixed``: ``W = W(U₀) = √(K/(K−1)) M U₀ᵀ`` for a fixed ``U₀`` (``I_{d×K}`` or a seeded random
  point of St(d,K)), never trained; ``b = −W μ_G``.
- ``implicit``: ``W = W(U*)`` with ``U*`` the nearest simplex ETF of the running class means
  (:func:`gnc.declarative.nearest_etf`), recomputed at every training step; ``b = −W μ_G``.

All derive from :class:`Head`, whose hooks the training loop and the evaluation call
(:meth:`Head.after_optimizer_step`, :meth:`Head.pop_polar_residual`,
:meth:`Head.set_global_mean`). :data:`METHODS` is the one registry of the method names.

``μ_G`` is the batch global mean in training and a running mean (a buffer) in evaluation, so
evaluation needs no targets and reproduces the last training ``W`` after a ``state_dict``
round trip.

``bias=False`` (the released scripts' ``--no-bias``) drops ``b`` from every head: logits are
``W h`` and ``.bias`` is ``None`` (no parameter, no buffer). For the ETF heads this is not the
same classifier: ``W h = W(h − μ_G) + W μ_G``, so the features' global mean now shifts
every sample's logits by ``W μ_G`` (zero only when μ_G lies in the null space of ``W``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnc.class_means import (
    ClassMeanTracker,
    ema_weight,
    keep_running_wide,
    running_average,
    running_dtype,
)
from gnc.declarative import check_ddn_first_step, nearest_etf, resolve_solve
from gnc.etf import canonical_stiefel, check_delta, simplex_etf
from gnc.runtime import all_reduce_sum_, differentiable_sum, is_distributed
from gnc.validation import NonFiniteError, all_finite, check_features, value_checks_enabled

__all__ = ["ABLATIONS", "HEAD_OPTIONS", "METHODS", "METHOD_NAMES", "PAPER_METHODS", "ROTATIONS",
           "FixedETFHead", "Head", "ImplicitETFHead", "MethodSpec", "StandardHead",
           "make_head", "normalizes_features"]


def _batch_mean(features: Tensor) -> Tensor:
    """Global mean of the batch (of all ranks under torch.distributed), differentiable."""
    if is_distributed():
        n = torch.tensor(float(features.shape[0]), device=features.device)
        return differentiable_sum(features.sum(dim=0)) / all_reduce_sum_(n)
    return features.mean(dim=0)


def _forget_host_steps(module: nn.Module, incompatible_keys) -> None:
    module._host_steps = None


class Head(nn.Module):
    """What the training loop and the evaluation may call on every head (no ``hasattr``).

    A head maps features (B×d) to logits (B×K), exposes ``.weight`` (K×d) and ``.bias`` (K or
    ``None``), and has these hooks, whose defaults do nothing:

    - :meth:`after_optimizer_step`: called by the loop after every optimiser step;
    - :meth:`pop_polar_residual`: the solver's residual since the last call, or None;
    - :attr:`tracks_global_mean` / :meth:`set_global_mean`: a head whose bias is
      ``−W μ_G`` keeps ``μ_G`` and lets the evaluation reset it.

    Class attributes:
        options: the :func:`make_head` options its constructor takes.
    """

    options: ClassVar[tuple[str, ...]] = ("bias", "device", "dtype")
    tracks_global_mean: ClassVar[bool] = False

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (default: nothing)."""

    def pop_polar_residual(self) -> float | None:
        """The largest polar-factor residual since the last call; None (the default) when the
        head computed none."""
        return None

    def set_global_mean(self, mu_G: Tensor) -> None:
        """Set the evaluation global mean ``μ_G``; only for heads that
        :attr:`tracks_global_mean`."""
        raise NotImplementedError(f"{type(self).__name__} keeps no global mean "
                                  "(tracks_global_mean is False)")


class StandardHead(Head):
    r"""Learned linear classifier ``logits = h Wᵀ + b`` (the paper's "standard" method).

    Args:
        d: feature dimension.
        K: number of classes.
        bias: learn a bias (default True).
        normalize: keep unit-norm rows: :meth:`after_optimizer_step` (the training loop calls
            it after every optimiser step) rescales them, ``w_c ← w_c/‖w_c‖``. ``False`` is
            the paper's unnormalised ablation, where it does nothing.

    Shape:
        features (B, d) → logits (B, K).

    Example:
        >>> head = StandardHead(64, 10)
        >>> head(torch.randn(8, 64)).shape
        torch.Size([8, 10])
    """

    def __init__(
        self, d: int, K: int, bias: bool = True, normalize: bool = True, *, device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.d, self.K, self.normalize = d, K, normalize
        self.weight = nn.Parameter(torch.empty(K, d, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(K, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        self.renormalize_()

    def forward(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        check_features(features, self.d)
        return F.linear(features, self.weight, self.bias)

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Rescale every row of ``W`` to unit norm (no-op when ``normalize=False``)."""
        if self.normalize:
            self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def after_optimizer_step(self) -> None:
        """:meth:`renormalize_`: the rows of ``W`` back on the unit sphere."""
        self.renormalize_()

    def extra_repr(self) -> str:
        return f"d={self.d}, K={self.K}, bias={self.bias is not None}, normalize={self.normalize}"


class _ETFHead(Head):
    """Shared parts of the ETF heads: ``W``, ``b`` buffers, the running ``μ_G`` and the step
    count.

    With ``bias=False`` the ``bias`` buffer is ``None`` (absent from the ``state_dict``);
    ``μ_G`` is still tracked (the metrics and :meth:`set_global_mean` use it).
    """

    tracks_global_mean: ClassVar[bool] = True
    weight: Tensor
    bias: Tensor | None
    mu_G: Tensor
    steps: Tensor

    def __init__(self, d: int, K: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        if K < 2 or d < K:
            raise ValueError(f"an ETF head needs K >= 2 and d >= K, but got d={d}, K={K}")
        self.d, self.K = d, K
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.zeros(K, d, **factory))
        self.register_buffer("bias", torch.zeros(K, **factory) if bias else None)
        self.register_buffer("mu_G", torch.zeros(d, device=device, dtype=running_dtype(dtype)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))
        # the step count on the host: reading the buffer each step would wait for the GPU
        self._host_steps: int | None = None
        self.register_load_state_dict_post_hook(_forget_host_steps)

    def _apply(self, fn, recurse: bool = True):
        before = {"mu_G": self.mu_G}
        super()._apply(fn, recurse)
        keep_running_wide(self, before)  # a half-precision head keeps μ_G in float32
        return self

    @property
    def num_steps(self) -> int:
        """Training steps taken (the ``steps`` buffer, read from the device once)."""
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        return self._host_steps

    def advance_host_steps(self, n: int = 1) -> None:
        """Count ``n`` steps on the host that ran without this Python code: a CUDA-graph
        replay advances the ``steps`` buffer on the device only (:mod:`gnc.graphs`)."""
        self._host_steps = self.num_steps + n

    def snapshot(self) -> dict[str, Any]:
        """Copies of every buffer (persistent or not, the tracker's too) and the host-side
        state, for :meth:`restore`."""
        return {"buffers": {k: v.detach().clone() for k, v in self.named_buffers()},
                "host_steps": self.num_steps}

    @torch.no_grad()
    def restore(self, snapshot: dict[str, Any]) -> None:
        """Back to :meth:`snapshot`'s state, copied in place (a CUDA graph that captured the
        buffers keeps them)."""
        for k, v in self.named_buffers():
            v.copy_(snapshot["buffers"][k])
        self._host_steps = snapshot["host_steps"]

    def _eval_logits(self, features: Tensor) -> Tensor:
        return F.linear(features.to(self.weight.dtype), self.weight, self.bias)

    def _check_not_recomputed(self) -> None:
        """Refuse a training forward run by the autograd engine: activation checkpointing
        (``torch.utils.checkpoint``) recomputes it in the backward, which would update the
        running state a second time and give wrong gradients."""
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                f"{type(self).__name__}'s training forward ran inside a backward pass "
                "(activation checkpointing recomputes it): it updates running state, like "
                "BatchNorm; keep the head outside torch.utils.checkpoint")

    def _train_logits(self, h: Tensor, W: Tensor, mu_G: Tensor) -> Tensor:
        """``W h + b`` with ``b = −W μ_G`` (μ_G the batch mean, differentiable), or ``W h``
        without bias."""
        return F.linear(h - mu_G if self.bias is not None else h, W)

    @torch.no_grad()
    def _store(self, W: Tensor | None, mu_G_running: Tensor) -> None:
        """The step's ``W`` (None: unchanged), running ``μ_G``, ``b`` and step count."""
        if W is not None:  # not W onto itself: that would invalidate an earlier forward's graph
            self.weight.copy_(W)
        W = self.weight
        # a non-finite batch (see ClassMeanTracker.forward) keeps the previous μ_G
        self.mu_G.copy_(torch.where(torch.isfinite(mu_G_running).all(), mu_G_running,
                                    self.mu_G))
        if self.bias is not None:
            self.bias.copy_(-W.to(self.mu_G.dtype) @ self.mu_G)
        self._host_steps = self.num_steps + 1
        self.steps += 1

    @torch.no_grad()
    def set_global_mean(self, mu_G: Tensor) -> None:
        """Set the evaluation global mean ``μ_G`` (and so ``b = −W μ_G``), e.g. recomputed
        over the training split by :func:`gnc.evaluation.recompute_statistics`."""
        if not isinstance(mu_G, Tensor) or tuple(mu_G.shape) != (self.d,) or not (
                mu_G.is_floating_point()):
            got = (f"{tuple(mu_G.shape)} {mu_G.dtype}" if isinstance(mu_G, Tensor)
                   else type(mu_G).__name__)
            raise ValueError(f"Expected `mu_G` to be a floating-point tensor of shape "
                             f"(d={self.d},), but got {got}")
        if value_checks_enabled() and not all_finite(mu_G):
            raise NonFiniteError("Expected `mu_G` to be finite, but got NaN or Inf values")
        self.mu_G.copy_(mu_G)
        if self.bias is not None:
            self.bias.copy_(-self.weight.to(self.mu_G.dtype) @ self.mu_G)

    def extra_repr(self) -> str:
        return f"d={self.d}, K={self.K}" + ("" if self.bias is not None else ", bias=False")


ROTATIONS = ("canonical", "random")  # the fixed ETF's U: I_{d×K}, or a seeded random one


class FixedETFHead(_ETFHead):
    r"""A fixed simplex ETF classifier ``W = √(K/(K−1)) M U₀ᵀ``, ``b = −W μ_G`` ("fixed").

    Args:
        d, K: feature dimension and number of classes (``d >= K``).
        rotation: ``"canonical"`` (``U₀ = I_{d×K}``) or ``"random"`` (a seeded random point of
            St(d,K)).
        seed: seed of the random rotation.
        bias: use ``b = −W μ_G`` (default True); ``False``: logits ``W h``.

    Training uses the batch global mean in the bias; a running mean (EMA with
    ``α_t = max(2/(t+1), 1e-4)``, :func:`~gnc.class_means.ema_weight`) is kept for evaluation.
    """

    options: ClassVar[tuple[str, ...]] = ("rotation", "seed", "bias", "device", "dtype")
    U: Tensor

    def __init__(
        self, d: int, K: int, rotation: str = "canonical", seed: int = 0, bias: bool = True, *,
        device=None, dtype=None,
    ) -> None:
        super().__init__(d, K, bias, device=device, dtype=dtype)
        if rotation == "canonical":
            U0 = canonical_stiefel(d, K)
        elif rotation == "random":
            g = torch.Generator().manual_seed(seed)
            U0, _ = torch.linalg.qr(torch.randn(d, K, generator=g, dtype=torch.float64))
        else:
            raise ValueError(f"unknown rotation {rotation!r}; choose from {', '.join(ROTATIONS)}")
        self.rotation = rotation
        self.register_buffer("U", U0.to(device=device, dtype=self.weight.dtype))
        self.weight.copy_(simplex_etf(K, self.U))

    def forward(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        check_features(features, self.d)
        if not self.training:
            return self._eval_logits(features)
        if features.shape[0] == 0:  # its mean is NaN: a step that learns nothing
            raise ValueError("Expected `features` to hold at least one sample, but got B=0")
        self._check_not_recomputed()
        h = features.to(self.weight.dtype)
        mu_G = _batch_mean(h)
        alpha = ema_weight(self.num_steps + 1)  # this step's number
        self._store(None, running_average(self.mu_G, mu_G.detach(), alpha))
        return self._train_logits(h, self.weight, mu_G)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rotation={self.rotation!r}"


class ImplicitETFHead(_ETFHead):
    r"""The nearest simplex ETF of the running class means as classifier ("implicit").

    At every training step, with ``H̄`` the running Frobenius-normalised centred class means
    (:class:`~gnc.class_means.ClassMeanTracker`) and ``U_prev`` the previous solution:

        U* = argmin_{U ∈ St(d,K)} ‖H̄ − U M/√(K−1)‖²_F + (δ/2)‖U − U_prev‖²_F
        W  = √(K/(K−1)) M U*ᵀ,    b = −W μ_G (none when ``bias=False``),    logits = W h + b

    Gradients reach the features directly and through ``U*(H̄)`` (the declarative node).

    Args:
        d, K: feature dimension and number of classes (``d >= K``).
        delta: proximal weight δ (default 1e-3).
        solver: ``"exact"`` (polar factor, default) or ``"riemannian"`` (the paper's).
        backward: ``"closed_form"`` (default), ``"ddn"`` (the paper's) or ``"none"``
            (no gradient through U*: the paper's ablation).
        update: running class means, ``"ema"`` (default) or ``"cma"``.
        solve_device: ``"same"`` (default) or ``"cpu"``: where the exact solve runs (see
            :func:`~gnc.declarative.nearest_etf`).
        polar_method: ``"auto"`` (default), ``"svd"``, ``"gram"`` or ``"newton_schulz"``: how
            the exact solver computes the polar factor (see
            :func:`~gnc.declarative.nearest_etf`; ``newton_schulz`` makes the training step
            free of host syncs on a GPU, with ``ns_fallback=False``).
        bias: use ``b = −W μ_G`` (default True); ``False``: logits ``W h``.
        ns_fallback: with ``newton_schulz``, check the iteration's residual on the host each
            step and redo an unconverged step by the eigensolver (default True, as
            :func:`~gnc.declarative.nearest_etf`); ``False``: no host read, the residual is
            only reported by :meth:`pop_polar_residual` (the trainer's setting, and what a
            CUDA-graphed step needs).

    The options are checked together by :func:`~gnc.declarative.resolve_solve`.

    Shape:
        features (B, d), targets (B,) in training → logits (B, K).

    Attributes (buffers): ``U`` (d×K, the last U*; ``I_{d×K}`` before the first step),
    ``weight`` (K×d), ``bias`` (K, or ``None``), ``mu_G`` (d, running global mean), and the
    tracker's.

    Example:
        >>> head = ImplicitETFHead(64, 10)
        >>> logits = head(torch.randn(40, 64), torch.arange(40) % 10)
        >>> head.eval()(torch.randn(3, 64)).shape
        torch.Size([3, 10])
    """

    options: ClassVar[tuple[str, ...]] = ("delta", "solver", "backward", "update",
                                          "solve_device", "polar_method", "ns_fallback",
                                          "bias", "device", "dtype")
    U: Tensor

    def __init__(
        self, d: int, K: int, delta: float = 1e-3, solver: str = "exact",
        backward: str = "closed_form", update: str = "ema", solve_device: str = "same",
        bias: bool = True, polar_method: str = "auto", *, ns_fallback: bool = True,
        device=None, dtype=None,
    ) -> None:
        super().__init__(d, K, bias, device=device, dtype=dtype)
        # the solver options, checked together; read back through the properties below
        self.plan = resolve_solve(solver, backward, polar_method, solve_device, ns_fallback)
        check_delta(delta)  # here, not at the first step: after the running means changed
        self.delta = delta
        # the Newton–Schulz residual, updated in place (a CUDA graph replays the update)
        self.register_buffer("polar_residual", torch.zeros((), dtype=torch.float64,
                                                           device=device), persistent=False)
        self._residual_seen = False
        self.tracker = ClassMeanTracker(d, K, update, device=device, dtype=dtype)
        self.register_buffer("U", canonical_stiefel(d, K, dtype=self.weight.dtype, device=device))
        self.weight.copy_(simplex_etf(K, self.U))
        self.solver_info: dict = {}

    def forward(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        check_features(features, self.d)
        if not self.training:
            return self._eval_logits(features)
        if targets is None:
            raise ValueError("ImplicitETFHead needs `targets` in training mode")
        if torch.compiler.is_compiling():
            # Eager inside a compiled model: AOTAutograd recomputes the running-mean weight
            # β in the backward from the count it has just incremented in place (torch 2.11
            # to 2.14), which scales the features' gradient by 2/(t+3) instead of 2/(t+2).
            return torch.compiler.disable(type(self)._train_forward)(self, features, targets)
        return self._train_forward(features, targets)

    def _train_forward(self, features: Tensor, targets: Tensor) -> Tensor:
        """A training step of the head: the running means, ``U*``, ``W`` (and the buffers)."""
        self._check_not_recomputed()
        if self.backward == "ddn" and self.num_steps == 0 and torch.is_grad_enabled():
            check_ddn_first_step(self.d, self.K)  # before the running means change
        h = features.to(self.weight.dtype)
        # The tracker validates labels before it changes any state.
        H_bar, mu_G = self.tracker(h, targets)
        U_prev = self.U if self.num_steps > 0 else None
        U = nearest_etf(H_bar, U_prev, delta=self.delta, solver=self.solver,
                        backward=self.backward, info=self.solver_info,
                        solve_device=self.solve_device, polar_method=self.polar_method,
                        ns_fallback=self.ns_fallback)
        residual = self.solver_info.pop("residual", None)
        if residual is not None:  # kept on the device: read by pop_polar_residual
            with torch.no_grad():
                self.polar_residual.copy_(torch.maximum(self.polar_residual, residual))
            self._residual_seen = True
        W = simplex_etf(self.K, U).to(h.dtype)  # K×d
        with torch.no_grad():
            self.U.copy_(U)
        self._store(W.detach(), self.tracker.mu_G)
        return self._train_logits(h, W, mu_G.to(h.dtype))

    @property
    def solver(self) -> str:  # noqa: D102
        return self.plan.solver

    @property
    def backward(self) -> str:  # noqa: D102
        return self.plan.backward

    @property
    def solve_device(self) -> str:  # noqa: D102
        return self.plan.solve_device

    @property
    def polar_method(self) -> str:  # noqa: D102
        return self.plan.polar_method

    @property
    def ns_fallback(self) -> bool:  # noqa: D102
        return self.plan.ns_fallback

    def pop_polar_residual(self) -> float | None:
        """The largest Newton–Schulz residual ``max|UᵀU − I|`` since the last call (None when
        no step used ``polar_method="newton_schulz"``); reads the device once."""
        if not self._residual_seen:
            return None
        residual = float(self.polar_residual)
        self.polar_residual.zero_()
        self._residual_seen = False
        return residual

    def advance_host_steps(self, n: int = 1) -> None:
        """As the base class; a replayed Newton–Schulz step also updated the residual that
        :meth:`pop_polar_residual` reports."""
        super().advance_host_steps(n)
        if n > 0 and self.polar_method == "newton_schulz":
            self._residual_seen = True

    def snapshot(self) -> dict[str, Any]:  # noqa: D102
        return super().snapshot() | {"residual_seen": self._residual_seen}

    def restore(self, snapshot: dict[str, Any]) -> None:  # noqa: D102
        super().restore(snapshot)
        self._residual_seen = snapshot["residual_seen"]

    def extra_repr(self) -> str:
        extra = "" if self.polar_method == "auto" else f", polar_method={self.polar_method!r}"
        extra += "" if self.ns_fallback else ", ns_fallback=False"
        return (super().extra_repr() + f", delta={self.delta}, solver={self.solver!r}, "
                f"backward={self.backward!r}" + extra)


@dataclass(frozen=True)
class MethodSpec:
    """A method of :data:`METHODS`: its head and how the rest of the package treats it."""

    head: type[Head]  # the head class
    label: str  # display name (plots, tables)
    paper: bool  # one of the paper's three methods (False: an ablation)
    normalizes_features: bool = True  # features on the sphere of radius τ
    fixed: Mapping[str, Any] = field(default_factory=dict)  # head options the method sets

    @property
    def options(self) -> tuple[str, ...]:
        """The :func:`make_head` options this method's head takes (those it sets excluded)."""
        return tuple(o for o in self.head.options if o not in self.fixed)


# The one registry of methods (names as in the paper, used in configs, logs and plots).
METHODS: dict[str, MethodSpec] = {
    "standard": MethodSpec(StandardHead, "Standard", paper=True),
    "fixed": MethodSpec(FixedETFHead, "Fixed ETF", paper=True),
    "implicit": MethodSpec(ImplicitETFHead, "Implicit ETF", paper=True),
    # the paper's ablations
    "implicit-nograd": MethodSpec(ImplicitETFHead, "Implicit ETF (no DDN grad)", paper=False,
                                  fixed={"backward": "none"}),
    "standard-unnormalized": MethodSpec(StandardHead, "Standard (unnormalised)", paper=False,
                                        normalizes_features=False,
                                        fixed={"normalize": False}),
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
PAPER_METHODS: tuple[str, ...] = tuple(m for m, spec in METHODS.items() if spec.paper)
ABLATIONS: tuple[str, ...] = tuple(m for m, spec in METHODS.items() if not spec.paper)
# Every option of make_head: the union of the heads' options, in a stable order.
HEAD_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(
    o for spec in METHODS.values() for o in spec.head.options))


def method_spec(method: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``method``; ``ValueError`` naming the choices if unknown."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method]


def normalizes_features(method: str) -> bool:
    """Whether ``method`` puts the features on the sphere of radius τ (all but the ablation)."""
    return method_spec(method).normalizes_features


def make_head(method: str, d: int, K: int, **opts: Any) -> Head:
    """The head of ``method`` (a name of :data:`METHODS`) for d-dimensional features and K
    classes.

    One set of options serves every method, so that a trainer or an experiment passes its
    whole configuration for each: an option of :data:`HEAD_OPTIONS` that the method's head
    does not take (``delta`` for ``standard``) is dropped, and the options the method itself
    sets (``backward="none"`` for ``implicit-nograd``) override the caller's. Any other name
    raises ``ValueError``; the values are checked by the head (the implicit head's solver
    options together, by :func:`~gnc.declarative.resolve_solve`).
    """
    spec = method_spec(method)
    unknown = set(opts) - set(HEAD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown head option(s) {sorted(unknown)}; choose from {HEAD_OPTIONS}")
    kwargs = {k: v for k, v in opts.items() if k in spec.options}
    return spec.head(d, K, **kwargs, **spec.fixed)
