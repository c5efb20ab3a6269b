"""The sync-free polar factor (scaled Newton–Schulz) against the eigensolver's, and its use."""

import json
import logging
import math

import pytest
import torch

import gnc.etf as etf
from gnc.config import TrainConfig
from gnc.declarative import (
    LYAPUNOV_KRON_MAX_K,
    lyapunov_solve,
    nearest_etf,
    newton_schulz_backward,
    polar_backward,
)
from gnc.etf import (
    NS_RESIDUAL_TOL,
    newton_schulz_schedule,
    polar_factor,
    polar_newton_schulz,
    proximal_lower_bound,
    proximal_target,
)
from gnc.heads import ImplicitETFHead
from gnc.training import train
from gnc.validation import trusted_inputs
from tests.conftest import near_etf_means, random_means, random_stiefel

F64 = torch.float64


def conditioned(d, K, cond, seed=0, dtype=F64):
    """A d×K matrix with singular values log-spaced from 1 down to 1/cond, and its polar
    factor (from the construction, not from a solver)."""
    A = random_stiefel(d, K, seed)
    B = random_stiefel(K, K, seed + 1)
    sigma = torch.logspace(0, -math.log10(cond), K, dtype=F64)
    return ((A * sigma) @ B.T).to(dtype), (A @ B.T).to(dtype)


def safe_ell(C):
    """A valid lower bound ℓ <= σ_min(C)/s for s = ‖CᵀC‖_F^{1/2}, the iteration's scale."""
    sv = torch.linalg.svdvals(C.double())
    return 0.9 * float(sv[-1] / torch.linalg.matrix_norm(C.double().T @ C.double()).sqrt())


def test_schedule_reaches_one_and_grows_with_the_condition():
    lengths = []
    for ell in (0.5, 1e-2, 1e-4, 1e-8, 1e-12):
        alphas = newton_schulz_schedule(ell)
        x = ell  # the smallest singular value under the schedule's cubics
        for a in alphas:
            x = 0.5 * a * x * (3 - (a * x) ** 2)
        assert abs(1 - x) <= 1e-14
        lengths.append(len(alphas))
    assert lengths == sorted(lengths) and lengths[-1] <= 40
    # each factor 10 of conditioning costs about log(10)/log(2.6) ≈ 2.4 more steps
    assert lengths[-1] - lengths[-2] in range(8, 12)  # 1e-8 → 1e-12
    with pytest.raises(ValueError, match="lower bound"):
        newton_schulz_schedule(0.0)


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e5])
@pytest.mark.parametrize("d,K", [(20, 3), (64, 10), (50, 50)])
def test_polar_equals_the_construction_and_the_svd(d, K, cond):
    C, U_true = conditioned(d, K, cond)
    ns = polar_newton_schulz(C, safe_ell(C))
    assert (ns.U - U_true).abs().max() <= 1e-13 * cond + 1e-13
    assert (ns.U - polar_factor(C, "svd").U).abs().max() <= 1e-12 * cond
    assert float(ns.residual) <= 1e-14
    eye = torch.eye(K, dtype=F64)
    assert torch.allclose(ns.P, U_true.T @ C, atol=1e-12)  # P = UᵀC = (CᵀC)^{1/2}
    assert torch.allclose(ns.P @ ns.P_inv, eye, atol=1e-10 * cond)


@pytest.mark.parametrize("d,K,dtype", [(64, 10, F64), (50, 50, F64), (300, 260, torch.float32)])
def test_products_only_variant_equals_the_cholesky_one(d, K, dtype):
    """What a CUDA-graph capture runs (no cuSOLVER call) against the eager variant."""
    C, _ = conditioned(d, K, 300.0, dtype=dtype)
    a = polar_newton_schulz(C, safe_ell(C))
    b = polar_newton_schulz(C, safe_ell(C), products_only=True)
    assert (a.U - b.U).abs().max() <= 1e-13
    assert (a.P_inv - b.P_inv).abs().max() <= 1e-10 * a.P_inv.abs().max()


def test_float32_input_is_solved_in_float64():
    C, U_true = conditioned(300, 260, 50.0, dtype=torch.float32)
    ns = polar_newton_schulz(C, safe_ell(C))
    assert ns.U.dtype == F64  # float32 iterates would lose eps32·cond(C)
    assert (ns.U - polar_factor(C.double(), "svd").U).abs().max() <= 1e-12
    assert (ns.U - U_true).abs().max() <= 1e-5  # C itself is U_true Σ Bᵀ rounded to float32
    assert float(ns.residual) <= 1e-14


def test_residual_flags_a_matrix_outside_the_schedule():
    C, _ = conditioned(40, 8, 1e9)
    ns = polar_newton_schulz(C, 1e-3)  # claims σ_min >= 1e-3 s; it is ~1e-9 s
    assert float(ns.residual) > 1e-2


@pytest.mark.parametrize("K", [3, LYAPUNOV_KRON_MAX_K, LYAPUNOV_KRON_MAX_K + 1, 40])
def test_lyapunov_solve_by_kronecker_and_by_sign_iteration(K):
    g = torch.Generator().manual_seed(K)
    B = random_stiefel(K, K, seed=K)
    lam = torch.logspace(0, -3, K, dtype=F64)  # P = B diag(λ) Bᵀ, condition 1000
    P = (B * lam) @ B.T
    S = torch.randn(K, K, generator=g, dtype=F64)
    S = S - S.T
    s = torch.linalg.matrix_norm(P)
    alphas = newton_schulz_schedule(0.9 * float(lam[-1] / s))
    Z_ref = B @ ((B.T @ S @ B) / (lam[:, None] + lam[None, :])) @ B.T  # in P's eigenbasis
    for products_only in (False, True):
        Z = lyapunov_solve(P, S, s, alphas, products_only=products_only)
        assert (Z - Z_ref).abs().max() <= 1e-11 * Z_ref.abs().max()


@pytest.mark.parametrize("means", [random_means, near_etf_means])
@pytest.mark.parametrize("d,K", [(12, 4), (64, 10), (40, 40)])
def test_backward_equals_the_eigenbasis_backward(d, K, means):
    H, U_prev = means(d, K), random_stiefel(d, K, seed=3)
    C = proximal_target(H, U_prev, 1e-3)
    pf, ns = polar_factor(C, "svd"), polar_newton_schulz(C, proximal_lower_bound(K, 1e-3))
    G = torch.randn(d, K, dtype=F64)
    ref = polar_backward(pf.U, pf.B, pf.sigma, G)
    got = newton_schulz_backward(ns.U, ns.P, ns.P_inv, ns.scale, ns.alphas, G)
    assert (got - ref).norm() <= 1e-10 * ref.norm()


@pytest.mark.parametrize("delta", [1e-3, 0.1])
def test_gradcheck(delta):
    H = random_means(12, 4).requires_grad_()
    U_prev = random_stiefel(12, 4, seed=1)
    f = lambda h: nearest_etf(h, U_prev, delta=delta, polar_method="newton_schulz")  # noqa: E731
    assert torch.autograd.gradcheck(f, (H,), eps=1e-8 if delta < 0.01 else 1e-6)


@pytest.mark.parametrize("means", [random_means, near_etf_means])
def test_nearest_etf_equals_the_eigensolver(means):
    d, K = 64, 10
    U_prev, G = random_stiefel(d, K, seed=2), torch.randn(d, K, dtype=F64)
    out = {}
    for method in ("auto", "newton_schulz"):
        H = means(d, K).requires_grad_()
        info = {}
        U = nearest_etf(H, U_prev, polar_method=method, info=info)
        (U * G).sum().backward()
        out[method] = U.detach(), H.grad, info
    assert (out["auto"][0] - out["newton_schulz"][0]).abs().max() <= 1e-11
    assert (out["auto"][1] - out["newton_schulz"][1]).norm() <= 1e-10 * out["auto"][1].norm()
    assert "residual" in out["newton_schulz"][2] and "residual" not in out["auto"][2]


def test_first_step_and_unconverged_api_calls_use_the_eigensolver(monkeypatch):
    H = random_means(30, 6)
    info = {}
    U0 = nearest_etf(H, None, polar_method="newton_schulz", info=info)  # δ = 0: rank K−1
    assert "residual" not in info
    assert torch.allclose(U0, nearest_etf(H, None), atol=1e-12)
    # a schedule far too short: the API call notices the residual and solves exactly
    monkeypatch.setattr("gnc.declarative.proximal_lower_bound", lambda K, delta: 0.9)
    U_prev = random_stiefel(30, 6, seed=4)
    U = nearest_etf(H, U_prev, polar_method="newton_schulz", info=info)
    assert float(info["residual"]) > NS_RESIDUAL_TOL
    assert torch.allclose(U, nearest_etf(H, U_prev), atol=1e-12)


def test_float32_api_call_keeps_its_float32_accurate_result(monkeypatch):
    """Above 256 classes the work is float32: its residual (a few float32 eps) is converged,
    so the API call does not fall back to the eigensolver."""
    d, K = 300, 260
    H, U_prev = random_means(d, K), random_stiefel(d, K, seed=5)
    exact = nearest_etf(H, U_prev)  # float64 throughout
    eig_err = (nearest_etf(H.float(), U_prev.float()) - exact).abs().max()
    monkeypatch.setattr("gnc.declarative._exact_solve", lambda *a, **k: 1 / 0)
    info = {}
    U = nearest_etf(H.float(), U_prev.float(), polar_method="newton_schulz", info=info)
    assert 0 < float(info["residual"]) <= NS_RESIDUAL_TOL
    assert (U - exact).abs().max() <= 3 * eig_err  # as accurate as the float32 eigensolver


def test_bad_options_are_refused():
    H, U_prev = random_means(12, 4), random_stiefel(12, 4)
    with pytest.raises(ValueError, match="unknown polar_method .qr."):
        nearest_etf(H, U_prev, polar_method="qr")
    with pytest.raises(ValueError, match="newton_schulz"):
        nearest_etf(H, U_prev, polar_method="newton_schulz", solve_device="cpu")
    with pytest.raises(ValueError, match="newton_schulz"):
        ImplicitETFHead(12, 4, polar_method="newton_schulz", solve_device="cpu")
    with pytest.raises(ValueError, match="unknown polar_method"):
        ImplicitETFHead(12, 4, polar_method="eig")


@pytest.mark.parametrize("K", [8, 20])  # Lyapunov by Kronecker Cholesky / sign iteration
@pytest.mark.parametrize("captured", [False, True])
def test_head_step_reads_no_tensor_value(monkeypatch, K, captured):
    """A training step of the head on "meta" tensors (shapes, no values): any read of a value
    on the host (``.item()``, ``bool``, ``float``: a device sync on a GPU, and forbidden in
    a CUDA graph) would raise. The eigensolvers, which sync inside, are not called; what a
    CUDA-graph capture records calls no factorisation at all, matrix products only."""
    d = 32
    head = ImplicitETFHead(d, K, polar_method="newton_schulz", ns_fallback=False, dtype=F64)
    y = torch.arange(2 * K) % K
    head(torch.randn(2 * K, d, dtype=F64), y)  # the δ = 0 first step, on the CPU
    head.to("meta")

    def refuse(*args, **kwargs):
        raise AssertionError("a factorisation was called")

    for name in ("svd", "eigh", "svdvals", "eigvalsh") + (("cholesky_ex",) if captured else ()):
        monkeypatch.setattr(torch.linalg, name, refuse)
    if captured:
        monkeypatch.setattr("gnc.declarative.capturing", lambda: True)
        monkeypatch.setattr(torch, "cholesky_inverse", refuse)
        monkeypatch.setattr(torch, "cholesky_solve", refuse)
    h = torch.randn(2 * K, d, dtype=F64, device="meta", requires_grad=True)
    with trusted_inputs():
        logits = head(h, y.to("meta"))
        torch.nn.functional.cross_entropy(logits, y.to("meta")).backward()
    assert h.grad.shape == (2 * K, d) and head.U.is_meta


def test_head_trains_like_the_eigensolver_head():
    d, K = 48, 6
    heads = {m: ImplicitETFHead(d, K, polar_method=m, dtype=F64)
             for m in ("auto", "newton_schulz")}
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        h, y = torch.randn(4 * K, d, generator=g, dtype=F64), torch.arange(4 * K) % K
        grads = {}
        for m, head in heads.items():
            x = h.clone().requires_grad_()
            with trusted_inputs():
                torch.nn.functional.cross_entropy(head(x, y), y).backward()
            grads[m] = x.grad
        assert (grads["auto"] - grads["newton_schulz"]).abs().max() <= 1e-10
    assert (heads["auto"].weight - heads["newton_schulz"].weight).abs().max() <= 1e-11
    residual = heads["newton_schulz"].pop_polar_residual()
    assert residual is not None and residual <= 1e-12
    assert heads["newton_schulz"].pop_polar_residual() is None  # popped
    assert heads["auto"].pop_polar_residual() is None


UFM = dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 10}, model="ufm",
           feature_dim=16, epochs=6, lr=0.5, eval_every=3, method="implicit", progress=False)


def test_training_logs_the_residual_and_matches_the_eigensolver(tmp_path):
    rows = {}
    for m in ("auto", "newton_schulz"):
        train(TrainConfig(**UFM, polar_method=m), tmp_path / m)
        rows[m] = [json.loads(x) for x in (tmp_path / m / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["auto"], rows["newton_schulz"], strict=True):
        assert "polar_residual" not in a and 0 <= b["polar_residual"] <= 1e-12
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-9)
        assert math.isclose(a["nc1"], b["nc1"], rel_tol=1e-7)


def test_training_warns_when_the_iteration_did_not_converge(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(etf, "proximal_lower_bound", lambda K, delta: 0.99)
    monkeypatch.setattr("gnc.declarative.proximal_lower_bound", lambda K, delta: 0.99)
    with caplog.at_level(logging.WARNING, logger="gnc.training"):
        train(TrainConfig(**{**UFM, "epochs": 3}, polar_method="newton_schulz"), tmp_path)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["polar_residual"] > NS_RESIDUAL_TOL
    assert "Newton–Schulz polar factor reached only" in caplog.text
