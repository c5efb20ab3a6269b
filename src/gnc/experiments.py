"""Experiment presets (a registry of named configurations) and the multi-seed runner.

Every preset holds one set of hyperparameters shared by all methods (fairness: a preset's
learning rate is chosen for the ``standard`` method, never for ``implicit``). Values the
paper states are marked "paper"; the rest are our choices and say so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gnc.heads import normalizes_features
from gnc.training import TrainConfig, train

logger = logging.getLogger(__name__)

METHODS = ("standard", "fixed", "implicit")
ABLATIONS = ("implicit-nograd", "standard-unnormalized")


@dataclass(frozen=True)
class Preset:
    """A named experiment: the shared training config, seeds and what the report shows."""

    name: str
    summary: str  # one line for `gnc presets`
    config: dict  # TrainConfig fields
    seeds: int = 5
    methods: tuple[str, ...] = METHODS
    table_epochs: tuple[int, int] = (1, 10)  # epochs of the top-1 table (paper's Table 1 form)
    gpu: bool = False  # sized for a GPU
    notes: str = ""  # where the values come from (paper / our choice, and how lr was picked)

    def train_config(self, **overrides) -> TrainConfig:
        return TrainConfig.from_dict({**self.config, **overrides})


def _ufm(K: int, d: int) -> dict:
    return {
        "dataset": "ufm", "dataset_options": {"num_classes": K, "per_class": 100},
        "model": "ufm", "feature_dim": d, "batch_size": 0, "epochs": 2000,
        "optimizer": "sgd", "lr": 1.0, "momentum": 0.9, "weight_decay": 5e-4, "tau": 1.0,
        "eval_every": 20, "eval_test": False,
    }


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


register(Preset(
    "ufm10",
    "unconstrained features, K=10, N=1000, d=512, full batch, 2000 iterations (CPU, minutes)",
    _ufm(10, 512), table_epochs=(100, 500),
    notes="K, N=100/class, d=512 and 2000 iterations: paper. SGD momentum 0.9, weight decay "
          "5e-4, tau=1, lr and the evaluation interval: our choice (lr picked for standard).",
))
register(Preset(
    "digits",
    "scikit-learn digits (8x8, K=10), MLP, 60 epochs, batch 100 (CPU, under a minute)",
    {"dataset": "digits", "model": "mlp", "width": 128, "feature_dim": 64, "epochs": 60,
     "batch_size": 100, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
     "weight_decay": 5e-4, "tau": 1.0, "eval_every": 2},
    table_epochs=(5, 30),
    notes="Not in the paper: a laptop-sized real dataset. All values are our choice.",
))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
    return PRESETS[name]



def run_dir(out: str | Path, method: str, seed: int) -> Path:
    """Where ``gnc experiment`` puts one run: ``OUT/<method>/seed<k>/``."""
    return Path(out) / method / f"seed{seed}"


def run_experiment(
    preset: Preset | str,
    out: str | Path,
    *,
    seeds: int | None = None,
    methods: Sequence[str] | None = None,
    overrides: dict | None = None,
    report: bool = True,
    command: str | None = None,
) -> list[Path]:
    """Train every method × seed of ``preset`` into ``out`` and write the report.

    A run with a ``DONE`` file is skipped; one with a checkpoint but no ``DONE`` (an
    interrupted experiment) resumes from it; the rest start afresh. Seeds are 1..N.
    Returns the run directories.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    methods = tuple(methods or preset.methods)
    for m in methods:
        normalizes_features(m)  # raises on an unknown method before any training
    n_seeds = seeds or preset.seeds
    dirs = []
    for method in methods:
        for seed in range(1, n_seeds + 1):
            path = run_dir(out, method, seed)
            dirs.append(path)
            if (path / "DONE").exists():
                logger.info("%s: finished, skipped", path)
                continue
            cfg = preset.train_config(**{**(overrides or {}), "method": method, "seed": seed})
            resume = (path / "checkpoints" / "last.pt").exists()
            train(cfg, path, resume=resume)
            (path / "DONE").write_text("finished\n")
    if report:
        from gnc.report import make_report

        make_report(out, title=f"{preset.name}: {preset.summary}",
                    table_epochs=preset.table_epochs, command=command)
    return dirs
