import math

import pytest
import torch

from gnc.declarative import NearestETF, closed_form_backward, ddn_backward
from gnc.etf import centering, nearest_etf, polar_factor, proximal_target
from tests.conftest import near_etf_means, random_means, random_stiefel

F64 = torch.float64


def _feature_grad(H, U_prev, backward, G, through_M=False):
    H = H.clone().requires_grad_()
    U = nearest_etf(H, U_prev, backward=backward)
    K = H.shape[1]
    out = U @ centering(K) if through_M else U
    (out * G).sum().backward()
    return H.grad


@pytest.mark.parametrize("backward", ["closed_form", "ddn"])
@pytest.mark.parametrize("delta,eps", [(1e-3, 1e-8), (0.1, 1e-6)])
def test_gradcheck_with_U_prev(backward, delta, eps):
    # With random means σ_min(C) ≈ δ, so U* curves on a scale of δ: small steps for small δ.
    H = random_means(12, 4).requires_grad_()
    U_prev = random_stiefel(12, 4, seed=1)
    f = lambda h: nearest_etf(h, U_prev, delta=delta, backward=backward)  # noqa: E731
    assert torch.autograd.gradcheck(f, (H,), eps=eps)


@pytest.mark.parametrize("backward", ["closed_form", "ddn"])
def test_gradcheck_without_U_prev(backward):
    # δ = 0: U* is unique up to the tie-break direction that M removes, so check U* M.
    H = random_means(12, 4).requires_grad_()
    M = centering(4)
    assert torch.autograd.gradcheck(lambda h: nearest_etf(h, backward=backward) @ M, (H,))


@pytest.mark.parametrize("d,K", [(20, 3), (40, 10), (64, 20)])
@pytest.mark.parametrize("means", [random_means, near_etf_means])
def test_closed_form_equals_ddn(d, K, means):
    H, U_prev = means(d, K), random_stiefel(d, K, seed=2)
    G = torch.randn(d, K, dtype=F64)
    g_cf = _feature_grad(H, U_prev, "closed_form", G)
    g_ddn = _feature_grad(H, U_prev, "ddn", G)
    assert (g_cf - g_ddn).norm() <= 1e-8 * g_cf.norm()


def test_closed_form_equals_ddn_without_U_prev():
    H, G = random_means(20, 5), torch.randn(20, 5, dtype=F64)
    g_cf = _feature_grad(H, None, "closed_form", G, through_M=True)
    g_ddn = _feature_grad(H, None, "ddn", G, through_M=True)
    assert (g_cf - g_ddn).norm() <= 1e-8 * g_cf.norm()


def test_gradient_finite_at_exact_collapse():
    d, K = 32, 8
    U0 = random_stiefel(d, K)
    H = U0 @ centering(K) / math.sqrt(K - 1)  # a perfect ETF
    C = proximal_target(H, U0, 1e-3)
    sigma = torch.linalg.svdvals(C)
    assert torch.allclose(sigma[:-1], sigma[0].expand(K - 1), rtol=1e-12)  # K−1 equal σ
    G = torch.randn(d, K, dtype=F64)
    g_cf = _feature_grad(H, U0, "closed_form", G)
    g_ddn = _feature_grad(H, U0, "ddn", G)
    assert torch.isfinite(g_cf).all()
    assert (g_cf - g_ddn).norm() <= 1e-8 * g_cf.norm()


def test_autograd_through_svd_fails_at_collapse():
    """The regression the closed form prevents: SVD's autograd divides by σ_i² − σ_j²."""
    d, K = 32, 8
    U0 = random_stiefel(d, K)
    C = proximal_target(U0 @ centering(K) / math.sqrt(K - 1), U0, 1e-3).requires_grad_()
    A, _, Bh = torch.linalg.svd(C, full_matrices=False)
    ((A @ Bh) * torch.randn(d, K, dtype=F64)).sum().backward()
    assert not torch.isfinite(C.grad).all()
    pf = polar_factor(C.detach())
    g = closed_form_backward(pf.U, pf.B, pf.sigma, torch.randn(d, K, dtype=F64))
    assert torch.isfinite(g).all()


def test_backward_none_gives_no_gradient():
    H = random_means(12, 4).requires_grad_()
    U = nearest_etf(H, random_stiefel(12, 4), backward="none")
    (U.sum() + H.sum()).backward()
    assert torch.equal(H.grad, torch.ones_like(H))  # only the direct path


def test_float32_inputs_get_float32_gradients():
    H = random_means(16, 4).float().requires_grad_()
    U = nearest_etf(H, random_stiefel(16, 4).float())
    U.sum().backward()
    assert H.grad.dtype == torch.float32 and torch.isfinite(H.grad).all()


def test_ddn_functions_agree_directly():
    d, K = 10, 4
    H, U_prev = random_means(d, K), random_stiefel(d, K, seed=5)
    pf = polar_factor(proximal_target(H, U_prev, 1e-3))
    G = torch.randn(d, K, dtype=F64)
    a = closed_form_backward(pf.U, pf.B, pf.sigma, G)
    b = ddn_backward(pf.U, H, U_prev, 1e-3, G)
    assert torch.allclose(a, b, atol=1e-10)


def test_riemannian_info_reported():
    info = {}
    NearestETF.apply(random_means(16, 4), random_stiefel(16, 4), 1e-3, "riemannian", "none", info)
    assert {"iterations", "gradient_norm", "stopping_reason"} <= info.keys()
    assert info["iterations"] >= 1


@pytest.mark.parametrize("backward", ["closed_form", "ddn"])
@pytest.mark.parametrize("solver", ["exact", "riemannian"])
def test_backward_unaffected_by_in_place_change_of_U_prev(solver, backward):
    # The caller may overwrite its U_prev buffer after the forward (the head does): the saved
    # tensors must be copies, and the gradient the one of the U_prev used in the forward.
    H, U_prev = random_means(12, 4), random_stiefel(12, 4, seed=2)
    G = torch.randn(12, 4, dtype=F64)
    grads = []
    for overwrite in (False, True):
        Hc, Up = H.clone().requires_grad_(), U_prev.clone()
        U = nearest_etf(Hc, Up, solver=solver, backward=backward)
        if overwrite:
            Up.copy_(U.detach())
        (U * G).sum().backward()
        grads.append(Hc.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-8)
