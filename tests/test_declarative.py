import contextlib
import math

import pytest
import torch

import gnc.declarative as declarative
from gnc.declarative import (
    BACKWARDS,
    ETF_POLAR_METHODS,
    SOLVE_DEVICES,
    SOLVERS,
    NearestETF,
    SolvePlan,
    closed_form_backward,
    ddn_backward,
    nearest_etf,
    resolve_solve,
)
from gnc.etf import (
    NS_RESIDUAL_TOL,
    centering,
    compute_dtype,
    polar_factor,
    proximal_full_rank,
    proximal_target,
)
from gnc.heads import ImplicitETFHead, make_head
from gnc.validation import trusted_inputs
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


# --------------------------------------------------------------------------- the solve plan


@pytest.mark.parametrize("kw,match", [
    ({"solver": "newton"}, "unknown solver 'newton'"),
    ({"backward": "autograd"}, "unknown backward 'autograd'"),
    ({"polar_method": "qr"}, "unknown polar_method 'qr'"),
    ({"solve_device": "auto"}, "unknown solve_device 'auto'"),  # the trainer resolves it
    ({"solve_device": "cuda"}, "unknown solve_device 'cuda'"),
    ({"ns_fallback": "yes"}, "`ns_fallback` to be a bool"),
    ({"solver": "riemannian", "polar_method": "svd"},
     "polar_method='svd' applies to solver='exact'"),
    ({"solver": "riemannian", "polar_method": "gram"},
     "polar_method='gram' applies to solver='exact'"),
    ({"solver": "riemannian", "polar_method": "newton_schulz"},
     "polar_method='newton_schulz' applies to solver='exact'"),
    ({"solver": "riemannian", "solve_device": "cpu"},
     "solve_device='cpu' applies to solver='exact'.*always runs on the host"),
    ({"polar_method": "newton_schulz", "solve_device": "cpu"},
     "newton_schulz.*solve_device='cpu' is for the SVD/eigh"),
])
def test_resolver_refuses_unknown_and_inapplicable_options(kw, match):
    with pytest.raises(ValueError, match=match):
        resolve_solve(**kw)
    H, U_prev = random_means(12, 4), random_stiefel(12, 4)
    with pytest.raises(ValueError, match=match):  # every entry point goes through it
        nearest_etf(H, U_prev, **kw)
    with pytest.raises(ValueError, match=match):
        ImplicitETFHead(12, 4, **kw)
    with pytest.raises(ValueError, match=match):
        make_head("implicit", 12, 4, **kw)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backward", BACKWARDS)
def test_resolver_accepts_every_meaningful_combination(solver, backward):
    methods = ETF_POLAR_METHODS if solver == "exact" else ("auto",)
    devices = SOLVE_DEVICES if solver == "exact" else ("same",)
    for polar_method in methods:
        for solve_device in devices:
            if polar_method == "newton_schulz" and solve_device == "cpu":
                continue
            for ns_fallback in (True, False):
                plan = resolve_solve(solver, backward, polar_method, solve_device, ns_fallback)
                assert plan == SolvePlan(solver, backward, polar_method, solve_device,
                                         ns_fallback)
                assert plan.eigen_method == ("auto" if polar_method == "newton_schulz"
                                             else polar_method)


def _spy_exact_solve(monkeypatch) -> list[bool]:
    calls = []
    real = declarative._exact_solve

    def spy(C, method, *, full_rank, **kw):
        calls.append(full_rank)
        return real(C, method, full_rank=full_rank, **kw)

    monkeypatch.setattr(declarative, "_exact_solve", spy)
    return calls


@pytest.mark.parametrize("with_prev", [True, False])
def test_rank_test_does_not_depend_on_the_validation_switch(monkeypatch, with_prev):
    """The rank test is skipped by the maths (δ > 0), never by trusted_inputs()."""
    calls = _spy_exact_solve(monkeypatch)
    H, U_prev = random_means(20, 5), random_stiefel(20, 5) if with_prev else None
    U_checked = nearest_etf(H, U_prev)
    with trusted_inputs():
        U_trusted = nearest_etf(H, U_prev)
    assert calls == [with_prev, with_prev]
    assert torch.equal(U_checked, U_trusted)


@pytest.mark.parametrize("d,K", [(20, 5), (64, 10), (300, 260)])
@pytest.mark.parametrize("delta", [1e-3, 1e-1])
@pytest.mark.parametrize("method", ["svd", "gram"])
def test_proximal_full_rank_agrees_with_the_rank_test(d, K, delta, method):
    """Where the a-priori rule skips the rank test, the test would find full rank."""
    dtype = compute_dtype(torch.zeros(d, K))
    assert proximal_full_rank(d, K, delta, "auto", dtype)  # the default skips it here
    if proximal_full_rank(d, K, delta, method, dtype):  # not float32 svd: 10·d·eps32 > 1e-6·δ
        for means in (random_means, near_etf_means):
            C = proximal_target(means(d, K).to(dtype), random_stiefel(d, K, dtype=dtype), delta)
            assert polar_factor(C, method).rank == K
    else:
        assert (method, dtype) == ("svd", torch.float32)
    assert not proximal_full_rank(d, K, 0.0, method, dtype)  # δ = 0: rank K − 1
    assert not proximal_full_rank(d, K, 1e-14, method, dtype)  # below the tolerance


@pytest.mark.parametrize("ns_fallback", [True, False])
def test_newton_schulz_fallback_does_not_depend_on_the_validation_switch(monkeypatch,
                                                                        ns_fallback):
    # a schedule far too short: the iteration does not converge
    monkeypatch.setattr("gnc.declarative.proximal_lower_bound", lambda K, delta: 0.9)
    H, U_prev = random_means(30, 6), random_stiefel(30, 6, seed=4)
    out = []
    for trusted in (False, True):
        info = {}
        with trusted_inputs() if trusted else contextlib.nullcontext():
            U = nearest_etf(H, U_prev, polar_method="newton_schulz", info=info,
                            ns_fallback=ns_fallback)
        assert float(info["residual"]) > NS_RESIDUAL_TOL
        out.append(U)
    assert torch.equal(out[0], out[1])
    exact = nearest_etf(H, U_prev)
    assert torch.allclose(out[0], exact, atol=1e-12) == ns_fallback
