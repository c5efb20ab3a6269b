import pytest
import torch

from gnc.declarative import nearest_etf
from gnc.etf import centering, simplex_etf
from gnc.riemannian import solve_riemannian
from tests.conftest import near_etf_means, random_means, random_stiefel


@pytest.mark.parametrize("d,K", [(64, 10), (512, 100)])
@pytest.mark.parametrize("means", [random_means, near_etf_means])
def test_exact_and_riemannian_agree(d, K, means):
    H, U_prev = means(d, K), random_stiefel(d, K, seed=4)
    # warm start near the solution, as in training; tolerance tightened for the test
    U_exact = nearest_etf(H, U_prev)
    start = nearest_etf(H + 1e-2 * random_means(d, K, seed=9), U_prev)
    res = solve_riemannian(H, U_prev, 1e-3, max_iterations=100, min_gradient_norm=1e-12,
                           initial_point=start)
    assert (res.U - U_exact).norm() <= 1e-6 * U_exact.norm()
    assert res.gradient_norm <= 1e-9


def test_riemannian_solver_through_nearest_etf_matches_exact():
    H, U_prev = random_means(64, 10), random_stiefel(64, 10, seed=4)
    U_r = nearest_etf(H, U_prev, solver="riemannian")  # the paper's 30 iterations
    U_e = nearest_etf(H, U_prev)
    assert (U_r - U_e).norm() <= 1e-6 * U_e.norm()


def test_feasibility_step_agrees_up_to_tie_break():
    H = random_means(64, 10)
    res = solve_riemannian(H, None, max_iterations=100, min_gradient_norm=1e-12)
    M = centering(10)
    U_e = nearest_etf(H)
    assert (res.U @ M - U_e @ M).norm() <= 1e-6 * U_e.norm()


def test_result_reports_progress():
    res = solve_riemannian(random_means(32, 5), random_stiefel(32, 5), max_iterations=2,
                           min_gradient_norm=1e-30)
    assert res.iterations == 2
    assert "max" in res.stopping_reason.lower() and "iteration" in res.stopping_reason.lower()
    assert res.gradient_norm > 0 and res.cost >= 0


def test_normal_stop_is_the_gradient_norm():
    """Warm-started as in training, the solver stops on the gradient norm, not the cap."""
    H, U_prev = random_means(32, 5), random_stiefel(32, 5, seed=2)
    start = nearest_etf(H + 1e-2 * random_means(32, 5, seed=3), U_prev)
    res = solve_riemannian(H, U_prev, 1e-3, initial_point=start)  # defaults: 30, 1e-6
    assert "min grad norm" in res.stopping_reason, res.stopping_reason
    assert res.iterations < 30 and res.gradient_norm <= 1e-6
    info = {}
    nearest_etf(H, U_prev, solver="riemannian", info=info)  # what the head reports
    assert "min grad norm" in info["stopping_reason"], info["stopping_reason"]
    assert info["iterations"] < 30 and info["gradient_norm"] <= 1e-6


@pytest.mark.parametrize("backward", ["closed_form", "ddn"])
@pytest.mark.parametrize("with_prev,loss_of", [(True, "W"), (True, "U"), (False, "W")],
                         ids=["delta-W", "delta-U", "feasibility-W"])
def test_riemannian_gradients_equal_the_exact_ones(backward, with_prev, loss_of):
    """float64 gradients through the Riemannian solve (closed form from the eigenpairs of
    P = sym(UᵀC), or the DDN) equal the exact solver's. Without U_prev (δ = 0, P singular)
    only losses of W(U) are defined: the tie-break direction U1 is free. With δ > 0 the
    solver's error along U1, where the curvature is only δ, reaches a loss of U amplified."""
    d, K = 12, 4
    H0, U_prev = random_means(d, K, seed=5), random_stiefel(d, K, seed=6)
    R = torch.randn(d, K, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = {}
    for solver in ("exact", "riemannian"):
        H = H0.clone().requires_grad_()
        U = nearest_etf(H, U_prev if with_prev else None, solver=solver, backward=backward)
        loss = (simplex_etf(K, U) * R.T).sum() if loss_of == "W" else (U * R).sum()
        (grads[solver],) = torch.autograd.grad(loss, H)
    g_e, g_r = grads["exact"], grads["riemannian"]
    assert g_e.norm() > 1e-2 and torch.isfinite(g_r).all()
    assert (g_r - g_e).norm() <= (1e-5 if loss_of == "W" else 5e-4) * g_e.norm()


def test_riemannian_head_trains_like_the_exact_one(tmp_path):
    """A few UFM training steps with ImplicitETFHead(solver="riemannian") (its forward and
    the backward through the eigenpairs of P) give the exact solver's run."""
    from gnc.config import TrainConfig
    from gnc.heads import ImplicitETFHead
    from gnc.training import Trainer

    base = dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 6},
                model="ufm", feature_dim=8, epochs=6, lr=0.5, eval_every=2, progress=False,
                method="implicit")
    out, heads = {}, {}
    for solver in ("exact", "riemannian"):
        trainer = Trainer(TrainConfig(**base, solver=solver), tmp_path / solver)
        head = trainer.model.head
        assert isinstance(head, ImplicitETFHead) and head.solver == solver
        out[solver], heads[solver] = trainer.fit(), head
    info = heads["riemannian"].solver_info
    assert "min grad norm" in info["stopping_reason"] and info["iterations"] < 30
    for key in ("train_loss", "nc1", "nc3", "avg_cos_margin", "wh_equinorm", "top1"):
        assert out["riemannian"][key] == pytest.approx(out["exact"][key], rel=1e-5,
                                                       abs=1e-7), key
    W_r, W_e = heads["riemannian"].weight, heads["exact"].weight
    assert (W_r - W_e).norm() <= 1e-5 * W_e.norm()
    assert out["exact"]["train_loss"] < 1.4  # it trained (log 4 ≈ 1.39 at chance)


def _critical_starts():
    """(H_bar, U_prev) whose warm start is a critical point that is no minimum: class means
    flipped against U_prev (a maximum of tr(UᵀC) over the span), the first step's I_{d×K}
    against −I M, and d = K with U_prev in the other component of O(K)."""
    torch.manual_seed(4)
    d, K = 20, 5
    M = centering(K, dtype=torch.float64)
    Up = random_stiefel(d, K)
    flipped = -Up @ M
    first = -torch.eye(d, K, dtype=torch.float64) @ M
    H = random_means(5, 5)
    U_star = nearest_etf(H, random_stiefel(5, 5))
    other = random_stiefel(5, 5)
    if torch.linalg.det(other) * torch.linalg.det(U_star) > 0:
        other = other * torch.tensor([-1.0, 1, 1, 1, 1], dtype=torch.float64)
    return [(flipped / flipped.norm(), Up), (first / first.norm(), None), (H, other)]


@pytest.mark.parametrize("case", [0, 1, 2], ids=["flipped", "first_step", "d_eq_K_component"])
def test_a_critical_warm_start_that_is_no_minimum_is_left(case):
    """Trust regions stopped at once at a critical warm start, a maximum or a saddle
    (f 4.0 for the minimum's 0.008), or in O(K)'s other component for d = K: the solver
    reflects the directions of sym(UᵀC)'s negative eigenvalues and runs again."""
    from gnc.etf import etf_objective

    H, Up = _critical_starts()[case]
    info: dict = {}
    U_riem = nearest_etf(H, Up, solver="riemannian", info=info)
    U_exact = nearest_etf(H, Up)
    delta = 1e-3 if Up is not None else 0.0
    assert info["restarts"] >= 1
    assert float(etf_objective(U_riem, H, Up, delta)) == pytest.approx(
        float(etf_objective(U_exact, H, Up, delta)), abs=1e-9)
    M = centering(H.shape[1], dtype=torch.float64)
    torch.testing.assert_close(U_riem @ M, U_exact @ M, atol=1e-6, rtol=0)
