"""What every dataset loader returns, and helpers shared by the loaders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DatasetBundle", "DatasetNotFoundError", "stratified_subset"]


SPLITS = ("train", "test")


def check_split(split: str) -> None:
    """``ValueError`` unless ``split`` names a split of a :class:`DatasetBundle`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing (and downloading was not asked for)."""


@dataclass
class DatasetBundle:
    """A loaded dataset: the splits and what a model and a sampler need to know about them."""

    train: Dataset
    """Training split; items are ``(x, y)``."""
    test: Dataset | None
    """Test split, or None when the dataset has none (``ufm``, an npz without ``x_test``, an
    ``imagefolder:`` tree without ``test/``)."""
    num_classes: int
    """K; labels are ``0..K-1``."""
    in_shape: tuple[int, ...]
    """Shape of one ``x`` (without batch dimension); ``()`` for ``ufm``."""
    train_targets: Tensor
    """LongTensor ``(len(train),)`` of the training labels, in dataset order (for samplers)."""
    name: str
    """The name the bundle was loaded under, e.g. ``"cifar10"`` or ``"npz:data/x.npz"``."""
    classes: tuple[str, ...] | None = None
    """Class names when the source has them."""
    noisy_indices: Tensor | None = None
    """With label noise: the sorted positions in ``train`` whose label was re-drawn (some
    re-drawn labels equal the old one; see :mod:`gnc.data.perturb`)."""
    clean_targets: Tensor | None = None
    """With label noise: the training labels before the noise (``train_targets`` holds the
    noisy ones, which training and the train-split metrics use)."""


# --------------------------------------------------------------------------- helpers


def stratified_subset(targets: Tensor, per_class: int, *, seed: int = 0) -> Tensor:
    """Indices of a seeded stratified subset: ``per_class`` samples of every class.

    A class with fewer than ``per_class`` samples contributes all of them. The result is sorted
    (dataset order), so a subset of a subset stays reproducible.

    Args:
        targets: ``(N,)`` integer labels.
        per_class: samples to keep per class (≥ 1).
        seed: seed of the choice.

    Returns:
        LongTensor of indices into ``targets``.
    """
    if per_class < 1:
        raise ValueError(f"Expected `subset` (samples per class) >= 1, but got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        perm = torch.randperm(len(idx), generator=gen)
        chosen.append(idx[perm[:per_class]])
    return torch.sort(torch.cat(chosen)).values


def as_long(targets: Sequence[int] | np.ndarray | Tensor) -> Tensor:
    """Labels as a flat LongTensor on the CPU."""
    if isinstance(targets, Tensor):
        return targets.detach().to("cpu", torch.long).flatten()
    return torch.as_tensor(np.asarray(targets), dtype=torch.long).flatten()


def tensor_bundle(
    name: str,
    x: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    x_test: np.ndarray | Tensor | None,
    y_test: np.ndarray | Tensor | None,
    num_classes: int,
) -> DatasetBundle:
    """A bundle of in-memory ``TensorDataset`` splits (items ``(x, y)``)."""
    xt, yt = torch.as_tensor(x), as_long(y)
    train = TensorDataset(xt, yt)
    test = None
    if x_test is not None and y_test is not None:
        test = TensorDataset(torch.as_tensor(x_test), as_long(y_test))
    return DatasetBundle(train, test, num_classes, tuple(xt.shape[1:]), yt, name)


def as_float32(a: np.ndarray) -> np.ndarray:
    """A contiguous float32 copy (or view) of ``a``."""
    return np.ascontiguousarray(a, dtype=np.float32)
