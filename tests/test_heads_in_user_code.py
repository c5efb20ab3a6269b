"""The heads in a researcher's own code, next to torch's tools: torch.compile, autocast,
torch.export, several forwards before one backward, second derivatives, heads without bias.

Each test compares with the same computation done plainly (eager, float64, one forward)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gnc.class_means import ClassMeanTracker
from gnc.declarative import DDN_KKT_MAX, nearest_etf
from gnc.heads import make_head
from gnc.metrics import nc_metrics


def _batches(steps: int, n: int, d: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield (torch.randn(n, d, generator=g), torch.arange(n) % K,
               torch.randn(n, K, generator=g))


def _feature_grads(module, steps: int, d: int, K: int) -> list[torch.Tensor]:
    grads = []
    for x, y, g_out in _batches(steps, 20, d, K):
        x.requires_grad_()
        out = module(x, y)
        out = out.H_bar if isinstance(out, tuple) else out
        (out * (g_out if out.shape == g_out.shape else g_out[: out.shape[0], : out.shape[1]])
         ).sum().backward()
        grads.append(x.grad)
    return grads


@pytest.mark.parametrize("kind", ["implicit", "tracker"])
def test_compiled_implicit_head_and_tracker_give_eager_gradients(kind):
    """torch.compile (AOTAutograd) recomputed the running-mean weight β in the backward from
    the count the forward had just incremented: the features' gradient was 2/(t+3) where it
    is 2/(t+2), 25 % off at the second step. Their training step now runs eagerly."""
    d, K = 16, 5
    torch.manual_seed(0)
    module = make_head("implicit", d, K) if kind == "implicit" else ClassMeanTracker(d, K)
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, backend="aot_eager")
    got = _feature_grads(compiled, 3, d, K)
    want = _feature_grads(eager, 3, d, K)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), f"step {step}"
    for (name, x), (_, y) in zip(module.state_dict().items(), eager.state_dict().items(),
                                 strict=True):
        assert torch.allclose(x.double(), y.double(), atol=1e-6), name


def test_nearest_etf_inside_autocast_solves_in_its_own_dtype():
    """Above 256 classes the solve is float32; inside autocast its products ran in bf16
    (max|UᵀU − I| ~ 1e-2) and the backward failed on mixed dtypes."""
    d, K = 300, 260
    g = torch.Generator().manual_seed(0)
    H = torch.randn(d, K, generator=g)
    H = (H / H.norm()).requires_grad_()
    U_prev = torch.linalg.qr(torch.randn(d, K, generator=g))[0]
    G = torch.randn(d, K, generator=g)

    def solve():
        H.grad = None
        U = nearest_etf(H, U_prev, delta=1e-3)
        (U * G).sum().backward()
        return U.detach(), H.grad

    U_plain, grad_plain = solve()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        U, grad = solve()
    eye = torch.eye(K)
    assert U.dtype == torch.float32 and (U.T @ U - eye).abs().max() < 1e-5
    assert torch.equal(U, U_plain) and torch.equal(grad, grad_plain)


def test_the_fixed_head_takes_two_forwards_before_one_backward():
    """Two augmented views (or micro-batches) summed into one loss: the fixed head copied
    its W onto itself at every forward, which invalidated the first forward's graph."""
    d, K = 16, 5
    x1, y1, _ = next(_batches(1, 20, d, K, seed=1))
    x2, y2, _ = next(_batches(1, 20, d, K, seed=2))
    for method in ("fixed", "implicit", "standard"):
        head = make_head(method, d, K)
        both = [x.clone().requires_grad_() for x in (x1, x2)]
        loss = sum(F.cross_entropy(head(x, y), y) for x, y in zip(both, (y1, y2), strict=True))
        loss.backward()
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in both), method


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_a_trained_head_exports_in_eval_mode(method):
    """torch.export of a head in eval mode: its NaN check read a value back
    (GuardOnDataDependentSymNode); value checks are skipped while torch traces."""
    d, K = 16, 5
    head = make_head(method, d, K)
    for x, y, _ in _batches(2, 20, d, K):
        head(x, y)
    head.eval()
    x = torch.randn(8, d)
    program = torch.export.export(head, (x,))
    assert torch.equal(program.module()(x), head(x))
    with pytest.raises(ValueError, match="finite"):  # eagerly, the check is still there
        head(torch.full((8, d), float("nan")))


def test_a_second_derivative_through_nearest_etf_is_refused():
    """create_graph=True (an input-gradient penalty) gave a silently wrong second
    derivative; the backward is first order and says so."""
    H = torch.randn(8, 4, dtype=torch.float64)
    H = (H / H.norm()).requires_grad_()
    U_prev = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64))[0]
    U = nearest_etf(H, U_prev)
    loss = (U @ torch.randn(4, 4, dtype=torch.float64)).square().sum()  # ∂L/∂U depends on U
    (g,) = torch.autograd.grad(loss, H, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        g.square().sum().backward()


def test_a_first_ddn_step_too_large_is_refused_before_the_state_changes():
    """d·K + K(K+1)/2 above DDN_KKT_MAX: the refusal came in the backward, after the
    forward had moved the running means and the step count."""
    d, K = 800, 10
    assert d * K + K * (K + 1) // 2 > DDN_KKT_MAX
    head = make_head("implicit", d, K, backward="ddn")
    before = copy.deepcopy(head.state_dict())
    x, y, _ = next(_batches(1, 20, d, K))
    with pytest.raises(ValueError, match="closed_form"):
        head(x.requires_grad_(), y)
    for name, value in head.state_dict().items():
        assert torch.equal(value, before[name]), name
    with torch.no_grad():  # no gradient, no KKT system: the step runs
        head(x, y)
    assert head.num_steps == 1
    head(x, y).sum().backward()  # δ > 0 from now on: no dense system


def test_nc_metrics_of_a_head_without_bias():
    d, K = 16, 4
    head = make_head("implicit", d, K, bias=False)
    x, y, _ = next(_batches(1, 40, d, K))
    head(x, y)
    assert head.bias is None
    got = nc_metrics(x, y, head.weight, head.bias)
    want = nc_metrics(x, y, head.weight, torch.zeros(K))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)), key


def test_a_float16_cma_tracker_keeps_learning_past_65504_samples_a_class():
    """The CMA weight n/(N + n) was formed in the buffers' float16, where N + n > 65504 is
    Inf: the weight 0 froze the class means."""
    d, K = 8, 2
    tracker = ClassMeanTracker(d, K, update="cma", dtype=torch.float16)
    tracker.counts.fill_(70_000)
    tracker.t.fill_(100)
    x, y = torch.randn(64, d, dtype=torch.float16), torch.arange(64) % K
    before = tracker.H_bar_raw.clone()
    tracker(x, y)
    assert not torch.equal(tracker.H_bar_raw, before)
    assert torch.isfinite(tracker.H_bar_raw).all()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method", ["fixed", "implicit"])
def test_activation_checkpointing_around_a_head_is_refused(method, reentrant):
    """torch.utils.checkpoint reran the head's training forward in the backward: its running
    state moved twice and the gradients were wrong (13–32 %), silently."""
    from torch.utils.checkpoint import checkpoint

    d, K = 16, 5
    head = make_head(method, d, K)
    x, y, _ = next(_batches(1, 20, d, K))
    x.requires_grad_()
    out = checkpoint(head, x, y, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="outside torch.utils.checkpoint"):
        out.sum().backward()
    head(x, y).sum().backward()  # outside it, as before
