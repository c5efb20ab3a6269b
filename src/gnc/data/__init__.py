"""Datasets (a registry loaded by name), long-tail and label-noise perturbations of their
training splits, and class-stratified, distributed batch sampling."""

from .base import SPLITS, DatasetBundle, DatasetNotFoundError, check_split, stratified_subset
from .datasets import DATASETS, load_dataset
from .perturb import RelabelledDataset, apply_imbalance, apply_label_noise, long_tailed_counts
from .sampler import (
    ShardSampler,
    StratifiedBatchSampler,
    batch_sampler_for,
    make_loader,
    set_loader_epoch,
)

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetBundle",
    "DatasetNotFoundError",
    "RelabelledDataset",
    "ShardSampler",
    "StratifiedBatchSampler",
    "apply_imbalance",
    "apply_label_noise",
    "batch_sampler_for",
    "check_split",
    "load_dataset",
    "long_tailed_counts",
    "make_loader",
    "set_loader_epoch",
    "stratified_subset",
]
