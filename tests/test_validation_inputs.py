"""Settings and inputs that no run can use fail up front, before the run directory exists."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gnc.build import train_batch_size
from gnc.config import TrainConfig
from gnc.data import load_dataset
from gnc.models import build_backbone
from gnc.training import Trainer


@pytest.mark.parametrize("field,value,match", [
    ("delta", -1e-3, "`delta` to be finite and >= 0"),
    ("delta", math.inf, "`delta` to be finite and >= 0"),
    ("lr", math.nan, "`lr` to be finite and > 0"),
    ("lr", 0.0, "`lr` to be finite and > 0"),
    ("momentum", -0.5, "`momentum` to be finite and >= 0"),
    ("weight_decay", math.nan, "`weight_decay` to be finite and >= 0"),
    ("tau", math.inf, "`tau` to be finite and > 0"),
    ("checkpoint_every", -1, "`checkpoint_every` >= 0"),
    ("eval_batch_size", 0, "`eval_batch_size` >= 1"),
    ("num_workers", -1, "`num_workers` >= 0"),
    ("seed", -1, "`seed` >= 0"),
    ("seed", 2**32, "`seed` < 2\\*\\*32"),
    ("feature_dim", 0, "`feature_dim` >= 1"),
    ("device", "bogus", "`device` to be auto, cpu, cuda or cuda:N, but got 'bogus'"),
    ("polar_method", "qr", "unknown polar_method 'qr'; choose from auto, svd, gram, "
     "newton_schulz"),
])
def test_validate_rejects(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value}).validate()


def test_validate_rejects_newton_schulz_on_the_host():
    with pytest.raises(ValueError, match="newton_schulz.*solve_device='cpu'"):
        TrainConfig(polar_method="newton_schulz", solve_device="cpu").validate()


def test_validate_accepts_the_defaults_and_edges():
    TrainConfig().validate()
    TrainConfig(delta=0.0, momentum=0.0, weight_decay=0.0, checkpoint_every=0,
                device="cpu").validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_validate_rejects_cuda_without_cuda():
    with pytest.raises(ValueError, match="no CUDA device is available"):
        TrainConfig(device="cuda").validate()


def test_full_batch_is_every_sample():
    bundle = load_dataset("digits")
    n = len(bundle.train)
    assert train_batch_size(TrainConfig(batch_size=0), bundle) == n
    assert train_batch_size(TrainConfig(batch_size=10 * n), bundle) == n
    assert train_batch_size(TrainConfig(batch_size=50), bundle) == 50


def test_backbone_must_fit_the_data():
    with pytest.raises(ValueError, match="Expected input features for backbone 'mlp'"):
        build_backbone("mlp", in_shape=(), width=8)
    with pytest.raises(ValueError, match=r"backbone 'ufm', but got inputs of shape \(64,\)"):
        build_backbone("ufm", in_shape=(64,), num_samples=10, width=8)


def _npz(tmp_path: Path, stem: str = "data", **arrays) -> str:
    np.savez(tmp_path / f"{stem}.npz", **arrays)
    return f"npz:{tmp_path / stem}.npz"


def _bad_cases(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 4)), np.arange(12) % 3
    base = {"model": "mlp", "feature_dim": 16, "width": 16, "epochs": 1, "progress": False}
    return {
        "1-D x": ({**base, "dataset": _npz(tmp_path, "flat", x=x[:, 0], y=y)},
                  "Expected `x` to have"),
        "x_test width": ({**base, "dataset": _npz(tmp_path, "wide", x=x, y=y, x_test=x[:, :3],
                                                  y_test=y)}, "`x_test` rows of shape"),
        "mlp on ufm": ({**base, "dataset": "ufm"}, "Expected input features"),
        "ufm on digits": ({**base, "model": "ufm", "dataset": "digits"},
                          "backbone 'ufm', but got inputs"),
        "batch fits no class": ({**base, "dataset": "digits", "batch_size": 1400},
                                "smallest class has only"),
        "lr nan": ({**base, "dataset": "digits", "lr": math.nan}, "`lr` to be finite"),
        "d < K": ({**base, "dataset": "digits", "feature_dim": 6, "method": "implicit"},
                  r"the implicit head needs feature dimension d >= K, but the mlp backbone "
                  r"gives d=6 for K=10 classes \(--feature-dim 6\): give --feature-dim >= 10"),
    }


@pytest.mark.parametrize("case", ["1-D x", "x_test width", "mlp on ufm", "ufm on digits",
                                  "batch fits no class", "lr nan", "d < K"])
def test_bad_inputs_fail_before_the_run_directory(tmp_path, case):
    cfg, match = _bad_cases(tmp_path)[case]
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        Trainer(TrainConfig(**cfg), out)
    assert not out.exists()


def test_imbalanced_full_batch_trains(tmp_path):
    # digits' classes differ in size; the full batch once made a loader with no batches
    cfg = TrainConfig(dataset="digits", model="mlp", feature_dim=16, width=16, epochs=2,
                      batch_size=0, progress=False, eval_test=False)
    trainer = Trainer(cfg, tmp_path / "run")
    assert len(trainer.train_loader) == 1
    row = trainer.fit()
    assert row["epoch"] == 2 and math.isfinite(row["train_loss"])


def test_test_split_missing_a_class_is_reported(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), np.arange(30) % 3
    name = _npz(tmp_path, x=x, y=y, x_test=x[:4], y_test=np.array([0, 0, 1, 1]))
    cfg = TrainConfig(dataset=name, model="mlp", feature_dim=8, width=8, epochs=2,
                      progress=False)
    row = Trainer(cfg, tmp_path / "run").fit()
    assert row["test_missing_classes"] == [2] and row["missing_classes"] == []
    assert math.isfinite(row["test_nc1"]) and math.isfinite(row["test_top1"])
