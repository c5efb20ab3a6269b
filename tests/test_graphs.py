"""GraphedHeadStep's logic on the CPU, with a stand-in for torch.cuda.make_graphed_callables
that does what it does to the head's state: warm-up steps that run, then a capture whose
Python side effects a replay does not repeat. The CUDA graphs themselves need a GPU
(`benchmarks/gpu_check.sh` times them)."""

import pytest
import torch

from gnc.config import TrainConfig
from gnc.etf import capturing, products_only
from gnc.graphs import WARMUP_ITERS, GraphedHeadStep
from gnc.heads import ImplicitETFHead
from gnc.models.classifier import FeatureClassifier
from gnc.training import Trainer
from gnc.validation import trusted_inputs

F64 = torch.float64


class FakeGrapher:
    """Runs the warm-up steps (as torch does), then a capture step and the "replays" with
    the Python-side state frozen, and with ``capturing()`` true: a replay runs the kernels
    that the capture recorded, the products-only ones."""

    def __init__(self, head, monkeypatch):
        self.head, self.monkeypatch = head, monkeypatch
        self.captures = self.replays = 0

    def _as_captured(self, fn, h, y):
        with self.monkeypatch.context() as m:
            m.setattr("gnc.declarative.capturing", lambda: True)
            out = fn(h, y)
            self.head.advance_host_steps(-1)  # a replay runs kernels, not Python: undo
            return out

    def __call__(self, fn, sample_args, num_warmup_iters):
        assert num_warmup_iters == WARMUP_ITERS
        assert capturing()  # the warm-up runs the kernels that the capture records
        h, y = sample_args
        for _ in range(num_warmup_iters):
            out = fn(h, y)
            torch.autograd.grad(out, h, torch.ones_like(out))
        out = self._as_captured(fn, h, y)  # on a GPU the capture records without running
        torch.autograd.grad(out, h, torch.ones_like(out))
        self.captures += 1

        def replay(h, y):
            self.replays += 1
            return self._as_captured(fn, h, y)

        return replay


def _batches(d, K, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [4 * K] * (n - 1) + [2 * K]  # a smaller last batch
    return [(torch.randn(b, d, generator=g, dtype=F64), torch.arange(b) % K) for b in sizes]


@pytest.mark.parametrize("K", [6, 20])  # Lyapunov by Kronecker Cholesky / sign iteration
def test_graphed_step_trains_like_the_plain_head(K, monkeypatch):
    d = 24
    plain = ImplicitETFHead(d, K, polar_method="newton_schulz", ns_fallback=False, dtype=F64)
    graphed = ImplicitETFHead(d, K, polar_method="newton_schulz", ns_fallback=False, dtype=F64)
    grapher = FakeGrapher(graphed, monkeypatch)
    step = GraphedHeadStep(graphed, make_graphed=grapher)
    with trusted_inputs():
        for x, y in _batches(d, K, 6):
            grads = []
            for call in (plain, step):
                h = x.clone().requires_grad_()
                logits = call(h, y)
                (logits.logsumexp(1).sum() - logits[torch.arange(len(y)), y].sum()).backward()
                grads.append((logits.detach(), h.grad))
            # the captured kernels (products only) differ from the eager ones (Cholesky) in
            # rounding only
            assert torch.allclose(grads[0][0], grads[1][0], rtol=0, atol=1e-11)
            assert torch.allclose(grads[0][1], grads[1][1], rtol=0, atol=1e-11)
    # step 1 eager (δ = 0), step 2 captures then replays, 3-5 replay, the short batch is eager
    assert grapher.captures == 1 and grapher.replays == 4 == step.replays
    assert graphed.num_steps == plain.num_steps == 6 == int(graphed.steps)
    for (k, a), b in zip(plain.state_dict().items(), graphed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), k  # warm-up and capture left no trace
    assert graphed.pop_polar_residual() <= 1e-14 and plain.pop_polar_residual() <= 1e-14


def test_a_failed_capture_leaves_the_state_and_trains_on_eagerly(caplog):
    d, K = 24, 6
    plain = ImplicitETFHead(d, K, polar_method="newton_schulz", ns_fallback=False, dtype=F64)
    head = ImplicitETFHead(d, K, polar_method="newton_schulz", ns_fallback=False, dtype=F64)

    def broken(fn, sample_args, num_warmup_iters):
        h, y = sample_args
        fn(h, y)  # a warm-up step ran (and changed the state) before the capture failed
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    step = GraphedHeadStep(head, make_graphed=broken)
    with trusted_inputs():
        for x, y in _batches(d, K, 4):
            assert torch.equal(plain(x, y), step(x, y))
    assert step.failed.startswith("RuntimeError: CUDA error") and step.replays == 0
    assert "could not be captured in a CUDA graph" in caplog.text
    for a, b in zip(plain.state_dict().values(), head.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_products_only_is_set_inside_and_restored_after():
    assert not capturing()
    with pytest.raises(RuntimeError), products_only():
        assert capturing()
        with products_only():
            assert capturing()
        assert capturing()
        raise RuntimeError
    assert not capturing()


def test_graphed_step_is_used_in_training_only():
    d, K = 16, 4
    head = ImplicitETFHead(d, K, polar_method="newton_schulz")
    model = FeatureClassifier(torch.nn.Linear(8, d), head, tau=1.0)
    calls = []
    model.head_step = lambda h, y: calls.append(1) or head(h, y)
    x, y = torch.randn(8, 8), torch.arange(8) % K
    model(x, y)
    model.eval()
    model(x)
    assert calls == [1]
    assert "head_step" not in str(model.state_dict().keys())


def test_graphed_step_needs_the_sync_free_polar_factor(tmp_path):
    with pytest.raises(ValueError, match="polar_method='newton_schulz'"):
        GraphedHeadStep(ImplicitETFHead(16, 4))
    with pytest.raises(ValueError, match="polar_method='newton_schulz'"):
        GraphedHeadStep(torch.nn.Linear(16, 4))
    with pytest.raises(ValueError, match="needs ns_fallback=False"):
        GraphedHeadStep(ImplicitETFHead(16, 4, polar_method="newton_schulz"))
    with pytest.raises(ValueError, match="graph_head needs polar_method newton_schulz"):
        TrainConfig(graph_head=True).validate()
    cfg = TrainConfig(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 5},
                      model="ufm", feature_dim=8, epochs=1, method="implicit", device="cpu",
                      polar_method="newton_schulz", graph_head=True, progress=False)
    with pytest.raises(ValueError, match="needs one process on a CUDA device"):
        Trainer(cfg, tmp_path / "run")
    # another head has no step to capture: refused, not ignored (`gnc experiment` sets it
    # for the implicit methods only)
    with pytest.raises(ValueError, match="method 'standard' has none"):
        TrainConfig(**{**cfg.__dict__, "method": "standard"}).validate()


def test_capture_failure_names_the_cause_and_not_a_suppressed_context():
    from gnc.graphs import capture_failure

    try:
        try:
            raise ValueError("inside the capture")
        except ValueError:
            raise RuntimeError("previous error during capture")  # noqa: B904
    except RuntimeError as err:
        assert capture_failure(err) == ("ValueError: inside the capture; then RuntimeError: "
                                        "previous error during capture")
    try:
        try:
            raise ValueError("handled")
        except ValueError:
            raise RuntimeError("the step's own error") from None
    except RuntimeError as err:
        assert capture_failure(err) == "RuntimeError: the step's own error"
