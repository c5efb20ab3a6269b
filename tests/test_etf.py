import math

import pytest
import torch

from gnc.declarative import nearest_etf
from gnc.etf import (
    centering,
    etf_objective,
    polar,
    polar_factor,
    proximal_target,
    simplex_etf,
)
from tests.conftest import near_etf_means, random_means, random_stiefel

F64 = torch.float64


@pytest.mark.parametrize("K", [2, 3, 10])
def test_simplex_etf_geometry(K):
    U = random_stiefel(2 * K, K)
    W = simplex_etf(K, U)
    assert W.shape == (K, 2 * K)
    G = W @ W.T
    assert torch.allclose(G.diagonal(), torch.ones(K, dtype=F64))
    off = G[~torch.eye(K, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / (K - 1)))
    expected = math.sqrt(K / (K - 1)) * centering(K, dtype=torch.float32)
    assert torch.allclose(simplex_etf(K), expected)


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_polar_factor_is_nearest_orthonormal(method):
    C = torch.randn(40, 8, dtype=F64)
    pf = polar_factor(C, method)
    assert pf.rank == 8
    assert torch.allclose(pf.U.T @ pf.U, torch.eye(8, dtype=F64), atol=1e-12)
    P = pf.B @ torch.diag(pf.sigma) @ pf.B.T
    assert torch.allclose(pf.U @ P, C, atol=1e-12)
    assert torch.allclose(pf.U, polar(C), atol=1e-10)


@pytest.mark.parametrize("d,K", [(16, 5), (64, 10)])
def test_feasibility_step_tie_break_is_deterministic_and_nearest_identity(d, K):
    H = random_means(d, K)
    U1, U2 = nearest_etf(H), nearest_etf(H.clone())
    assert torch.equal(U1, U2)
    # every minimiser is U* + a rotation in the tie-break direction; ours is nearest I_{d×K}
    C = proximal_target(H, None, 0.0)
    pf = polar_factor(C, "svd")
    assert pf.rank == K - 1
    assert torch.allclose(U1 @ centering(K), pf.U @ centering(K), atol=1e-10)
    E = torch.eye(d, K, dtype=F64)
    b = torch.full((K, 1), 1 / math.sqrt(K), dtype=F64)
    for seed in range(5):  # rotate the free column: never nearer I_{d×K}
        v = torch.randn(d, 1, dtype=F64, generator=torch.Generator().manual_seed(seed))
        A_r = (U1 @ centering(K))
        v = v - A_r @ torch.linalg.lstsq(A_r, v).solution
        v = v / v.norm()
        U_alt = U1 @ centering(K) + v @ b.T
        assert (U1 - E).norm() <= (U_alt - E).norm() + 1e-12


@pytest.mark.parametrize("d,K", [(64, 10), (512, 100)])
@pytest.mark.parametrize("means", ["random", "near_etf"])
def test_solution_on_manifold_and_minimises_objective(d, K, means):
    H = random_means(d, K) if means == "random" else near_etf_means(d, K)
    U_prev = random_stiefel(d, K, seed=3)
    U = nearest_etf(H, U_prev)
    assert (U.T @ U - torch.eye(K, dtype=F64)).norm() <= 1e-10
    f_star = etf_objective(U, H, U_prev, 1e-3)
    g = torch.Generator().manual_seed(7)
    for scale in (1e-4, 1e-2, 1e-1):
        for _ in range(5):
            X = U + scale * torch.randn(d, K, dtype=F64, generator=g)
            V = polar(X)  # a random point of St(d,K) near U*
            assert etf_objective(V, H, U_prev, 1e-3) >= f_star - 1e-12


def test_dtype_and_device_preserved():
    H = random_means(32, 6).float()
    U = nearest_etf(H, random_stiefel(32, 6).float())
    assert U.dtype == torch.float32 and U.device == H.device
    assert (U.double().T @ U.double() - torch.eye(6, dtype=F64)).norm() < 1e-5


@pytest.mark.parametrize(
    "H,U_prev,kw,match",
    [
        (torch.randn(10), None, {}, "2-D"),
        (torch.randn(10, 1), None, {}, "K >= 2"),
        (torch.randn(4, 6), None, {}, "d >= K"),
        (torch.randn(10, 4), torch.randn(10, 3), {}, "`U_prev`"),
        (torch.full((10, 4), float("nan")), None, {}, "NaN or Inf"),
        (torch.randn(10, 4), torch.full((10, 4), float("inf")), {}, "NaN or Inf"),
        (torch.randn(10, 4), None, {"solver": "newton"}, "unknown solver"),
        (torch.randn(10, 4), None, {"backward": "autograd"}, "unknown backward"),
        (torch.randn(10, 4), None, {"delta": -1.0}, "delta"),
    ],
)
def test_bad_inputs(H, U_prev, kw, match):
    with pytest.raises(ValueError, match=match):
        nearest_etf(H, U_prev, **kw)


def test_simplex_etf_bad_inputs():
    with pytest.raises(ValueError, match="K >= 2"):
        simplex_etf(1)
    with pytest.raises(ValueError, match="shape"):
        simplex_etf(3, torch.randn(5, 4))


def test_large_K_path_matches_float64_svd_reference():
    """K above FLOAT64_MAX_K: float32 products around a float64 Gram eigenproblem."""
    from gnc.etf import FLOAT64_MAX_K, GRAM_MIN_K

    d, K = 600, 300
    assert K > FLOAT64_MAX_K and K > GRAM_MIN_K
    H, U_prev = random_means(d, K), random_stiefel(d, K, seed=2)
    G = torch.randn(d, K, dtype=F64, generator=torch.Generator().manual_seed(3))
    ref = polar_factor(proximal_target(H, U_prev, 1e-3), "svd").U  # float64 SVD
    h32 = H.float().requires_grad_()
    U = nearest_etf(h32, U_prev.float())
    assert U.dtype == torch.float32
    assert (U.double() - ref).norm() <= 1e-5 * ref.norm()
    U.backward(G.float())
    h64 = H.clone().requires_grad_()
    nearest_etf(h64, U_prev).backward(G)  # the small-K (float64) closed form
    assert (h32.grad.double() - h64.grad).norm() <= 1e-5 * h64.grad.norm()
    # first step (rank-deficient C) on the same path
    M = centering(K)
    U0 = nearest_etf(H.float()).double()
    ref0 = polar_factor(proximal_target(H, None, 0.0), "svd").U
    assert (U0 @ M - ref0 @ M).norm() <= 1e-5 * ref0.norm()


def test_etf_module_imports_only_validation_from_the_package():
    """gnc.etf is the maths: no import of gnc.declarative (the cycle this once had)."""
    import ast
    import inspect

    import gnc.etf

    tree = ast.parse(inspect.getsource(gnc.etf))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("gnc")} == {"gnc.validation"}


def test_nearest_etf_moved_to_declarative():
    import gnc
    import gnc.declarative
    import gnc.etf

    assert gnc.nearest_etf is gnc.declarative.nearest_etf
    assert not hasattr(gnc.etf, "nearest_etf")  # etf.py is the maths only
    with pytest.raises(AttributeError, match="no attribute 'check_solver_options'"):
        gnc.etf.check_solver_options  # noqa: B018 -- folded into gnc.declarative.resolve_solve


@pytest.mark.parametrize("bad, match", [
    (torch.randn(3, 5), r"d×K matrix with d >= K >= 1, but got \(3, 5\)"),
    (torch.randn(5), r"but got \(5,\)"),
    (torch.randn(5, 0), r"but got \(5, 0\)"),
    (torch.ones(5, 3, dtype=torch.long), "floating point, but got torch.int64"),
    (torch.full((5, 3), math.nan), "`C` to be finite"),
    ([[1.0]], "but got list"),
])
def test_polar_names_what_is_wrong_with_its_input(bad, match):
    with pytest.raises(ValueError, match=match):
        polar(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_polar_of_half_precision_is_solved_in_float32(dtype):
    C = torch.randn(6, 3, dtype=torch.float64)
    U = polar(C.to(dtype))
    assert U.dtype == dtype
    torch.testing.assert_close(U.double(), polar(C.to(dtype).double()), atol=1e-2, rtol=0)
