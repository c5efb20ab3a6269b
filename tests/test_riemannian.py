import pytest

from gnc.etf import centering, nearest_etf
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
