"""Running class means: EMA/CMA formulas, absent classes, gradient path, validation, DDP."""

from __future__ import annotations

import copy
import datetime
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gnc.class_means import ClassMeans, ClassMeanTracker, ema_weight, running_average

D, K = 5, 4
F64 = torch.float64


def batch(labels: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    return torch.randn(len(labels), D, generator=g, dtype=F64) + 2.0, y


def centred_means(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hb (d x K; NaN for absent classes) and μ_G of one batch, sample by sample."""
    mu_G = h.mean(dim=0)
    absent = torch.full((D,), math.nan, dtype=F64)
    cols = [h[y == c].mean(dim=0) - mu_G if (y == c).any() else absent for c in range(K)]
    return torch.stack(cols, dim=1), mu_G


def normalised(H: torch.Tensor) -> torch.Tensor:
    return H / torch.linalg.norm(H)


BATCHES = [
    [0, 1, 1, 2, 0, 2],  # class 3 not yet seen
    [0, 0, 1, 3, 3, 2, 2],  # class 3 seen for the first time
    [1, 2, 2, 1],  # classes 0 and 3 absent
    [0, 1, 2, 3, 3, 0],
]


def expected_running(update: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(H̄ raw, running μ_G) after each of BATCHES, from the formulas in DESIGN §1."""
    H, mu = torch.zeros(D, K, dtype=F64), torch.zeros(D, dtype=F64)
    seen, total, out = [0] * K, 0, []
    for t, labels in enumerate(BATCHES, start=1):
        h, y = batch(labels, seed=t)
        Hb, mu_b = centred_means(h, y)
        alpha = max(2 / (t + 1), 1e-4)
        for c in range(K):
            n_c = int((y == c).sum())
            if n_c == 0:
                continue
            beta = (1.0 if seen[c] == 0 else alpha) if update == "ema" else n_c / (seen[c] + n_c)
            H[:, c] = (1 - beta) * H[:, c] + beta * Hb[:, c]
            seen[c] += n_c
        gamma = alpha if update == "ema" else len(labels) / (total + len(labels))
        mu = (1 - gamma) * mu + gamma * mu_b
        total += len(labels)
        out.append((H.clone(), mu.clone()))
    return out


def test_first_update_takes_the_batch_as_is():
    h, y = batch([0, 1, 1, 2, 3, 3, 3], seed=0)
    tracker = ClassMeanTracker(D, K, dtype=F64)
    out = tracker(h, y)
    assert isinstance(out, ClassMeans)
    Hb, mu_G = centred_means(h, y)
    torch.testing.assert_close(out.H_bar, normalised(Hb))
    torch.testing.assert_close(out.mu_G, mu_G)
    torch.testing.assert_close(tracker.H_bar_raw, Hb)
    torch.testing.assert_close(tracker.mu_G, mu_G)
    torch.testing.assert_close(tracker.H_bar, out.H_bar)
    assert int(tracker.t) == 1 and tracker.counts.tolist() == [1, 2, 1, 3]


@pytest.mark.parametrize("update", ["ema", "cma"])
def test_running_means_follow_their_formula(update):
    tracker = ClassMeanTracker(D, K, update=update, dtype=F64)
    for t, (labels, (H, mu)) in enumerate(zip(BATCHES, expected_running(update), strict=True), 1):
        h, y = batch(labels, seed=t)
        out = tracker(h, y)
        torch.testing.assert_close(tracker.H_bar_raw, H, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.H_bar, normalised(H), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.mu_G, h.mean(dim=0))  # batch mean, not running
        torch.testing.assert_close(tracker.mu_G, mu, rtol=1e-12, atol=1e-12)
    assert int(tracker.t) == len(BATCHES)


def test_absent_and_unseen_classes():
    tracker = ClassMeanTracker(D, K, dtype=F64)
    tracker(*batch(BATCHES[0], seed=1))
    assert torch.all(tracker.H_bar_raw[:, 3] == 0)  # never seen: column 0
    before = tracker.H_bar_raw.clone()
    tracker(*batch([1, 2, 2, 1], seed=2))  # 0 and 3 absent
    assert torch.equal(tracker.H_bar_raw[:, [0, 3]], before[:, [0, 3]])
    assert not torch.equal(tracker.H_bar_raw[:, [1, 2]], before[:, [1, 2]])


def test_ema_alpha_floor():
    tracker = ClassMeanTracker(D, K, dtype=F64)
    h, y = batch([0, 1, 2, 3], seed=0)
    tracker(h, y)
    tracker.t.fill_(10**6)  # alpha = max(2/(t+1), 1e-4) = 1e-4 at this count
    old = tracker.H_bar_raw.clone()
    h2, y2 = batch([0, 1, 2, 3], seed=1)
    tracker(h2, y2)
    torch.testing.assert_close(tracker.H_bar_raw, 0.9999 * old + 1e-4 * centred_means(h2, y2)[0])


def test_gradient_flows_only_through_the_current_batch():
    tracker = ClassMeanTracker(D, K, dtype=F64)
    h1, y1 = batch(BATCHES[0], seed=1)
    h1.requires_grad_(True)
    tracker(h1, y1)
    h2, y2 = batch(BATCHES[1], seed=2)
    h2.requires_grad_(True)
    out = tracker(h2, y2)
    assert not any(buf.requires_grad for buf in tracker.buffers())
    R = torch.randn(D, K, dtype=F64)
    ((out.H_bar * R).sum() + out.mu_G.sum()).backward()
    assert h1.grad is None  # the old estimate is detached
    assert h2.grad is not None and h2.grad.abs().sum() > 0

    state = copy.deepcopy(tracker.state_dict())

    def step(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fresh = ClassMeanTracker(D, K, dtype=F64)
        fresh.load_state_dict(state)
        return tuple(fresh(h, torch.tensor(BATCHES[2])))

    h3 = batch(BATCHES[2], seed=3)[0].requires_grad_(True)
    assert torch.autograd.gradcheck(step, (h3,))


def test_single_class_batch_has_zero_means_and_finite_gradient():
    tracker = ClassMeanTracker(D, K, dtype=F64)
    h = batch([2, 2, 2], seed=0)[0].requires_grad_(True)
    out = tracker(h, torch.tensor([2, 2, 2]))
    assert torch.all(out.H_bar == 0)
    (out.H_bar * torch.randn(D, K, dtype=F64)).sum().backward()
    assert torch.isfinite(h.grad).all()


def test_float32_features_in_float64_buffers_and_default_dtype():
    h, y = batch([0, 1, 2, 3], seed=0)
    out = ClassMeanTracker(D, K, dtype=F64)(h.float(), y)
    assert out.H_bar.dtype == F64
    out32 = ClassMeanTracker(D, K)(h.float(), y)
    assert out32.H_bar.dtype == torch.float32
    torch.testing.assert_close(out32.H_bar.double(), out.H_bar, rtol=1e-5, atol=1e-6)


BAD = [
    ({"features": torch.zeros(D)}, r"Expected `features` to have shape \(B, d=5\), but got \(5,\)"),
    ({"features": torch.zeros(3, D + 1)}, r"shape \(B, d=5\), but got \(3, 6\)"),
    ({"features": torch.zeros(0, D), "labels": torch.zeros(0).long()}, "at least one sample"),
    ({"features": torch.zeros(3, D).long()}, "`features` to be floating point"),
    ({"features": torch.full((3, D), math.nan)}, "`features` to be finite"),
    ({"features": torch.full((3, D), -math.inf)}, "`features` to be finite"),
    ({"labels": torch.tensor([0, 1])}, r"`labels` to have shape \(B=3,\), but got \(2,\)"),
    ({"labels": torch.tensor([0.0, 1.0, 2.0])}, "`labels` to be an integer tensor"),
    ({"labels": torch.tensor([0, 1, K])}, r"`labels` to be in \[0, K=4\), but got values in"),
    ({"labels": torch.tensor([-1, 1, 2])}, r"`labels` to be in \[0, K=4\)"),
]


@pytest.mark.parametrize(("bad", "match"), BAD)
def test_bad_inputs_raise_and_keep_the_buffers(bad, match):
    tracker = ClassMeanTracker(D, K, dtype=F64)
    tracker(*batch(BATCHES[0], seed=1))
    before = copy.deepcopy(tracker.state_dict())
    args = {"features": batch([0, 1, 2], seed=5)[0], "labels": torch.tensor([0, 1, 2])} | bad
    with pytest.raises(ValueError, match=match):
        tracker(args["features"], args["labels"])
    after = tracker.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_constructor_validates():
    with pytest.raises(ValueError, match=r"`update` to be one of \('ema', 'cma'\), but got 'sma'"):
        ClassMeanTracker(D, K, update="sma")
    with pytest.raises(ValueError, match="`d` >= 1 and `K` >= 2"):
        ClassMeanTracker(D, 1)


@pytest.mark.parametrize("update", ["ema", "cma"])
def test_state_dict_round_trip(update):
    tracker = ClassMeanTracker(D, K, update=update, dtype=F64)
    for t, labels in enumerate(BATCHES[:3], start=1):
        tracker(*batch(labels, seed=t))
    state = tracker.state_dict()
    assert set(state) == {"H_bar_raw", "mu_G", "counts", "t"}
    restored = ClassMeanTracker(D, K, update=update, dtype=F64)
    restored.load_state_dict(state)
    nxt = batch(BATCHES[3], seed=4)
    torch.testing.assert_close(restored(*nxt).H_bar, tracker(*nxt).H_bar, rtol=0, atol=0)
    for key, value in tracker.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    tracker.reset()
    assert int(tracker.t) == 0 and not tracker.counts.any() and not tracker.H_bar_raw.any()
    assert "update='" + update + "'" in repr(tracker)


# --------------------------------------------------------------------------- distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, steps: list, path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        tracker = ClassMeanTracker(D, K, dtype=F64)
        results = []
        for h, y, R, split in steps:
            mine = slice(0, split) if rank == 0 else slice(split, None)
            local = h[mine].clone().requires_grad_(True)
            out = tracker(local, y[mine])
            ((out.H_bar * R).sum() + out.mu_G.sum()).backward()
            results.append((out.H_bar.detach(), out.mu_G.detach(), local.grad))
        torch.save({"results": results, "state": tracker.state_dict()}, f"{path}.{rank}")
        dist.barrier()  # no rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    steps = []
    for t, (labels, split) in enumerate(zip(BATCHES, [2, 3, 1, 4], strict=True), start=1):
        h, y = batch(labels, seed=t)
        steps.append((h, y, torch.randn(D, K, dtype=F64), split))
    path = str(tmp_path / "result")
    mp.spawn(_ddp_worker, args=(free_port(), steps, path), nprocs=2, join=True)
    ranks = [torch.load(f"{path}.{rank}") for rank in range(2)]
    tracker = ClassMeanTracker(D, K, dtype=F64)
    for i, (h, y, R, split) in enumerate(steps):
        h = h.clone().requires_grad_(True)
        out = tracker(h, y)
        ((out.H_bar * R).sum() + out.mu_G.sum()).backward()
        for rank, mine in enumerate([slice(0, split), slice(split, None)]):
            H_bar, mu_G, grad = ranks[rank]["results"][i]
            torch.testing.assert_close(H_bar, out.H_bar.detach())
            torch.testing.assert_close(mu_G, out.mu_G.detach())
            # each rank's loss equals the global one: the summed gradient is world_size x
            torch.testing.assert_close(grad / 2, h.grad[mine])
    for rank in range(2):
        for key, value in tracker.state_dict().items():
            torch.testing.assert_close(ranks[rank]["state"][key], value)


def test_ema_weight_on_the_host_and_on_the_device():
    for t in (1, 2, 3, 10, 19_999, 20_000, 10**6):
        expected = max(2.0 / (t + 1), 1e-4)
        assert ema_weight(t) == expected
        on_device = ema_weight(torch.tensor(t), dtype=F64)
        assert on_device.dtype == F64 and float(on_device) == expected
    assert ema_weight(1) == 1.0  # the first update takes the batch as is
    old, new = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    torch.testing.assert_close(running_average(old, new, 0.25), torch.full((3,), 0.25,
                                                                           dtype=F64))


@pytest.mark.parametrize("cast", ["to", "constructor"])
def test_half_precision_heads_keep_their_running_means_in_float32(cast):
    """A bfloat16 model (``model.to(torch.bfloat16)``) kept its running means in bfloat16:
    once α_t < ~2⁻⁸ the updates rounded away (μ_G 1.79 from the data's mean after 2000
    steps, H̄ 0.88 from the class means; float32: 0.25 and 0.11). They stay float32 and
    follow the data as a float32 head's do; W, b and the logits stay bfloat16."""
    from gnc import FixedETFHead, ImplicitETFHead

    torch.manual_seed(0)
    d, K, B = 8, 4, 16
    y = torch.arange(B) % K
    A, Bm = torch.randn(K, d), torch.randn(K, d)

    def make(cls, dtype, **kw):
        if cast == "to":
            return cls(d, K, **kw).to(dtype)
        return cls(d, K, dtype=dtype, **kw)

    heads = {dt: [make(ImplicitETFHead, dt, backward="none"), make(FixedETFHead, dt)]
             for dt in (torch.float32, torch.bfloat16)}
    with torch.no_grad():
        for t in range(1500):
            x = (A if t < 500 else Bm)[y]
            for dt, pair in heads.items():
                for head in pair:
                    head(x.to(dt), y)
    (implicit32, fixed32), (implicit16, fixed16) = heads.values()
    assert implicit16.tracker.H_bar_raw.dtype == implicit16.mu_G.dtype == torch.float32
    assert fixed16.mu_G.dtype == torch.float32
    assert implicit16.weight.dtype == implicit16.bias.dtype == torch.bfloat16
    torch.testing.assert_close(implicit16.tracker.H_bar, implicit32.tracker.H_bar,
                               atol=2e-2, rtol=0)
    for a, b in ((implicit16, implicit32), (fixed16, fixed32)):
        torch.testing.assert_close(a.mu_G, b.mu_G, atol=2e-2, rtol=0)
    assert implicit16.eval()(torch.randn(3, d, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # a later cast of the module keeps them wide too, and .double() widens them
    assert implicit16.half().tracker.mu_G.dtype == torch.float32
    assert implicit16.double().tracker.mu_G.dtype == torch.float64
