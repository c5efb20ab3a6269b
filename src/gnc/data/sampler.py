"""Class-stratified (and distributed) batch sampling, and a DataLoader factory.

The nearest-ETF head estimates class means from each batch, so every batch should hold every
class, in equal proportion: :class:`StratifiedBatchSampler` does that, split across ranks so
that the ranks together see exactly the single-process batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    Sampler,
    Subset,
    TensorDataset,
)

from .base import DatasetBundle, as_long, check_split

logger = logging.getLogger(__name__)

# The streams of an epoch's randomness (epoch_seed's last word): a data order, augmentation
ORDER, AUGMENTATION = 0, 1


def epoch_seed(seed: int, epoch: int, stream: int = ORDER, rank: int = 0) -> int:
    """The seed of one epoch's ``stream`` of randomness (on ``rank``): a hash of all four
    (NumPy's ``SeedSequence``). ``seed + epoch`` made seed s at epoch e replay seed s+1's
    order of epoch e − 1: the seeds of an experiment shared one sequence of batches."""
    words = [seed, epoch, stream] + ([rank] if rank else [])
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1  # 63 bits: torch takes a non-negative int64


__all__ = [
    "ShardSampler",
    "StratifiedBatchSampler",
    "TensorBatchLoader",
    "batch_sampler_for",
    "epoch_seed",
    "make_loader",
    "set_loader_epoch",
]


class StratifiedBatchSampler(Sampler[list[int]]):
    r"""Batches with every class in equal proportion, reshuffled every epoch.

    With K classes, a (global) batch holds ``p = batch_size // K`` samples of every class, so
    its size is ``K·p`` (= ``batch_size`` when K divides it; otherwise the remainder
    ``batch_size mod K`` is left out). In epoch e (see :meth:`set_epoch`) each class's indices
    are permuted with a generator seeded by :func:`epoch_seed` ``(seed, e)`` and cut into
    consecutive chunks of p;
    batch b takes chunk b of every class, in a shuffled order. Hence every sample appears at
    most once per epoch, and the order is a pure function of ``(labels, batch_size, seed,
    epoch)``.

    Epoch length: ``n_min // p`` batches where ``n_min`` is the size of the smallest class
    (one more, partial but still balanced batch of ``n_min mod p`` per class when
    ``drop_last=False``). With balanced classes whose size p divides, every sample is used
    exactly once per epoch; larger classes contribute a fresh random ``n_min``-sample share each
    epoch (the rest waits for later epochs), so imbalanced data is effectively class-balanced.

    Full batch: a ``batch_size`` of at least N (the number of samples) gives one batch of all
    N samples per epoch, shuffled, whatever the class sizes (on R ranks, rank r takes positions
    ``r, r+R, …`` of it). Otherwise a ``batch_size`` that K does not divide is reduced to
    ``K·p`` with one logged warning, and when the smallest class cannot fill one batch
    (``n_min < p`` with ``drop_last``) construction raises ``ValueError``.

    Distributed: with ``num_replicas = R``, rank r gets ``p/R`` samples of every class from
    each global batch (the class chunk's elements ``r, r+R, r+2R, …``), so the union over ranks
    of their batch b is exactly the single-process batch b for the same seed and epoch. ``p``
    must be divisible by R. With ``drop_last=False`` the partial last batch keeps a multiple of
    R per class (the surplus ``< R`` samples per class are skipped) so all ranks get equal,
    balanced batches; it is omitted when nothing remains.

    Args:
        labels: ``(N,)`` integer labels of the dataset, in dataset order.
        batch_size: global batch size (all ranks together), at least K.
        seed: base seed of the shuffling.
        num_replicas: number of ranks R.
        rank: this rank, in ``[0, R)``.
        drop_last: drop the partial last batch.

    Example:
        >>> s = StratifiedBatchSampler(torch.tensor([0, 0, 1, 1, 2, 2]), 3)
        >>> [sorted(b) for b in s]  # one sample of each class per batch
        [[0, 2, 4], [1, 3, 5]]
    """

    def __init__(
        self,
        labels: Tensor | Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        labels = as_long(labels)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"Expected 0 <= `rank` < `num_replicas`, but got rank {rank} of {num_replicas}"
            )
        classes = torch.unique(labels)
        k = len(classes)
        if k == 0:
            raise ValueError("the stratified sampler needs at least one labelled sample")
        self.batch_size = batch_size
        self.num_classes = k
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self.full_batch = batch_size >= len(labels)
        if self.full_batch:  # one batch of every sample, whatever the class sizes
            if len(labels) % num_replicas:  # DDP averages ranks alike: shards must be equal
                raise ValueError(
                    f"a full batch of {len(labels)} samples does not split evenly over "
                    f"{num_replicas} ranks (each rank's mean would weigh its samples "
                    f"differently); use a number of ranks that divides {len(labels)}")
            self.per_class = 0
            self._counts = [len(labels)]
            return
        if batch_size < k:
            raise ValueError(
                f"batch size {batch_size} is smaller than the number of classes {k}; the "
                "stratified sampler needs at least one sample per class per batch"
            )
        per_class = batch_size // k
        if per_class % num_replicas:
            raise ValueError(
                f"batch size {batch_size} gives {per_class} samples per class, which does not "
                f"split evenly over {num_replicas} ranks; choose a batch size whose per-class "
                f"count ({k} classes) is a multiple of {num_replicas}"
            )
        self.per_class = per_class
        self._class_indices = [torch.nonzero(labels == c).flatten() for c in classes]
        n_min = min(len(idx) for idx in self._class_indices)
        if drop_last and n_min < per_class:
            raise ValueError(
                f"batch size {batch_size} takes {per_class} samples of each of the {k} classes, "
                f"but the smallest class has only {n_min}: no batch can be formed; choose a "
                f"batch size of at most {k * n_min}, or one of at least {len(labels)} (the full "
                "batch)"
            )
        if batch_size % k:
            logger.warning(
                "batch size %d is not a multiple of the %d classes: the stratified batches "
                "hold %d samples (%d per class)", batch_size, k, k * per_class, per_class,
            )
        self._counts = [per_class] * (n_min // per_class)  # per-class count of each batch
        rest = n_min % per_class
        rest -= rest % num_replicas
        if not drop_last and rest > 0:
            self._counts.append(rest)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (:func:`epoch_seed`)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._counts)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.full_batch:
            batch = torch.randperm(self._counts[0], generator=gen)
            yield batch[self.rank :: self.num_replicas].tolist()
            return
        perms = [idx[torch.randperm(len(idx), generator=gen)] for idx in self._class_indices]
        start = 0
        for count in self._counts:
            parts = [p[start : start + count][self.rank :: self.num_replicas] for p in perms]
            batch = torch.cat(parts)  # (K·count/R,), class by class
            start += count
            # same length on every rank, so the generators stay in step across ranks
            yield batch[torch.randperm(len(batch), generator=gen)].tolist()


class ShardSampler(Sampler[int]):
    """Every index once per epoch, optionally shuffled, split over ranks without padding.

    Rank r takes positions ``r, r+R, …`` of the (shuffled by :func:`epoch_seed`, or
    sequential) order, so ranks differ by at most one sample and no sample is duplicated
    (unlike ``DistributedSampler``, which pads) — what evaluation needs. ``even``: the order
    is first cut to a multiple of R, so every rank has as many samples (training: ranks with
    different numbers of steps wait for each other forever in DDP's collectives).

    Args:
        num_samples: dataset length N.
        shuffle: shuffle each epoch.
        seed: base seed.
        num_replicas: number of ranks R.
        rank: this rank.
        even: every rank gets ``N // R`` samples (the last ``N mod R`` of the order are left
            out this epoch).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        even: bool = False,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"Expected 0 <= `rank` < `num_replicas`, but got rank {rank} of {num_replicas}"
            )
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.even = even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (the shuffle is seeded by :func:`epoch_seed`)."""
        self.epoch = epoch

    def _used(self) -> int:
        n, r = self.num_samples, self.num_replicas
        return n - n % r if self.even else n

    def __len__(self) -> int:
        return len(range(self.rank, self._used(), self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=gen)
        else:
            order = torch.arange(self.num_samples)
        return iter(order[: self._used()][self.rank :: self.num_replicas].tolist())


def _tensors_of(dataset: Dataset) -> tuple[Tensor, ...] | None:
    """The tensors behind an in-memory dataset (a ``TensorDataset`` or a ``Subset`` of one)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        idx = torch.as_tensor(dataset.indices, dtype=torch.long)
        return tuple(t[idx] for t in dataset.dataset.tensors)
    return None


class TensorBatchLoader:
    """A DataLoader stand-in for in-memory tensors: each batch is one indexing operation.

    ``DataLoader`` fetches and collates samples one by one, which costs more than a whole
    full-batch UFM step; this yields ``tuple(t[batch] for t in tensors)`` for the batches of
    ``batch_sampler`` instead, with the same ``batch_sampler``/``sampler``/``generator``
    attributes, so :func:`set_loader_epoch` works on it.
    """

    def __init__(self, tensors: Sequence[Tensor], batch_sampler: Sampler[list[int]],
                 generator: torch.Generator) -> None:
        self.tensors, self.batch_sampler, self.generator = tuple(tensors), batch_sampler, generator
        self.sampler = getattr(batch_sampler, "sampler", batch_sampler)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for batch in self.batch_sampler:
            idx = torch.as_tensor(batch, dtype=torch.long)
            yield tuple(t[idx] for t in self.tensors)


def make_loader(
    data: Dataset | DatasetBundle,
    batch_size: int,
    *,
    split: str = "train",
    labels: Tensor | None = None,
    stratified: bool = False,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader | TensorBatchLoader:
    """A DataLoader over a dataset (or a bundle's split) with a seeded, rank-aware sampler;
    for in-memory tensors with ``num_workers=0``, a :class:`TensorBatchLoader` (the same
    batches, without a worker or a collate per sample).

    Args:
        data: a ``Dataset``, or a :class:`DatasetBundle` whose ``split`` is used.
        batch_size: *global* batch size (all ranks together).
        split: ``"train"`` or ``"test"`` when ``data`` is a bundle.
        labels: labels for ``stratified`` (default: the bundle's ``train_targets``).
        stratified: use :class:`StratifiedBatchSampler` (class-balanced batches).
        shuffle: otherwise, shuffle every epoch (:class:`ShardSampler`); per-rank batches are
            ``batch_size // num_replicas`` with ``drop_last`` (training, which needs R to
            divide it), else ``ceil(batch_size / num_replicas)``.
        drop_last: drop the last incomplete batch.
        seed: base seed of the order and of the worker RNGs.
        num_replicas, rank: distributed split.
        num_workers, pin_memory: passed to ``DataLoader``.

    Call :func:`set_loader_epoch` before every epoch for a new (deterministic) order.
    """
    if isinstance(data, DatasetBundle):
        check_split(split)
        dataset = data.train if split == "train" else data.test
        if dataset is None:
            raise ValueError(f"dataset '{data.name}' has no {split} split")
        if labels is None and split == "train":
            labels = data.train_targets
    else:
        dataset = data
    gen = torch.Generator().manual_seed(seed)
    batches = batch_sampler_for(
        len(dataset), batch_size, labels=labels, stratified=stratified, shuffle=shuffle,
        drop_last=drop_last, seed=seed, num_replicas=num_replicas, rank=rank,
    )
    tensors = _tensors_of(dataset) if num_workers == 0 else None
    if tensors is not None:
        return TensorBatchLoader(tensors, batches, gen)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      pin_memory=pin_memory, generator=gen)


def batch_sampler_for(
    num_samples: int,
    batch_size: int,
    *,
    labels: Tensor | None = None,
    stratified: bool = False,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
) -> Sampler[list[int]]:
    """The batch sampler of :func:`make_loader` (same arguments): the order of every loader."""
    if stratified:
        if labels is None:
            raise ValueError("a stratified loader needs `labels` (or a bundle's train split)")
        if shuffle:
            raise ValueError("`stratified` batches are always shuffled; leave `shuffle` False")
        return StratifiedBatchSampler(
            labels, batch_size, seed=seed, num_replicas=num_replicas, rank=rank,
            drop_last=drop_last,
        )
    if batch_size % num_replicas and drop_last:  # training: every rank's batch alike
        raise ValueError(f"batch size {batch_size} does not split evenly over {num_replicas} ranks")
    # evaluation (not drop_last) needs no even split: ceil(B/R) a rank, the ranks' last
    # batches shorter (ShardSampler's shards differ by at most one sample)
    shard = ShardSampler(
        num_samples, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank,
        even=drop_last,
    )
    return BatchSampler(shard, -(-batch_size // num_replicas), drop_last)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of a :func:`make_loader` loader: its sampler's order and worker seeds.

    Worker RNGs (``num_workers > 0``) and a device loader's crops and flips are then seeded
    from ``(seed, epoch, rank)`` (:func:`epoch_seed`), so a resumed run draws the same
    augmentations and the ranks of a DDP run draw different ones (the same seed on every rank
    gave position i of every rank's batch the same crop and flip). A ``DataLoader`` with
    ``num_workers=0`` runs its transforms in this process, on torch's global CPU RNG, which
    every rank seeded alike: on more than one rank that RNG is reseeded from
    ``(seed, epoch, rank)`` too (one process keeps its RNG as it is, so its runs are unchanged).
    """
    candidates = (loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None),
                  loader.sampler)
    sampler = next((s for s in candidates if hasattr(s, "set_epoch")), None)
    if sampler is None:
        raise ValueError("the loader's sampler has no `set_epoch`; build it with make_loader")
    sampler.set_epoch(epoch)
    rank = getattr(sampler, "rank", 0)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(sampler.seed, epoch, AUGMENTATION, rank))
    if (isinstance(loader, DataLoader) and loader.num_workers == 0
            and getattr(sampler, "num_replicas", 1) > 1):
        torch.default_generator.manual_seed(epoch_seed(sampler.seed, epoch, AUGMENTATION, rank))
