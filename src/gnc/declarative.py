"""The nearest simplex ETF as a declarative node: a solver forward, an implicit backward.

The forward solves (DESIGN §1, the paper's eq. (6))

    U* = argmin_{U ∈ St(d,K)} ‖H_bar − U M/√(K−1)‖²_F + (δ/2)‖U − U_prev‖²_F,

whose solution is the polar factor of ``C = (2/√(K−1)) H_bar M + δ U_prev``. The backward
returns ``∂L/∂H_bar`` from ``G = ∂L/∂U*`` in one of two interchangeable ways:

``closed_form`` — differentiate ``C = U* P`` (``P = B Σ Bᵀ`` symmetric positive definite):

    ∂L/∂C = (I − U Uᵀ) G P⁻¹ + 2 U Z,   P Z + Z P = skew(Uᵀ G),
    ∂L/∂H_bar = (2/√(K−1)) (∂L/∂C) M.

The Sylvester equation is diagonal in the eigenbasis ``B`` of ``P``: ``Z̃_ij = S̃_ij/(σ_i+σ_j)``.
Only sums of singular values are divided by, never differences: autograd through
``torch.linalg.svd`` divides by ``σ_i² − σ_j²`` and returns inf/NaN at neural collapse, where
K−1 singular values of C coincide. Cost O(dK²).

``ddn`` — the paper's: implicit differentiation of the equality-constrained problem
(Gould et al., "Deep Declarative Networks", TPAMI 2021, Prop. 4.5) with the constraints
``h(U) = sym(UᵀU) − I = 0`` (K(K+1)/2 of them):

    Dy = H⁻¹Aᵀ(AH⁻¹Aᵀ)⁻¹AH⁻¹B − H⁻¹B,

``A = D_U h``, ``H = I_d ⊗ ((2/(K−1))M + δI − Λ)`` the Hessian of the Lagrangian with
``Λ = sym(Uᵀ∇f(U))``, ``B = D²_{H_bar U} f = −(2/√(K−1)) (I_d ⊗ M)`` (row-major
vectorisation: ``vec(U)[i·K + a] = U[i, a]``). Dense in the K(K+1)/2 constraints, so for small K.

At δ = 0 (no ``U_prev``) ``P`` is singular along ``1/√K``; both backwards use the
pseudo-inverse there, which is exact for ``U* M`` (hence for ``W(U*)``): the singular
direction is the tie-break that ``M`` removes. That holds while ``H_bar M`` has rank K − 1.
A class absent from the first batch (a batch smaller than K, ``sampler="shuffle"``) leaves a
second null direction, which ``M`` does not remove: ``W`` then depends on the tie-break, and
both backwards hold it fixed, so that first step's gradient differs from the finite
difference (0.18 against 0.25 in a probe). Later steps (δ > 0) are unique and exact.

Layering: :func:`nearest_etf` (the function) → :class:`NearestETF` (the autograd node) →
:class:`~gnc.heads.ImplicitETFHead` (the module). Which forward and backward run is decided
in one place, :func:`resolve_solve`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gnc.etf import (
    BACKWARDS,
    ETF_POLAR_METHODS,
    NS_RESIDUAL_TOL,
    SOLVE_DEVICES,
    SOLVERS,
    capturing,
    check_nearest_etf_inputs,
    compute_dtype,
    polar_factor,
    polar_newton_schulz,
    proximal_full_rank,
    proximal_lower_bound,
    proximal_target,
)

__all__ = ["BACKWARDS", "ETF_POLAR_METHODS", "SOLVERS", "SOLVE_DEVICES", "NearestETF",
           "SolvePlan", "check_ddn_first_step", "nearest_etf", "resolve_solve"]


@dataclass(frozen=True)
class SolvePlan:
    """How :func:`nearest_etf` solves and differentiates (made by :func:`resolve_solve`).

    Attributes:
        solver: ``"exact"`` (the polar factor) or ``"riemannian"`` (the paper's trust regions).
        backward: ``"closed_form"``, ``"ddn"`` or ``"none"``.
        polar_method: the exact solver's polar factor, ``"auto"``, ``"svd"``, ``"gram"`` or
            ``"newton_schulz"``; always ``"auto"`` with the Riemannian solver (none computed).
        solve_device: ``"same"`` or ``"cpu"`` (exact eigensolvers only).
        ns_fallback: whether an unconverged Newton–Schulz iteration is redone by the
            eigensolver (reads its residual on the host).
    """

    solver: str = "exact"
    backward: str = "closed_form"
    polar_method: str = "auto"
    solve_device: str = "same"
    ns_fallback: bool = True

    @property
    def newton_schulz(self) -> bool:
        """Whether steps with δ > 0 use the sync-free iteration."""
        return self.polar_method == "newton_schulz"

    @property
    def eigen_method(self) -> str:
        """:func:`~gnc.etf.polar_factor`'s method when the eigensolver runs: ``"auto"`` for
        the Newton–Schulz plan's first step (δ = 0, rank-deficient) and fallback."""
        return "auto" if self.newton_schulz else self.polar_method


def resolve_solve(solver: str = "exact", backward: str = "closed_form",
                  polar_method: str = "auto", solve_device: str = "same",
                  ns_fallback: bool = True) -> SolvePlan:
    """Check the options of :func:`nearest_etf` and return its :class:`SolvePlan`.

    Raises ``ValueError`` for an unknown value or an option that the chosen solver does not
    use (no option is accepted and then ignored):

    - ``polar_method`` other than ``"auto"`` with ``solver="riemannian"``: that solver computes
      no polar factor;
    - ``solve_device="cpu"`` with ``solver="riemannian"``: that solver always runs on the
      host (pymanopt, NumPy), and returns to the tensors' device;
    - ``polar_method="newton_schulz"`` with ``solve_device="cpu"``: the iteration is for the
      tensors' device (the host runs the eigensolvers).

    ``ns_fallback`` is a guarantee rather than a method option: ``False`` means that the solve
    never reads the Newton–Schulz residual back; the other methods read none, so any value
    holds with them.
    """
    for name, value, choices in (("solver", solver, SOLVERS), ("backward", backward, BACKWARDS),
                                 ("polar_method", polar_method, ETF_POLAR_METHODS),
                                 ("solve_device", solve_device, SOLVE_DEVICES)):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose from {choices}")
    if not isinstance(ns_fallback, bool):
        raise ValueError(f"Expected `ns_fallback` to be a bool, but got {ns_fallback!r}")
    if solver == "riemannian" and polar_method != "auto":
        raise ValueError(f"polar_method={polar_method!r} applies to solver='exact'; "
                         "solver='riemannian' (trust regions) computes no polar factor")
    if solver == "riemannian" and solve_device != "same":
        raise ValueError(f"solve_device={solve_device!r} applies to solver='exact'; "
                         "solver='riemannian' always runs on the host (pymanopt, NumPy)")
    if polar_method == "newton_schulz" and solve_device == "cpu":
        raise ValueError("polar_method='newton_schulz' runs where the tensors are; "
                         "solve_device='cpu' is for the SVD/eigh methods")
    return SolvePlan(solver, backward, polar_method, solve_device, ns_fallback)


def _centre_rows(X: Tensor) -> Tensor:
    """``X M`` for ``M = I − 11ᵀ/K``."""
    return X - X.mean(dim=-1, keepdim=True)


def _sym(X: Tensor) -> Tensor:
    return 0.5 * (X + X.T)


def polar_backward(U: Tensor, B: Tensor, sigma: Tensor, G: Tensor) -> Tensor:
    """``∂L/∂C`` for the polar factor ``U`` of ``C = U B diag(σ) Bᵀ``, given ``G = ∂L/∂U``.

    ``(I − UUᵀ) G P⁺ + 2 U Z`` with ``PZ + ZP = skew(UᵀG)``; zero σ (rank-deficient C) are
    pseudo-inverted. Rearranged to three d×K products: with ``T = UᵀG`` and ``T̃ = Bᵀ T B``,
    ``(U T) P⁺ = U B (T̃ Σ⁺) Bᵀ`` and ``Z = B Z̃ Bᵀ``, so the result is
    ``G P⁺ + U B (2 Z̃ − T̃ Σ⁺) Bᵀ`` with ``Z̃_ij = skew(T̃)_ij / (σ_i + σ_j)``.
    """
    sigma_inv = torch.where(sigma > 0, 1.0 / sigma, torch.zeros_like(sigma))
    T_tilde = B.T @ (U.T @ G) @ B  # K×K, UᵀG in the eigenbasis of P
    denom = sigma[:, None] + sigma[None, :]
    Z_tilde = torch.where(denom > 0, 0.5 * (T_tilde - T_tilde.T) / denom,
                          torch.zeros_like(T_tilde))
    X = 2.0 * Z_tilde - T_tilde * sigma_inv  # T̃ Σ⁺ scales column j by 1/σ_j
    P_pinv = (B * sigma_inv) @ B.T
    return G @ P_pinv + U @ (B @ X @ B.T)


def closed_form_backward(U: Tensor, B: Tensor, sigma: Tensor, G: Tensor) -> Tensor:
    """``∂L/∂H_bar = (2/√(K−1)) · polar_backward(...) · M``."""
    K = U.shape[1]
    return (2.0 / math.sqrt(K - 1)) * _centre_rows(polar_backward(U, B, sigma, G))


# Up to this many classes the sync-free backward solves its Lyapunov equation as one K²×K²
# Cholesky system (a few kernels) instead of the ~5 products a step of the sign iteration.
LYAPUNOV_KRON_MAX_K = 16
# Up to this many classes a captured backward iterates on the whole 2K×2K block matrix (two
# kernels a step) rather than on its blocks (six kernels, 3/8 of the flops): four launches
# (~3 µs each in a graph) buy 20K³ float64 flops, the break-even near K ≈ 300 at 50 TFLOP/s
# (an estimate; small products run below peak).
LYAPUNOV_BLOCK_MAX_K = 128


def lyapunov_solve(P: Tensor, S: Tensor, scale: Tensor, alphas: tuple[float, ...], *,
                   products_only: bool = False) -> Tensor:
    """``Z`` with ``PZ + ZP = S`` for a symmetric positive definite ``P``, sync-free.

    Small K: the Kronecker form ``(P ⊗ I + I ⊗ P) vec(Z) = vec(S)`` by Cholesky
    (``cholesky_ex``: no error check, no sync). Otherwise the matrix sign function (Roberts,
    1980): for ``P̂ = P/s`` (spectrum in (0, 1]), ``sign([[P̂, S], [0, −P̂]]) = [[I, E], [0, −I]]``
    with ``P̂E + EP̂ = 2S``, so ``Z = E/(2s)``; the sign is the forward's scaled Newton–Schulz
    iteration with the same ``α_k`` (P̂ has the singular values of C/s) on the
    block-triangular matrix, whose off-diagonal block evolves as
    ``E ↦ (α/2)(3E − Q²E + QEQ − EQ²)``, ``Q = α P̂_k``. ``products_only`` (inside a
    CUDA-graph capture): always the sign iteration, for K <= :data:`LYAPUNOV_BLOCK_MAX_K` on
    the whole block matrix ``B ↦ (α/2) B (3I − α² B²)``, whose blocks evolve exactly as
    above (two kernels a step instead of six).
    """
    K = P.shape[0]
    if K <= LYAPUNOV_KRON_MAX_K and not products_only:
        eye = torch.eye(K, dtype=P.dtype, device=P.device)
        L, _ = torch.linalg.cholesky_ex(torch.kron(P, eye) + torch.kron(eye, P))
        return torch.cholesky_solve(S.reshape(K * K, 1), L).reshape(K, K)
    P_hat = P / scale
    if products_only and K <= LYAPUNOV_BLOCK_MAX_K:
        B = torch.cat([torch.cat([P_hat, S], 1), torch.cat([torch.zeros_like(S), -P_hat], 1)])
        for a in alphas:
            B = torch.addmm(B, B, B @ B, beta=1.5 * a, alpha=-0.5 * a**3)
        return B[:K, K:] / (2.0 * scale)
    E = S
    for a in alphas:  # Q = a P̂: E ← (a/2)(3E − a²P̂²E + a²P̂EP̂ − a²EP̂²), by addmm
        P2 = P_hat @ P_hat
        R = torch.addmm(E, P2, E, beta=1.5 * a, alpha=-0.5 * a**3)
        R = torch.addmm(R, P_hat @ E, P_hat, alpha=0.5 * a**3)
        E = torch.addmm(R, E, P2, alpha=-0.5 * a**3)
        P_hat = torch.addmm(P_hat, P_hat, P2, beta=1.5 * a, alpha=-0.5 * a**3)
    return E / (2.0 * scale)


def newton_schulz_backward(
    U: Tensor, P: Tensor, P_inv: Tensor, scale: Tensor, alphas: tuple[float, ...], G: Tensor
) -> Tensor:
    """:func:`polar_backward` without an eigenbasis, from the factors of
    :func:`~gnc.etf.polar_newton_schulz`: ``∂L/∂C = G P⁻¹ + U (2Z − T P⁻¹)`` with
    ``T = UᵀG`` and ``PZ + ZP = skew(T)`` (:func:`lyapunov_solve`). No host sync; all
    float64, as the forward's factors.
    """
    T = U.T @ G
    Z = lyapunov_solve(P, 0.5 * (T - T.T), scale, alphas, products_only=capturing())
    return G @ P_inv + U @ (2.0 * Z - T @ P_inv)


# Largest KKT system (dK + K(K+1)/2 unknowns) the δ = 0 ddn backward will build densely.
DDN_KKT_MAX = 8000


def check_ddn_first_step(d: int, K: int) -> None:
    """Refuse a δ = 0 (first-step) ddn backward whose dense KKT system exceeds
    :data:`DDN_KKT_MAX` unknowns: called before the step changes any state."""
    n = d * K + K * (K + 1) // 2
    if n > DDN_KKT_MAX:
        raise ValueError(
            f"the ddn backward without `U_prev` (δ = 0, the first step) solves a dense KKT "
            f"system of {n} unknowns (d·K + K(K+1)/2 for d={d}, K={K}), above the limit "
            f"{DDN_KKT_MAX}; use backward='closed_form' (the same gradient)")


def ddn_backward(
    U: Tensor, H_bar: Tensor, U_prev: Tensor | None, delta: float, G: Tensor
) -> Tensor:
    """The paper's DDN backward ``Dyᵀ g = Bᵀ(H⁻¹Aᵀ(AH⁻¹Aᵀ)⁻¹AH⁻¹g − H⁻¹g)`` (dense in A).

    At δ = 0 the minimiser is not isolated (the tie-break direction is free), ``H`` is
    singular and the formula above does not apply; we then solve the KKT system
    ``[H Aᵀ; A 0] z = [g; 0]`` it comes from in the least-squares sense, which is exact
    for losses of ``U* M`` (those ``g`` are orthogonal to the free direction).
    """
    d, K = U.shape
    s = math.sqrt(K - 1)
    eye = torch.eye(K, dtype=U.dtype, device=U.device)
    if U_prev is None:
        delta, U_prev = 0.0, torch.zeros_like(U)
    grad_f = (2.0 / (K - 1)) * _centre_rows(U) - (2.0 / s) * _centre_rows(H_bar)
    grad_f = grad_f + delta * (U - U_prev)
    Lam = _sym(U.T @ grad_f)  # Lagrange multipliers: ∇f(U*) = U* Λ
    H_k = (2.0 / (K - 1)) * (eye - 1.0 / K) + delta * eye - Lam  # H = I_d ⊗ H_k

    # A: one row per constraint (a <= b); ∂(UᵀU)_ab/∂U_ic = [c=a] U_ib + [c=b] U_ia.
    a_idx, b_idx = torch.triu_indices(K, K, device=U.device)
    p = a_idx.numel()
    rows = torch.arange(p, device=U.device)
    A = torch.zeros(p, d, K, dtype=U.dtype, device=U.device)
    A[rows, :, a_idx] += U[:, b_idx].T
    A[rows, :, b_idx] += U[:, a_idx].T
    if delta == 0.0:
        n = d * K
        check_ddn_first_step(d, K)
        A = A.reshape(p, n)
        KKT = torch.zeros(n + p, n + p, dtype=U.dtype, device=U.device)
        KKT[:n, :n] = torch.kron(torch.eye(d, dtype=U.dtype, device=U.device), H_k)
        KKT[:n, n:] = A.T
        KKT[n:, :n] = A
        rhs = torch.cat([G.reshape(-1), G.new_zeros(p)])
        z = torch.linalg.pinv(KKT, hermitian=True) @ rhs
        # Dy = −[I 0] KKT⁻¹ [B; 0]  ⇒  Dyᵀ g = −Bᵀ z_y
        return (2.0 / s) * _centre_rows(z[:n].reshape(d, K))
    H_k_inv = torch.linalg.inv(H_k)
    A_Hinv = (A @ H_k_inv).reshape(p, d * K)  # rows of A H⁻¹
    A = A.reshape(p, d * K)
    v = G @ H_k_inv  # H⁻¹ g
    mu = torch.linalg.solve(A_Hinv @ A.T, A @ v.reshape(-1))  # (AH⁻¹Aᵀ)⁻¹ A H⁻¹ g
    u = (A_Hinv.T @ mu).reshape(d, K)  # H⁻¹Aᵀ(AH⁻¹Aᵀ)⁻¹AH⁻¹g
    return -(2.0 / s) * _centre_rows(u - v)  # Bᵀ(u − v), B = −(2/√(K−1)) I ⊗ M


def _exact_solve(C: Tensor, method: str, *, full_rank: bool, on_host: bool,
                 input_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The polar factor's ``U, B, σ``, computed on the host when ``on_host`` (then moved back)."""
    if not on_host or C.device.type == "cpu":
        pf = polar_factor(C, method, full_rank=full_rank, input_dtype=input_dtype)
        return pf.U, pf.B, pf.sigma
    # the copy waits for C anyway: the rank test is free
    pf = polar_factor(C.cpu(), method, input_dtype=input_dtype)
    return tuple(t.to(C.device, non_blocking=True) for t in (pf.U, pf.B, pf.sigma))


def _newton_schulz_solve(C: Tensor, K: int, delta: float, info: dict | None, *,
                         fallback: bool):
    """:func:`~gnc.etf.polar_newton_schulz` of the proximal target, or None when ``fallback``
    and it did not converge (residual above ``NS_RESIDUAL_TOL``, read on the host: the
    caller then solves by the eigensolver)."""
    ns = polar_newton_schulz(C, proximal_lower_bound(K, delta), products_only=capturing())
    if info is not None:
        info["residual"] = ns.residual  # a device scalar: read it when a sync is acceptable
    if fallback and not float(ns.residual) <= NS_RESIDUAL_TOL:
        return None
    return ns


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The solve and its backward in the dtype they chose (float64 for small K, float32
    above): inside a model's autocast region their products would run in bf16/fp16."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class NearestETF(torch.autograd.Function):
    """``U* = nearest_etf(H_bar, U_prev)`` with a choice of solver and backward.

    ``NearestETF.apply(H_bar, U_prev, delta, solver, backward, info=None,
    solve_device="same", polar_method="auto", ns_fallback=True)`` (the options of
    :func:`nearest_etf`, checked by :func:`resolve_solve`); ``info``, when a dict, receives the
    solver's diagnostics (the Riemannian solver's iterations, gradient norm and stopping
    reason; the Newton–Schulz residual).
    """

    @staticmethod
    def forward(ctx, H_bar, U_prev, delta, solver, backward, info=None, solve_device="same",  # noqa: D102,E501
                polar_method="auto", ns_fallback=True):
        plan = resolve_solve(solver, backward, polar_method, solve_device, ns_fallback)
        check_nearest_etf_inputs(H_bar, U_prev, delta)
        if plan.backward == "ddn" and U_prev is None and H_bar.requires_grad:
            check_ddn_first_step(*H_bar.shape)
        with _no_autocast(H_bar.device):
            return NearestETF._solve(ctx, plan, H_bar, U_prev, delta, info)

    @staticmethod
    def _solve(ctx, plan: SolvePlan, H_bar: Tensor, U_prev: Tensor | None, delta: float,
               info: dict | None) -> Tensor:
        dtype = compute_dtype(H_bar)
        # Copies, never views: the ddn backward saves them, and the caller may overwrite its
        # U_prev in place after the step (ImplicitETFHead copies U* into its `U` buffer).
        H = H_bar.detach().to(dtype, copy=True)
        Up = None if U_prev is None else U_prev.detach().to(dtype, copy=True)
        delta = float(delta) if Up is not None else 0.0
        C = proximal_target(H, Up, delta)
        ns = None
        if plan.newton_schulz and delta > 0:
            # δ = 0 (the first step) is rank-deficient: the eigensolver's tie-break takes it
            ns = _newton_schulz_solve(C, H.shape[1], delta, info, fallback=plan.ns_fallback)
        if ns is not None:
            U = ns.U
        elif plan.solver == "exact":
            method = plan.eigen_method
            # The rank test (a host read) is skipped where the maths rules out a rank
            # deficiency: δ > 0 well above the rank tolerance (gnc.etf.proximal_full_rank).
            full_rank = proximal_full_rank(*H.shape, delta, method, dtype)
            U, B, sigma = _exact_solve(C, method, full_rank=full_rank,
                                       on_host=plan.solve_device == "cpu",
                                       input_dtype=H_bar.dtype)
        else:
            from gnc.riemannian import solve_riemannian

            res = solve_riemannian(H, Up, delta)
            U = res.U.to(device=H.device, dtype=dtype)
            if info is not None:
                info.update(
                    iterations=res.iterations,
                    gradient_norm=res.gradient_norm,
                    stopping_reason=res.stopping_reason,
                    restarts=res.restarts,
                )
            B = sigma = None
            if plan.backward == "closed_form":
                # At the optimum UᵀC = P (symmetric PSD): its eigenpairs are the factors.
                P = _sym(U.T @ C)
                sigma, B = torch.linalg.eigh(P)
                sigma = sigma.clamp_min(0)
                sigma = torch.where(sigma > sigma.max() * 1e-10, sigma, torch.zeros_like(sigma))
        ctx.backward_mode = plan.backward
        ctx.delta = delta
        ctx.in_dtype = H_bar.dtype
        ctx.has_prev = Up is not None
        ctx.alphas = ns.alphas if ns is not None else None
        if plan.backward == "closed_form" and ns is not None:
            ctx.save_for_backward(U, ns.P, ns.P_inv, ns.scale)
        elif plan.backward == "closed_form":
            ctx.save_for_backward(U, B, sigma)
        elif plan.backward == "ddn":
            ctx.save_for_backward(U, H, Up if Up is not None else torch.zeros_like(U))
        return U.to(H_bar.dtype)

    @staticmethod
    @once_differentiable  # a second derivative is refused, not silently wrong
    def backward(ctx, G):  # noqa: D102
        if ctx.backward_mode == "none" or not ctx.needs_input_grad[0]:
            return (None,) * 9
        with _no_autocast(G.device):
            return (NearestETF._gradient(ctx, G),) + (None,) * 8

    @staticmethod
    def _gradient(ctx, G: Tensor) -> Tensor:
        if ctx.backward_mode == "closed_form" and ctx.alphas is not None:
            U, P, P_inv, scale = ctx.saved_tensors
            K = U.shape[1]
            grad = newton_schulz_backward(U, P, P_inv, scale, ctx.alphas, G.to(U.dtype))
            grad = (2.0 / math.sqrt(K - 1)) * _centre_rows(grad)
        elif ctx.backward_mode == "closed_form":
            U, B, sigma = ctx.saved_tensors
            grad = closed_form_backward(U, B, sigma, G.to(U.dtype))
        else:
            U, H, Up = ctx.saved_tensors
            grad = ddn_backward(U, H, Up if ctx.has_prev else None, ctx.delta, G.to(U.dtype))
        return grad.to(ctx.in_dtype)


def nearest_etf(
    H_bar: Tensor,
    U_prev: Tensor | None = None,
    *,
    delta: float = 1e-3,
    solver: str = "exact",
    backward: str = "closed_form",
    info: dict | None = None,
    solve_device: str = "same",
    polar_method: str = "auto",
    ns_fallback: bool = True,
) -> Tensor:
    """Rotation ``U* ∈ St(d,K)`` of the simplex ETF nearest the class means ``H_bar``.

    Solves ``min_{U ∈ St(d,K)} ‖H_bar − U M/√(K−1)‖²_F + (δ/2)‖U − U_prev‖²_F`` (DESIGN §1):
    ``U*`` is the polar factor of ``C = (2/√(K−1)) H_bar M + δ U_prev``. Without ``U_prev``
    (first step) it solves the δ = 0 "feasibility" problem, whose solution is unique up to
    the direction ``1/√K`` that ``M`` removes; that direction is fixed by a deterministic
    tie-break, and ``W(U*) = simplex_etf(K, U*)`` does not depend on it.

    Differentiable with respect to ``H_bar`` (never ``U_prev``). The options are checked
    together by :func:`resolve_solve`, which refuses combinations that would leave one unused.

    Args:
        H_bar: d×K Frobenius-normalised centred class means.
        U_prev: d×K previous solution, or None.
        delta: proximal weight δ (default 1e-3); ignored without ``U_prev``.
        solver: ``"exact"`` (polar factor) or ``"riemannian"`` (the paper's trust regions,
            on the host).
        backward: ``"closed_form"`` (polar derivative), ``"ddn"`` (the paper's implicit
            differentiation, small K) or ``"none"`` (no gradient through U*).
        info: optional dict that receives the solver's diagnostics (Riemannian: iterations,
            gradient_norm, stopping_reason, restarts; Newton–Schulz: residual, a device
            scalar).
        solve_device: ``"same"`` (the tensors' device) or ``"cpu"``: the exact solve on the
            host, for small K on a GPU, where a d×K SVD is a few launch-bound kernels (the
            factors return to the device for the backward; ``docs/bench.md`` compares both).
            Exact solver only.
        polar_method: how the exact solver computes the polar factor: ``"auto"``, ``"svd"``,
            ``"gram"`` (see :func:`~gnc.etf.polar_factor`) or ``"newton_schulz"``
            (:func:`~gnc.etf.polar_newton_schulz` for δ > 0, with the backward by the same
            iteration: matrix products only, no host sync on a GPU; assumes
            ``‖H_bar‖_F <= 1``; the first step, δ = 0, always uses ``"auto"``). Exact solver
            only.
        ns_fallback: with ``"newton_schulz"``, read the iteration's residual
            ``max|UᵀU − I|`` on the host and, above ``NS_RESIDUAL_TOL`` (not converged),
            solve by ``"auto"`` instead (default True). ``False`` keeps the step free of host
            reads (the trainer's setting): the residual is then only reported in ``info``.

    Returns:
        ``U*``, d×K, same dtype and device as ``H_bar``.

    Example:
        >>> H = torch.randn(64, 10, dtype=torch.float64)
        >>> U = nearest_etf(H / H.norm())
        >>> torch.allclose(U.T @ U, torch.eye(10, dtype=torch.float64))
        True
    """
    return NearestETF.apply(H_bar, U_prev, delta, solver, backward, info, solve_device,
                            polar_method, ns_fallback)
