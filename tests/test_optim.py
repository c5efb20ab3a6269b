"""Optimisers and schedules: AGD's step, the factories and their errors."""

import math

import pytest
import torch
from torch import nn

from gnc.optim import AGD, agd_init_, build_optimizer, build_scheduler


def _problem(bias: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 32, bias=bias),
        nn.ReLU(),
        nn.Linear(32, 32, bias=bias),
        nn.ReLU(),
        nn.Linear(32, 3, bias=bias),
    )
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return net, x, y


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(net(x), y)


@pytest.mark.parametrize("bias", [False, True])
def test_agd_lowers_the_loss(bias: bool) -> None:
    net, x, y = _problem(bias)
    agd_init_(net)
    opt = AGD(net.parameters())
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = _loss(net, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert losses[-1] < 0.6 * losses[0]
    assert opt.last_eta > 0


def test_agd_step_matches_the_formula() -> None:
    net, x, y = _problem(bias=True)
    agd_init_(net)
    _loss(net, x, y).backward()
    weights = [p for p in net.parameters() if p.ndim == 2]
    before = {p: p.detach().clone() for p in net.parameters()}
    scale = [math.sqrt(p.shape[0] / p.shape[1]) for p in weights]
    G = sum(s * p.grad.norm().item() for s, p in zip(scale, weights, strict=True)) / 3
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    opt = AGD(net.parameters(), gain=2.0)
    opt.step()
    assert opt.last_G == pytest.approx(G, rel=1e-5)
    assert opt.last_eta == pytest.approx(eta, rel=1e-5)
    for s, p in zip(scale, weights, strict=True):
        expected = before[p] - 2.0 * eta / 3 * s * p.grad / p.grad.norm()
        torch.testing.assert_close(p.detach(), expected)
    for p in net.parameters():
        if p.ndim == 1:  # biases: plain gradient step of size gain·η/L
            torch.testing.assert_close(p.detach(), before[p] - 2.0 * eta / 3 * p.grad)


def test_agd_init_scales_singular_values() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3))
    agd_init_(net)
    w = net[0].weight.detach()
    torch.testing.assert_close(torch.linalg.svdvals(w), torch.full((6,), math.sqrt(2.0)))
    # as the released code: every kernel position an out×in semi-orthogonal slice scaled by
    # √(out/in)/√(kh·kw)
    for conv, (out, inp) in ((net[1], (8, 3)), (net[2], (4, 8))):
        c = conv.weight.detach()
        for i in range(3):
            for j in range(3):
                torch.testing.assert_close(
                    torch.linalg.svdvals(c[:, :, i, j]),
                    torch.full((min(out, inp),), math.sqrt(out / inp) / 3))
    # out <= in: the flattened out×(in·9) matrix then has singular values √(out/in)
    flat = net[2].weight.detach().reshape(4, 72)
    torch.testing.assert_close(torch.linalg.svdvals(flat), torch.full((4,), math.sqrt(0.5)))


def test_agd_conv_step_is_per_kernel_position() -> None:
    """AGD on a conv net against the released code's formula, written densely: G sums the
    per-position gradient norms, each position moves by s·gain·η/L along its own unit
    gradient (a position with zero gradient stays put)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 3, bias=False))
    agd_init_(net)
    x, y = torch.randn(8, 2, 6, 6), torch.arange(8) % 3
    nn.functional.cross_entropy(net(x), y).backward()
    conv, lin = net[0].weight, net[3].weight
    conv.grad[:, :, 1, 2] = 0.0  # a kernel position without gradient
    before = {p: p.detach().clone() for p in (conv, lin)}
    s_conv, s_lin = math.sqrt(4 / 2) / 3, math.sqrt(3 / 64)
    pos_norms = {(i, j): conv.grad[:, :, i, j].norm().item() for i in range(3) for j in range(3)}
    G = (s_conv * sum(pos_norms.values()) + s_lin * lin.grad.norm().item()) / 2
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    opt = AGD(net.parameters(), gain=10.0)
    opt.step()
    assert opt.last_G == pytest.approx(G, rel=1e-5)
    step = 10.0 * eta / 2
    for (i, j), n in pos_norms.items():
        expected = before[conv][:, :, i, j]
        if n > 0:
            expected = expected - step * s_conv * conv.grad[:, :, i, j] / n
        torch.testing.assert_close(conv.detach()[:, :, i, j], expected)
    torch.testing.assert_close(lin.detach(),
                               before[lin] - step * s_lin * lin.grad / lin.grad.norm())


def test_agd_rejects_bad_gain() -> None:
    with pytest.raises(ValueError, match="gain"):
        AGD([torch.zeros(2, 2, requires_grad=True)], gain=0.0)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sgd", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("agd", AGD),
    ],
)
def test_build_optimizer(name: str, cls: type) -> None:
    net, _, _ = _problem()
    opt = build_optimizer(name, net.parameters(), lr=0.05, weight_decay=1e-4, gain=1.5)
    assert isinstance(opt, cls)
    expected_lr = 1.5 if name == "agd" else 0.05
    assert opt.param_groups[0]["lr"] == expected_lr
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9


def test_unknown_names_raise() -> None:
    net, _, _ = _problem()
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; choose from sgd, adam"):
        build_optimizer("lion", net.parameters(), lr=0.1)
    opt = build_optimizer("sgd", net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown scheduler 'poly'; choose from none, step"):
        build_scheduler("poly", opt, total_steps=10)


def _lrs(name: str | None, **kw: object) -> list[float]:
    net, _, _ = _problem()
    opt = build_optimizer("sgd", net.parameters(), lr=1.0)
    sched = build_scheduler(name, opt, total_steps=9, **kw)
    out = []
    for _ in range(9):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules() -> None:
    assert _lrs(None) == [1.0] * 9
    assert _lrs("none") == [1.0] * 9
    assert _lrs("step") == pytest.approx([1.0] * 3 + [0.1] * 3 + [0.01] * 3)
    assert _lrs("step", step_size=4, gamma=0.5) == pytest.approx([1.0] * 4 + [0.5] * 4 + [0.25])
    assert _lrs("multistep", milestones=[2, 5]) == pytest.approx([1.0] * 2 + [0.1] * 3 + [0.01] * 4)
    assert _lrs("multistep") == pytest.approx([1.0] * 3 + [0.1] * 3 + [0.01] * 3)
    cos = _lrs("cosine")
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:], strict=False))
    assert cos[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 9)))


def _onecycle(name: str, **kw: object) -> tuple[list[float], list[float | None], object]:
    net, _, _ = _problem()
    opt = build_optimizer(name, net.parameters(), lr=2.0, gain=2.0, **kw)
    sched = build_scheduler("onecycle", opt, total_steps=100)
    lrs, moms = [], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0].get("momentum"))
        opt.step()
        sched.step()
    return lrs, moms, opt


def test_onecycle_schedule_has_the_released_settings() -> None:
    lrs, moms, _ = _onecycle("sgd")
    peak = max(range(100), key=lrs.__getitem__)
    assert lrs[0] == pytest.approx(2.0 / 25)  # div factor 25
    assert peak == 29 and lrs[peak] == pytest.approx(2.0)  # 30% warm-up to the given lr
    assert lrs[58] == pytest.approx(2.0 / 25)  # three phases: back to the start by 60%
    assert lrs[-1] == pytest.approx(2.0 / 25 / 1e4)  # final div factor 1e4
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:], strict=False))
    assert moms[0] == pytest.approx(0.95) and moms[peak] == pytest.approx(0.85)
    # no momentum to cycle: SGD without momentum keeps 0, AGD has none and cycles its gain
    _, moms, _ = _onecycle("sgd", momentum=0.0)
    assert set(moms) == {0.0}
    lrs, moms, opt = _onecycle("agd")
    assert isinstance(opt, AGD) and set(moms) == {None}
    assert max(lrs) == pytest.approx(2.0) and lrs[0] == pytest.approx(2.0 / 25)


def test_default_multistep_milestones_of_a_short_run_decay_once_each():
    """Two epochs gave the default milestones [1, 1]: γ² at epoch 2."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    s = build_scheduler("multistep", opt, total_steps=2, gamma=0.1)
    lrs = []
    for _ in range(2):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs == pytest.approx([0.1, 0.01])


def test_agd_reads_an_embedding_table_as_the_map_it_is() -> None:
    """The UFM's features are an (N, d) ``nn.Embedding`` table E, the map h = Eᵀ e_i from
    d_{l−1} = N to d_l = d: AGD's scale is √(d/N), not the √(N/d) of reading the table as
    stored (N/d times too large: 98 for ufm1000's shape)."""
    from gnc.build import build_training_optimizer
    from gnc.config import TrainConfig
    from gnc.optim import embedding_weights

    torch.manual_seed(0)
    N, d = 40, 8
    net = nn.Sequential(nn.Embedding(N, d), nn.Linear(d, 3))
    agd_init_(net)
    table = net[0].weight
    torch.testing.assert_close(torch.linalg.svdvals(table.detach()),
                               torch.full((d,), math.sqrt(d / N)))
    opt = AGD(net.parameters(), gain=1.0, transposed=embedding_weights(net))
    idx, y = torch.arange(N), torch.arange(N) % 3
    nn.functional.cross_entropy(net(idx), y).backward()
    before = table.detach().clone()
    grads = {p: p.grad.clone() for p in (table, net[1].weight)}
    opt.step()
    G = (math.sqrt(d / N) * grads[table].norm()
         + math.sqrt(3 / d) * grads[net[1].weight].norm()) / 2
    eta = math.log((1 + math.sqrt(1 + 4 * float(G))) / 2)
    torch.testing.assert_close(opt.last_G, float(G))
    torch.testing.assert_close(
        table.detach(), before - eta / 2 * math.sqrt(d / N) * grads[table] / grads[table].norm())
    # the trainer's optimiser knows the ufm backbone's table
    from gnc.build import build_model
    from gnc.data import load_dataset

    cfg = TrainConfig(dataset="ufm", model="ufm", method="fixed", optimizer="agd", lr=1.0,
                      weight_decay=0.0, feature_dim=d,
                      dataset_options={"num_classes": 3, "per_class": 4})
    model = build_model(cfg, load_dataset("ufm", num_classes=3, per_class=4))
    opt = build_training_optimizer(cfg, model)
    (table,) = embedding_weights(model)
    assert isinstance(opt, AGD) and opt.is_transposed(table)
    assert not any(opt.is_transposed(p) for p in model.head.parameters())
