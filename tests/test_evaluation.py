"""Evaluation of the model as it is (precise statistics) and the sync-free training step."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from gnc.config import TrainConfig
from gnc.data import make_loader
from gnc.evaluation import evaluate, recompute_statistics
from gnc.heads import ImplicitETFHead, make_head
from gnc.models import FeatureClassifier, build_backbone
from gnc.saved_runs import evaluate_run
from gnc.training import NONFINITE_CHECK_EVERY, Trainer, train
from gnc.validation import trusted_inputs


def _blobs(K=4, n=60, d_in=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(K, d_in, generator=g)
    y = torch.arange(K).repeat_interleave(n)
    x = centres[y] + 0.3 * torch.randn(K * n, d_in, generator=g)
    return x, y


def _mlp_model(method: str, K=4, d_in=6, seed=0) -> FeatureClassifier:
    torch.manual_seed(seed)
    backbone, d = build_backbone("mlp", in_shape=(d_in,), num_samples=None, feature_dim=8,
                                 small_input=None, width=16)
    return FeatureClassifier(backbone, make_head(method, d, K), tau=5.0)


def _fit(model, x, y, steps=150):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                          momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(y))[:40]
        logits, _ = model(x[idx], y[idx])
        loss = torch.nn.functional.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method", ["standard", "implicit"])
def test_evaluation_after_a_large_feature_shift_is_not_degenerate(method):
    """BN running averages from before a shift of the inputs make every sample one class;
    the precise statistics recomputed on the shifted data give the trained accuracy back."""
    x, y = _blobs()
    model = _mlp_model(method)
    _fit(model, x, y)
    loader = make_loader(TensorDataset(x, y), 80)
    recompute_statistics(model, loader, torch.device("cpu"))
    before, _ = evaluate(model, loader, 4, torch.device("cpu"))
    assert before["top1"] > 95
    shifted = make_loader(TensorDataset(3 * x + 40.0, y), 80)  # a large shift and scale
    stale, _ = evaluate(model, shifted, 4, torch.device("cpu"))
    recompute_statistics(model, shifted, torch.device("cpu"))
    precise, _ = evaluate(model, shifted, 4, torch.device("cpu"))
    assert stale["top1"] < 60  # degenerate: the lagging statistics, not the network
    assert precise["top1"] > 90


def test_precise_statistics_are_the_split_statistics():
    x, y = _blobs()  # 240 samples: six equal batches of 40, so the batch average is exact
    model = _mlp_model("implicit")
    _fit(model, x, y, steps=20)
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm1d))
    recompute_statistics(model, make_loader(TensorDataset(x, y), 40), torch.device("cpu"))
    seen = []
    hook = bn.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    model.eval()
    with torch.no_grad():
        h = model.features(x)
    hook.remove()
    assert torch.allclose(bn.running_mean, seen[0].mean(0), atol=1e-5)
    batch_vars = torch.stack([b.var(0) for b in seen[0].split(40)])  # unbiased, per batch
    assert torch.allclose(bn.running_var, batch_vars.mean(0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(model.head.mu_G, h.mean(0), atol=1e-5)
    assert torch.allclose(model.head.bias, -model.head.weight @ h.mean(0), atol=1e-5)
    assert bn.momentum == 0.1  # restored


def test_logged_metrics_equal_a_reload_of_the_checkpoint(tmp_path):
    cfg = TrainConfig.from_dict({
        "dataset": "digits", "model": "mlp", "width": 32, "feature_dim": 16, "epochs": 2,
        "batch_size": 100, "lr": 0.1, "tau": 5.0, "method": "fixed", "progress": False})
    row = train(cfg, tmp_path / "r")
    assert row["eval_stats"] == "precise"
    again = evaluate_run(tmp_path / "r", split="train", device="cpu")
    for key in ("top1", "nc1", "nc4_bias", "avg_cos_margin"):
        assert again[key] == pytest.approx(row[key], rel=1e-6, abs=1e-9)


def test_running_protocol_stays_available(tmp_path):
    base = {"dataset": "digits", "model": "mlp", "width": 32, "feature_dim": 16, "epochs": 1,
            "batch_size": 100, "lr": 0.1, "tau": 5.0, "method": "implicit", "progress": False}
    rows = {s: train(TrainConfig.from_dict({**base, "eval_stats": s}), tmp_path / s)
            for s in ("precise", "running")}
    assert rows["running"]["eval_stats"] == "running"
    assert rows["precise"]["train_loss"] == rows["running"]["train_loss"]  # same training
    assert rows["precise"]["nc4_bias"] < rows["running"]["nc4_bias"]  # exact μ_G: bias 0
    assert rows["precise"]["nc4_bias"] < 1e-4


# --------------------------------------------------------------------------- the step loop


def _ufm_cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict({
        "dataset": "ufm", "dataset_options": {"num_classes": 4, "per_class": 30},
        "model": "ufm", "feature_dim": 8, "epochs": 2, "batch_size": 8, "lr": 0.5,
        "tau": 5.0, "weight_decay": 0.0, "progress": False, "eval_test": False, **kw})


class _Counter:
    """Counts the Tensor → host conversions (each a device sync on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.n, self.where = 0, []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _original=original, **k):
                caller = sys._getframe(1).f_code.co_filename
                if not caller.endswith(os.path.join("data", "sampler.py")):  # host-side order
                    self.n += 1
                    self.where.append(caller + ":" + str(sys._getframe(1).f_lineno))
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("method", ["standard", "fixed", "implicit"])
def test_training_steps_read_nothing_back_from_the_device(tmp_path, monkeypatch, method):
    cfg = _ufm_cfg(method=method, batch_size=4, dataset_options={"num_classes": 4,
                                                                 "per_class": 40})
    trainer = Trainer(cfg, tmp_path / "r")
    steps = len(trainer.train_loader)
    assert steps >= 3 * NONFINITE_CHECK_EVERY / 2
    trainer.train_epoch(None)  # the first step (U_prev None) may read the solve's rank
    counter = _Counter(monkeypatch)
    trainer.train_epoch(None)
    # the periodic loss check and the end of the epoch only, never once per step
    assert counter.n <= steps // NONFINITE_CHECK_EVERY + 8 < steps, counter.where


def test_fp16_overflow_skips_the_step_and_keeps_the_running_state(tmp_path):
    cfg = _ufm_cfg(method="implicit", amp="fp16", epochs=1)
    trainer = Trainer(cfg, tmp_path / "r")
    head, calls = trainer.model.head, {"n": 0}

    def overflow(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 5:  # one step whose features overflow (fp16 max is 65504)
            return output * float("inf")
        return output

    trainer.model.backbone.register_forward_hook(overflow)
    stats = trainer.train_epoch(None)
    assert stats["skipped_steps"] == 1
    assert np.isfinite(stats["train_loss"])
    for t in (head.U, head.mu_G, head.tracker.H_bar_raw, head.tracker.mu_G, head.weight):
        assert bool(torch.isfinite(t).all())
    assert int(head.tracker.t) == len(trainer.train_loader) - 1  # the bad batch left no trace


def test_fp16_steps_skipped_for_overflowing_gradients_are_counted(tmp_path):
    """A finite loss whose fp16 gradients overflow: the GradScaler skips the step. Such skips
    were not counted: a run that never took a step logged skipped_steps 0 and trained on. They
    count, and an epoch in which every step was skipped is divergence."""
    cfg = TrainConfig(dataset="digits", model="mlp", width=16, epochs=1, batch_size=100,
                      method="standard", amp="fp16", device="cpu", progress=False)
    trainer = Trainer(cfg, tmp_path / "some")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)  # 6 of 13 steps skip
    taken = []
    trainer.optimizer.register_step_post_hook(lambda *a: taken.append(1))
    stats = trainer.train_epoch(None)
    trainer.release_lock()
    assert 0 < stats["skipped_steps"] == len(trainer.train_loader) - len(taken)
    assert np.isfinite(stats["train_loss"])
    trainer = Trainer(cfg, tmp_path / "all")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # every step skips
    with pytest.raises(FloatingPointError, match="training diverged: every step overflowed "
                                                 "in fp16"):
        trainer.train_epoch(None)
    trainer.release_lock()


def test_non_finite_features_without_a_scaler_are_divergence(tmp_path):
    trainer = Trainer(_ufm_cfg(method="implicit", epochs=1), tmp_path / "r")
    calls = {"n": 0}

    def nan_once(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 5 else output

    trainer.model.backbone.register_forward_hook(nan_once)
    with pytest.raises(FloatingPointError, match="the loss is NaN/Inf.* at epoch 1, step 5 "):
        trainer.train_epoch(None)


def test_trusted_inputs_skip_value_checks_but_keep_state():
    head = ImplicitETFHead(8, 4)
    y = torch.arange(8) % 4
    head(torch.randn(8, 8), y)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        head(torch.full((8, 8), float("nan")), y)
    assert all(torch.equal(state[k], v) for k, v in head.state_dict().items())
    with trusted_inputs():
        head(torch.full((8, 8), float("nan")), y)  # no check, no host sync
    tracker = head.tracker
    assert torch.equal(tracker.H_bar_raw, state["tracker.H_bar_raw"])
    assert torch.equal(tracker.mu_G, state["tracker.mu_G"])
    assert bool(torch.isfinite(head.U).all()) and bool(torch.isfinite(head.bias).all())
    with pytest.raises(ValueError, match="NaN"):  # checks are back outside the context
        head(torch.full((8, 8), float("nan")), y)


def test_step_counter_survives_a_reload():
    head = ImplicitETFHead(8, 4)
    y = torch.arange(8) % 4
    for _ in range(3):
        head(torch.randn(8, 8), y)
    fresh = ImplicitETFHead(8, 4)
    assert fresh.num_steps == 0
    fresh.load_state_dict(head.state_dict())
    assert fresh.num_steps == 3 == int(fresh.steps)


def test_metrics_lines_say_which_statistics(tmp_path):
    train(_ufm_cfg(epochs=1, eval_stats="running"), tmp_path / "r")
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["eval_stats"] == "running" and row["skipped_steps"] == 0


def test_divergence_found_at_an_evaluation_is_divergence(tmp_path):
    trainer = Trainer(_ufm_cfg(method="implicit", epochs=1), tmp_path / "r")
    trainer.train_epoch(None)
    with torch.no_grad():
        next(trainer.model.backbone.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training diverged: the weights are NaN/Inf"):
        trainer.evaluate_epoch({})


def test_compile_keeps_the_checkpoint_keys_and_the_head_eager():
    from gnc.build import build_model
    from gnc.data import load_dataset

    bundle = load_dataset("digits")
    cfg = TrainConfig(dataset="digits", model="mlp", width=16, feature_dim=16)
    plain = build_model(cfg, bundle)
    compiled = build_model(dataclasses.replace(cfg, compile=True), bundle)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compiled.backbone._compiled_call_impl is not None  # nn.Module.compile, in place
    assert compiled.head._compiled_call_impl is None


def test_evaluation_autocasts_the_backbone_and_feeds_float32_features(monkeypatch):
    """Eval mode keeps the training's autocast for the backbone; the NC statistics get the
    float32 features (summed in float64), never bf16."""
    from gnc.metrics import NCStatistics

    x, y = _blobs()
    torch.manual_seed(0)
    backbone, d = build_backbone("mlp", in_shape=(6,), num_samples=None, feature_dim=8,
                                 small_input=None, width=16)
    model = FeatureClassifier(backbone, make_head("standard", d, 4), tau=5.0,
                              amp_dtype=torch.bfloat16)
    inner = [m for m in backbone.modules() if isinstance(m, torch.nn.Linear)]
    seen = {"backbone": set(), "stats": set()}
    for m in inner:
        m.register_forward_hook(lambda m, i, out: seen["backbone"].add(out.dtype))
    update = NCStatistics.update

    def spy(self, features, labels, logits=None):
        seen["stats"].add(features.dtype)
        return update(self, features, labels, logits)

    monkeypatch.setattr(NCStatistics, "update", spy)
    metrics, _ = evaluate(model, make_loader(TensorDataset(x, y), 64), 4, torch.device("cpu"))
    assert seen == {"backbone": {torch.bfloat16}, "stats": {torch.float32}}
    assert 0.0 <= metrics["top1"] <= 100.0


def test_non_finite_features_at_evaluation_raise_after_the_passes():
    # the evaluation defers its value checks (no host read per batch) and raises at the end
    from gnc.validation import NonFiniteError

    x, y = _blobs()
    model = _mlp_model("standard")
    calls = {"n": 0}

    def nan_once(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 2 else output

    model.backbone.register_forward_hook(nan_once)
    with pytest.raises(NonFiniteError, match="`features` to be finite"):
        evaluate(model, make_loader(TensorDataset(x, y), 40), 4, torch.device("cpu"))
    assert calls["n"] == 6  # one pass over the six batches (pass 2 reads the cache)


def test_a_divergence_found_at_evaluation_names_the_evaluated_epoch(tmp_path):
    """Epoch 2's evaluation found NaN features and said "at epoch 3, step 2n + 1": the epoch
    counter had already moved past the epoch it evaluated."""
    trainer = Trainer(_ufm_cfg(method="implicit", epochs=3, eval_every=1), tmp_path / "r")
    steps_per_epoch = len(trainer.train_loader)
    evaluate_epoch, evaluations = trainer.evaluate_epoch, []

    def nan_in_the_second_evaluation(module, inputs, output):
        return output * float("nan") if not module.training and evaluations == [1] else output

    def counted(row):
        try:
            return evaluate_epoch(row)
        finally:
            evaluations.append(1)

    trainer.model.backbone.register_forward_hook(nan_in_the_second_evaluation)
    trainer.evaluate_epoch = counted
    with pytest.raises(FloatingPointError, match=rf"the train features are NaN/Inf at "
                       rf"evaluation at epoch 2, step {2 * steps_per_epoch} "):
        trainer.fit()
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1]
