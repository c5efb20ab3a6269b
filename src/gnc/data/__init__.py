"""Datasets (a registry loaded by name) and class-stratified, distributed batch sampling."""

from .base import DatasetBundle, DatasetNotFoundError, stratified_subset
from .datasets import DATASETS, load_dataset
from .sampler import (
    ShardSampler,
    StratifiedBatchSampler,
    batch_sampler_for,
    make_loader,
    set_loader_epoch,
)

__all__ = [
    "DATASETS",
    "DatasetBundle",
    "DatasetNotFoundError",
    "ShardSampler",
    "StratifiedBatchSampler",
    "batch_sampler_for",
    "load_dataset",
    "make_loader",
    "set_loader_epoch",
    "stratified_subset",
]
