"""The simplex equiangular tight frame (ETF) and the nearest-ETF problem.

Notation (DESIGN §1): ``K`` classes, feature dimension ``d >= K``,
``M = I_K - (1/K) 1 1ᵀ`` the centring matrix, ``St(d, K) = {U ∈ R^{d×K} : UᵀU = I_K}``.
The simplex ETF with rotation ``U`` is the K×d matrix ``W(U) = √(K/(K-1)) · M · Uᵀ``.

The nearest simplex ETF of the (Frobenius-normalised) centred class means ``H_bar`` is the
proximal problem of Markou, Ajanthan & Gould (NeurIPS 2024), eq. (6):

    U* = argmin_{U ∈ St(d,K)}  ‖H_bar − U M/√(K−1)‖²_F + (δ/2) ‖U − U_prev‖²_F

On St(d,K), ‖UM‖²_F = K−1 and ‖U‖²_F = K, so the objective is ``const − tr(Uᵀ C)`` with

    C = (2/√(K−1)) · H_bar M + δ · U_prev

and the global minimiser is the polar factor of ``C``. This module holds that closed form;
:mod:`gnc.declarative` makes it differentiable and :mod:`gnc.riemannian` holds the paper's
iterative solver.

Pure maths: it imports nothing from the package but :mod:`gnc.validation`. The function
:func:`~gnc.declarative.nearest_etf` and the choice of solver
(:func:`~gnc.declarative.resolve_solve`) live in :mod:`gnc.declarative`; the names of its
options are defined here, once.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from gnc.validation import NonFiniteError, all_finite, value_checks_enabled

# The options of gnc.declarative.nearest_etf (checked by gnc.declarative.resolve_solve).
SOLVERS = ("exact", "riemannian")
BACKWARDS = ("closed_form", "ddn", "none")
# How polar_factor computes the polar factor.
POLAR_METHODS = ("auto", "svd", "gram")
# How nearest_etf computes the polar factor: the above, or the sync-free iteration.
ETF_POLAR_METHODS = (*POLAR_METHODS, "newton_schulz")
SOLVE_DEVICES = ("same", "cpu")

# Up to this many classes the whole solve and backward run in float64 (cheap at that size);
# above it the O(dK²) products run in the input's precision (float32 at least), and only
# the K×K eigenproblem stays float64 (see polar_factor).
FLOAT64_MAX_K = 256
# Above this many classes the polar factor comes from the K×K Gram matrix, not an SVD.
GRAM_MIN_K = 256
# The proximal target's σ_min(C) is assumed >= NS_SAFETY · δ (C 1 = δ U_prev 1 makes
# σ_min <= δ; ~δ is typical): a margin of 1000 below the typical. The Newton–Schulz schedule
# and the a-priori rank rule (proximal_full_rank) both rest on it.
NS_SAFETY = 1e-3


def centering(K: int, *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The centring matrix ``M = I_K − (1/K) 1 1ᵀ`` (symmetric, idempotent, ``M 1 = 0``)."""
    return torch.eye(K, dtype=dtype, device=device) - 1.0 / K


def canonical_stiefel(d: int, K: int, *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """``I_{d×K}``: the first K standard basis vectors of R^d, a point of St(d, K)."""
    return torch.eye(d, K, dtype=dtype, device=device)


def simplex_etf(K: int, U: Tensor | None = None) -> Tensor:
    """The simplex ETF ``W(U) = √(K/(K−1)) · M · Uᵀ`` (K×d).

    Its rows have unit norm and pairwise cosine ``−1/(K−1)``.

    Args:
        K: number of classes (``K >= 2``).
        U: rotation in St(d, K) (d×K). Default ``I_{K×K}``, giving a K×K ETF.

    Example:
        >>> W = simplex_etf(4)
        >>> torch.allclose(W @ W.T, (4 / 3) * centering(4, dtype=W.dtype))
        True
    """
    if K < 2:
        raise ValueError(f"a simplex ETF needs K >= 2 classes, but got K={K}")
    if U is None:
        U = torch.eye(K, dtype=torch.get_default_dtype())
    if U.ndim != 2 or U.shape[1] != K:
        raise ValueError(f"Expected `U` to have shape (d, K={K}), but got {tuple(U.shape)}")
    # M Uᵀ = Uᵀ − (column means of Uᵀ): avoids forming M.
    Ut = U.T
    return math.sqrt(K / (K - 1)) * (Ut - Ut.mean(dim=0, keepdim=True))


def proximal_target(H_bar: Tensor, U_prev: Tensor | None, delta: float) -> Tensor:
    """``C = (2/√(K−1)) · H_bar M + δ · U_prev`` (``U_prev = None`` means ``δ = 0``)."""
    K = H_bar.shape[1]
    # H_bar M = H_bar with each row's mean removed.
    C = (2.0 / math.sqrt(K - 1)) * (H_bar - H_bar.mean(dim=1, keepdim=True))
    if U_prev is not None and delta != 0.0:
        C = C + delta * U_prev
    return C


def etf_objective(
    U: Tensor, H_bar: Tensor, U_prev: Tensor | None = None, delta: float = 0.0
) -> Tensor:
    """``f(U) = ‖H_bar − U M/√(K−1)‖²_F + (δ/2)‖U − U_prev‖²_F`` (the paper's eq. (6))."""
    K = H_bar.shape[1]
    UM = U - U.mean(dim=1, keepdim=True)
    f = (H_bar - UM / math.sqrt(K - 1)).square().sum()
    if U_prev is not None and delta != 0.0:
        f = f + 0.5 * delta * (U - U_prev).square().sum()
    return f


@dataclass
class PolarFactor:
    """``C = U P`` with ``U ∈ St(d,K)`` and ``P = B diag(sigma) Bᵀ`` (the SVD ``C = (U B) Σ Bᵀ``).

    ``rank`` is the number of singular values above the rank tolerance; the remaining
    ``sigma`` are set to 0 and ``U`` is completed on the null space by a tie-break (see
    :func:`polar_factor`). The backward of :mod:`gnc.declarative` reuses ``B`` and ``sigma``.
    """

    U: Tensor
    B: Tensor
    sigma: Tensor
    rank: int


def _complete_null_space(A_r: Tensor, B_n: Tensor) -> Tensor:
    """Left factor ``A_n`` (d×n) for the null directions ``B_n`` of a rank-deficient C.

    Any ``A_n`` with orthonormal columns orthogonal to ``A_r`` maximises ``tr(Uᵀ C)``; we take
    the one that puts ``U = A_r B_rᵀ + A_n B_nᵀ`` nearest ``I_{d×K}``:
    ``A_n = polar((I − A_r A_rᵀ) I_{d×K} B_n)``. It is deterministic and does not depend on
    the basis chosen for the null space.
    """
    d = A_r.shape[0]
    E_Bn = torch.zeros(d, B_n.shape[1], dtype=B_n.dtype, device=B_n.device)
    E_Bn[: B_n.shape[0]] = B_n
    Q = E_Bn - A_r @ (A_r.T @ E_Bn)
    Qa, Qs, Qvh = torch.linalg.svd(Q, full_matrices=False)
    if Qs.numel() and Qs.min() < 1e-6:
        # I_{d×K} B_n lies (nearly) in span(A_r): complete with a fixed pseudo-random frame.
        g = torch.Generator(device="cpu").manual_seed(0)
        R = torch.randn(d, B_n.shape[1], generator=g, dtype=B_n.dtype).to(B_n.device)
        Q = Q + (R - A_r @ (A_r.T @ R))
        Qa, _, Qvh = torch.linalg.svd(Q, full_matrices=False)
    return Qa @ Qvh


def concrete_polar_method(method: str, K: int) -> str:
    """``"auto"`` resolved for K classes: ``"svd"`` up to :data:`GRAM_MIN_K`, ``"gram"`` above."""
    if method == "auto":
        return "gram" if K > GRAM_MIN_K else "svd"
    return method


def rank_tolerance(sigma_max: float, d: int, K: int, method: str, dtype: torch.dtype) -> float:
    """Singular values of a d×K matrix at or below this count as zero in :func:`polar_factor`.

    ``10 · max(d, K) · eps · σ_max`` (the SVD's backward error, ``eps`` of ``dtype``); for
    ``"gram"`` (float64 eigenproblem of CᵀC) at least ``10 · √(K·eps) · σ_max``: an eigenvalue
    of CᵀC carries absolute error ~eps·σ_max², i.e. σ ~ √eps·σ_max.
    """
    if method == "svd":
        return sigma_max * max(d, K) * torch.finfo(dtype).eps * 10
    eps = torch.finfo(torch.float64).eps
    return max(sigma_max * max(d, K) * eps * 10, sigma_max * math.sqrt(K * eps) * 10)


def proximal_full_rank(d: int, K: int, delta: float, method: str = "auto",
                       dtype: torch.dtype = torch.float64) -> bool:
    """Whether the proximal target ``C = (2/√(K−1)) H_bar M + δ U_prev`` has full rank for
    :func:`polar_factor`, decided from (d, K, δ, method, dtype) alone: no host read.

    ``C 1/√K = δ U_prev 1/√K`` has norm δ, so ``σ_min(C) <= δ``; for class means that are not
    adversarially aligned with ``U_prev``, ``σ_min ≈ δ``. As the Newton–Schulz schedule
    (:func:`proximal_lower_bound`) we assume ``σ_min >= NS_SAFETY·δ`` and, for
    ``‖H_bar‖_F <= 1``, ``σ_max <= ‖C‖_F <= s_max = 2/√(K−1) + δ√K``. C then has full rank
    when ``NS_SAFETY·δ`` is above :func:`rank_tolerance` at ``σ_max = s_max``: true at the
    default δ = 1e-3 up to a few thousand classes; false for δ = 0 (no ``U_prev``: C has
    rank K−1) and for a δ so small that the rank test is needed.
    """
    if not delta > 0:
        return False
    s_max = 2 / math.sqrt(K - 1) + delta * math.sqrt(K)
    method = concrete_polar_method(method, K)
    return NS_SAFETY * delta > rank_tolerance(s_max, d, K, method, dtype)


def polar_factor(C: Tensor, method: str = "auto", *, full_rank: bool = False,
                 input_dtype: torch.dtype | None = None) -> PolarFactor:
    """Polar decomposition ``C = U P`` of a d×K matrix (d >= K), with the factors of ``P``.

    ``U = A Bᵀ`` where ``C = A Σ Bᵀ`` is the thin SVD; it is the unique maximiser of
    ``tr(Uᵀ C)`` over St(d, K) when ``σ_min(C) > 0``. When C is rank-deficient (the δ = 0
    feasibility step, where ``C 1 = 0``), the null directions are completed by the
    tie-break of :func:`_complete_null_space`.

    Methods:

    - ``"svd"``: thin SVD of C, in C's dtype.
    - ``"gram"``: eigendecomposition of the K×K Gram matrix ``CᵀC = B Σ² Bᵀ``, then
      ``U = C (B Σ⁻¹ Bᵀ)``. The Gram matrix and its eigendecomposition are always float64
      (their error grows as eps·cond(C)², so float32 would not do); the two d×K products are
      in C's dtype (error ~eps·cond(C)). About 2× cheaper than the SVD when d ≫ K.
    - ``"auto"``: svd up to :data:`GRAM_MIN_K` classes (cheap either way, and the more
      accurate), gram above.

    ``full_rank=True`` skips the rank test (which reads ``σ_max`` on the host, a device sync
    on a GPU): for a C known to have ``σ_min`` above the rank tolerance, such as the proximal
    target with δ > 0 (see :func:`proximal_full_rank`). ``input_dtype``: the precision C's
    data came in; float32 class means solved in float64 have their rounding,
    ``10·eps(float32)·‖C‖_F``, counted as no rank either. Without it a class absent from the first
    batch left a singular value of ~2e-8·σ_max, rounding of the float32 means, which the
    float64 test kept as rank: the tie-break then followed noise, and W differed by 0.5
    between float32 and float64 heads and with the batch's order.

    Returns the factors in C's dtype.
    """
    if method not in POLAR_METHODS:
        raise ValueError(f"unknown polar method {method!r}; choose from {POLAR_METHODS}")
    d, K = C.shape
    method = concrete_polar_method(method, K)
    if method == "svd":
        A, sigma, Bh = torch.linalg.svd(C, full_matrices=False)
        B = Bh.T
    else:
        C64 = C.double()
        lam, B = torch.linalg.eigh(C64.T @ C64)  # ascending
        lam, B = lam.flip(0), B.flip(1)  # descending, like the SVD
        sigma = lam.clamp_min(0).sqrt()
        A = None
    if full_rank:
        if A is not None:
            return PolarFactor(A @ B.T, B, sigma, K)
        B, sigma = B.to(C.dtype), sigma.to(C.dtype)
        return PolarFactor(C @ ((B / sigma) @ B.T), B, sigma, K)
    top, norm = torch.stack([sigma[0], torch.linalg.vector_norm(sigma)]).tolist()  # one read
    tol = rank_tolerance(top, d, K, method, C.dtype)
    if input_dtype == torch.float32 and C.dtype == torch.float64:
        # (half-precision means would cut real directions: 10·eps(bf16) is 8 % of ‖C‖)
        tol = max(tol, 10 * torch.finfo(torch.float32).eps * norm)
    rank = int((sigma > tol).sum())
    if rank == K:
        if A is not None:
            return PolarFactor(A @ B.T, B, sigma, rank)
        B, sigma = B.to(C.dtype), sigma.to(C.dtype)
        return PolarFactor(C @ ((B / sigma) @ B.T), B, sigma, rank)
    B_r, B_n = B[:, :rank], B[:, rank:]
    A_r = A[:, :rank] if A is not None else C @ (B_r / sigma[:rank]).to(C.dtype)
    B_r, B_n = B_r.to(C.dtype), B_n.to(C.dtype)
    A_n = _complete_null_space(A_r, B_n)
    U = A_r @ B_r.T + A_n @ B_n.T
    sigma = torch.cat([sigma[:rank], sigma.new_zeros(K - rank)]).to(C.dtype)
    return PolarFactor(U, B.to(C.dtype), sigma, rank)


def polar(C: Tensor) -> Tensor:
    """The polar factor ``U = A Bᵀ`` of ``C = A Σ Bᵀ``: the nearest point of St(d,K) to C.

    ``C`` is a finite floating-point d×K matrix with d >= K >= 1 (float16/bfloat16 are solved
    in float32, which the linear algebra needs, and returned in their dtype); anything else
    is a ``ValueError`` naming what is wrong.
    """
    if not isinstance(C, Tensor) or C.ndim != 2 or not 1 <= C.shape[1] <= C.shape[0]:
        got = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
        raise ValueError(f"Expected `C` to be a d×K matrix with d >= K >= 1, but got {got}")
    if not C.is_floating_point():
        raise ValueError(f"Expected `C` to be floating point, but got {C.dtype}")
    if value_checks_enabled() and not all_finite(C):
        raise NonFiniteError("Expected `C` to be finite, but got NaN or Inf values")
    if C.dtype in (torch.float16, torch.bfloat16):
        return polar_factor(C.float()).U.to(C.dtype)
    return polar_factor(C).U


# Largest residual max|UᵀU − I| (float64) taken as converged: √eps, half the digits
# (converged runs reach a few eps; an unconverged direction leaves an error of order one).
NS_RESIDUAL_TOL = math.sqrt(torch.finfo(torch.float64).eps)


@functools.lru_cache(maxsize=64)
def newton_schulz_schedule(ell: float, eps: float = 1e-15) -> tuple[float, ...]:
    """Scalings ``α_k`` of the scaled Newton–Schulz iteration for singular values in [ℓ, 1].

    Each step maps a singular value ``x ↦ g(α_k x)`` with ``g(y) = (3y − y³)/2``;
    ``α_k = √(3/(1 + ℓ_k + ℓ_k²))`` makes ``g`` equal at both ends of ``[ℓ_k, 1]``, so the
    values stay in ``[ℓ_{k+1}, 1]`` with ``ℓ_{k+1} = g(α_k ℓ_k)`` (Chen & Chow, "A stable
    scaling of Newton–Schulz for improving the sign function computation of a Hermitian
    matrix", 2014). Small ℓ grow ×2.6 a step, then the convergence is quadratic. Stops once
    ``1 − ℓ_k <= eps`` and adds one unscaled step.
    """
    if not 0 < ell <= 1:
        raise ValueError(f"Expected a lower bound 0 < ell <= 1, but got {ell}")
    alphas = []
    while 1 - ell > eps and len(alphas) < 200:
        a = math.sqrt(3 / (1 + ell + ell * ell))
        alphas.append(a)
        ell = 0.5 * a * ell * (3 - a * a * ell * ell)
    return (*alphas, 1.0)


def proximal_lower_bound(K: int, delta: float) -> float:
    """ℓ for :func:`newton_schulz_schedule` of the proximal target of a Frobenius-normalised
    ``H_bar``: ``NS_SAFETY·δ / s_max`` with ``s_max = 2/√(K−1) + δ√K >= ‖C‖_F``."""
    return min(1.0, NS_SAFETY * delta / (2 / math.sqrt(K - 1) + delta * math.sqrt(K)))


@dataclass
class NewtonSchulzPolar:
    """``C = U P`` from :func:`polar_newton_schulz` (all float64): ``P = UᵀC = (CᵀC)^{1/2}``
    and ``P⁻¹``, the scale ``s`` the iteration started from, and its ``residual``
    ``max|UᵀU − I|`` (device scalars: reading them is the caller's choice)."""

    U: Tensor
    P: Tensor
    P_inv: Tensor
    scale: Tensor
    residual: Tensor
    alphas: tuple[float, ...]


# Set while a CUDA graph of the head is warmed up and captured (gnc.graphs): a module-level
# flag, not a context variable, because autograd runs a CUDA backward on its own thread.
_PRODUCTS_ONLY = False


@contextlib.contextmanager
def products_only() -> Iterator[None]:
    """Run the Newton–Schulz solve and backward with matrix products only (see
    :func:`capturing`), e.g. for the warm-up steps before a CUDA-graph capture, so that
    they run the kernels that the capture records."""
    global _PRODUCTS_ONLY
    previous, _PRODUCTS_ONLY = _PRODUCTS_ONLY, True
    try:
        yield
    finally:
        _PRODUCTS_ONLY = previous


def capturing() -> bool:
    """Whether only kernels known to be capturable in a CUDA graph may run (matrix products
    and elementwise operations, no cuSOLVER): inside :func:`products_only`, or while a CUDA
    graph is being captured on the current stream."""
    return _PRODUCTS_ONLY or (torch.cuda.is_available()
                              and torch.cuda.is_current_stream_capturing())


def polar_newton_schulz(C: Tensor, ell: float, *, products_only: bool = False
                        ) -> NewtonSchulzPolar:
    """Polar factor ``U = C (CᵀC)^{−1/2}`` by the scaled Newton–Schulz iteration.

    Matrix products and a Cholesky factorisation only: no SVD or eigensolver, no branch on a
    tensor's value, so no host sync on a GPU (``svd``/``eigh`` wait for the device every
    call) and the step can be captured in a CUDA graph. With ``s = ‖CᵀC‖_F^{1/2} >= σ_max(C)``:

        X_0 = C/s,    X_{k+1} = (α_k/2) X_k (3I − α_k² X_kᵀX_k),    U = X_N,

    two products (d×K·K and its Gram) a step. Each step maps every singular value through
    the same cubic, so X_k keeps C's singular vectors and tends to ``U``; the iteration
    corrects its own rounding (error ~eps·cond(C), like the SVD). Converged (to rounding)
    when ``σ_min(C) >= ℓ s``, ``ℓ`` setting the schedule (:func:`newton_schulz_schedule`);
    below that the smallest singular directions are not, which ``residual`` shows. ``P`` and
    its inverse are for the backward: the inverse by Cholesky, or with ``products_only``
    (inside a CUDA-graph capture) as the product ``Y`` of the steps' polynomials,
    ``X_N = C Y``, iterated with X as one stacked matrix ``[X; Y]`` (the same two kernels a
    step: a graph's step is launch-bound, not flop-bound).

    Everything is float64, whatever C's dtype: rounding in the iterates is amplified by
    cond(C) in the slow singular directions (float32 iterates: 1.6e-5 off the exact factor
    at d×K = 300×260, 40× the float32 ``"gram"`` method's error), and a float64 product costs
    what a float32 one does on the H100/H200 tensor cores.
    """
    alphas = newton_schulz_schedule(ell)
    C = C.double()
    eye = torch.eye(C.shape[1], dtype=C.dtype, device=C.device)
    s = torch.linalg.matrix_norm(C.T @ C).sqrt().clamp_min(torch.finfo(C.dtype).tiny)
    d = C.shape[0]
    # X (3a/2) − (a³/2) X (XᵀX): two kernels a step; products_only: on Z = [X; Y], X_k = C Y_k
    Z = torch.cat([C, eye]) / s if products_only else C / s
    for a in alphas:
        X = Z[:d]
        Z = torch.addmm(Z, Z, X.T @ X, beta=1.5 * a, alpha=-0.5 * a**3)
    X, Y = Z[:d], (Z[d:] if products_only else None)
    residual = (X.T @ X - eye).abs().amax()
    P = X.T @ C
    P = 0.5 * (P + P.T)
    if Y is None:
        L, _ = torch.linalg.cholesky_ex(P)  # _ex: no error check, so no sync
        P_inv = torch.cholesky_inverse(L)
    else:
        P_inv = 0.5 * (Y + Y.T)
    return NewtonSchulzPolar(X, P, P_inv, s.clone(), residual, alphas)


def check_delta(delta: object) -> None:
    """Raise ``ValueError`` unless the proximal weight ``delta`` is a finite real number >= 0."""
    real = isinstance(delta, numbers.Real) and not isinstance(delta, bool)
    if not (real and math.isfinite(delta) and delta >= 0):
        raise ValueError(f"Expected `delta` to be a finite number >= 0, but got {delta!r}")


def check_nearest_etf_inputs(H_bar: Tensor, U_prev: Tensor | None, delta: float) -> None:
    """Raise ``ValueError`` naming the problem when the nearest-ETF inputs are invalid."""
    if not isinstance(H_bar, Tensor) or H_bar.ndim != 2:
        shape = tuple(H_bar.shape) if isinstance(H_bar, Tensor) else type(H_bar).__name__
        raise ValueError(f"Expected `H_bar` to be a 2-D tensor (d, K), but got {shape}")
    d, K = H_bar.shape
    if K < 2:
        raise ValueError(f"the nearest simplex ETF needs K >= 2 classes, but `H_bar` has K={K}")
    if d < K:
        raise ValueError(
            f"the nearest simplex ETF needs feature dimension d >= K, but `H_bar` is d={d} x K={K}"
        )
    if not H_bar.is_floating_point():
        raise ValueError(f"Expected `H_bar` to be floating point, but got {H_bar.dtype}")
    if value_checks_enabled() and not all_finite(H_bar):
        raise NonFiniteError("`H_bar` contains NaN or Inf")
    check_delta(delta)
    if U_prev is not None:
        if U_prev.shape != H_bar.shape:
            raise ValueError(
                f"Expected `U_prev` to have the shape of `H_bar` {tuple(H_bar.shape)}, "
                f"but got {tuple(U_prev.shape)}"
            )
        if value_checks_enabled() and not all_finite(U_prev):
            raise NonFiniteError("`U_prev` contains NaN or Inf")


def compute_dtype(H_bar: Tensor) -> torch.dtype:
    """Working precision of the solve and backward: float64 up to FLOAT64_MAX_K classes (or
    for float64 inputs), else float32 (also for bf16/fp16 inputs: never below float32)."""
    if H_bar.shape[1] <= FLOAT64_MAX_K or H_bar.dtype == torch.float64:
        return torch.float64
    return torch.float32
