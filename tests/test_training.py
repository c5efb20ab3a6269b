import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch

from gnc.config import TrainConfig
from gnc.metrics import nc_metrics
from gnc.rundir import atomic_save
from gnc.saved_runs import evaluate_run
from gnc.training import Trainer, train

NC_KEYS = {"nc1", "nc2", "nc2_h", "nc3", "nc4_bias", "ncc_mismatch", "w_equinorm",
           "h_equinorm", "wh_equinorm", "avg_cos_margin", "cos_margins", "top1", "top5"}
ROW_KEYS = {"epoch", "train_loss", "train_top1", "time_forward_ms", "time_backward_ms"}


def read_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def write_npz(path, n_per_class=12, K=3, shape=(6,), test=True, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, *shape)) * 3
    y = np.repeat(np.arange(K), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), *shape))
    arrays = {"x": x.astype(np.float32), "y": y}
    if test:
        arrays |= {"x_test": x[::2].astype(np.float32), "y_test": y[::2]}
    np.savez(path, **arrays)
    return path


CASES = {
    "ufm": dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 10},
                model="ufm", feature_dim=16, epochs=30, lr=0.5, eval_every=10),
    "mnist1d": dict(dataset="mnist1d", dataset_options={"num_samples": 400}, model="cnn1d",
                    width=16, epochs=3, batch_size=100, lr=0.05),
    "digits": dict(dataset="digits", model="mlp", width=32, feature_dim=16, epochs=4,
                   batch_size=100, lr=0.05),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_end_to_end_loss_falls_and_metrics_logged(tmp_path, case, method):
    cfg = TrainConfig(**CASES[case], method=method, progress=False, seed=1)
    train(cfg, tmp_path / "run")
    rows = read_rows(tmp_path / "run")
    assert len(rows) >= 2
    for row in rows:
        assert ROW_KEYS | NC_KEYS <= row.keys()
        if case != "ufm":
            assert {"test_" + k for k in NC_KEYS} <= row.keys()
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == method and config["seed"] == 1
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    margins = np.load(tmp_path / "run" / "cos_margins.npy")
    assert np.all(np.diff(margins) >= 0)


def test_npz_and_resnet_backbone_on_random_images(tmp_path):
    npz = write_npz(tmp_path / "img.npz", n_per_class=8, K=2, shape=(3, 16, 16))
    for method in ("standard", "implicit"):
        cfg = TrainConfig(dataset=f"npz:{npz}", model="resnet18", width=4, epochs=3,
                          batch_size=8, lr=0.05, method=method, progress=False)
        train(cfg, tmp_path / method)
        rows = read_rows(tmp_path / method)
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]
        assert "test_nc1" in rows[-1]


def test_logged_metrics_equal_a_dense_recomputation(tmp_path):
    cfg = TrainConfig(**CASES["ufm"], method="implicit", progress=False)
    trainer = Trainer(cfg, tmp_path / "run")
    row = trainer.fit()
    model = trainer.model.eval()
    x, y = trainer.eval_bundle.train.tensors
    logits, h = model(x)
    dense = nc_metrics(h.detach(), y, model.head.weight, model.head.bias, logits.detach())
    for key in ("nc1", "nc3", "wh_equinorm", "avg_cos_margin", "top1", "ncc_mismatch"):
        assert math.isclose(row[key], dense[key], rel_tol=1e-6, abs_tol=1e-9), key


def test_resume_gives_the_uninterrupted_result(tmp_path):
    base = dict(CASES["digits"], method="implicit", progress=False, eval_every=1)
    train(TrainConfig(**{**base, "epochs": 4}), tmp_path / "full")
    train(TrainConfig(**{**base, "epochs": 2}), tmp_path / "split")
    train(TrainConfig(**{**base, "epochs": 4}), tmp_path / "split", resume=True)
    full, split = read_rows(tmp_path / "full"), read_rows(tmp_path / "split")
    assert [r["epoch"] for r in split] == [1, 2, 3, 4]
    for key in ("train_loss", "nc1", "nc3", "top1", "test_top1", "avg_cos_margin"):
        assert split[-1][key] == pytest.approx(full[-1][key], rel=1e-6, abs=1e-9), key
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-6), k


def test_resume_refuses_a_changed_config(tmp_path):
    base = dict(CASES["ufm"], method="fixed", progress=False)
    train(TrainConfig(**{**base, "epochs": 10}), tmp_path / "run")
    with pytest.raises(ValueError, match="differs in lr="):
        train(TrainConfig(**{**base, "epochs": 20, "lr": 0.1}), tmp_path / "run", resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(**base), tmp_path / "nothing", resume=True)


def test_checkpoint_killed_mid_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}


# UFM, 4 classes x 10 samples, stratified batches of 16: two steps per epoch
DIVERGE = dict(dataset="ufm", dataset_options={"num_classes": 4, "per_class": 10}, model="ufm",
               feature_dim=8, batch_size=16, lr=0.5, eval_every=1, progress=False)


def assert_epoch1_checkpoint_kept(run, reference):
    """``run``'s own last.pt is epoch 1's, finite and equal to a clean 1-epoch run's."""
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1
    ref = torch.load(reference / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert ckpt["model"].keys() == ref.keys()
    for key, value in ckpt["model"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
        assert torch.equal(value, ref[key]), key
    assert [r["epoch"] for r in read_rows(run)] == [1]


def test_divergence_of_the_loss_is_reported_and_checkpoint_kept(tmp_path, monkeypatch):
    """A NaN loss at epoch 2 (gradients and weights stay finite) stops the run."""
    cfg = TrainConfig(**DIVERGE, method="standard", epochs=3)
    train(TrainConfig(**{**DIVERGE, "method": "standard", "epochs": 1}), tmp_path / "ref")
    real_ce, calls = torch.nn.functional.cross_entropy, []

    def nan_loss_from_epoch_2(logits, target, *args, **kwargs):
        loss = real_ce(logits, target, *args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) > 2:  # the loss value is NaN, its gradient the real one
                loss = loss + torch.tensor(float("nan"))
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_loss_from_epoch_2)
    with pytest.raises(FloatingPointError,
                       match="training diverged: the loss is .* at epoch 2, step 3 ") as err:
        train(cfg, tmp_path / "bad")
    assert "weights" not in str(err.value) and "last checkpoint is kept" in str(err.value)
    # before any checkpoint, the message does not promise one
    calls[:] = [1, 1]
    with pytest.raises(FloatingPointError, match="at epoch 1, step 1 .*; no checkpoint was "
                       "written yet$"):
        train(cfg, tmp_path / "first")
    monkeypatch.undo()
    assert_epoch1_checkpoint_kept(tmp_path / "bad", tmp_path / "ref")


@pytest.mark.parametrize("poisoned_step", [3, 4], ids=["mid-epoch", "last-step-of-epoch"])
def test_divergence_of_the_weights_is_reported_and_checkpoint_kept(tmp_path, poisoned_step):
    """The optimiser step `poisoned_step` (in epoch 2) leaves NaN weights."""
    train(TrainConfig(**{**DIVERGE, "method": "implicit", "epochs": 1}), tmp_path / "ref")
    trainer = Trainer(TrainConfig(**DIVERGE, method="implicit", epochs=3), tmp_path / "bad")
    assert len(trainer.train_loader) == 2
    steps = []

    def poison(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == poisoned_step:
            with torch.no_grad():
                next(trainer.model.backbone.parameters()).fill_(float("nan"))

    trainer.optimizer.register_step_post_hook(poison)
    with pytest.raises(FloatingPointError, match="training diverged: .*the weights are NaN/Inf "
                       "at epoch 2"):
        trainer.fit()
    assert_epoch1_checkpoint_kept(tmp_path / "bad", tmp_path / "ref")


def test_evaluate_run_reproduces_the_logged_metrics(tmp_path):
    cfg = TrainConfig(**CASES["digits"], method="implicit", progress=False)
    row = train(cfg, tmp_path / "run")
    again = evaluate_run(tmp_path / "run", split="train", device="cpu")
    assert again["epoch"] == cfg.epochs
    for key in ("nc1", "nc3", "top1", "avg_cos_margin"):
        assert again[key] == pytest.approx(row[key], rel=1e-6), key
    test = evaluate_run(tmp_path / "run", split="test", device="cpu")
    assert test["top1"] == pytest.approx(row["test_top1"])


def test_config_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(ValueError, match="unknown amp"):
        TrainConfig(amp="fp8").validate()
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def record_dtypes(model):
    """Output dtypes of the backbone's first Linear layer and input dtypes of the head."""
    seen = {"backbone": set(), "head": set()}
    linear = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, args, out: seen["backbone"].add(out.dtype))
    model.head.register_forward_pre_hook(lambda m, args: seen["head"].add(args[0].dtype))
    return seen


def test_tensorboard_events_and_bf16_backbone(tmp_path):
    cfg = TrainConfig(**{**CASES["digits"], "epochs": 2}, method="implicit", amp="bf16",
                      tensorboard=True, progress=False)
    trainer = Trainer(cfg, tmp_path / "run")
    seen = record_dtypes(trainer.model)
    row = trainer.fit()
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["nc1"])
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    # the backbone ran in bf16 (training and evaluation), the head (and its nearest-ETF
    # solve) in float32
    assert seen == {"backbone": {torch.bfloat16}, "head": {torch.float32}}
    assert trainer.model.head.U.dtype == torch.float32
    x = trainer.eval_bundle.train.tensors[0][:4]
    assert trainer.model.features(x).dtype == torch.float32


def _tensorboard_steps(run_dir) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_resume_hides_the_tensorboard_events_after_its_checkpoint(tmp_path):
    """A run killed after logging epoch 4 but before saving it resumes from epoch 3: its
    metrics.jsonl line of epoch 4 was dropped, its TensorBoard events were not (steps
    1, 2, 3, 4, 4 in every tag)."""
    cfg = TrainConfig(**{**CASES["digits"], "epochs": 4}, method="standard", eval_every=1,
                      checkpoint_every=3, tensorboard=True, progress=False)
    run = tmp_path / "run"
    train(cfg, run)
    (run / "checkpoints" / "last.pt").write_bytes(b"cut short")  # back to epoch_0003.pt
    train(cfg, run, resume=True)
    steps = _tensorboard_steps(run)
    assert steps and all(s == [1, 2, 3, 4] for s in steps.values()), steps
    assert [r["epoch"] for r in read_rows(run)] == [1, 2, 3, 4]


def test_tensorboard_missing_is_one_error_before_the_run_directory(tmp_path, monkeypatch):
    """Without tensorboard, `--tensorboard` failed with a traceback after the run directory
    was prepared (with --overwrite: the old run already removed)."""
    cfg = TrainConfig(**{**CASES["digits"], "epochs": 1}, method="standard", progress=False)
    train(cfg, tmp_path / "old")
    before = sorted(p.name for p in (tmp_path / "old").iterdir())
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with_tb = dataclasses.replace(cfg, tensorboard=True)
    for out, kw in ((tmp_path / "new", {}), (tmp_path / "old", {"overwrite": True})):
        with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
            train(with_tb, out, **kw)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == before


def test_fp16_backbone_with_grad_scaler_resumes_exactly(tmp_path):
    base = dict(CASES["digits"], method="implicit", amp="fp16", progress=False, eval_every=1)
    full = Trainer(TrainConfig(**{**base, "epochs": 3}), tmp_path / "full")
    seen = record_dtypes(full.model)
    full.fit()
    assert seen == {"backbone": {torch.float16}, "head": {torch.float32}}
    assert full.scaler.is_enabled()

    first = Trainer(TrainConfig(**{**base, "epochs": 2}), tmp_path / "split")
    first.fit()
    saved = first.scaler.state_dict()
    # the scaler took part: it counted unskipped steps (or backed off after an overflow)
    assert saved["_growth_tracker"] > 0 or saved["scale"] < 2.0**16
    resumed = Trainer(TrainConfig(**{**base, "epochs": 3}), tmp_path / "split", resume=True)
    assert resumed.scaler.is_enabled() and resumed.scaler.state_dict() == saved
    resumed.fit()
    assert resumed.scaler.state_dict() == full.scaler.state_dict()

    a, b = read_rows(tmp_path / "full"), read_rows(tmp_path / "split")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "nc1", "nc3", "top1", "test_top1", "avg_cos_margin"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["epoch"], key)
    ca = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    cb = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k in ca:
        assert torch.allclose(ca[k].double(), cb[k].double(), atol=1e-6), k


def test_agd_run_uses_agd_initialisation(tmp_path):
    from gnc.optim import AGD

    cfg = TrainConfig(**{**CASES["digits"], "epochs": 2, "optimizer": "agd", "lr": 1.0},
                      method="implicit", progress=False)
    trainer = Trainer(cfg, tmp_path / "run")
    assert isinstance(trainer.optimizer, AGD)
    W = next(p for p in trainer.model.backbone.parameters() if p.ndim == 2)
    s = torch.linalg.svdvals(W.detach())
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-4)  # semi-orthogonal, scaled
    row = trainer.fit()
    rows = read_rows(tmp_path / "run")
    assert math.isfinite(row["train_loss"]) and rows[-1]["train_loss"] < rows[0]["train_loss"]


@pytest.mark.parametrize("schedule", ["step", "cosine", "onecycle"])
def test_the_logged_lr_is_the_rate_the_epoch_trained_with(tmp_path, schedule):
    """metrics.jsonl's lr was read after the epoch's scheduler step: the next epoch's rate
    (cosine logged 0.0 at the end, a rate never used)."""
    cfg = TrainConfig(dataset="ufm", model="ufm", method="standard",
                      dataset_options={"num_classes": 4}, epochs=4, batch_size=40,
                      schedule=schedule, step_every=1 if schedule == "step" else None,
                      eval_every=1, lr=0.1, device="cpu", progress=False)
    trainer = Trainer(cfg, tmp_path / "run")
    used = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, *a: used.append(opt.param_groups[0]["lr"]))
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    per_epoch = len(used) // 4
    want = [used[(e + 1) * per_epoch - 1] for e in range(4)]  # each epoch's last step
    assert [r["lr"] for r in rows] == pytest.approx(want)
    assert rows[0]["lr"] == pytest.approx(0.1 if schedule != "onecycle" else want[0])


def test_settings_that_would_do_nothing_are_said(tmp_path, caplog):
    """AGD has no weight decay, and stratified batches train a long tail class-balanced:
    both were silent."""
    import logging

    base = {**CASES["digits"], "epochs": 1, "progress": False}
    agd = {**base, "optimizer": "agd", "lr": 1.0}
    with caplog.at_level(logging.WARNING, logger="gnc"):
        Trainer(TrainConfig(**agd, weight_decay=5e-4), tmp_path / "a").release_lock()
        Trainer(TrainConfig(**base, imbalance=0.5), tmp_path / "b").release_lock()
        Trainer(TrainConfig(**agd, imbalance=0.5, sampler="shuffle", weight_decay=0.0),
                tmp_path / "c").release_lock()
    said = [r.getMessage() for r in caplog.records]
    assert sum("agd has no weight decay: --weight-decay 0.0005" in m for m in said) == 1
    assert sum("--imbalance 0.5 with stratified batches" in m for m in said) == 1
