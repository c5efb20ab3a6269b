"""The configuration of a run: :class:`TrainConfig`, its checks, and which keys change results.

``config.json`` in a run directory is a :class:`TrainConfig`, resolved. Every field carries
its help text and, where it has one, its set of choices in ``dataclasses.field`` metadata:
the command line builds one flag per field from them (``gnc.cli``), so the schema is written
once, here.

Keys fall into three classes (:data:`RUNTIME_KEYS`, :data:`OUTPUT_KEYS`, the rest), used by
resuming a run, by ``gnc experiment`` reusing a finished run, and by the report's list of
settings (:func:`config_differences`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from gnc.class_means import UPDATES
from gnc.declarative import resolve_solve
from gnc.etf import BACKWARDS, ETF_POLAR_METHODS, SOLVE_DEVICES, SOLVERS
from gnc.heads import METHODS, ROTATIONS, ImplicitETFHead
from gnc.losses import LOSSES
from gnc.optim import OPTIMIZERS, SCHEDULERS

AMP = ("none", "bf16", "fp16")
DATA_ON_DEVICE = ("auto", "on", "off")
EVAL_STATS = ("precise", "running")
SAMPLERS = ("stratified", "shuffle")
# The largest learning rate (AGD: gain) validate accepts: larger ones overflow float32 weights
# in the first step, so they are refused before the run directory is made.
MAX_LR = 1e6

# Keys that say where and how a run ran, not what it computes: a run may be resumed, and a
# finished run reused by `gnc experiment`, with other values of these.
# `until_epoch` is how far one invocation goes: the run it continues is the same run.
RUNTIME_KEYS = frozenset({"progress", "device", "data_dir", "num_workers", "download",
                          "tensorboard", "until_epoch"})
# Fields that gnc.build.load_data hands to gnc.data.load_dataset itself: never in
# dataset_options (a second value for the same keyword).
DATASET_SETTINGS = frozenset({"data_dir", "download", "augment", "seed", "imbalance",
                              "label_noise"})
# Optimisers whose step gnc.step runs without host reads (graph_step): all of OPTIMIZERS
# today; an optimiser added there is refused with --graph-step until gnc.step runs it.
GRAPH_STEP_OPTIMIZERS = ("sgd", "adam", "adamw", "agd")
# Keys that add files to a run directory without changing its metrics.
OUTPUT_KEYS = frozenset({"save_classifier"})
# `solve_device="auto"` meant "same" (the solve on the host never paid off, docs/bench.md);
# configs written before it was retired still read.
_LEGACY_VALUES = {("solve_device", "auto"): "same"}


def uses_implicit_head(method: str) -> bool:
    """Whether ``method`` trains the implicit ETF head (the nearest-ETF options apply)."""
    return issubclass(METHODS[method].head, ImplicitETFHead)


def is_type(hint: Any, value: Any) -> bool:
    """Whether ``value`` (as JSON or the command line gives it) is of the annotation ``hint``:
    ``int`` rejects ``bool``; ``float`` takes ``int`` (not ``bool``); ``dict`` needs ``str``
    keys; ``list[T]`` every item a ``T``; ``T | None`` also ``None``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(is_type(a, value) for a in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin is list:
        return isinstance(value, list) and all(is_type(args[0], v) for v in value)
    raise TypeError(f"gnc.config cannot check the annotation {hint!r}")


def hint_name(hint: Any) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def _field(default: Any, help: str, *, choices: tuple | None = None,
           factory: Any = None) -> Any:
    """A dataclass field whose metadata the CLI turns into a flag."""
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a run needs; ``config.json`` is this, resolved."""

    dataset: str = _field("ufm", "dataset name, npz:PATH or imagefolder:PATH")
    dataset_options: dict = _field(None, "dataset options as JSON, e.g. "
                                   "'{\"num_classes\": 10, \"subset\": 50}'", factory=dict)
    model: str = _field("ufm", "backbone (ufm, mlp, cnn1d, resnet18/34/50/101/152, "
                        "resnext50_32x4d, resnext101_32x8d, wide_resnet50_2/101_2, "
                        "vgg11/13/16_bn)")
    width: int = _field(64, "backbone base width (ResNet channels, MLP hidden units)")
    feature_dim: int | None = _field(None, "feature dimension d (adds a projection; default "
                                     "the backbone's own)")
    small_input: bool | None = _field(None, "small-image stem (--small-input / "
                                      "--no-small-input; default: by the input size; image "
                                      "backbones only)")
    method: str = _field("implicit", "the classifier", choices=tuple(METHODS))
    tau: float = _field(1.0, "feature-sphere radius (temperature)")
    delta: float = _field(1e-3, "proximal weight of the nearest-ETF problem")
    solver: str = _field("exact", "nearest-ETF solver (riemannian: the paper's)",
                         choices=SOLVERS)
    backward: str = _field("closed_form", "gradient through the nearest ETF (ddn: the "
                           "paper's; implicit-nograd: always none)", choices=BACKWARDS)
    update: str = _field("ema", "running class means", choices=UPDATES)
    rotation: str = _field("canonical", "the fixed ETF's rotation", choices=ROTATIONS)
    bias: bool = _field(True, "classifier bias (ETF heads: b = -W mu_G) and affine BatchNorm; "
                        "false: logits W h, every BatchNorm non-affine")
    loss: str = _field("ce", "ce (cross-entropy) | dr (dot regression)", choices=LOSSES)
    gamma: float = _field(0.1, "step/multistep schedules: lr factor per decay")
    step_every: int | None = _field(None, "step schedule: decay every N epochs (default "
                                    "epochs // 3)")
    epochs: int = _field(10, "epochs (UFM full batch: iterations)")
    batch_size: int = _field(0, "global batch size (0 = full batch; `gnc train` default: the "
                             "preset's, else 100; full batch for ufm)")
    sampler: str = _field("stratified", "stratified (equal class shares per batch) | shuffle "
                          "(the data's own distribution)", choices=SAMPLERS)
    imbalance: float = _field(1.0, "long tail R in (0, 1]: class c keeps "
                              "floor(n_max*R^(c/(K-1))) training samples (1: as is); with "
                              "stratified batches each epoch is class-balanced: --sampler "
                              "shuffle trains on the long tail")
    label_noise: float = _field(0.0, "p in [0, 1]: floor(p*N) training labels re-drawn "
                                "uniformly over the K classes (test stays clean)")
    optimizer: str = _field("sgd", "optimiser", choices=OPTIMIZERS)
    lr: float = _field(0.1, "learning rate (agd: its gain; onecycle: the maximum)")
    momentum: float = _field(0.9, "SGD momentum (onecycle: cycled 0.95 -> 0.85 -> 0.95 when "
                             "not 0; agd has none)")
    weight_decay: float = _field(5e-4, "weight decay (agd has none: give 0)")
    schedule: str = _field("none", "learning-rate schedule (onecycle steps per batch, the "
                           "others per epoch)", choices=SCHEDULERS)
    milestones: list[int] | None = _field(None, "multistep: epochs of the decays, as JSON, "
                                          "e.g. '[100, 150]'")
    eval_every: int = _field(1, "evaluate the NC metrics every N epochs (and at the last; 0: "
                             "only at --eval-epochs and the last)")
    eval_epochs: list[int] | None = _field(None, "also evaluate after exactly these epochs, "
                                           "e.g. 10,25,50 (`gnc train`/`experiment` without "
                                           "--eval-every: only there and at the last)")
    until_epoch: int | None = _field(None, "stop after this epoch, checkpointed, on the "
                                     "schedule of --epochs; `gnc train --resume` (or the same "
                                     "`gnc experiment` command again) continues the same run")
    eval_test: bool = _field(True, "also evaluate the test split when there is one")
    eval_batch_size: int = _field(1024, "evaluation batch size")
    checkpoint_every: int = _field(0, "keep checkpoints/epoch_XXXX.pt every N epochs "
                                   "(0: only last.pt)")
    seed: int = _field(0, "seed of everything")
    device: str = _field("auto", "auto | cpu | cuda | cuda:N (auto: cuda when present)")
    amp: str = _field("none", "backbone autocast", choices=AMP)
    data_dir: str = _field("data", "where datasets are read from")
    download: bool = _field(False, "allow torchvision to download a missing dataset")
    augment: bool = _field(True, "training augmentation of image datasets")
    num_workers: int = _field(0, "data-loader workers")
    tensorboard: bool = _field(False, "write TensorBoard events to OUT/tb")
    progress: bool = _field(True, "progress bar")
    data_on_device: str = _field("auto", "image pixels kept on the device and augmented "
                                 "there (auto: on a GPU that holds them)",
                                 choices=DATA_ON_DEVICE)
    channels_last: bool = _field(False, "channels-last memory layout for image backbones (GPU)")
    compile: bool = _field(False, "torch.compile the backbone (the head stays eager)")
    solve_device: str = _field("same", "where the implicit head's exact solve runs",
                               choices=SOLVE_DEVICES)
    polar_method: str = _field("auto", "the implicit head's polar factor (newton_schulz: "
                               "matrix products only, no host sync on a GPU)",
                               choices=ETF_POLAR_METHODS)
    graph_head: bool = _field(False, "replay the implicit head's training step from CUDA "
                              "graphs (one process on a GPU; needs polar_method newton_schulz)")
    graph_step: bool = _field(False, "replay the whole training step (batch, forward, backward, "
                              "optimiser, heads) from one CUDA graph (one process; on a CPU "
                              "the capture-ready step runs eagerly); implicit methods need "
                              "polar_method newton_schulz")
    eval_stats: str = _field("precise", "BN statistics and mu_G at evaluation: precise "
                             "(recomputed over the training split) | running (BN's and the "
                             "heads' running averages as they are)",
                             choices=EVAL_STATS)
    precise_bn_batches: int = _field(0, "eval_stats precise: BatchNorm statistics from the "
                                     "first N augmented training batches only (each rank N, "
                                     "as detectron2's PreciseBN); 0: one full pass")
    save_classifier: bool = _field(False, "write OUT/classifier/epoch_XXXX.pt (W, b, class "
                                   "means, U) at every evaluation")

    @property
    def last_epoch(self) -> int:
        """The epoch this invocation trains to: ``until_epoch``, else ``epochs``."""
        return self.epochs if self.until_epoch is None else self.until_epoch

    def check_types(self) -> None:
        """Raise ``ValueError`` for a field whose value is not of its annotation (one line:
        "Expected `FIELD` to be TYPE, but got VALUE"); see :func:`is_type`."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not is_type(hints[f.name], value):
                shown = json.dumps(value) if _jsonable(value) else repr(value)
                if len(shown) > 60:
                    shown = shown[:57] + "..."
                raise ValueError(f"Expected `{f.name}` to be {hint_name(hints[f.name])}, "
                                 f"but got {shown}")

    def validate(self) -> None:
        """Raise ``ValueError`` for settings no run can use."""
        self.check_types()
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(f"unknown {f.name} {value!r}; choose from {', '.join(choices)}")
        own = sorted(set(self.dataset_options or {}) & DATASET_SETTINGS)
        if own:  # load_data passes these itself: one value each
            raise ValueError(
                f"dataset option(s) {', '.join(map(repr, own))} are settings of their own: "
                f"use {', '.join('--' + k.replace('_', '-') for k in own)} (config key(s) "
                f"{', '.join(own)}), not dataset_options")
        if self.epochs < 1:
            raise ValueError(f"Expected `epochs` >= 1, but got {self.epochs}")
        if self.batch_size < 0:
            raise ValueError(f"Expected `batch_size` >= 0 (0 = full batch), got {self.batch_size}")
        if self.eval_every < 0:
            raise ValueError(f"Expected `eval_every` >= 0 (0: only --eval-epochs), but got "
                             f"{self.eval_every}")
        for e in self.eval_epochs or ():
            if not (isinstance(e, int) and 1 <= e <= self.epochs):
                raise ValueError(f"Expected `eval_epochs` to be epochs in [1, {self.epochs}], "
                                 f"but got {self.eval_epochs}")
        if self.until_epoch is not None and not 1 <= self.until_epoch <= self.epochs:
            raise ValueError(f"Expected `until_epoch` in [1, epochs={self.epochs}], but got "
                             f"{self.until_epoch}")
        stop = self.until_epoch
        if stop is not None and stop < self.epochs and not (
                0 < self.eval_every <= stop or any(e <= stop for e in self.eval_epochs or ())):
            raise ValueError(f"until_epoch {stop} stops the run before its first evaluation "
                             f"(eval_every {self.eval_every}, eval_epochs "
                             f"{self.eval_epochs or 'none'}): it would have no metrics; "
                             f"evaluate there, e.g. --eval-epochs {stop}")
        from gnc.data.datasets import check_option_values  # gnc.data: not at import
        from gnc.data.perturb import check_rates

        check_rates(self.imbalance, self.label_noise)
        check_option_values(self.dataset.partition(":")[0], self.dataset_options or {})
        if self.graph_head and not uses_implicit_head(self.method):
            raise ValueError(f"graph_head captures the implicit head's step; method "
                             f"{self.method!r} has none")
        if self.graph_head and self.polar_method != "newton_schulz":
            raise ValueError("graph_head needs polar_method newton_schulz (the SVD/eigh "
                             "methods make the host wait for the device)")
        if self.graph_step:  # gnc.step: what its captured step can hold
            for bad, why in ((self.graph_head, "graph_head (the step's graph holds the head)"),
                             (self.optimizer not in GRAPH_STEP_OPTIMIZERS,
                              f"optimizer {self.optimizer!r}"),
                             (self.schedule == "onecycle", "the per-step onecycle schedule"),
                             (self.amp == "fp16", "amp fp16 (its GradScaler reads back "
                              "whether a gradient overflowed; bf16 can be captured)"),
                             (self.compile, "compile"),
                             (uses_implicit_head(self.method) and (
                                 self.polar_method != "newton_schulz" or self.solver != "exact"
                                 or self.solve_device != "same"),
                              "an implicit head without solver exact, polar_method "
                              "newton_schulz and solve_device same (the others sync)")):
                if bad:
                    raise ValueError(f"graph_step cannot capture {why}")
        if uses_implicit_head(self.method):  # inapplicable solver options raise here
            resolve_solve(self.solver, self.backward, self.polar_method, self.solve_device)
        for name in ("tau", "lr", "gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Expected `{name}` to be finite and > 0, but got {value}")
        if self.step_every is not None and self.step_every < 1:
            raise ValueError(f"Expected `step_every` >= 1 (or None), but got {self.step_every}")
        for name in ("delta", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Expected `{name}` to be finite and >= 0, but got {value}")
        if self.momentum >= 1:  # SGD's momentum buffer grows without bound at >= 1
            raise ValueError(f"Expected `momentum` in [0, 1), but got {self.momentum}")
        if self.lr > MAX_LR:
            raise ValueError(f"Expected `lr` <= {MAX_LR:g}, but got {self.lr} (the first "
                             "step would overflow the weights)")
        minimum = {"eval_batch_size": 1, "checkpoint_every": 0, "num_workers": 0, "width": 1,
                   "seed": 0, "precise_bn_batches": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"Expected `{name}` >= {low}, but got {getattr(self, name)}")
        if self.precise_bn_batches and self.eval_stats != "precise":
            raise ValueError(f"precise_bn_batches bounds the BN pass of eval_stats 'precise'; "
                             f"with eval_stats {self.eval_stats!r} there is none (give 0)")
        if self.seed >= 2**32:
            raise ValueError(f"Expected `seed` < 2**32, but got {self.seed}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ValueError(f"Expected `feature_dim` >= 1, but got {self.feature_dim}")
        from gnc.runtime import check_device  # torch's device parser; no CUDA initialised

        check_device(self.device)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config of ``d`` (a ``config.json``); keys it lacks take their defaults
        (settings added since it was written), unknown keys raise."""
        if not isinstance(d, dict):
            raise ValueError(f"Expected a config to be a JSON object, but got a "
                             f"{type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}")
        d = {k: _LEGACY_VALUES.get((k, v), v) if isinstance(v, str) else v
             for k, v in d.items()}
        cfg = cls(**d)
        cfg.check_types()  # a config.json of wrong types is one line, not a crash later
        return cfg

    def to_dict(self) -> dict:
        """The config as ``config.json`` stores it (JSON types only)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def config_differences(saved: dict, cfg: TrainConfig, *, ignore: frozenset | set = frozenset()
                       ) -> list[str]:
    """``key=saved (now current)`` for each key where the config ``saved`` (a run's
    ``config.json``) differs from ``cfg``, but those in ``ignore``.

    ``saved`` is read as :meth:`TrainConfig.from_dict` reads it: a key it lacks is a setting
    added since, which the run used at its default; legacy values are mapped.
    """
    old = TrainConfig.from_dict(saved).to_dict()
    now = cfg.to_dict()
    return [f"{k}={json.dumps(old[k])} (now {json.dumps(now[k])})"
            for k in sorted(now) if k not in ignore and old[k] != now[k]]


def describe_config(config: dict) -> str:
    """One line naming what a config trains: data, model, length, batch, optimiser, and the
    data perturbations and sampler when not the defaults (the title of a preset-less
    experiment)."""
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in ("method", "seed")})
    opts = ", ".join(f"{k}={v}" for k, v in sorted(cfg.dataset_options.items()))
    parts = [cfg.dataset + (f" ({opts})" if opts else ""),
             f"{cfg.model}" + (f" width {cfg.width}" if cfg.width != 64 else ""),
             f"{cfg.epochs} epochs",
             _batch_words(cfg),
             f"{cfg.optimizer} lr {cfg.lr:g}", f"tau {cfg.tau:g}"]
    defaults = TrainConfig()
    if cfg.loss != defaults.loss:
        parts.append(f"{cfg.loss} loss")
    if not cfg.bias:
        parts.append("no bias")
    if cfg.imbalance != 1:
        parts.append(f"long tail R={cfg.imbalance:g}")
    if cfg.label_noise:
        parts.append(f"label noise {cfg.label_noise:g}")
    if cfg.batch_size and cfg.sampler != "stratified":
        parts.append(f"{cfg.sampler} batches")
    return ", ".join(parts)


def _batch_words(cfg: TrainConfig) -> str:
    """The batch a config trains with: stratified batches hold ⌊batch/K⌋ samples of each of
    the K classes (the config does not know K), the other samplers ``batch_size``."""
    if not cfg.batch_size:
        return "full batch"
    if cfg.sampler == "stratified":
        return f"batch {cfg.batch_size} // K of each class"
    return f"batch {cfg.batch_size}"
