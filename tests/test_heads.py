import math

import pytest
import torch

from gnc.class_means import ClassMeanTracker
from gnc.declarative import nearest_etf
from gnc.etf import simplex_etf
from gnc.heads import (
    ABLATIONS,
    HEAD_OPTIONS,
    METHOD_NAMES,
    METHODS,
    PAPER_METHODS,
    FixedETFHead,
    Head,
    ImplicitETFHead,
    StandardHead,
    make_head,
    normalizes_features,
)
from gnc.metrics import NCStatistics
from gnc.models.classifier import FeatureClassifier
from gnc.validation import NonFiniteError, trusted_inputs

F64 = torch.float64


def batch(d=16, K=4, per_class=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat(per_class)
    h = torch.randn(K * per_class, d, generator=g, dtype=dtype)
    return h / h.norm(dim=1, keepdim=True), y


def feature_grad(head, h, y):
    h = h.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(head(h, y), y)
    loss.backward()
    return h.grad


def test_implicit_logits_use_nearest_etf_of_current_means():
    head = ImplicitETFHead(16, 4, dtype=F64)
    h, y = batch()
    logits = head(h, y)
    mu_c = torch.stack([h[y == c].mean(0) for c in range(4)])  # K×d
    mu_G = h.mean(0)
    H = (mu_c - mu_G).T
    U = nearest_etf(H / H.norm())
    W = simplex_etf(4, U)
    assert torch.allclose(logits, (h - mu_G) @ W.T, atol=1e-10)
    assert torch.allclose(head.weight, W, atol=1e-10)
    # the second step is warm-started at the first solution (δ > 0)
    h2, y2 = batch(seed=1)
    head(h2, y2)
    U2 = nearest_etf(head.tracker.H_bar, U, delta=1e-3)
    assert torch.allclose(head.U, U2, atol=1e-10)


def test_implicit_gradient_paths():
    h, y = batch()
    g = {b: feature_grad(ImplicitETFHead(16, 4, backward=b, dtype=F64), h, y)
         for b in ("closed_form", "ddn", "none")}
    assert torch.allclose(g["closed_form"], g["ddn"], atol=1e-10)
    assert (g["closed_form"] - g["none"]).norm() > 1e-3 * g["none"].norm()


def test_eval_reproduces_last_training_classifier_after_state_dict_round_trip():
    head = ImplicitETFHead(16, 4)
    for seed in range(3):
        head(*batch(seed=seed, dtype=torch.float32))
    fresh = ImplicitETFHead(16, 4)
    fresh.load_state_dict(head.state_dict())
    fresh.eval()
    x = torch.randn(5, 16)
    assert torch.equal(fresh.weight, head.weight) and torch.equal(fresh.bias, head.bias)
    assert torch.allclose(fresh(x), x @ head.weight.T + head.bias)
    assert torch.allclose(head.bias, -head.weight @ head.tracker.mu_G)
    assert torch.equal(fresh.U, head.U)
    # training continues from the stored U (warm start), not from scratch
    fresh.train()
    h, y = batch(seed=5, dtype=torch.float32)
    head(h, y)
    fresh(h, y)
    assert torch.allclose(fresh.U, head.U, atol=1e-6)


def test_fixed_head_is_a_simplex_etf():
    for rotation in ("canonical", "random"):
        head = FixedETFHead(16, 4, rotation=rotation, seed=3)
        W = head.weight
        assert torch.allclose(W.norm(dim=1), torch.ones(4), atol=1e-6)
        cos = (W @ W.T)[~torch.eye(4, dtype=torch.bool)]
        assert torch.allclose(cos, torch.full_like(cos, -1 / 3), atol=1e-6)
    h, y = batch(dtype=torch.float32)
    head = FixedETFHead(16, 4)
    assert torch.allclose(head(h, y), (h - h.mean(0)) @ head.weight.T, atol=1e-6)
    head.eval()
    assert torch.allclose(head.bias, -head.weight @ head.mu_G)
    assert not any(p.requires_grad for p in head.parameters())


def test_standard_head_renormalize():
    head = StandardHead(16, 4)
    with torch.no_grad():
        head.weight.mul_(3.0)
    head.renormalize_()
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(4), atol=1e-6)
    raw = StandardHead(16, 4, normalize=False)
    with torch.no_grad():
        raw.weight.mul_(3.0)
    w = raw.weight.clone()
    raw.renormalize_()
    assert torch.equal(raw.weight, w)


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit", "implicit-nograd",
                                    "standard-unnormalized"])
def test_make_head_and_module_conventions(method):
    head = make_head(method, 16, 4, delta=1e-3, rotation="canonical")
    assert head.weight.shape == (4, 16) and head.bias.shape == (4,)
    h, y = batch(dtype=torch.float32)
    assert head(h, y).shape == (20, 4)
    head = head.double()
    assert head.weight.dtype == F64
    assert head(h.double(), y).dtype == F64
    fresh = make_head(method, 16, 4).double()
    fresh.load_state_dict(head.state_dict())
    head.eval(), fresh.eval()
    assert torch.allclose(fresh(h.double()), head(h.double()))
    assert normalizes_features(method) == (method != "standard-unnormalized")


def test_make_head_errors():
    with pytest.raises(ValueError, match="unknown method"):
        make_head("learned", 16, 4)
    with pytest.raises(ValueError, match="unknown head option"):
        make_head("implicit", 16, 4, delta_prime=1.0)
    with pytest.raises(ValueError, match="d >= K"):
        make_head("implicit", 3, 4)
    with pytest.raises(ValueError, match="unknown solver"):
        make_head("implicit", 16, 4, solver="lbfgs")


@pytest.mark.parametrize("method", ["fixed", "implicit"])
def test_bad_inputs_leave_state_unchanged(method):
    head = make_head(method, 16, 4)
    head(*batch(dtype=torch.float32))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    h, y = batch(dtype=torch.float32)
    bad_h = h.clone()
    bad_h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        head(bad_h, y)
    with pytest.raises(ValueError, match=r"shape \(B, d=16\)"):
        head(h[:, :8], y)
    if method == "implicit":
        with pytest.raises(ValueError, match="labels"):
            head(h, y + 4)
        with pytest.raises(ValueError, match="needs `targets`"):
            head(h)
    after = head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["fixed", "implicit"])
def test_features_whose_sums_overflow_leave_the_running_means(method):
    """1e38 is finite in float32, passes the input check, and its batch sum is Inf: the
    running means (and μ_G) stayed Inf/NaN and every later batch failed. Now the batch
    leaves them as they were, and training goes on."""
    head = make_head(method, 16, 4)
    h, y = batch(dtype=torch.float32)
    head(h, y)
    means = ["mu_G"] + ["tracker." + k for k in ("H_bar_raw", "mu_G", "counts", "t")]
    before = {k: v.clone() for k, v in head.state_dict().items() if k in means}
    y8 = torch.arange(8) % 4  # two a class: per-class sums 2e38 are finite, the total is not
    head(torch.full((8, 16), 1e38), y8)
    after = head.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.isfinite(head(*batch(dtype=torch.float32))).all()


@pytest.mark.parametrize("method", ["fixed", "implicit"])
def test_set_global_mean_takes_only_a_finite_d_vector(method):
    """NaN made the bias NaN; a (1,) tensor was broadcast; ints were taken."""
    head = make_head(method, 16, 4)
    head(*batch(dtype=torch.float32))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    for bad, match in [(torch.full((16,), math.nan), "`mu_G` to be finite"),
                       (torch.ones(1), r"shape \(d=16,\), but got \(1,\)"),
                       (torch.ones(16, dtype=torch.long), "floating-point"),
                       ([0.0] * 16, "but got list")]:
        with pytest.raises(ValueError, match=match):
            head.set_global_mean(bad)
    after = head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    head.set_global_mean(torch.ones(16))
    assert torch.equal(head.mu_G, torch.ones(16))


def test_an_empty_batch_is_refused_by_the_fixed_head():
    head = make_head("fixed", 16, 4)
    with pytest.raises(ValueError, match="at least one sample, but got B=0"):
        head(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))
    assert head.num_steps == 0


@pytest.mark.parametrize("delta", [-1.0, math.nan, math.inf, "0.1", None, True])
def test_a_bad_delta_is_refused_when_the_head_is_made(delta):
    with pytest.raises(ValueError, match="Expected `delta` to be a finite number >= 0"):
        make_head("implicit", 16, 4, delta=delta)


def test_feature_classifier_normalises_onto_tau_sphere():
    backbone = torch.nn.Linear(8, 16)
    model = FeatureClassifier(backbone, make_head("implicit", 16, 4), tau=math.sqrt(2.0))
    x, y = torch.randn(20, 8), torch.arange(20) % 4
    logits, h = model(x, y)
    assert logits.shape == (20, 4)
    assert torch.allclose(h.norm(dim=1), torch.full((20,), math.sqrt(2.0)), atol=1e-5)
    raw = FeatureClassifier(backbone, make_head("standard", 16, 4), tau=None)
    assert torch.allclose(raw(x)[1], backbone(x))
    with pytest.raises(ValueError, match="tau"):
        FeatureClassifier(backbone, make_head("standard", 16, 4), tau=0.0)



def test_public_api():
    import gnc

    for name in ("nearest_etf", "NearestETF", "ImplicitETFHead", "FixedETFHead", "StandardHead",
                 "make_head", "ClassMeanTracker", "NCStatistics", "nc_metrics",
                 "FeatureClassifier"):
        assert hasattr(gnc, name), name


@pytest.mark.parametrize("solver", ["exact", "riemannian"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_implicit_ddn_backward_over_several_steps(solver, dtype):
    # The paper's ddn backward saves U_prev, which is the head's `U` buffer overwritten after
    # each step: float64 (where no dtype conversion copies it) failed at step 2.
    torch.manual_seed(0)
    heads = {b: ImplicitETFHead(32, 5, solver=solver, backward=b).to(dtype)
             for b in ("ddn", "closed_form")}
    for step in range(4):
        h, y = batch(d=32, K=5, per_class=4, seed=step, dtype=dtype)
        g = {b: feature_grad(head, h, y) for b, head in heads.items()}
        assert torch.isfinite(g["ddn"]).all(), f"step {step}"
        tol = 1e-8 if dtype == torch.float64 else 1e-4
        assert torch.allclose(g["ddn"], g["closed_form"], atol=tol), f"step {step}"


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit", "implicit-nograd",
                                    "standard-unnormalized"])
def test_no_bias_heads_have_logits_W_h_and_nothing_else_changes(method):
    torch.manual_seed(0)  # the standard heads' W is random
    with_b = make_head(method, 16, 4).double()
    torch.manual_seed(0)
    without = make_head(method, 16, 4, bias=False).double()
    # no bias parameter or buffer; every other piece of state is there
    assert without.bias is None
    assert "bias" not in dict(without.named_parameters()) | dict(without.named_buffers())
    assert set(without.state_dict()) == set(with_b.state_dict()) - {"bias"}
    assert "bias=False" in repr(without)
    h, y = batch()
    for _ in range(2):  # the implicit heads' second step is warm-started at U_prev
        z_b, z = with_b(h, y), without(h, y)
        W = without.weight
        torch.testing.assert_close(z, h @ W.T)
        torch.testing.assert_close(with_b.weight, W)  # the same classifier, only b differs
        if method.startswith("standard"):  # a learned b, zero at initialisation
            torch.testing.assert_close(z_b, z + with_b.bias)
        else:  # b = −W μ_G with the batch mean
            torch.testing.assert_close(z_b, z - W @ h.mean(0))
    with_b.eval(), without.eval()
    torch.testing.assert_close(without(h), h @ without.weight.T)
    fresh = make_head(method, 16, 4, bias=False).double()
    fresh.load_state_dict(without.state_dict())
    torch.testing.assert_close(fresh.eval()(h), without(h))


# --------------------------------------------------------------------------- hooks, registry


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_head_has_the_loop_hooks(method):
    head = make_head(method, 16, 4)
    assert isinstance(head, Head) and isinstance(head, METHODS[method].head)
    h, y = batch(dtype=torch.float32)
    head(h, y)
    assert head.pop_polar_residual() is None  # no Newton–Schulz step
    W = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.mul_(3.0)
    head.after_optimizer_step()
    if method == "standard":  # rows back on the unit sphere
        torch.testing.assert_close(head.weight, W / W.norm(dim=1, keepdim=True))
    else:  # nothing to do
        torch.testing.assert_close(head.weight, 3.0 * W)
    assert head.tracks_global_mean == (not method.startswith("standard"))
    mu_G = torch.randn(16)
    if head.tracks_global_mean:
        head.set_global_mean(mu_G)
        assert torch.equal(head.mu_G, mu_G)
        torch.testing.assert_close(head.bias, -head.weight @ mu_G)
        assert head.num_steps == 1
    else:
        with pytest.raises(NotImplementedError, match="keeps no global mean"):
            head.set_global_mean(mu_G)


def test_implicit_head_pops_the_newton_schulz_residual_and_counts_host_steps():
    head = ImplicitETFHead(16, 4, polar_method="newton_schulz", ns_fallback=False, dtype=F64)
    for seed in range(3):
        head(*batch(seed=seed))
    residual = head.pop_polar_residual()
    assert residual is not None and residual <= 1e-12 and head.pop_polar_residual() is None
    assert head.num_steps == 3 == int(head.steps)
    saved = head.snapshot()
    head(*batch(seed=4))
    head.advance_host_steps(2)  # e.g. two CUDA-graph replays
    assert head.num_steps == 6
    head.restore(saved)
    assert head.num_steps == 3 and head.pop_polar_residual() is None
    for k, v in head.named_buffers():
        assert torch.equal(v, saved["buffers"][k]), k
    assert "ns_fallback=False" in repr(head) and "polar_method='newton_schulz'" in repr(head)


def test_method_registry():
    assert METHOD_NAMES == ("standard", "fixed", "implicit", "implicit-nograd",
                            "standard-unnormalized")
    assert PAPER_METHODS == ("standard", "fixed", "implicit")
    assert ABLATIONS == ("implicit-nograd", "standard-unnormalized")
    assert set(HEAD_OPTIONS) == {"bias", "rotation", "seed", "delta", "solver", "backward",
                                 "update", "solve_device", "polar_method", "ns_fallback",
                                 "device", "dtype"}
    for spec in METHODS.values():
        assert set(spec.options) <= set(HEAD_OPTIONS) and not set(spec.fixed) & set(spec.options)
    # the trainer passes every option to every method: unused ones are dropped ...
    full = dict(delta=1e-2, solver="exact", backward="closed_form", update="cma",
                rotation="random", seed=3, solve_device="same", bias=True,
                polar_method="newton_schulz", ns_fallback=False)
    heads = {m: make_head(m, 16, 4, **full) for m in METHOD_NAMES}
    assert heads["implicit"].delta == 1e-2 and not heads["implicit"].ns_fallback
    assert heads["fixed"].rotation == "random"
    # ... and what the method sets overrides the caller's
    assert heads["implicit-nograd"].backward == "none"
    assert not heads["standard-unnormalized"].normalize
    with pytest.raises(ValueError, match="unknown method 'learned'"):
        normalizes_features("learned")


# --------------------------------------------------------------------------- NaN features


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_non_finite_features_raise_non_finite_error(method):
    head = make_head(method, 16, 4)
    h, y = batch(dtype=torch.float32)
    h[3, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="`features` to be finite, but got NaN or Inf"):
        head(h, y)
    head.eval()
    with pytest.raises(NonFiniteError):
        head(h)
    with trusted_inputs():  # the check is skipped, nothing else changes
        head(h)


def test_tracker_and_metrics_raise_non_finite_error():
    h, y = batch(dtype=torch.float32)
    h[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="`features` to be finite"):
        ClassMeanTracker(16, 4)(h, y)
    with pytest.raises(NonFiniteError, match="`features` to be finite"):
        NCStatistics(4, 16).update(h, y)
    assert issubclass(NonFiniteError, ValueError)  # `except ValueError` still catches it


def test_fixed_and_implicit_heads_share_the_running_global_mean_rule():
    fixed, implicit = FixedETFHead(16, 4, dtype=F64), ImplicitETFHead(16, 4, dtype=F64)
    for seed in range(4):
        h, y = batch(seed=seed)
        fixed(h, y), implicit(h, y)  # batch means summed differently: rounding apart
        torch.testing.assert_close(fixed.mu_G, implicit.mu_G, rtol=0, atol=1e-15)


@pytest.mark.parametrize("polar_method", ["svd", "gram"])
def test_first_step_with_an_absent_class_is_the_same_in_float32_and_float64(polar_method):
    """δ = 0 with a class missing from the first batch: C's null space is two-dimensional,
    and the float32 class means' rounding left a singular value of ~2e-8·σ_max that the
    float64 rank test kept, so the tie-break followed noise (W 0.47 from the float64 head's,
    0.21 between two orders of one batch). The rounding of the input counts as no rank."""
    from gnc import ImplicitETFHead

    torch.manual_seed(0)
    d, K, B = 64, 10, 32
    x = torch.nn.functional.normalize(torch.randn(B, d), dim=1)
    y = torch.randint(0, K - 1, (B,))  # class 9 absent
    weights = []
    for dtype, order in ((torch.float64, torch.arange(B)), (torch.float32, torch.arange(B)),
                         (torch.float32, torch.randperm(B))):
        head = ImplicitETFHead(d, K, dtype=dtype, polar_method=polar_method).train()
        head(x[order].to(dtype), y[order])
        weights.append(head.weight.double())
    for W in weights[1:]:
        torch.testing.assert_close(W, weights[0], atol=1e-6, rtol=0)



def test_the_input_rounding_floor_is_for_float32_means_only():
    """``polar_factor(input_dtype=...)`` counts float32 rounding as no rank; at bfloat16 the
    same floor (10·eps·‖C‖_F, 8 % of it) cut a real direction of σ = 0.07."""
    from gnc.etf import centering, polar_factor

    g = torch.Generator().manual_seed(0)
    d, K = 16, 5
    A = torch.linalg.qr(torch.randn(d, K - 1, generator=g, dtype=torch.float64))[0]
    B = torch.linalg.qr(centering(K) @ torch.randn(K, K - 1, generator=g,
                                                   dtype=torch.float64))[0]
    C = A @ torch.diag(torch.tensor([1.0, 0.8, 0.6, 0.1], dtype=torch.float64)) @ B.T
    C = C / C.norm()
    for dtype in (torch.bfloat16, torch.float16, torch.float32, None):
        assert polar_factor(C, "svd", input_dtype=dtype).rank == K - 1, dtype
