"""Bounded precise BN (``precise_bn_batches``) and the ``μ_G`` pass folded into the train
split's evaluation (issue 18): the default is today's evaluation, bit for bit."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import gnc.evaluation as evaluation
import gnc.training as training
from gnc.config import TrainConfig, config_differences
from gnc.data import make_loader
from gnc.evaluation import evaluate, recompute_bn, recompute_statistics
from gnc.heads import make_head
from gnc.models import FeatureClassifier, build_backbone
from gnc.training import Trainer, train

CPU = torch.device("cpu")
DIGITS = {"dataset": "digits", "model": "mlp", "width": 32, "feature_dim": 16, "epochs": 2,
          "batch_size": 100, "lr": 0.1, "tau": 5.0, "progress": False}


def _blobs(K=4, n=60, d_in=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(K, d_in, generator=g)
    y = torch.arange(K).repeat_interleave(n)
    return centres[y] + 0.3 * torch.randn(K * n, d_in, generator=g), y


def _model(method="implicit", K=4, d_in=6, steps=30) -> FeatureClassifier:
    """A BN MLP, trained a little so that its running averages lag."""
    torch.manual_seed(0)
    backbone, d = build_backbone("mlp", in_shape=(d_in,), num_samples=None, feature_dim=8,
                                 small_input=None, width=16)
    model = FeatureClassifier(backbone, make_head(method, d, K), tau=5.0)
    x, y = _blobs(K, d_in=d_in)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        idx = torch.randperm(len(y))[:40]
        loss = nn.functional.cross_entropy(model(x[idx], y[idx])[0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


class Counted:
    """An iterable over ``batches`` that counts the batches read from it."""

    def __init__(self, batches):
        self.batches, self.read = list(batches), 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.read += 1
            yield b


def _batches(n=6, size=20, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(size, d, generator=g, dtype=dtype) + torch.arange(d, dtype=dtype),
             torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def _bn_net(d=5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, d, dtype=torch.float64),
                         nn.BatchNorm1d(d, dtype=torch.float64)).eval()


def _cumulative_average(net: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand, as fvcore's ``update_bn_stats``: r ← r + (x − r)/t over the batch means and
    unbiased variances of the BN's input."""
    mean = var = None
    for t, (x, _) in enumerate(batches, start=1):
        z = net[0](x)
        m, v = z.mean(0), z.var(0, unbiased=True)
        mean = m if mean is None else mean + (m - mean) / t
        var = v if var is None else var + (v - var) / t
    return mean, var


def _equal(a, b) -> bool:
    """Equal values (NaN equal to NaN), recursively over dicts, lists and tensors."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- bounded BN


@pytest.mark.parametrize("n", [1, 2, 4])
def test_bounded_pass_reads_n_batches_and_is_their_cumulative_average(n):
    batches = _batches()
    net, loader = _bn_net(), Counted(batches)
    recompute_bn(net, loader, CPU, max_batches=n)
    assert loader.read == n  # the loader is not read past the N-th batch
    bn = net[1]
    mean, var = _cumulative_average(net, batches[:n])
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == n and bn.momentum == 0.1 and not bn.training


def test_the_pass_is_torchs_momentum_none_average_without_host_reads():
    """torch's ``momentum=None`` computes 1/float(num_batches_tracked): a device read per BN
    layer per batch on a GPU. The pass sets momentum 1/t from a host count instead: the same
    statistics, bit for bit, and no ``_local_scalar_dense`` at all."""
    from tests.test_eval_host_reads import HostReads

    batches = _batches(n=9)
    ours, torchs = _bn_net(), _bn_net()
    with HostReads() as reads:
        recompute_bn(ours, Counted(batches), CPU)
    assert reads.n == 0, reads.where
    bn = torchs[1]
    bn.reset_running_stats()
    bn.momentum = None
    bn.train()
    with torch.no_grad():
        for x, _ in batches:
            torchs(x)
    bn.momentum = 0.1
    bn.eval()
    assert _states_equal(ours, torchs)


@pytest.mark.parametrize("n", [6, 7, 100])
def test_a_bound_at_or_above_the_loader_is_the_full_pass(n):
    full, bounded = _bn_net(), _bn_net()
    recompute_bn(full, Counted(_batches()), CPU)
    loader = Counted(_batches())
    recompute_bn(bounded, loader, CPU, max_batches=n)
    assert loader.read == 6
    assert _states_equal(bounded, full)  # bit for bit


def test_zero_is_the_full_pass():
    net, loader = _bn_net(), Counted(_batches())
    recompute_bn(net, loader, CPU, max_batches=0)
    assert loader.read == 6
    mean, var = _cumulative_average(net, _batches())
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_recompute_bn_refuses_a_bad_bound(bad):
    net = _bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"Expected `max_batches` to be an int >= 0"):
        recompute_bn(net, Counted(_batches()), CPU, max_batches=bad)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_recompute_statistics_passes_the_bound_to_bn():
    model = _model()
    x, y = _blobs()
    loader = Counted(list(make_loader(TensorDataset(x, y), 40)))
    recompute_statistics(model, loader, CPU, bn_batches=2, global_mean=False)
    assert loader.read == 2
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert int(bn.num_batches_tracked) == 2


# --------------------------------------------------------------------------- the config


def test_config_field_validation():
    assert TrainConfig().precise_bn_batches == 0
    TrainConfig(precise_bn_batches=20).validate()
    with pytest.raises(ValueError, match=r"Expected `precise_bn_batches` >= 0, but got -1"):
        TrainConfig(precise_bn_batches=-1).validate()
    for bad in (2.5, True, "10", None):
        with pytest.raises(ValueError, match=r"Expected `precise_bn_batches` to be int"):
            TrainConfig.from_dict({"precise_bn_batches": bad})
    with pytest.raises(ValueError, match="precise_bn_batches bounds the BN pass of eval_stats "
                                         "'precise'; with eval_stats 'running'"):
        TrainConfig(precise_bn_batches=5, eval_stats="running").validate()
    TrainConfig(precise_bn_batches=0, eval_stats="running").validate()


def test_an_old_config_without_the_key_loads_and_resumes():
    old = {k: v for k, v in TrainConfig(**DIGITS).to_dict().items()
           if k != "precise_bn_batches"}
    assert TrainConfig.from_dict(old).precise_bn_batches == 0
    assert config_differences(old, TrainConfig(**DIGITS)) == []
    # it changes the logged metrics: a run may not be resumed with another value
    assert config_differences(old, TrainConfig(**DIGITS, precise_bn_batches=3)) == [
        "precise_bn_batches=0 (now 3)"]


def test_the_cli_flag_comes_from_the_field():
    from gnc.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--preset", "cifar10-small",
                                      "--precise-bn-batches", "20", "--out", "x"])
    assert train_config_from_args(args).precise_bn_batches == 20


# --------------------------------------------------------------------------- the μ_G fold


def _separate_pass(model, bn_loader, mean_loader, loaders, bn_batches=0):
    """The evaluation before the fold: BN, then μ_G by its own pass, then every split."""
    recompute_statistics(model, bn_loader, CPU, mean_loader=mean_loader, bn_batches=bn_batches)
    return [evaluate(model, loader, 4, CPU, geometry=(g := {})) + (g,) for loader in loaders]


def _folded(model, bn_loader, loaders, bn_batches=0, **kw):
    recompute_statistics(model, bn_loader, CPU, bn_batches=bn_batches, global_mean=False)
    return [evaluate(model, loader, 4, CPU, geometry=(g := {}), set_global_mean=i == 0, **kw)
            + (g,) for i, loader in enumerate(loaders)]


@pytest.mark.parametrize("method", ["implicit", "fixed", "standard"])
@pytest.mark.parametrize("cache", [evaluation.DEFAULT_CACHE_BYTES, 3000, 0])
def test_folded_global_mean_equals_the_separate_pass(method, cache):
    """Bit for bit: μ_G, b, every buffer and every metric of both splits — with the features
    kept in memory, with the budget running out part-way, and with no cache."""
    x, y = _blobs()
    xt, yt = _blobs(n=20, seed=1)
    bn_loader = make_loader(TensorDataset(x + 0.1 * torch.randn_like(x), y), 48)  # augmented
    train_loader = make_loader(TensorDataset(x, y), 40)
    test_loader = make_loader(TensorDataset(xt, yt), 40)
    before, after = _model(method), _model(method)
    want = _separate_pass(before, bn_loader, train_loader, [train_loader, test_loader])
    got = _folded(after, bn_loader, [train_loader, test_loader], max_cache_bytes=cache)
    assert _states_equal(after, before)
    assert _equal(got, want)
    if method != "standard":
        assert after.head.mu_G.abs().sum() > 0 and want[0][0]["nc4_bias"] < 1e-5


def _forward_counter(module: nn.Module) -> list:
    calls: list = []
    module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


@pytest.mark.parametrize("method", ["implicit", "standard"])
def test_forward_passes_of_one_trainer_evaluation(tmp_path, method, monkeypatch):
    """Backbone calls of one evaluation with precise statistics, L training batches, E
    batches of the train split, T of the test split: L + 2E + T before the fold (ETF heads;
    a standard head never had the μ_G pass), L + E + T after, N + E + T bounded."""
    counts = {}
    for name, n in (("full", 0), ("bounded", 2)):
        trainer = Trainer(TrainConfig(**DIGITS, method=method, precise_bn_batches=n),
                          tmp_path / name)
        try:
            calls = _forward_counter(trainer.model.backbone)
            trainer.evaluate_epoch({})
            counts[name] = len(calls)
            L = len(trainer.train_loader)
            E, T = (len(trainer.eval_loaders[s]) for s in ("train", "test"))
        finally:
            trainer.release_lock()
    assert L > 2 and E >= 2 and T >= 1
    assert counts == {"full": L + E + T, "bounded": 2 + E + T}
    with monkeypatch.context() as m:  # the evaluation before the fold, for the record
        _separate_mu_G(m)
        trainer = Trainer(TrainConfig(**DIGITS, method=method), tmp_path / "old")
        try:
            calls = _forward_counter(trainer.model.backbone)
            trainer.evaluate_epoch({})
        finally:
            trainer.release_lock()
    assert len(calls) == L + (2 * E if method == "implicit" else E) + T


def _separate_mu_G(monkeypatch) -> None:
    """Make the trainer evaluate as before the fold: μ_G by its own pass, plain evaluations."""
    def precise(self):
        rng = torch.get_rng_state()
        training.set_loader_epoch(self.train_loader, self.epoch)
        recompute_statistics(self.model, self.train_loader, self.device,
                             mean_loader=self.eval_loaders["train"])
        torch.set_rng_state(rng)

    def plain_evaluate(*args, set_global_mean=False, **kw):
        return evaluate(*args, **kw)

    monkeypatch.setattr(Trainer, "_precise_statistics", precise)
    monkeypatch.setattr(evaluation, "evaluate", plain_evaluate)  # evaluate_splits calls it


@pytest.mark.parametrize("method", ["implicit", "fixed"])
def test_training_with_the_default_is_the_evaluation_before_the_fold(tmp_path, method,
                                                                     monkeypatch):
    """precise_bn_batches = 0 (the default): every logged number and the checkpoint equal,
    bit for bit, those of the evaluation with the separate μ_G pass."""
    cfg = TrainConfig(**DIGITS, method=method)
    now = train(cfg, tmp_path / "now")
    with monkeypatch.context() as m:
        _separate_mu_G(m)
        before = train(cfg, tmp_path / "before")
    timing = {"elapsed_s", "peak_mem_mb"}
    assert _equal({k: v for k, v in now.items() if k not in timing and "time_" not in k},
                  {k: v for k, v in before.items() if k not in timing and "time_" not in k})
    states = [torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=False)["model"]
              for r in ("now", "before")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[1])


def test_a_bounded_run_differs_only_in_its_evaluation(tmp_path):
    base = train(TrainConfig(**DIGITS, method="implicit"), tmp_path / "full")
    bounded = train(TrainConfig(**DIGITS, method="implicit", precise_bn_batches=2),
                    tmp_path / "bounded")
    assert bounded["train_loss"] == base["train_loss"]  # the same training
    assert bounded["nc1"] != base["nc1"]  # other BN statistics
    assert bounded["nc4_bias"] < 1e-5  # μ_G is still the split's exact mean


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net, loader = _bn_net(), Counted(_batches(seed=rank))
        recompute_bn(net, loader, CPU, max_batches=n)
        torch.save({"read": loader.read, "state": net.state_dict()}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_each_rank_averages_its_first_n_batches(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, 3, str(tmp_path / "r")), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"r.{r}", weights_only=False) for r in range(2)]
    assert [r["read"] for r in results] == [3, 3]
    net = _bn_net()
    by_rank = [_cumulative_average(net, _batches(seed=r)[:3]) for r in range(2)]
    for r in results:
        torch.testing.assert_close(r["state"]["1.running_mean"],
                                   (by_rank[0][0] + by_rank[1][0]) / 2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["state"]["1.running_var"],
                                   (by_rank[0][1] + by_rank[1][1]) / 2, rtol=1e-12, atol=1e-12)


def test_a_last_batch_of_one_sample_is_left_out_of_precise_bn():
    """``gnc.measure``'s loaders keep a short last batch: one of a single sample failed in
    BatchNorm1d's training mode ("Expected more than 1 value per channel"); it is left out,
    and the statistics are the average of the other batches'."""
    from gnc.measure import measure

    torch.manual_seed(0)
    x, y = torch.randn(41, 5), torch.arange(41) % 3
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    assert math.isfinite(measure(model, loader, eval_stats="precise")["nc1"])
    bn = model[1]
    recompute_bn(model, loader, torch.device("cpu"))
    z = model[0](x[:40]).detach()
    want = (z[:20].mean(0) + z[20:40].mean(0)) / 2
    torch.testing.assert_close(bn.running_mean, want)
