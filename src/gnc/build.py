"""What a :class:`~gnc.config.TrainConfig` builds: its data, its model, its loaders.

Used by the training loop, by loading a saved run (:mod:`gnc.evaluation`), by ``gnc
measure`` and by the benchmarks, so all of them build the same model from the same config.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from gnc.config import TrainConfig
from gnc.data import DatasetBundle, batch_sampler_for, load_dataset, make_loader
from gnc.data.device import DeviceImageLoader, device_images, estimated_bytes, fits_on_device
from gnc.data.sampler import TensorBatchLoader
from gnc.heads import StandardHead, make_head, method_spec, normalizes_features
from gnc.models import build_backbone, without_bn_affine
from gnc.models.classifier import FeatureClassifier
from gnc.optim import (
    PER_STEP_SCHEDULES,
    agd_init_,
    build_optimizer,
    build_scheduler,
    embedding_weights,
)
from gnc.runtime import DistInfo

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_data(cfg: TrainConfig, *, augment: bool | None = None) -> DatasetBundle:
    """The dataset of ``cfg`` (training augmentation as ``cfg.augment`` unless given)."""
    bundle = load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
        augment=cfg.augment if augment is None else augment, imbalance=cfg.imbalance,
        label_noise=cfg.label_noise, **cfg.dataset_options,
    )
    if bundle.num_classes < 2:  # every head and the NC metrics need two (else: at the first
        raise ValueError(  # evaluation, after the run directory was made)
            f"dataset {cfg.dataset} has {bundle.num_classes} class: a classifier needs 2 or more")
    return bundle


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
    if method_spec(cfg.method).head is not StandardHead and d < bundle.num_classes:
        raise ValueError(
            f"the {cfg.method} head needs feature dimension d >= K, but the {cfg.model} "
            f"backbone gives d={d} for K={bundle.num_classes} classes ("
            + (f"--feature-dim {cfg.feature_dim}" if cfg.feature_dim is not None
               else f"its own output at --width {cfg.width}")
            + f"): give --feature-dim >= {bundle.num_classes}")
    head = make_head(
        cfg.method, d, bundle.num_classes, delta=cfg.delta, solver=cfg.solver,
        backward=cfg.backward, update=cfg.update, rotation=cfg.rotation, seed=cfg.seed,
        solve_device=cfg.solve_device, bias=cfg.bias, polar_method=cfg.polar_method,
        ns_fallback=False,  # the loop reads no residual per step; it logs the epoch's largest
    )
    tau = cfg.tau if normalizes_features(cfg.method) else None
    model = FeatureClassifier(backbone, head, tau=tau, amp_dtype=AMP_DTYPES[cfg.amp])
    model = model.to(device)
    if cfg.channels_last and len(bundle.in_shape) == 3:
        model.backbone.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.backbone.compile()
    return model


def train_batch_size(cfg: TrainConfig, bundle: DatasetBundle) -> int:
    """The global training batch size: ``cfg.batch_size``, where 0 or anything above the
    training split's N means the full batch of all N samples (one step per epoch)."""
    n = len(bundle.train)
    if cfg.batch_size > n:
        logger.warning("batch size %d is above the %d training samples: one full batch "
                       "per epoch", cfg.batch_size, n)
    return min(cfg.batch_size, n) if cfg.batch_size else n


def make_train_loaders(cfg: TrainConfig, bundle: DatasetBundle, eval_bundle: DatasetBundle,
                       device: torch.device, dist_info: DistInfo,
                       model: nn.Module | None = None) -> tuple[Any, dict]:
    """The training loader and the evaluation loaders (``train``, and ``test`` if any).

    Image data lives on the device (:mod:`gnc.data.device`) when ``cfg.data_on_device`` is
    ``on``, or ``auto`` on a GPU that holds it; tensor datasets are moved to a GPU whole.
    ``model``: refused (``ValueError``) when it has BatchNorm and a process's training batch
    holds one sample, which BatchNorm cannot normalise (before, the first step failed with
    torch's message, after the run directory was made).
    """
    ranks = {"num_replicas": dist_info.world_size, "rank": dist_info.rank}
    batch = train_batch_size(cfg, bundle)
    stratified = cfg.sampler == "stratified"
    K = bundle.num_classes
    per_rank = ((batch // K) * K if stratified else batch) // dist_info.world_size
    if per_rank == 1 and model is not None and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(f"a training batch of one sample per process (--batch-size "
                         f"{cfg.batch_size}): the model's BatchNorm needs at least 2")
    if stratified and cfg.imbalance < 1 and batch < len(bundle.train):
        logger.warning("--imbalance %g with stratified batches: every batch holds each class "
                       "alike, so an epoch ends when the smallest class runs out and trains "
                       "class-balanced; --sampler shuffle trains on the long tail",
                       cfg.imbalance)
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


def build_training_optimizer(cfg: TrainConfig, model: FeatureClassifier) -> torch.optim.Optimizer:
    """The optimiser of ``cfg`` over ``model``'s trainable parameters; for AGD first its own
    initialisation, which its step sizes assume (``lr`` is AGD's gain)."""
    if cfg.optimizer == "agd":
        if cfg.weight_decay:
            logger.warning("agd has no weight decay: --weight-decay %g has no effect (give 0)",
                           cfg.weight_decay)
        agd_init_(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return build_optimizer(cfg.optimizer, params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, gain=cfg.lr,
                           transposed=embedding_weights(model))


def build_training_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                             steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of ``cfg``: over ``epochs × steps_per_epoch`` optimiser steps for the
    per-step schedules (onecycle), over ``epochs`` epochs for the others."""
    per_step = cfg.schedule in PER_STEP_SCHEDULES
    return build_scheduler(
        cfg.schedule, optimizer, milestones=cfg.milestones, gamma=cfg.gamma,
        step_size=cfg.step_every,
        total_steps=cfg.epochs * (max(steps_per_epoch, 1) if per_step else 1))
