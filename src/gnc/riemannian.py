"""The paper's solver for the nearest simplex ETF: Riemannian trust regions on St(d, K).

Markou, Ajanthan & Gould (NeurIPS 2024) solve eq. (6),

    min_{U ∈ St(d,K)}  f(U) = ‖H_bar − U M/√(K−1)‖²_F + (δ/2)‖U − U_prev‖²_F,

with the Riemannian trust-region method (Absil, Baker & Gallivan 2007) of ``pymanopt``,
warm-started at ``U_prev``. We give pymanopt the analytic Euclidean derivatives

    ∇f(U)    = (2/(K−1)) U M − (2/√(K−1)) H_bar M + δ (U − U_prev)
    ∇²f(U)[V] = (2/(K−1)) V M + δ V

and it projects them onto the manifold. The closed form of :mod:`gnc.etf` gives the same
minimiser (tests check it); this solver is kept as the paper's reference.

Trust regions stop at a small gradient: at a critical point, which need not be the minimum.
A warm start that is itself critical (class means flipped against ``U_prev``, or against
``I_{d×K}`` on the first step) was returned as it was, a maximum or a saddle (f = 4.0 for the
minimum's 0.008), and with d = K a start in the other component of O(K) ended at a local
minimum there. The minimum is where ``sym(UᵀC)`` is positive semi-definite (``C = (2/√(K−1))
H_bar M + δ U_prev``: f = const − tr(UᵀC)); at a critical point that is not, reflecting the
eigendirections of its negative eigenvalues, ``U ← U (I − 2 V Vᵀ)``, raises tr(UᵀC) by
``2 Σ|λ|`` and stays on St(d,K), and the trust regions run again from there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pymanopt
import torch
from pymanopt.manifolds import Stiefel
from pymanopt.optimizers import TrustRegions
from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass
class RiemannianResult:
    """Outcome of :func:`solve_riemannian` (pymanopt's ``OptimizerResult``, as torch)."""

    U: Tensor  # d×K solution on St(d,K), float64
    cost: float  # f(U)
    iterations: int
    gradient_norm: float  # Riemannian gradient norm at U
    stopping_reason: str
    time_s: float
    restarts: int = 0  # runs again from a reflected critical point that was no minimum


MAX_RESTARTS = 3


def _reflect_to_descent(U: np.ndarray, C: np.ndarray) -> np.ndarray | None:
    """``U (I − 2 V Vᵀ)`` with V the eigenvectors of the negative eigenvalues of ``sym(UᵀC)``
    (below −1e-8 of its largest magnitude), or None when there are none (U is the minimum
    if it is critical)."""
    P = U.T @ C
    lam, V = np.linalg.eigh(0.5 * (P + P.T))
    scale = float(np.abs(lam).max())
    negative = lam < -1e-8 * scale
    if scale == 0.0 or not negative.any():
        return None
    Vn = V[:, negative]
    return U - 2.0 * (U @ Vn) @ Vn.T


def _centre_rows(X: np.ndarray) -> np.ndarray:
    """``X M``: each row minus its mean."""
    return X - X.mean(axis=1, keepdims=True)


def solve_riemannian(
    H_bar: Tensor,
    U_prev: Tensor | None = None,
    delta: float = 1e-3,
    *,
    max_iterations: int = 30,
    min_gradient_norm: float = 1e-6,
    initial_point: Tensor | None = None,
) -> RiemannianResult:
    """Riemannian trust regions for the nearest simplex ETF (the paper's solver).

    Args:
        H_bar: d×K centred, normalised class means.
        U_prev: previous solution (warm start and proximal anchor); None solves δ = 0.
        delta: proximal weight δ.
        max_iterations: outer trust-region iterations (the paper uses 30).
        min_gradient_norm: stop when the Riemannian gradient norm falls below this.
        initial_point: start here instead of ``U_prev`` (default ``U_prev``, else
            ``I_{d×K}``).
    """
    H = H_bar.detach().to("cpu", torch.float64).numpy()
    d, K = H.shape
    s = math.sqrt(K - 1)
    HM = _centre_rows(H)
    if U_prev is None:
        delta, Up = 0.0, np.zeros_like(H)
    else:
        Up = U_prev.detach().to("cpu", torch.float64).numpy()
    manifold = Stiefel(d, K)
    # f, its gradient and C are written out here from DESIGN §1, not taken from gnc.etf: the
    # paper's solver is the independent computation the closed form is tested against.

    @pymanopt.function.numpy(manifold)
    def cost(U):
        return float(np.sum((H - _centre_rows(U) / s) ** 2) + 0.5 * delta * np.sum((U - Up) ** 2))

    @pymanopt.function.numpy(manifold)
    def euclidean_gradient(U):
        return (2.0 / (K - 1)) * _centre_rows(U) - (2.0 / s) * HM + delta * (U - Up)

    @pymanopt.function.numpy(manifold)
    def euclidean_hessian(U, V):
        return (2.0 / (K - 1)) * _centre_rows(V) + delta * V

    problem = pymanopt.Problem(
        manifold, cost, euclidean_gradient=euclidean_gradient, euclidean_hessian=euclidean_hessian
    )
    optimizer = TrustRegions(
        max_iterations=max_iterations, min_gradient_norm=min_gradient_norm, verbosity=0
    )
    if initial_point is not None:
        x0 = initial_point.detach().to("cpu", torch.float64).numpy()
    elif U_prev is not None:
        x0 = Up
    else:
        x0 = np.eye(d, K)
    C = (2.0 / s) * HM + delta * Up
    restarts = 0
    while True:
        with np.errstate(divide="ignore", invalid="ignore"):  # a critical start: 0/0 inside
            result = optimizer.run(problem, initial_point=x0)
        x0 = _reflect_to_descent(result.point, C)
        if x0 is None or restarts == MAX_RESTARTS:
            break
        restarts += 1
    out = RiemannianResult(
        U=torch.from_numpy(np.ascontiguousarray(result.point)),
        cost=float(result.cost),
        iterations=int(result.iterations),
        gradient_norm=float(result.gradient_norm),
        stopping_reason=str(result.stopping_criterion),
        time_s=float(result.time),
        restarts=restarts,
    )
    logger.debug(
        "trust regions: %d iterations, |grad| %.2e, %s",
        out.iterations,
        out.gradient_norm,
        out.stopping_reason,
    )
    return out
