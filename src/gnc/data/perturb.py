"""Training-split perturbations for any dataset: a long tail and label noise.

Both change only the training split (the test split stays as it is: balanced and clean) and
are seeded, so the three methods of one seed train on the same data.

**Long tail** (imbalance ratio ``R``, the released code's ``imb_factor``, exponential
profile): class ``c`` keeps

    n_c = ⌊n_max · R^{c/(K−1)}⌋ samples,   c = 0..K−1,

a seeded choice among its samples, where ``n_max`` is the size of the largest class (on a
balanced set, the released code's ``len(data)/K``); a class smaller than ``n_c`` keeps all
its samples. Class 0 is the head, class K−1 the tail (``n_max·R``): CIFAR-10 with R = 0.01
gives 5000, 2997, ..., 83, 50. The released code draws the choice with NumPy seed 0 for every
run; here it follows the run's seed, as ``subset`` does.

**Label noise** (rate ``p``): ``⌊p·N⌋`` training samples, chosen uniformly without
replacement, get a label drawn uniformly from all K classes — the old label included, as in
the released code's ``add_label_noise`` (which it applies to MNIST-1D only). So about
``⌊p·N⌋·(K−1)/K`` labels actually change; :attr:`DatasetBundle.noisy_indices` lists the
re-drawn positions and :attr:`DatasetBundle.clean_targets` the labels before.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from .base import DatasetBundle
from .sampler import _tensors_of

__all__ = [
    "RelabelledDataset",
    "apply_imbalance",
    "apply_label_noise",
    "check_rates",
    "long_tailed_counts",
]

# Stream tags of the seeded generators, so the long-tail choice and the noise draw differ
# while both are functions of the run's seed alone.
_IMBALANCE_STREAM, _NOISE_STREAM = 1, 2


class RelabelledDataset(Dataset):
    """``dataset`` with its labels replaced: item ``i`` is ``(dataset[i][0], targets[i])``.

    The device-resident image path (:mod:`gnc.data.device`) reads :attr:`targets` in place of
    the labels stored with the pixels.
    """

    def __init__(self, dataset: Dataset, targets: Tensor) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if len(targets) != n:
            raise ValueError(f"Expected {n} labels (one per sample), but got {len(targets)}")
        self.dataset, self.targets = dataset, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.dataset[i][0], self.targets[i]


def long_tailed_counts(class_sizes: Sequence[int] | Tensor | np.ndarray, ratio: float
                       ) -> list[int]:
    """Samples kept per class: ``min(size_c, ⌊n_max·R^{c/(K−1)}⌋)`` (module docstring).

    Args:
        class_sizes: ``(K,)`` samples per class in the split.
        ratio: R in (0, 1]; 1 keeps every class whole.
    """
    _check_rate("imbalance", ratio, low_open=True)
    sizes = [int(s) for s in np.asarray(class_sizes)]
    K, n_max = len(sizes), max(sizes)
    if K < 2:
        return sizes
    return [min(s, math.floor(n_max * ratio ** (c / (K - 1)))) for c, s in enumerate(sizes)]


def check_rates(imbalance: float, label_noise: float) -> None:
    """Raise ``ValueError`` unless ``0 < imbalance <= 1`` and ``0 <= label_noise <= 1``."""
    _check_rate("imbalance", imbalance, low_open=True)
    _check_rate("label_noise", label_noise, low_open=False)


def _check_rate(name: str, value: float, *, low_open: bool) -> None:
    bounds = "0 < R <= 1" if low_open else "0 <= p <= 1"
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Expected `{name}` to be a number in {bounds}, but got {value!r}")
    if not (math.isfinite(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)):
        raise ValueError(f"Expected `{name}` in {bounds}, but got {value}")


def _tensors(ds: Dataset) -> tuple[Tensor, Tensor] | None:
    """``(x, y)`` of an in-memory split (a ``TensorDataset`` or a ``Subset`` of one)."""
    tensors = _tensors_of(ds)
    return tensors if tensors is not None and len(tensors) == 2 else None


def _take(bundle: DatasetBundle, idx: Tensor) -> Dataset:
    """The training split restricted to ``idx`` (sorted positions).

    In-memory tensor splits stay one ``TensorDataset`` (the fast batch path); for ``ufm``,
    whose input is the sample index into the free-feature table, the kept samples are
    renumbered ``0..n−1`` so the table (sized by the split) matches them.
    """
    ds = bundle.train
    tensors = _tensors(ds)
    if tensors is not None:
        x, y = tensors
        if bundle.in_shape == ():
            return TensorDataset(torch.arange(len(idx)), y[idx])
        return TensorDataset(x[idx], y[idx])
    if bundle.in_shape == ():
        raise ValueError(f"dataset '{bundle.name}': cannot subsample an index dataset that "
                         "is not a TensorDataset")
    return Subset(ds, idx.tolist())


def apply_imbalance(bundle: DatasetBundle, ratio: float, *, seed: int = 0) -> DatasetBundle:
    """Make the training split long-tailed with ratio R (module docstring); in place.

    ``ratio == 1`` leaves the bundle as it is. Raises ``ValueError`` when a class would keep
    no sample (raise R, or use a larger dataset).
    """
    _check_rate("imbalance", ratio, low_open=True)
    if ratio == 1:
        return bundle
    targets, K = bundle.train_targets, bundle.num_classes
    sizes = torch.bincount(targets, minlength=K)
    keep = long_tailed_counts(sizes, ratio)
    empty = [c for c, n in enumerate(keep) if n == 0]
    if empty:
        raise ValueError(
            f"imbalance {ratio} leaves class(es) {empty[:10]} of dataset '{bundle.name}' with no "
            f"training sample (largest class: {int(sizes.max())}); choose a larger imbalance "
            "ratio"
        )
    rng = np.random.default_rng([seed, _IMBALANCE_STREAM])
    y = targets.numpy()
    chosen = [rng.permutation(np.flatnonzero(y == c))[:n] for c, n in enumerate(keep)]
    idx = torch.as_tensor(np.sort(np.concatenate(chosen)), dtype=torch.long)
    bundle.train = _take(bundle, idx)
    bundle.train_targets = targets[idx]
    return bundle


def apply_label_noise(bundle: DatasetBundle, rate: float, *, seed: int = 0) -> DatasetBundle:
    """Re-draw ``⌊p·N⌋`` training labels uniformly over the K classes (module docstring).

    In place; sets :attr:`DatasetBundle.noisy_indices` (sorted) and
    :attr:`DatasetBundle.clean_targets`. ``rate == 0`` leaves the bundle as it is.
    """
    _check_rate("label_noise", rate, low_open=False)
    if rate == 0:
        return bundle
    clean = bundle.train_targets
    n = len(clean)
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    idx = np.sort(rng.choice(n, size=math.floor(rate * n), replace=False))
    noisy = clean.clone()
    noisy[idx] = torch.as_tensor(rng.integers(0, bundle.num_classes, size=len(idx)),
                                 dtype=torch.long)
    emptied = sorted(set(clean.unique().tolist()) - set(noisy.unique().tolist()))
    if emptied:  # as apply_imbalance: every class the split had keeps a training sample
        raise ValueError(
            f"label noise {rate} leaves class(es) {emptied[:10]} of dataset '{bundle.name}' "
            f"with no training label (seed {seed}, {n} samples); lower the noise rate or use "
            "more samples")
    ds = bundle.train
    tensors = _tensors(ds)
    if tensors is not None:  # stay on the fast in-memory batch path
        bundle.train = TensorDataset(tensors[0], noisy)
    else:
        bundle.train = RelabelledDataset(ds, noisy)
    bundle.train_targets = noisy
    bundle.noisy_indices = torch.as_tensor(idx, dtype=torch.long)
    bundle.clean_targets = clean
    return bundle
