"""The training loop for the three methods: runs you can resume, under DDP too.

A run directory holds (DESIGN §3):

- ``config.json``: the full resolved :class:`TrainConfig` (with ``method`` and ``seed``);
- ``metrics.jsonl``: one JSON object per evaluated epoch — ``epoch``, ``step``, ``lr``,
  ``train_loss`` (mean over the epoch's steps), the time per step split into
  ``time_forward_ms`` / ``time_backward_ms`` (means; ``_median`` too), ``peak_mem_mb`` (peak
  memory above the level at the start of training: CUDA allocator, or sampled RSS on CPU) and
  every key of :func:`gnc.metrics.nc_metrics` on the train split (``cos_margins`` as 101
  quantiles of the sorted per-sample margins), then the test split's prefixed ``test_``, and
  the train split's distances to the nearest simplex ETFs (``etf_w_dist``, ``etf_h_dist``,
  ``etf_wh_dist``, ``etf_w_moved``, ``etf_h_moved``: :func:`gnc.metrics.etf_distances`);
- ``classifier/epoch_XXXX.pt`` with ``save_classifier``: W, b, the train class means and U
  at every evaluation (:func:`gnc.evaluation.save_classifier`);
- ``cos_margins.npy``: every sorted per-sample train cosine margin at the last evaluation;
- ``checkpoints/last.pt`` (and ``epoch_XXXX.pt`` every ``checkpoint_every`` epochs), written
  to a temporary file and renamed, so a crash never leaves a corrupt checkpoint;
- ``tb/``: TensorBoard events when enabled.

``resume=True`` continues from ``checkpoints/last.pt`` to the same result as an uninterrupted
run: the data order is a function of (seed, epoch) and the RNG states are checkpointed. An
unreadable ``last.pt`` falls back to the newest readable ``epoch_XXXX.pt``; a fresh run into a
directory that holds a run is refused unless ``overwrite=True`` (see :mod:`gnc.checkpoint`).

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in ``DistributedDataParallel``,
the stratified sampler splits every global batch over the ranks, class statistics and NC
metrics are all-reduced (so every rank solves the same nearest-ETF problem) and only rank 0
writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gnc.checkpoint import (
    CheckpointError,
    append_line,
    atomic_save,
    atomic_write_text,
    check_fresh_run_dir,
    load_checkpoint,
    load_latest_checkpoint,
    prepare_run_dir,
    resolve_data_paths,
    rng_state,
    set_rng_state,
    trim_metrics,
)
from gnc.data import DatasetBundle, batch_sampler_for, load_dataset, make_loader, set_loader_epoch
from gnc.data.device import DeviceImageLoader, device_images, estimated_bytes, fits_on_device
from gnc.data.perturb import check_rates
from gnc.data.sampler import TensorBatchLoader
from gnc.etf import ETF_POLAR_METHODS, NS_RESIDUAL_TOL
from gnc.evaluation import (
    EVAL_STATS,
    etf_distances_of,
    evaluate,
    quantiles,
    recompute_statistics,
    save_classifier,
)
from gnc.graphs import GraphedHeadStep
from gnc.heads import ImplicitETFHead, make_head, normalizes_features
from gnc.losses import LOSSES, classification_loss
from gnc.memory import PeakMemory
from gnc.models import build_backbone, without_bn_affine
from gnc.models.classifier import FeatureClassifier
from gnc.optim import PER_STEP_SCHEDULES, agd_init_, build_optimizer, build_scheduler
from gnc.validation import all_finite, trusted_inputs

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DATA_ON_DEVICE = ("auto", "on", "off")
SOLVE_DEVICES = ("auto", "same", "cpu")
# The step loop reads the loss on the host only every this many steps (and at the epoch end).
NONFINITE_CHECK_EVERY = 25


@dataclass
class TrainConfig:
    """Everything a run needs; ``config.json`` is this, resolved."""

    dataset: str = "ufm"  # gnc.data registry name, or npz:PATH / imagefolder:PATH
    dataset_options: dict = field(default_factory=dict)  # e.g. num_classes, per_class, subset
    model: str = "ufm"  # gnc.models backbone
    width: int = 64  # backbone base width (ResNet channels, MLP hidden units)
    feature_dim: int | None = None  # d; None = the backbone's own
    small_input: bool | None = None  # small-image stem; None = by input size
    method: str = "implicit"  # standard | fixed | implicit (+ ablations, see gnc.heads.METHODS)
    tau: float = 1.0  # feature-sphere radius (temperature)
    delta: float = 1e-3  # proximal weight of the nearest-ETF problem
    solver: str = "exact"  # exact | riemannian
    backward: str = "closed_form"  # closed_form | ddn | none
    update: str = "ema"  # running class means: ema | cma
    rotation: str = "canonical"  # fixed ETF: canonical | random
    bias: bool = True  # classifier bias (ETF heads: b = −Wμ_G) and affine BatchNorm; False:
    # logits = W h and every BatchNorm non-affine (the released scripts' --no-bias)
    loss: str = "ce"  # ce (cross-entropy) | dr (dot regression: ½·mean (logit_y − 1)²)
    gamma: float = 0.1  # step / multistep schedules: lr × gamma at each decay
    step_every: int | None = None  # step schedule: decay every N epochs; None = epochs // 3
    epochs: int = 10  # epochs (UFM: full-batch iterations)
    batch_size: int = 0  # global batch size; 0 = full batch
    sampler: str = "stratified"  # stratified (every class in every batch) | shuffle (K > batch)
    imbalance: float = 1.0  # long tail: class c keeps n_max*R^(c/(K-1)) samples; 1 = as is
    label_noise: float = 0.0  # share p of training labels re-drawn uniformly (test stays clean)
    optimizer: str = "sgd"  # sgd | adam | adamw | agd
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "none"  # none | step | multistep | cosine (per epoch) | onecycle (per step)
    milestones: list[int] | None = None  # multistep epochs
    eval_every: int = 1  # evaluate every N epochs (and at the last)
    eval_test: bool = True  # also evaluate the test split when there is one
    eval_batch_size: int = 1024
    checkpoint_every: int = 0  # keep checkpoints/epoch_XXXX.pt every N epochs (0: never)
    seed: int = 0
    device: str = "auto"  # auto = cuda when present
    amp: str = "none"  # none | bf16 | fp16 (backbone only)
    data_dir: str = "data"
    download: bool = False
    augment: bool = True
    num_workers: int = 0
    tensorboard: bool = False
    progress: bool = True  # tqdm bar on rank 0
    data_on_device: str = "auto"  # images decoded once, augmented on the device: auto | on | off
    channels_last: bool = False  # image backbones in channels-last memory layout (GPU)
    compile: bool = False  # torch.compile the backbone in place (the head stays eager)
    solve_device: str = "auto"  # implicit head's exact solve: auto | same | cpu
    polar_method: str = "auto"  # implicit head's polar factor: auto | svd | gram | newton_schulz
    graph_head: bool = False  # implicit head's training step from CUDA graphs (newton_schulz)
    eval_stats: str = "precise"  # BN statistics and mu_G at evaluation: precise | running
    save_classifier: bool = False  # write classifier/epoch_XXXX.pt (W, b, class means, U) at evals

    def validate(self) -> None:
        """Raise ``ValueError`` for settings no run can use (names are checked where used)."""
        if self.epochs < 1:
            raise ValueError(f"Expected `epochs` >= 1, but got {self.epochs}")
        if self.batch_size < 0:
            raise ValueError(f"Expected `batch_size` >= 0 (0 = full batch), got {self.batch_size}")
        if self.eval_every < 1:
            raise ValueError(f"Expected `eval_every` >= 1, but got {self.eval_every}")
        if self.sampler not in ("stratified", "shuffle"):
            raise ValueError(f"unknown sampler {self.sampler!r}; choose 'stratified' or 'shuffle'")
        check_rates(self.imbalance, self.label_noise)
        for name, choices in (("data_on_device", DATA_ON_DEVICE), ("eval_stats", EVAL_STATS),
                              ("solve_device", SOLVE_DEVICES),
                              ("polar_method", ETF_POLAR_METHODS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from "
                                 f"{', '.join(choices)}")
        if self.graph_head and self.polar_method != "newton_schulz":
            raise ValueError("graph_head needs polar_method newton_schulz (the SVD/eigh "
                             "methods make the host wait for the device)")
        if self.polar_method == "newton_schulz" and self.solve_device == "cpu":
            raise ValueError("polar_method newton_schulz runs on the training device; "
                             "solve_device='cpu' is for the SVD/eigh methods")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp {self.amp!r}; choose from {', '.join(AMP_DTYPES)}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"Expected `tau` to be finite and > 0, but got {self.tau}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Expected `lr` to be finite and > 0, but got {self.lr}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"Expected `bias` to be true or false, but got {self.bias!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"Expected `gamma` to be finite and > 0, but got {self.gamma}")
        if self.step_every is not None and self.step_every < 1:
            raise ValueError(f"Expected `step_every` >= 1 (or None), but got {self.step_every}")
        for name in ("delta", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Expected `{name}` to be finite and >= 0, but got {value}")
        minimum = {"eval_batch_size": 1, "checkpoint_every": 0, "num_workers": 0, "width": 1,
                   "seed": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"Expected `{name}` >= {low}, but got {getattr(self, name)}")
        if self.seed >= 2**32:
            raise ValueError(f"Expected `seed` < 2**32, but got {self.seed}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ValueError(f"Expected `feature_dim` >= 1, but got {self.feature_dim}")
        try:
            device = torch.device("cpu" if self.device == "auto" else self.device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(
                f"Expected `device` to be auto, cpu, cuda or cuda:N, but got {self.device!r}"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device} was asked for, but no CUDA device is "
                             "available")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}")
        return cls(**d)


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    The device is resolved first (``auto`` → this rank's GPU when CUDA is present) and made
    current with ``torch.cuda.set_device`` before the group is created; the backend is NCCL
    whenever that device is a GPU, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        info = DistInfo(int(os.environ.get("RANK", 0)), world, local_rank)
        backend = "nccl" if resolve_device(device, info).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """The ``torch.device`` of ``name`` for this rank; a GPU is made the current device.

    ``auto`` is CUDA when available, else the CPU; ``cuda`` without an index is the
    ``LOCAL_RANK``-th GPU under ``torchrun`` (GPU 0 otherwise).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.world_size > 1 else 0)
        torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------- model and data


def load_data(cfg: TrainConfig, *, augment: bool | None = None) -> DatasetBundle:
    return load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
        augment=cfg.augment if augment is None else augment, imbalance=cfg.imbalance,
        label_noise=cfg.label_noise, **cfg.dataset_options,
    )


# The exact solve of the implicit head runs on the host up to this many classes when training
# on a GPU: there a d×K SVD is a handful of launch-bound kernels (docs/bench.md measures both).
CPU_SOLVE_MAX_K = 0


def solve_device_for(cfg: TrainConfig, K: int, device: torch.device) -> str:
    """``cfg.solve_device`` with ``auto`` resolved for K classes on ``device``."""
    if cfg.solve_device != "auto":
        return cfg.solve_device
    return "cpu" if device.type == "cuda" and K <= CPU_SOLVE_MAX_K else "same"


def build_model(cfg: TrainConfig, bundle: DatasetBundle,
                device: torch.device | None = None) -> FeatureClassifier:
    """Backbone → τ-sphere → head of ``cfg.method``, for the dataset of ``bundle``.

    On ``device`` when given, in channels-last layout when ``cfg.channels_last``; the
    backbone is compiled in place when ``cfg.compile`` (its state-dict keys are unchanged).
    ``cfg.bias=False`` (``--no-bias``): the head has no bias (logits ``W h``) and every
    BatchNorm of the backbone is made non-affine (:func:`gnc.models.without_bn_affine`).
    """
    device = torch.device("cpu") if device is None else device
    backbone, d = build_backbone(
        cfg.model, in_shape=bundle.in_shape, num_samples=len(bundle.train),
        feature_dim=cfg.feature_dim, small_input=cfg.small_input, width=cfg.width,
    )
    if not cfg.bias:
        without_bn_affine(backbone)
    head = make_head(
        cfg.method, d, bundle.num_classes, delta=cfg.delta, solver=cfg.solver,
        backward=cfg.backward, update=cfg.update, rotation=cfg.rotation, seed=cfg.seed,
        solve_device=solve_device_for(cfg, bundle.num_classes, device), bias=cfg.bias,
        polar_method=cfg.polar_method,
    )
    tau = cfg.tau if normalizes_features(cfg.method) else None
    model = FeatureClassifier(backbone, head, tau=tau, amp_dtype=AMP_DTYPES[cfg.amp])
    model = model.to(device)
    if cfg.channels_last and len(bundle.in_shape) == 3:
        model.backbone.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.backbone.compile()
    return model


def _train_batch_size(cfg: TrainConfig, bundle: DatasetBundle) -> int:
    """The global training batch size: ``cfg.batch_size``, where 0 or anything above the
    training split's N means the full batch of all N samples (one step per epoch)."""
    n = len(bundle.train)
    if cfg.batch_size > n:
        logger.warning("batch size %d is above the %d training samples: one full batch "
                       "per epoch", cfg.batch_size, n)
    return min(cfg.batch_size, n) if cfg.batch_size else n


# --------------------------------------------------------------------------- evaluation


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_finite_params(model: nn.Module) -> bool:
    """Whether every parameter is finite (one host sync: a NaN/Inf makes its sum non-finite)."""
    sums = [p.detach().float().sum() for p in model.parameters()]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return True
    return all(all_finite(p.detach()) for p in model.parameters())


def _progress_bar(total: int, initial: int, disable: bool, desc: str):
    """A tqdm bar; without tqdm installed (a bare GPU machine), a silent stand-in."""
    try:
        from tqdm import tqdm
    except ImportError:
        from types import SimpleNamespace

        return SimpleNamespace(disable=True, update=lambda n=1: None, close=lambda: None,
                               set_postfix=lambda **kw: None)
    return tqdm(total=total, initial=initial, unit="step", disable=disable,
                dynamic_ncols=True, desc=desc)


class StepTimer:
    """Forward and backward times of the steps of an epoch, without a host sync per step.

    ``mark()`` three times per step (start, after the loss, after the optimiser step); on
    CUDA the marks are events recorded in the stream and read once, in :meth:`times_ms`.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def times_ms(self) -> tuple[list[float], list[float]]:
        """Per step: (forward ms, backward ms)."""
        if self.cuda and self.marks:
            self.marks[-1].synchronize()
            ms = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        else:
            ms = [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return ms[0::3], ms[1::3]


def make_train_loaders(cfg: TrainConfig, bundle: DatasetBundle, eval_bundle: DatasetBundle,
                       device: torch.device, dist_info: DistInfo) -> tuple[Any, dict]:
    """The training loader and the evaluation loaders (``train``, and ``test`` if any).

    Image data lives on the device (:mod:`gnc.data.device`) when ``cfg.data_on_device`` is
    ``on``, or ``auto`` on a GPU that holds it; tensor datasets are moved to a GPU whole.
    """
    ranks = {"num_replicas": dist_info.world_size, "rank": dist_info.rank}
    batch = _train_batch_size(cfg, bundle)
    stratified = cfg.sampler == "stratified"
    images = _device_images(cfg, bundle, device)
    if images is None:
        common = {**ranks, "num_workers": cfg.num_workers, "pin_memory": device.type == "cuda"}
        train = make_loader(bundle, batch, drop_last=True, seed=cfg.seed,
                            stratified=stratified, shuffle=not stratified, **common)
        evals = {"train": make_loader(eval_bundle, cfg.eval_batch_size, split="train", **common)}
        if cfg.eval_test and eval_bundle.test is not None:
            evals["test"] = make_loader(eval_bundle, cfg.eval_batch_size, split="test", **common)
        if device.type == "cuda":
            for loader in (train, *evals.values()):
                if isinstance(loader, TensorBatchLoader):
                    loader.tensors = tuple(t.to(device) for t in loader.tensors)
        return train, evals
    cl = cfg.channels_last
    sampler = batch_sampler_for(len(bundle.train), batch, labels=bundle.train_targets,
                                stratified=stratified, shuffle=not stratified, drop_last=True,
                                seed=cfg.seed, **ranks)
    train = DeviceImageLoader(images["train"], sampler, augment=cfg.augment, channels_last=cl,
                              seed=cfg.seed)
    evals = {}
    for split in ("train", "test"):
        if split in images and (split == "train" or cfg.eval_test):
            order = batch_sampler_for(len(images[split].labels), cfg.eval_batch_size, **ranks)
            evals[split] = DeviceImageLoader(images[split], order, augment=False,
                                             channels_last=cl)
    return train, evals


def _device_images(cfg: TrainConfig, bundle: DatasetBundle, device: torch.device) -> dict | None:
    if cfg.data_on_device == "off" or not bundle.in_shape or len(bundle.in_shape) != 3:
        if cfg.data_on_device == "on" and len(bundle.in_shape) != 3:
            raise ValueError(f"--data-on-device on: dataset '{cfg.dataset}' holds no images")
        return None
    if cfg.data_on_device == "auto" and not fits_on_device(estimated_bytes(bundle), device):
        return None
    images = {"train": device_images(bundle.train, device)}
    if images["train"] is None:
        if cfg.data_on_device == "on":
            raise ValueError(f"--data-on-device on: the transforms of '{cfg.dataset}' cannot "
                             "run on the device (only pad, crop, flip and normalise can)")
        return None
    if bundle.test is not None:
        images["test"] = device_images(bundle.test, device)
        if images["test"] is None:
            del images["test"]
    return images


# --------------------------------------------------------------------------- the loop


class Trainer:
    """One run: model, data, optimiser and the run directory. Use :func:`train`."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
                 overwrite: bool = False,
                 data: tuple[DatasetBundle, DatasetBundle] | None = None) -> None:
        """``data``: the (training, un-augmented evaluation) bundles, when not loaded from
        ``cfg`` (benchmarks on synthetic data)."""
        cfg.validate()
        if resume and overwrite:
            raise ValueError("choose one of resume (continue the run) and overwrite (replace it)")
        self.cfg, self.out = cfg, Path(out_dir)
        self.dist = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.dist)
        if not resume and self.dist.is_main:  # refuse before any work, change nothing yet
            check_fresh_run_dir(self.out, overwrite=overwrite)
        seed_everything(cfg.seed)
        if data is None:
            data = load_data(cfg), load_data(cfg, augment=False)
        self.bundle, self.eval_bundle = data
        self.K = self.bundle.num_classes
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
        self.model = build_model(cfg, self.bundle, self.device)
        if cfg.graph_head and isinstance(self.model.head, ImplicitETFHead):
            if self.device.type != "cuda" or self.dist.world_size > 1:
                raise ValueError("graph_head captures CUDA graphs: it needs one process on a "
                                 f"CUDA device, not {self.dist.world_size} on {self.device}")
            self.model.head_step = GraphedHeadStep(self.model.head)
        if cfg.optimizer == "agd":  # AGD's step sizes assume its own initialisation
            agd_init_(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(  # AGD has no learning rate: `lr` is its gain
            cfg.optimizer, params, lr=cfg.lr, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, gain=cfg.lr,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.ddp = self.model
        if self.dist.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None, broadcast_buffers=False,
            )
        self.train_loader, self.eval_loaders = make_train_loaders(
            cfg, self.bundle, self.eval_bundle, self.device, self.dist)
        # one-cycle steps after every optimiser step, the others once per epoch
        self.step_schedule_per_step = cfg.schedule in PER_STEP_SCHEDULES
        self.scheduler = build_scheduler(
            cfg.schedule, self.optimizer, milestones=cfg.milestones, gamma=cfg.gamma,
            step_size=cfg.step_every, total_steps=cfg.epochs * (
                max(len(self.train_loader), 1) if self.step_schedule_per_step else 1),
        )
        self.epoch, self.step = 0, 0
        self._etf_prev: dict = {}  # nearest ETFs of W and H at the last evaluation (etf_distances)
        self.memory = PeakMemory(self.device)  # started by fit()
        self.writer = None
        if resume:
            self._resume()
        elif self.dist.is_main:
            prepare_run_dir(self.out, overwrite=overwrite)
        if self.dist.is_main:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json",
                              json.dumps(dataclasses.asdict(cfg), indent=2))
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tb"))

    # ----------------------------------------------------------------- checkpointing
    def _checkpoint(self) -> dict:
        return {
            "config": dataclasses.asdict(self.cfg), "epoch": self.epoch, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": rng_state(), "cwd": os.getcwd(),  # relative data paths start here
            "etf_prev": self._etf_prev,  # the last evaluation's nearest ETFs ("moved" after resume)
        }

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` (and ``epoch_XXXX.pt`` when due) atomically, on rank 0 only."""
        if not self.dist.is_main:
            return
        ckpt = self._checkpoint()
        atomic_save(ckpt, self.out / "checkpoints" / "last.pt")
        if self._is_due(self.cfg.checkpoint_every):
            atomic_save(ckpt, self.out / "checkpoints" / f"epoch_{self.epoch:04d}.pt")

    def _is_due(self, every: int) -> bool:
        return bool(every) and self.epoch % every == 0

    def _resume(self) -> None:
        """Continue from the newest readable checkpoint (``last.pt``, else ``epoch_XXXX.pt``).

        The checkpoint is read onto the CPU: ``load_state_dict`` moves the model and optimiser
        state to their device and the RNG states stay CPU ``ByteTensor`` objects. Rows of
        ``metrics.jsonl`` after its epoch, and torn or foreign lines, are dropped.
        """
        ckpt, _ = load_latest_checkpoint(self.out, "resume")
        saved = {k: v for k, v in ckpt["config"].items() if k not in ("epochs", "progress")}
        now = dataclasses.asdict(self.cfg)
        changed = sorted(k for k in saved if saved[k] != now.get(k))
        if changed:
            raise ValueError(f"cannot resume {self.out}: the configuration differs in {changed}")
        if self.cfg.schedule in PER_STEP_SCHEDULES and ckpt["config"]["epochs"] != self.cfg.epochs:
            raise ValueError(  # its length is fixed when the run starts: it cannot be extended
                f"cannot resume {self.out} with epochs={self.cfg.epochs}: its {self.cfg.schedule} "
                f"schedule spans the {ckpt['config']['epochs']} epochs it was started with")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self._etf_prev = ckpt.get("etf_prev") or {}  # absent in older checkpoints
        if self.dist.is_main:  # drop lines of epochs after the checkpoint (a crash between)
            trim_metrics(self.out / "metrics.jsonl", self.epoch)

    # ----------------------------------------------------------------- one epoch
    def train_epoch(self, bar) -> dict:
        """One epoch. On a GPU nothing in a step waits for the device: losses and accuracy
        add up on the device, step times are CUDA events, and the loss is checked for
        NaN/Inf every :data:`NONFINITE_CHECK_EVERY` steps and at the end of the epoch."""
        model, device = self.model, self.device
        self.ddp.train()
        set_loader_epoch(self.train_loader, self.epoch)
        timer = StepTimer(device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        loss_sum, correct, bad = zero.clone(), zero.clone(), zero.clone()
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        seen = steps = 0
        show = bar is not None and not bar.disable
        with trusted_inputs():  # data were validated at load time; the loss is checked here
            for x, y in self.train_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                timer.mark()
                logits, _ = self.ddp(x, y)
                loss = classification_loss(self.cfg.loss, logits, y)
                timer.mark()
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)  # fp16: skipped when the gradients overflow
                self.scaler.update()
                if hasattr(model.head, "renormalize_"):
                    model.head.renormalize_()
                if self.step_schedule_per_step:
                    self.scheduler.step()
                timer.mark()
                loss = loss.detach()
                finite = torch.isfinite(loss)
                first_bad = torch.where(finite | (first_bad >= 0), first_bad,
                                        torch.full_like(first_bad, self.step + 1))
                loss_sum += torch.where(finite, loss, 0.0)
                bad += ~finite
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.numel()
                steps += 1
                self.step += 1
                if steps % NONFINITE_CHECK_EVERY == 0:
                    self._check_finite(bad, first_bad, steps, end=False)
                if bar is not None:
                    bar.update(1)
                    if show and steps % NONFINITE_CHECK_EVERY == 0:
                        bar.set_postfix(loss=f"{float(loss_sum) / max(steps - float(bad), 1):.4f}",
                                        acc=f"{100 * float(correct) / seen:.1f}")
        self._check_finite(bad, first_bad, steps, end=True)
        if not self.step_schedule_per_step:
            self.scheduler.step()
        self.epoch += 1
        t_fwd, t_bwd = timer.times_ms()
        loss_sum, bad, correct, seen_all, n_steps = self._all_reduce(
            [float(loss_sum), float(bad), float(correct), seen, steps])
        return self._polar_residual() | {
            "train_loss": loss_sum / max(n_steps - bad, 1),
            "train_batch_top1": 100.0 * correct / seen_all,
            "skipped_steps": int(bad),
            "time_forward_ms": statistics.fmean(t_fwd),
            "time_backward_ms": statistics.fmean(t_bwd),
            "time_forward_ms_median": statistics.median(t_fwd),
            "time_backward_ms_median": statistics.median(t_bwd),
        }

    def _polar_residual(self) -> dict:
        """``{"polar_residual": r}``, the epoch's largest Newton–Schulz residual max|UᵀU − I|
        (empty unless the head used it), with a warning when the iteration did not converge."""
        pop = getattr(self.model.head, "pop_polar_residual", None)
        residual = pop() if pop is not None else None
        if residual is None:
            return {}
        if not residual <= NS_RESIDUAL_TOL and self.dist.is_main:
            logger.warning("epoch %d: the Newton–Schulz polar factor reached only max|UᵀU − I| = "
                           "%.2e > %.1e (σ_min(C) below what its schedule assumes); "
                           "--polar-method auto solves exactly", self.epoch, residual,
                           NS_RESIDUAL_TOL)
        return {"polar_residual": residual}

    def _check_finite(self, bad: torch.Tensor, first_bad: torch.Tensor, steps: int,
                      end: bool) -> None:
        """Raise "training diverged" for a non-finite loss (fp16: only when every step of
        the epoch overflowed — the scaler skips the others) or non-finite weights."""
        n_bad = int(self._all_reduce([float(bad)])[0])
        if self.scaler.is_enabled():
            diverged = end and n_bad == steps * self.dist.world_size
        else:
            diverged = n_bad > 0
        if end and not diverged and not all_finite_params(self.model):
            raise self._diverged("the weights are NaN/Inf")
        if diverged:
            step = int(first_bad)
            what = "the loss is NaN/Inf"
            if not all_finite_params(self.model):
                what += " and the weights are NaN/Inf"
            raise self._diverged(what, step=step if step > 0 else None)

    def _all_reduce(self, values: list[float]) -> list[float]:
        """Sums over the ranks (the values themselves in a single process)."""
        if self.dist.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _diverged(self, what: str, step: int | None = None) -> FloatingPointError:
        return FloatingPointError(
            f"training diverged: {what} at epoch {self.epoch + 1}, step "
            f"{step or self.step + 1} (try a smaller --lr); the last checkpoint is kept"
        )

    def evaluate_epoch(self, row: dict) -> dict:
        """NC metrics of both splits; first, with ``eval_stats="precise"``, the BN statistics
        and μ_G recomputed over the (un-augmented) training split (:mod:`gnc.evaluation`)."""
        if not all_finite_params(self.model):
            raise self._diverged("the weights are NaN/Inf")
        if self.cfg.eval_stats == "precise":
            self._precise_statistics()
        row["eval_stats"] = self.cfg.eval_stats
        for split, loader in self.eval_loaders.items():
            geometry: dict = {}
            try:
                metrics, margins = evaluate(self.model, loader, self.K, self.device,
                                            geometry=geometry)
            except ValueError as err:
                if "NaN" not in str(err):
                    raise
                raise self._diverged(f"the {split} features are NaN/Inf at evaluation") from err
            prefix = "" if split == "train" else "test_"
            row.update({prefix + k: v for k, v in metrics.items()})
            row[prefix + "cos_margins"] = quantiles(margins)
            if split == "train":  # the ETF-distance study and the saved geometry: train split
                distances, self._etf_prev = etf_distances_of(geometry, self._etf_prev)
                row.update(distances)
            if split == "train" and self.dist.is_main:
                np.save(self.out / "cos_margins.npy", margins.numpy())
                if self.cfg.save_classifier:
                    save_classifier(self.out, self.model.head, geometry, self.epoch, split)
        return row

    def _precise_statistics(self) -> None:
        """BN statistics over one pass of training batches as trained on (the next epoch's
        order and augmentation, so training is unchanged), μ_G over the un-augmented split."""
        rng = torch.get_rng_state()  # the PIL path draws its augmentation from it
        set_loader_epoch(self.train_loader, self.epoch)
        recompute_statistics(self.model, self.train_loader, self.device,
                             mean_loader=self.eval_loaders["train"])
        torch.set_rng_state(rng)

    def log(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        append_line(self.out / "metrics.jsonl", json.dumps(row))  # fsynced; a tear is trimmed
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def fit(self) -> dict:
        cfg = self.cfg
        steps = len(self.train_loader)
        if steps == 0:
            raise ValueError("the training loader has no batches (batch size above the data?)")
        bar = _progress_bar(total=cfg.epochs * steps, initial=self.epoch * steps,
                            disable=not (cfg.progress and self.dist.is_main),
                            desc=f"{cfg.method} seed {cfg.seed}")
        t_start = time.perf_counter()
        row: dict = {}
        self.memory.start()
        try:
            while self.epoch < cfg.epochs:
                stats = self.train_epoch(bar)
                last = self.epoch == cfg.epochs
                if self._is_due(cfg.eval_every) or last:
                    row = {"epoch": self.epoch, "step": self.step,
                           "lr": self.optimizer.param_groups[0].get("lr", math.nan), **stats}
                    row = self.evaluate_epoch(row)
                    row["train_top1"] = row["top1"]
                    row["peak_mem_mb"] = self.memory.mb
                    row["elapsed_s"] = time.perf_counter() - t_start
                    self.log(row)
                # last.pt follows the evaluations: cheap for UFM's 2000 one-step epochs
                if self._is_due(cfg.eval_every) or self._is_due(cfg.checkpoint_every) or last:
                    self.save_checkpoint()
        finally:
            self.memory.stop()
            bar.close()
            if self.writer is not None:
                self.writer.close()
        return row


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          overwrite: bool = False) -> dict:
    """Train one run into ``out_dir`` (see the module docstring); returns the last metrics.

    A directory that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it) is given; a missing or empty one is fine.
    """
    return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite).fit()


def _read_config(run_dir: Path, action: str) -> dict:
    path = run_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"not a run directory: {path} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot {action} {run_dir}: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"cannot {action} {run_dir}: {path} is not a JSON object")
    return config


def kept_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """Epoch → file of every checkpoint a run kept, by epoch: the ``epoch_XXXX.pt`` files and
    ``last.pt`` (read to learn its epoch; left out when unreadable or when an epoch file has
    the same epoch)."""
    folder = Path(run_dir) / "checkpoints"
    kept = {int(p.stem.split("_")[1]): p for p in folder.glob("epoch_*.pt")
            if p.stem.split("_")[1].isdigit()}
    last = folder / "last.pt"
    if last.exists():
        try:
            kept.setdefault(load_checkpoint(last)["epoch"], last)
        except CheckpointError as err:
            logger.warning("%s", err)
    return dict(sorted(kept.items()))


def _checkpoint_of_epoch(run_dir: Path, epoch: int, action: str,
                         kept: dict[int, Path] | None = None) -> dict:
    """The checkpoint of ``epoch`` (``epoch_XXXX.pt``, else ``last.pt`` if it is that epoch),
    among ``kept`` (default: :func:`kept_checkpoints`, which reads ``last.pt``)."""
    kept = kept_checkpoints(run_dir) if kept is None else kept
    if epoch not in kept:
        have = ", ".join(map(str, kept)) or "none"
        raise FileNotFoundError(f"cannot {action} {run_dir}: no checkpoint of epoch {epoch} "
                                f"(kept epochs: {have}; see --checkpoint-every)")
    try:
        return load_checkpoint(kept[epoch])
    except CheckpointError as err:
        raise CheckpointError(f"cannot {action} {run_dir}: {err}") from None


def load_run(run_dir: str | Path, device: str = "auto", *, action: str = "load",
             checkpoint: int | None = None) -> tuple[TrainConfig, FeatureClassifier, dict]:
    """The config, the model and facts of a run's newest readable checkpoint.

    The checkpoint is ``checkpoints/last.pt``, or when that is unreadable the newest readable
    ``epoch_XXXX.pt`` (with a warning); with ``checkpoint=N`` the one of epoch N (see
    :func:`kept_checkpoints`). Errors are one line starting ``cannot {action} RUN:``.
    Returns ``(config, model on the device, {"bundle", "epoch", "device"})``.

    Relative data paths (``data_dir`` and the path of ``npz:PATH`` / ``imagefolder:PATH``)
    are read as the run was: kept when they exist from the current directory, else taken
    relative to the directory the run was trained from (recorded in its checkpoints), else
    relative to ``run_dir`` (see :func:`gnc.checkpoint.resolve_data_paths`). The returned
    config holds the paths used.
    """
    run_dir = Path(run_dir)
    config = _read_config(run_dir, action)
    if checkpoint is None:
        ckpt, _ = load_latest_checkpoint(run_dir, action)
    else:
        ckpt = _checkpoint_of_epoch(run_dir, checkpoint, action)
    cfg = TrainConfig.from_dict(resolve_data_paths(config, run_dir, ckpt.get("cwd")))
    dev = resolve_device(device, DistInfo())
    bundle = load_data(cfg, augment=False)
    model = build_model(cfg, bundle).to(dev)
    model.load_state_dict(ckpt["model"])  # copies the CPU tensors onto the model's device
    return cfg, model, {"bundle": bundle, "epoch": ckpt["epoch"], "device": dev}


def _evaluate_loaded(run_dir: Path, cfg: TrainConfig, model: FeatureClassifier, info: dict,
                     split: str, save: bool, previous: dict | None) -> tuple[dict, dict]:
    """One checkpoint's row (metrics, ETF distances against ``previous``, ``epoch``,
    ``split``, margin quantiles) and the ETF state for the next one."""
    bundle = info["bundle"]
    loader = make_loader(bundle, cfg.eval_batch_size, split=split)
    geometry: dict = {}
    metrics, margins = evaluate(model, loader, bundle.num_classes, info["device"],
                                geometry=geometry)
    distances, state = etf_distances_of(geometry, previous)
    if save:
        save_classifier(run_dir, model.head, geometry, info["epoch"], split)
    row = {"epoch": info["epoch"], "split": split, **metrics, **distances,
           "cos_margins": quantiles(margins)}
    return row, state


def _check_split_name(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")


def _check_split(split: str, cfg: TrainConfig, bundle: DatasetBundle) -> None:
    if split == "test" and bundle.test is None:
        raise ValueError(f"dataset '{cfg.dataset}' has no test split")


def evaluate_run(run_dir: str | Path, split: str = "train", device: str = "auto", *,
                 checkpoint: int | None = None, save_classifier: bool = False) -> dict:
    """NC metrics of a run's newest readable checkpoint on ``split`` (``gnc evaluate``).

    ``checkpoint=N``: the checkpoint of epoch N instead (``--checkpoint N``). Besides the
    metrics of :func:`gnc.evaluation.evaluate` the result has ``epoch``, ``split``, the
    ETF distances of :func:`gnc.metrics.etf_distances` (``etf_*_moved`` NaN: one checkpoint
    has no previous evaluation) and ``cos_margins`` (101 quantiles). ``save_classifier``
    also writes :func:`gnc.evaluation.save_classifier`'s file. The model is evaluated with
    the statistics its checkpoint stores (precise ones when the epoch was evaluated in
    training with ``eval_stats="precise"``). Checkpoint fallback and data paths as in
    :func:`load_run`.
    """
    _check_split_name(split)  # before any loading
    cfg, model, info = load_run(run_dir, device, action="evaluate", checkpoint=checkpoint)
    _check_split(split, cfg, info["bundle"])
    return _evaluate_loaded(Path(run_dir), cfg, model, info, split, save_classifier, None)[0]


def evaluate_checkpoints(run_dir: str | Path, split: str = "train", device: str = "auto", *,
                         out: str | Path | None = None, save_classifier: bool = False
                         ) -> list[dict]:
    """:func:`evaluate_run` of every kept checkpoint, by epoch (``gnc evaluate --all``).

    Appends one JSON line per checkpoint to ``out`` (default ``RUN/evaluate_{split}.jsonl``;
    never the training's ``metrics.jsonl``) as it goes, and returns the rows. ``etf_*_moved``
    is measured from the previous checkpoint of the sequence. Data are loaded and the model
    built once.
    """
    run_dir = Path(run_dir)
    _check_split_name(split)
    kept = kept_checkpoints(run_dir)
    if not kept:
        raise FileNotFoundError(f"cannot evaluate {run_dir}: no checkpoint in "
                                f"{run_dir / 'checkpoints'}")
    cfg, model, info = load_run(run_dir, device, action="evaluate", checkpoint=next(iter(kept)))
    _check_split(split, cfg, info["bundle"])
    path = Path(out) if out is not None else run_dir / f"evaluate_{split}.jsonl"
    rows, state = [], None
    for epoch in kept:
        if epoch != info["epoch"]:
            ckpt = _checkpoint_of_epoch(run_dir, epoch, "evaluate", kept)
            model.load_state_dict(ckpt["model"])
            info["epoch"] = epoch
        row, state = _evaluate_loaded(run_dir, cfg, model, info, split, save_classifier, state)
        append_line(path, json.dumps(row))
        rows.append(row)
    return rows
