"""Classifier heads: the paper's three methods (DESIGN §1) and its two ablations.

Every head maps features ``h`` (B×d, normalised by the caller onto the sphere of radius τ)
to logits ``W h + b`` and exposes ``.weight`` (K×d) and ``.bias`` (K; ``None`` without bias)
for the metrics:

- ``standard``: a learned linear classifier whose rows are renormalised to unit norm after
  each optimiser step (:meth:`StandardHead.renormalize_`).
- ``fixed``: ``W = W(U₀) = √(K/(K−1)) M U₀ᵀ`` for a fixed ``U₀`` (``I_{d×K}`` or a seeded random
  point of St(d,K)), never trained; ``b = −W μ_G``.
- ``implicit``: ``W = W(U*)`` with ``U*`` the nearest simplex ETF of the running class means
  (:func:`gnc.etf.nearest_etf`), recomputed at every training step; ``b = −W μ_G``.

``μ_G`` is the batch global mean in training and a running mean (a buffer) in evaluation, so
evaluation needs no targets and reproduces the last training ``W`` after a ``state_dict``
round trip.

``bias=False`` (the released scripts' ``--no-bias``) drops ``b`` from every head: logits are
``W h`` and ``.bias`` is ``None`` (no parameter, no buffer). For the ETF heads this is not the
same classifier: ``W h = W(h − μ_G) + W μ_G``, so the features' global mean now shifts
every sample's logits by ``W μ_G`` (zero only when μ_G lies in the null space of ``W``).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gnc.class_means import ClassMeanTracker
from gnc.etf import (
    canonical_stiefel,
    check_solver_options,
    nearest_etf,
    simplex_etf,
)
from gnc.validation import all_finite, value_checks_enabled

_MIN_ALPHA = 1e-4


def _check_features(features: Tensor, d: int) -> None:
    if features.ndim != 2 or features.shape[1] != d:
        raise ValueError(
            f"Expected `features` to have shape (B, d={d}), but got {tuple(features.shape)}"
        )
    if value_checks_enabled() and not all_finite(features):
        raise ValueError("`features` contains NaN or Inf")


def _batch_mean(features: Tensor) -> Tensor:
    """Global mean of the batch (of all ranks under torch.distributed), differentiable."""
    if dist.is_available() and dist.is_initialized():
        import torch.distributed.nn.functional as dist_fn

        total = dist_fn.all_reduce(features.sum(dim=0), op=dist.ReduceOp.SUM)
        n = torch.tensor(float(features.shape[0]), device=features.device)
        dist.all_reduce(n, op=dist.ReduceOp.SUM)
        return total / n
    return features.mean(dim=0)


def _forget_host_steps(module: nn.Module, incompatible_keys) -> None:
    module._host_steps = None


class StandardHead(nn.Module):
    r"""Learned linear classifier ``logits = h Wᵀ + b`` (the paper's "standard" method).

    Args:
        d: feature dimension.
        K: number of classes.
        bias: learn a bias (default True).
        normalize: keep unit-norm rows: :meth:`renormalize_` rescales them (call it after
            every optimiser step; the training loop does). ``False`` is the paper's
            unnormalised ablation, where :meth:`renormalize_` does nothing.

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
        _check_features(features, self.d)
        return F.linear(features, self.weight, self.bias)

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Rescale every row of ``W`` to unit norm (no-op when ``normalize=False``)."""
        if self.normalize:
            self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def extra_repr(self) -> str:
        return f"d={self.d}, K={self.K}, bias={self.bias is not None}, normalize={self.normalize}"


class _ETFHead(nn.Module):
    """Shared parts of the ETF heads: ``W``, ``b`` buffers and the running ``μ_G``.

    With ``bias=False`` the ``bias`` buffer is ``None`` (absent from the ``state_dict``);
    ``μ_G`` is still tracked (the metrics and :func:`set_global_mean` use it).
    """

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
        self.register_buffer("mu_G", torch.zeros(d, **factory))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))
        # the step count on the host: reading the buffer each step would wait for the GPU
        self._host_steps: int | None = None
        self.register_load_state_dict_post_hook(_forget_host_steps)

    @property
    def num_steps(self) -> int:
        """Training steps taken (the ``steps`` buffer, read from the device once)."""
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        return self._host_steps

    def _eval_logits(self, features: Tensor) -> Tensor:
        return F.linear(features.to(self.weight.dtype), self.weight, self.bias)

    def _train_logits(self, h: Tensor, W: Tensor, mu_G: Tensor) -> Tensor:
        """``W h + b`` with ``b = −W μ_G`` (μ_G the batch mean, differentiable), or ``W h``
        without bias."""
        return F.linear(h - mu_G if self.bias is not None else h, W)

    @torch.no_grad()
    def _store(self, W: Tensor, mu_G_running: Tensor) -> None:
        self.weight.copy_(W)
        # a non-finite batch (see ClassMeanTracker.forward) keeps the previous μ_G
        self.mu_G.copy_(torch.where(torch.isfinite(mu_G_running).all(), mu_G_running,
                                    self.mu_G))
        if self.bias is not None:
            self.bias.copy_(-W @ self.mu_G)
        self._host_steps = self.num_steps + 1
        self.steps += 1

    @torch.no_grad()
    def set_global_mean(self, mu_G: Tensor) -> None:
        """Set the evaluation global mean ``μ_G`` (and so ``b = −W μ_G``), e.g. recomputed
        over the training split by :func:`gnc.evaluation.recompute_statistics`."""
        self.mu_G.copy_(mu_G)
        if self.bias is not None:
            self.bias.copy_(-self.weight @ self.mu_G)

    def extra_repr(self) -> str:
        return f"d={self.d}, K={self.K}" + ("" if self.bias is not None else ", bias=False")


class FixedETFHead(_ETFHead):
    r"""A fixed simplex ETF classifier ``W = √(K/(K−1)) M U₀ᵀ``, ``b = −W μ_G`` ("fixed").

    Args:
        d, K: feature dimension and number of classes (``d >= K``).
        rotation: ``"canonical"`` (``U₀ = I_{d×K}``) or ``"random"`` (a seeded random point of
            St(d,K)).
        seed: seed of the random rotation.
        bias: use ``b = −W μ_G`` (default True); ``False``: logits ``W h``.

    Training uses the batch global mean in the bias; a running mean (EMA with
    ``α_t = max(2/(t+1), 1e-4)``) is kept for evaluation.
    """

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
            raise ValueError(f"unknown rotation {rotation!r}; choose 'canonical' or 'random'")
        self.rotation = rotation
        self.register_buffer("U", U0.to(device=device, dtype=self.weight.dtype))
        self.weight.copy_(simplex_etf(K, self.U))

    def forward(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        _check_features(features, self.d)
        if not self.training:
            return self._eval_logits(features)
        h = features.to(self.weight.dtype)
        mu_G = _batch_mean(h)
        alpha = max(2.0 / (self.num_steps + 2), _MIN_ALPHA)
        self._store(self.weight, (1 - alpha) * self.mu_G + alpha * mu_G.detach())
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
            :func:`~gnc.etf.nearest_etf`).
        polar_method: ``"auto"`` (default), ``"svd"``, ``"gram"`` or ``"newton_schulz"``: how
            the exact solver computes the polar factor (see :func:`~gnc.etf.nearest_etf`;
            ``newton_schulz`` makes the training step free of host syncs on a GPU).
        bias: use ``b = −W μ_G`` (default True); ``False``: logits ``W h``.

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

    U: Tensor

    def __init__(
        self, d: int, K: int, delta: float = 1e-3, solver: str = "exact",
        backward: str = "closed_form", update: str = "ema", solve_device: str = "same",
        bias: bool = True, polar_method: str = "auto", *, device=None, dtype=None,
    ) -> None:
        super().__init__(d, K, bias, device=device, dtype=dtype)
        check_solver_options(solver, backward, solve_device, polar_method)
        self.delta, self.solver, self.backward = delta, solver, backward
        self.solve_device, self.polar_method = solve_device, polar_method
        # the Newton–Schulz residual, updated in place (a CUDA graph replays the update)
        self.register_buffer("polar_residual", torch.zeros((), dtype=torch.float64,
                                                           device=device), persistent=False)
        self._residual_seen = False
        self.tracker = ClassMeanTracker(d, K, update, device=device, dtype=dtype)
        self.register_buffer("U", canonical_stiefel(d, K, dtype=self.weight.dtype, device=device))
        self.weight.copy_(simplex_etf(K, self.U))
        self.solver_info: dict = {}

    def forward(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        _check_features(features, self.d)
        if not self.training:
            return self._eval_logits(features)
        if targets is None:
            raise ValueError("ImplicitETFHead needs `targets` in training mode")
        h = features.to(self.weight.dtype)
        # The tracker validates labels before it changes any state.
        H_bar, mu_G = self.tracker(h, targets)
        U_prev = self.U if self.num_steps > 0 else None
        U = nearest_etf(H_bar, U_prev, delta=self.delta, solver=self.solver,
                        backward=self.backward, info=self.solver_info,
                        solve_device=self.solve_device, polar_method=self.polar_method)
        residual = self.solver_info.pop("residual", None)
        if residual is not None:  # kept on the device: read by pop_polar_residual
            with torch.no_grad():
                self.polar_residual.copy_(torch.maximum(self.polar_residual, residual))
            self._residual_seen = True
        W = simplex_etf(self.K, U).to(h.dtype)  # K×d
        with torch.no_grad():
            self.U.copy_(U)
        self._store(W.detach(), self.tracker.mu_G.to(W.dtype))
        return self._train_logits(h, W, mu_G)

    def pop_polar_residual(self) -> float | None:
        """The largest Newton–Schulz residual ``max|UᵀU − I|`` since the last call (None when
        no step used ``polar_method="newton_schulz"``); reads the device once."""
        if not self._residual_seen:
            return None
        residual = float(self.polar_residual)
        self.polar_residual.zero_()
        self._residual_seen = False
        return residual

    def extra_repr(self) -> str:
        extra = "" if self.polar_method == "auto" else f", polar_method={self.polar_method!r}"
        return (super().extra_repr() + f", delta={self.delta}, solver={self.solver!r}, "
                f"backward={self.backward!r}" + extra)


# method name → (head factory, normalise features onto the τ-sphere)
METHODS: dict[str, tuple[type[nn.Module], dict, bool]] = {
    "standard": (StandardHead, {}, True),
    "fixed": (FixedETFHead, {}, True),
    "implicit": (ImplicitETFHead, {}, True),
    # the paper's ablations
    "implicit-nograd": (ImplicitETFHead, {"backward": "none"}, True),
    "standard-unnormalized": (StandardHead, {"normalize": False}, False),
}


HEAD_OPTIONS = ("bias", "rotation", "seed", "delta", "solver", "backward", "update",
                "solve_device", "polar_method", "device", "dtype")


def normalizes_features(method: str) -> bool:
    """Whether ``method`` puts the features on the sphere of radius τ (all but the ablation)."""
    _check_method(method)
    return METHODS[method][2]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def make_head(method: str, d: int, K: int, **opts) -> nn.Module:
    """The head of ``method`` (``standard``, ``fixed``, ``implicit``, ``implicit-nograd``,
    ``standard-unnormalized``) for d-dimensional features and K classes.

    One set of options serves every method: those of :data:`HEAD_OPTIONS` that a head does
    not take are left out (``delta`` means nothing to ``standard``); any other name raises.
    """
    _check_method(method)
    unknown = set(opts) - set(HEAD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown head option(s) {sorted(unknown)}; choose from {HEAD_OPTIONS}")
    cls, fixed_opts, _ = METHODS[method]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in opts.items() if k in accepted}
    kwargs.update(fixed_opts)
    return cls(d, K, **kwargs)
