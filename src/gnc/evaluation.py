"""Evaluation of a model as it is: precise statistics, then every NC metric (DESIGN §5).

Two running averages trail a network in training: BatchNorm's running mean and variance
(momentum 0.1) and the ETF heads' running global mean ``μ_G`` (their bias is ``−W μ_G``; late
in training an average over ~10⁴ steps). Early in training both lag far enough that every
sample lands in one class. :func:`recompute_statistics` replaces them by their values over
the training split — "precise BN" as in pycls and detectron2, and the exact ``μ_G`` — and
stores them in the model, so a saved checkpoint's ``eval()`` logits equal the logged ones.
``eval_stats="running"`` (the paper's protocol) evaluates the running averages as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from gnc.checkpoint import atomic_save
from gnc.metrics import NCStatistics, etf_distances
from gnc.models.classifier import FeatureClassifier

__all__ = ["EVAL_STATS", "classifier_path", "etf_distances_of", "evaluate", "quantiles",
           "recompute_statistics", "save_classifier"]

EVAL_STATS = ("precise", "running")
MARGIN_QUANTILES = 101  # points of the sorted cosine margins kept per metrics line


def quantiles(sorted_values: Tensor, n: int = MARGIN_QUANTILES) -> list[float]:
    """``n`` evenly spaced quantiles of a 1-D tensor (float64), ``[]`` when it is empty."""
    if sorted_values.numel() == 0:
        return []
    q = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.quantile(sorted_values.double().cpu(), q).tolist()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _mean_over_ranks(t: Tensor) -> None:
    if _distributed():
        dist.all_reduce(t)
        t /= dist.get_world_size()


@torch.no_grad()
def recompute_bn(module: nn.Module, loader, device: torch.device,
                 forward: Callable[[Tensor], Any] | None = None) -> None:
    """"Precise BN": every BatchNorm of ``module`` gets, as running statistics, the cumulative
    average (momentum None) of its batch statistics over one pass of ``loader``.

    Only the BN layers are put in training mode (the caller puts the rest in eval mode);
    ``forward`` (default ``module``) maps a batch of inputs through them. Under DDP the ranks'
    results are averaged. Momenta and eval mode come back even when a batch fails.
    """
    bns = bn_layers(module)
    if not bns:
        return
    forward = module if forward is None else forward
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for batch in loader:
            forward(batch[0].to(device, non_blocking=True))
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            m.eval()
    for m in bns:
        _mean_over_ranks(m.running_mean)
        _mean_over_ranks(m.running_var)


@torch.no_grad()
def recompute_statistics(model: FeatureClassifier, loader, device: torch.device,
                         mean_loader=None) -> None:
    """Set BatchNorm's running statistics from ``loader`` and the ETF head's ``μ_G`` from
    ``mean_loader`` (default: ``loader``).

    BatchNorm: :func:`recompute_bn` over the backbone. Give it training batches *as trained
    on* (augmented), as pycls and detectron2 do: the layers after a BN learnt to expect the
    statistics of augmented batches, and statistics of un-augmented images (zero-padded
    crops change them) cost CIFAR-10 three points of train accuracy at the end of training.
    ``μ_G``: the mean of the normalised features over ``mean_loader`` in eval mode, with the
    new BN statistics — the un-augmented split that the evaluation measures.
    """
    was_training = model.training
    model.eval()
    recompute_bn(model.backbone, loader, device, forward=model.features)
    if hasattr(model.head, "set_global_mean"):
        total, n = None, torch.zeros((), dtype=torch.float64, device=device)
        for x, _ in loader if mean_loader is None else mean_loader:
            h = model.features(x.to(device, non_blocking=True)).double()
            total = h.sum(0) if total is None else total + h.sum(0)
            n += h.shape[0]
        if total is not None:
            if _distributed():
                dist.all_reduce(total)
                dist.all_reduce(n)
            model.head.set_global_mean((total / n).to(model.head.mu_G.dtype))
    model.train(was_training)


def _outputs(model: FeatureClassifier, loader, device: torch.device):
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, h = model(x)
        yield h, y, logits


@torch.no_grad()
def evaluate(model: FeatureClassifier, loader, K: int, device: torch.device, *,
             geometry: dict | None = None) -> tuple[dict, Any]:
    """Every NC metric of ``model`` (eval mode, statistics as stored) over ``loader``.

    Two passes as :class:`~gnc.metrics.NCStatistics` needs; the features and logits of the
    first are kept for the second when they fit in 2 GiB, otherwise the data is read twice.
    Returns ``(metrics without cos_margins, sorted cos_margins tensor on the CPU)``.

    ``geometry``: a dict that, when given, receives what the metrics were computed from, on
    the CPU: ``W`` (K×d) and ``b`` (K) of the head, the split's ``class_means`` (K×d,
    float64, 0 for a class without samples), ``global_mean`` (d) and ``counts`` (K) — for
    :func:`gnc.metrics.etf_distances` and for saving the classifier.
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
    if geometry is not None:
        means, mu_G, counts = stats.class_means()
        geometry.update(W=W.cpu().clone(), b=b.cpu().clone(), class_means=means.cpu(),
                        global_mean=mu_G.cpu(), counts=counts.cpu())
    model.train(was_training)
    margins = out.pop("cos_margins")
    return out, margins.cpu()


def etf_distances_of(geometry: dict, previous: dict | None) -> tuple[dict, dict]:
    """:func:`gnc.metrics.etf_distances` of an evaluation's ``geometry`` (see :func:`evaluate`).

    ``H`` is the centred means of the classes with samples; a split that lacks a class has
    NaN H-side distances. Returns ``(distances, state for the next call)``.
    """
    present = geometry["counts"] > 0
    means = geometry["class_means"].double()
    H = (means[present] - geometry["global_mean"].double()).T  # (d, K')
    return etf_distances(geometry["W"].double(), H, previous)


def classifier_path(run_dir: str | Path, epoch: int, split: str = "train") -> Path:
    """``RUN/classifier/epoch_XXXX.pt`` (``epoch_XXXX_test.pt`` for the test split's means)."""
    suffix = "" if split == "train" else f"_{split}"
    return Path(run_dir) / "classifier" / f"epoch_{epoch:04d}{suffix}.pt"


def save_classifier(run_dir: str | Path, head: nn.Module, geometry: dict, epoch: int,
                    split: str = "train") -> Path:
    """Write the classifier and the class means of one evaluation, atomically.

    The file (:func:`classifier_path`) holds ``epoch``, ``split``, ``W`` (K×d), ``b`` (K;
    zeros for a head without bias, as the metrics used), ``class_means`` (K×d float64, the
    split's ``μ_c``; 0 for a class without samples), ``global_mean`` (d), ``counts`` (K) and,
    for the ETF heads, ``U`` (d×K: the rotation, ``W = √(K/(K−1)) M Uᵀ``), all on the CPU —
    the geometry of training, to study after it. Returns the path.
    """
    record = {"epoch": epoch, "split": split,
              **{k: geometry[k] for k in ("W", "b", "class_means", "global_mean", "counts")}}
    U = getattr(head, "U", None)
    if isinstance(U, Tensor):
        record["U"] = U.detach().cpu().clone()
    path = classifier_path(run_dir, epoch, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(record, path)
    return path


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers whose running statistics :func:`recompute_statistics` sets."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
