"""The training loop for the three methods: runs you can resume, under DDP too.

A run directory holds (DESIGN §3):

- ``config.json``: the full resolved :class:`TrainConfig` (with ``method`` and ``seed``);
- ``metrics.jsonl``: one JSON object per evaluated epoch — ``epoch``, ``step``, ``lr``,
  ``train_loss`` (mean over the epoch's steps), the time per step split into
  ``time_forward_ms`` / ``time_backward_ms`` (means; ``_median`` too), ``peak_mem_mb`` (peak
  memory above the level at the start of training: CUDA allocator, or sampled RSS on CPU) and
  every key of :func:`gnc.metrics.nc_metrics` on the train split (``cos_margins`` as 101
  quantiles of the sorted per-sample margins), then the test split's prefixed ``test_``;
- ``cos_margins.npy``: every sorted per-sample train cosine margin at the last evaluation;
- ``checkpoints/last.pt`` (and ``epoch_XXXX.pt`` every ``checkpoint_every`` epochs), written
  to a temporary file and renamed, so a crash never leaves a corrupt checkpoint;
- ``tb/``: TensorBoard events when enabled.

``resume=True`` continues from ``checkpoints/last.pt`` to the same result as an uninterrupted
run: the data order is a function of (seed, epoch) and the RNG states are checkpointed.

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
import torch.nn.functional as F
from torch import nn

from gnc.data import DatasetBundle, load_dataset, make_loader, set_loader_epoch
from gnc.heads import make_head, normalizes_features
from gnc.memory import PeakMemory
from gnc.metrics import NCStatistics
from gnc.models import build_backbone
from gnc.models.classifier import FeatureClassifier
from gnc.optim import agd_init_, build_optimizer, build_scheduler
from gnc.validation import all_finite

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MARGIN_QUANTILES = 101  # points of the sorted cosine margins kept per metrics line


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
    epochs: int = 10  # epochs (UFM: full-batch iterations)
    batch_size: int = 0  # global batch size; 0 = full batch
    sampler: str = "stratified"  # stratified (every class in every batch) | shuffle (K > batch)
    optimizer: str = "sgd"  # sgd | adam | adamw | agd
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "none"  # none | step | multistep | cosine (per epoch)
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
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp {self.amp!r}; choose from {', '.join(AMP_DTYPES)}")
        if not self.tau > 0:
            raise ValueError(f"Expected `tau` > 0, but got {self.tau}")

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
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, info: DistInfo) -> torch.device:
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
        augment=cfg.augment if augment is None else augment, **cfg.dataset_options,
    )


def build_model(cfg: TrainConfig, bundle: DatasetBundle) -> FeatureClassifier:
    """Backbone → τ-sphere → head of ``cfg.method``, for the dataset of ``bundle``."""
    backbone, d = build_backbone(
        cfg.model, in_shape=bundle.in_shape, num_samples=len(bundle.train),
        feature_dim=cfg.feature_dim, small_input=cfg.small_input, width=cfg.width,
    )
    head = make_head(
        cfg.method, d, bundle.num_classes, delta=cfg.delta, solver=cfg.solver,
        backward=cfg.backward, update=cfg.update, rotation=cfg.rotation, seed=cfg.seed,
    )
    tau = cfg.tau if normalizes_features(cfg.method) else None
    return FeatureClassifier(backbone, head, tau=tau, amp_dtype=AMP_DTYPES[cfg.amp])


def _train_batch_size(cfg: TrainConfig, bundle: DatasetBundle) -> int:
    return cfg.batch_size or len(bundle.train)


# --------------------------------------------------------------------------- evaluation


def _quantiles(sorted_values: torch.Tensor, n: int = MARGIN_QUANTILES) -> list[float]:
    if sorted_values.numel() == 0:
        return []
    q = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.quantile(sorted_values.double(), q).tolist()


def _outputs(model: FeatureClassifier, loader, device: torch.device):
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, h = model(x)
        yield h, y, logits


@torch.no_grad()
def evaluate(model: FeatureClassifier, loader, K: int, device: torch.device) -> tuple[dict, Any]:
    """Every NC metric of ``model`` (eval mode) over ``loader``'s samples.

    Two passes as :class:`~gnc.metrics.NCStatistics` needs; the features and logits of the
    first are kept for the second when they fit in 2 GiB, otherwise the data is read twice.
    Returns ``(metrics without cos_margins, sorted cos_margins tensor)``.
    """
    was_training = model.training
    model.eval()
    stats: NCStatistics | None = None
    cache: list | None = []
    cached_bytes = 0
    for h, y, logits in _outputs(model, loader, device):
        if stats is None:
            stats = NCStatistics(K, h.shape[1], device=device)
        stats.update(h, y, logits)
        if cache is not None:
            cached_bytes += (h.numel() + logits.numel()) * h.element_size()
            cache = cache + [(h, y, logits)] if cached_bytes < 2**31 else None
    if stats is None:
        raise ValueError("evaluation loader produced no batches")
    W = model.head.weight.detach()
    b = model.head.bias
    b = torch.zeros(K, device=W.device, dtype=W.dtype) if b is None else b.detach()
    for h, y, logits in cache if cache is not None else _outputs(model, loader, device):
        stats.update_margins(h, y, W, b, logits)
    out = stats.compute(W, b)
    model.train(was_training)
    margins = out.pop("cos_margins")
    return out, margins


# --------------------------------------------------------------------------- checkpoints


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_finite_params(model: nn.Module) -> bool:
    return all(all_finite(p.detach()) for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the loop


class Trainer:
    """One run: model, data, optimiser and the run directory. Use :func:`train`."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False) -> None:
        cfg.validate()
        self.cfg, self.out = cfg, Path(out_dir)
        self.dist = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.dist)
        seed_everything(cfg.seed)
        self.bundle = load_data(cfg)
        self.eval_bundle = load_data(cfg, augment=False)
        self.K = self.bundle.num_classes
        self.model = build_model(cfg, self.bundle).to(self.device)
        if cfg.optimizer == "agd":  # AGD's step sizes assume its own initialisation
            agd_init_(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(
            cfg.optimizer, params, lr=cfg.lr, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = build_scheduler(
            cfg.schedule, self.optimizer, total_steps=cfg.epochs, milestones=cfg.milestones
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.ddp = self.model
        if self.dist.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None, broadcast_buffers=False,
            )
        common = {"num_replicas": self.dist.world_size, "rank": self.dist.rank,
                  "num_workers": cfg.num_workers, "pin_memory": self.device.type == "cuda"}
        self.train_loader = make_loader(
            self.bundle, _train_batch_size(cfg, self.bundle), drop_last=True, seed=cfg.seed,
            stratified=cfg.sampler == "stratified", shuffle=cfg.sampler == "shuffle", **common,
        )
        self.eval_loaders = {"train": make_loader(
            self.eval_bundle, cfg.eval_batch_size, split="train", **common)}
        if cfg.eval_test and self.eval_bundle.test is not None:
            self.eval_loaders["test"] = make_loader(
                self.eval_bundle, cfg.eval_batch_size, split="test", **common)
        self.epoch, self.step = 0, 0
        self.memory = PeakMemory(self.device)  # started by fit()
        self.writer = None
        if resume:
            self._resume()
        elif self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("")
        if self.dist.is_main:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tb"))

    # ----------------------------------------------------------------- checkpointing
    def _checkpoint(self) -> dict:
        return {
            "config": dataclasses.asdict(self.cfg), "epoch": self.epoch, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
        }

    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        ckpt = self._checkpoint()
        atomic_save(ckpt, self.out / "checkpoints" / "last.pt")
        if self._is_due(self.cfg.checkpoint_every):
            atomic_save(ckpt, self.out / "checkpoints" / f"epoch_{self.epoch:04d}.pt")

    def _is_due(self, every: int) -> bool:
        return bool(every) and self.epoch % every == 0

    def _resume(self) -> None:
        path = self.out / "checkpoints" / "last.pt"
        if not path.exists():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {path}")
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        saved = {k: v for k, v in ckpt["config"].items() if k not in ("epochs", "progress")}
        now = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k in saved}
        changed = sorted(k for k in saved if saved[k] != now[k])
        if changed:
            raise ValueError(f"cannot resume {self.out}: the configuration differs in {changed}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        if self.dist.is_main:  # drop lines of epochs after the checkpoint (a crash between)
            lines = (self.out / "metrics.jsonl").read_text().splitlines()
            keep = [ln for ln in lines if ln and json.loads(ln)["epoch"] <= self.epoch]
            (self.out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in keep))

    # ----------------------------------------------------------------- one epoch
    def train_epoch(self, bar) -> dict:
        model, device = self.model, self.device
        self.ddp.train()
        set_loader_epoch(self.train_loader, self.epoch)
        losses, t_fwd, t_bwd, correct, seen = [], [], [], 0, 0
        for x, y in self.train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _sync(device)
            t0 = time.perf_counter()
            try:
                logits, _ = self.ddp(x, y)
            except ValueError as err:  # the heads reject non-finite features
                if not all_finite_params(model):
                    raise self._diverged("the weights are NaN/Inf") from err
                raise
            loss = F.cross_entropy(logits, y)
            _sync(device)
            t1 = time.perf_counter()
            if not torch.isfinite(loss):
                raise self._diverged(f"the loss is {loss.item()}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if hasattr(model.head, "renormalize_"):
                model.head.renormalize_()
            _sync(device)
            t2 = time.perf_counter()
            self.step += 1
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            t_fwd.append((t1 - t0) * 1e3)
            t_bwd.append((t2 - t1) * 1e3)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", acc=f"{100 * correct / seen:.1f}")
        self.scheduler.step()
        self.epoch += 1
        loss_sum, correct, seen = self._all_reduce([sum(losses), correct, seen])
        return {
            "train_loss": loss_sum / (len(losses) * self.dist.world_size),
            "train_batch_top1": 100.0 * correct / seen,
            "time_forward_ms": statistics.fmean(t_fwd),
            "time_backward_ms": statistics.fmean(t_bwd),
            "time_forward_ms_median": statistics.median(t_fwd),
            "time_backward_ms_median": statistics.median(t_bwd),
        }

    def _all_reduce(self, values: list[float]) -> list[float]:
        """Sums over the ranks (the values themselves in a single process)."""
        if self.dist.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _diverged(self, what: str) -> FloatingPointError:
        return FloatingPointError(
            f"training diverged: {what} at epoch {self.epoch + 1}, step {self.step + 1} "
            "(try a smaller --lr); the last checkpoint is kept"
        )

    def evaluate_epoch(self, row: dict) -> dict:
        for split, loader in self.eval_loaders.items():
            metrics, margins = evaluate(self.model, loader, self.K, self.device)
            prefix = "" if split == "train" else "test_"
            row.update({prefix + k: v for k, v in metrics.items()})
            row[prefix + "cos_margins"] = _quantiles(margins)
            if split == "train" and self.dist.is_main:
                np.save(self.out / "cos_margins.npy", margins.numpy())
        return row

    def log(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        steps = len(self.train_loader)
        if steps == 0:
            raise ValueError("the training loader has no batches (batch size above the data?)")
        bar = tqdm(total=cfg.epochs * steps, initial=self.epoch * steps, unit="step",
                   disable=not (cfg.progress and self.dist.is_main), dynamic_ncols=True,
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


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False) -> dict:
    """Train one run into ``out_dir`` (see the module docstring); returns the last metrics."""
    return Trainer(cfg, out_dir, resume=resume).fit()


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[TrainConfig, FeatureClassifier,
                                                                  dict]:
    """The config, the model (from ``checkpoints/last.pt``) and the checkpoint of a run."""
    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / "config.json", run_dir / "checkpoints" / "last.pt"
    for p in (cfg_path, ckpt_path):
        if not p.exists():
            raise FileNotFoundError(f"not a run directory: {p} is missing")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    dev = resolve_device(device, DistInfo())
    bundle = load_data(cfg, augment=False)
    model = build_model(cfg, bundle).to(dev)
    ckpt = torch.load(ckpt_path, map_location=dev, weights_only=False)
    model.load_state_dict(ckpt["model"])
    return cfg, model, {"bundle": bundle, "epoch": ckpt["epoch"], "device": dev}


def evaluate_run(run_dir: str | Path, split: str = "train", device: str = "auto") -> dict:
    """NC metrics of a run's last checkpoint on ``split`` (``gnc evaluate``)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    cfg, model, info = load_run(run_dir, device)
    bundle = info["bundle"]
    if split == "test" and bundle.test is None:
        raise ValueError(f"dataset '{cfg.dataset}' has no test split")
    loader = make_loader(bundle, cfg.eval_batch_size, split=split)
    metrics, margins = evaluate(model, loader, bundle.num_classes, info["device"])
    metrics["epoch"] = info["epoch"]
    metrics["cos_margins"] = _quantiles(margins)
    return metrics
