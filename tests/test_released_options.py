"""The released code's options through the trainer, the presets and the CLI: --no-bias,
--loss dr, AGD's gain (--lr), the one-cycle schedule and the step schedule's settings."""

import copy
import json

import pytest
import torch
from torch import nn

import gnc.experiments as experiments
from gnc.build import build_model, load_data
from gnc.cli import build_parser, main, train_config_from_args
from gnc.config import TrainConfig
from gnc.experiments import Preset
from gnc.losses import dot_regression
from gnc.models import build_backbone, without_bn_affine
from gnc.optim import AGD
from gnc.training import Trainer, train

UFM = dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 10}, model="ufm",
           feature_dim=8, epochs=2, lr=0.5, progress=False, eval_test=False)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- --no-bias


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "resnet18"])
def test_without_bn_affine_drops_gamma_and_beta_only(name):
    shape = {"mlp": (10,), "cnn1d": (1, 40), "resnet18": (3, 16, 16)}[name]
    torch.manual_seed(0)
    net, _ = build_backbone(name, in_shape=shape, width=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.affine for m in bns)
    assert without_bn_affine(net) is net
    assert all(not m.affine and m.weight is None and m.bias is None for m in bns)
    bn_affine = {f"{n}.{p}" for n, m in net.named_modules() if m in bns for p in ("weight", "bias")}
    assert set(net.state_dict()) == set(before) - bn_affine  # running statistics kept
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    x = torch.randn(6, *shape)
    net.train()(x).sum().backward()  # forward and backward still work
    m = bns[0].eval()  # y = (x − mean)/√(var + ε), no γ, β
    m.running_mean.normal_()
    spatial = {"mlp": (), "cnn1d": (4,), "resnet18": (3, 3)}[name]
    z = torch.randn(5, m.num_features, *spatial)
    view = (1, -1, *[1] * len(spatial))
    expect = (z - m.running_mean.view(view)) / torch.sqrt(m.running_var.view(view) + m.eps)
    torch.testing.assert_close(m(z), expect)


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit", "implicit-nograd",
                                    "standard-unnormalized"])
def test_no_bias_model_loses_exactly_the_head_bias_and_bn_affine(method):
    cfg = TrainConfig(dataset="digits", model="mlp", width=16, feature_dim=16, method=method)
    bundle = load_data(cfg)
    torch.manual_seed(0)
    full = build_model(cfg, bundle)
    torch.manual_seed(0)
    bare = build_model(TrainConfig(**{**cfg.__dict__, "bias": False}), bundle)
    bn = {k for k in full.state_dict() if k.startswith("backbone.")
          and k.rsplit(".", 1)[1] in ("weight", "bias")
          and isinstance(full.get_submodule(k.rsplit(".", 1)[0]), nn.BatchNorm1d)}
    assert bn and "head.bias" in full.state_dict()
    assert set(bare.state_dict()) == set(full.state_dict()) - bn - {"head.bias"}
    assert bare.head.bias is None
    assert not any(m.affine for m in bare.modules() if isinstance(m, nn.BatchNorm1d))
    # the rest is unchanged: same weights, and logits W h
    for k, v in bare.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k
    x, y = bundle.train.tensors[0][:40], bundle.train.tensors[1][:40]
    logits, h = bare.train()(x, y)
    torch.testing.assert_close(logits, h @ bare.head.weight.T)


def test_no_bias_run_trains_and_evaluates(tmp_path):
    for method in ("standard", "implicit"):
        row = train(TrainConfig(**{**UFM, "bias": False, "method": method}), tmp_path / method)
        assert row["nc4_bias"] >= 0 and row["train_loss"] > 0


# --------------------------------------------------------------------------- --loss dr


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_dr_loss_is_what_the_trainer_minimises(tmp_path, method):
    """UFM, full batch: the first logged loss is the DR loss of the initial model's logits."""
    cfg = TrainConfig(**{**UFM, "epochs": 1, "method": method, "loss": "dr", "tau": 2.0})
    trainer = Trainer(cfg, tmp_path / "run")
    start = copy.deepcopy(trainer.model).train()
    x, y = trainer.bundle.train.tensors
    logits, _ = start(x, y)
    row = trainer.fit()
    assert row["train_loss"] == pytest.approx(float(dot_regression(logits.detach(), y)), rel=1e-5)
    ce = TrainConfig(**{**cfg.__dict__, "loss": "ce"})
    assert Trainer(ce, tmp_path / "ce").fit()["train_loss"] != pytest.approx(row["train_loss"])


# --------------------------------------------------------------------------- AGD's gain


def test_lr_is_agds_gain(tmp_path):
    """The fixed head has no parameters: one full-batch AGD step moves the UFM features by
    gain·η/L·s·g/‖g‖, so --lr 10 moves them exactly 10 times as far as --lr 1."""
    moves = {}
    for lr in (1.0, 10.0):
        cfg = TrainConfig(**{**UFM, "epochs": 1, "method": "fixed", "optimizer": "agd",
                             "lr": lr})
        trainer = Trainer(cfg, tmp_path / str(lr))
        assert isinstance(trainer.optimizer, AGD)
        assert trainer.optimizer.param_groups[0]["lr"] == lr
        start = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.fit()
        moves[lr] = [p.detach() - s for p, s in zip(trainer.model.parameters(), start,
                                                    strict=True)]
    for a, b in zip(moves[1.0], moves[10.0], strict=True):
        torch.testing.assert_close(b, 10 * a, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- schedules


def test_step_schedule_gamma_and_step_every(tmp_path):
    base = {**UFM, "epochs": 4, "schedule": "step", "lr": 1.0}
    # each row's lr: the rate its epoch trained with
    train(TrainConfig(**base, gamma=0.5, step_every=1), tmp_path / "a")
    assert [r["lr"] for r in rows(tmp_path / "a")] == pytest.approx([1, 0.5, 0.25, 0.125])
    train(TrainConfig(**base), tmp_path / "b")  # default: × 0.1 every epochs // 3 = 1 epoch
    assert [r["lr"] for r in rows(tmp_path / "b")] == pytest.approx([1, 0.1, 0.01, 1e-3])
    train(TrainConfig(**base, step_every=3), tmp_path / "c")
    assert [r["lr"] for r in rows(tmp_path / "c")] == pytest.approx([1, 1, 1, 0.1])


ONECYCLE = {**UFM, "epochs": 4, "batch_size": 8, "schedule": "onecycle", "lr": 1.0,
            "method": "implicit", "eval_every": 1}


def test_onecycle_steps_per_batch_over_the_whole_run(tmp_path):
    trainer = Trainer(TrainConfig(**ONECYCLE), tmp_path / "run")
    assert len(trainer.train_loader) == 5 and trainer.scheduler.total_steps == 20
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=1.0, total_steps=20,
                                              three_phase=True)
    expected = []
    for _ in range(20):
        ref_opt.step()
        ref.step()
        expected.append(ref_opt.param_groups[0]["lr"])
    trainer.fit()
    # each row: the rate of its epoch's last step (step 5e ran after 5e − 1 scheduler steps)
    assert [r["lr"] for r in rows(tmp_path / "run")] == pytest.approx(expected[3::5])


class _Killed(Exception):
    pass


def test_onecycle_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    train(TrainConfig(**ONECYCLE), tmp_path / "full")
    save = Trainer.save_checkpoint

    def save_then_die(self):
        save(self)
        if self.epoch == 2:
            raise _Killed

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(TrainConfig(**ONECYCLE), tmp_path / "split")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="onecycle schedule spans the 4 epochs"):
        train(TrainConfig(**{**ONECYCLE, "epochs": 6}), tmp_path / "split", resume=True)
    train(TrainConfig(**ONECYCLE), tmp_path / "split", resume=True)
    full, split = rows(tmp_path / "full"), rows(tmp_path / "split")
    assert [r["epoch"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(full, split, strict=True):
        for key in ("lr", "train_loss", "nc1", "top1", "avg_cos_margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["epoch"], key)


# --------------------------------------------------------------------------- config, CLI


def test_config_validation_of_the_new_fields():
    for bad, match in ((dict(loss="mse"), "unknown loss 'mse'; choose from ce, dr"),
                       (dict(gamma=0.0), "`gamma` to be finite and > 0"),
                       (dict(gamma=float("nan")), "`gamma` to be finite and > 0"),
                       (dict(step_every=0), "`step_every` >= 1"),
                       (dict(bias="no"), "`bias` to be bool, but got \"no\"")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).validate()
    with pytest.raises(ValueError, match="unknown schedule 'poly'"):
        Trainer(TrainConfig(**{**UFM, "schedule": "poly"}), "unused")
    cfg = TrainConfig()
    assert (cfg.bias, cfg.loss, cfg.gamma, cfg.step_every) == (True, "ce", 0.1, None)


def test_flags_presets_and_experiment_set_the_new_fields(monkeypatch, tmp_path):
    args = build_parser().parse_args([
        "train", "--preset", "ufm10", "--out", "x", "--no-bias", "--loss", "dr",
        "--optimizer", "agd", "--lr", "10", "--schedule", "onecycle", "--gamma", "0.5",
        "--step-every", "7"])
    cfg = train_config_from_args(args)
    assert (cfg.bias, cfg.loss, cfg.optimizer, cfg.lr, cfg.schedule, cfg.gamma,
            cfg.step_every) == (False, "dr", "agd", 10.0, "onecycle", 0.5, 7)
    plain = train_config_from_args(build_parser().parse_args(["train", "--out", "x"]))
    assert plain.bias is True and plain.loss == "ce"
    preset = Preset("p", "p", {**UFM, "bias": False, "loss": "dr", "schedule": "onecycle"})
    cfg = preset.train_config(method="fixed", seed=1)
    assert (cfg.bias, cfg.loss, cfg.schedule) == (False, "dr", "onecycle")
    seen = {}
    monkeypatch.setattr(experiments, "run_experiment",
                        lambda *a, overrides=None, **kw: seen.update(overrides))
    main(["experiment", "ufm10", "--out", str(tmp_path), "--no-bias", "--loss", "dr",
          "--lr", "3", "--schedule", "step", "--gamma", "0.2", "--step-every", "5",
          "--no-report"])
    assert {k: seen[k] for k in ("bias", "loss", "lr", "schedule", "gamma", "step_every")} == {
        "bias": False, "loss": "dr", "lr": 3.0, "schedule": "step", "gamma": 0.2,
        "step_every": 5}
