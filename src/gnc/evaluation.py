"""Evaluation of a model as it is: precise statistics, then every NC metric (DESIGN §5).

Two running averages trail a network in training: BatchNorm's running mean and variance
(momentum 0.1) and the ETF heads' running global mean ``μ_G`` (their bias is ``−W μ_G``; late
in training an average over ~10⁴ steps). Early in training both lag far enough that every
sample lands in one class. :func:`recompute_statistics` replaces them by their values over
the training split — "precise BN" as in pycls and detectron2, and the exact ``μ_G`` — and
stores them in the model, so a saved checkpoint's ``eval()`` logits equal the logged ones.
``eval_stats="running"`` evaluates the running averages as they are (the BN statistics as the
released code evaluates them; its ETF heads' bias comes from the last training batch, the
fixed head's from each evaluation batch, not from a running μ_G).

The trainer's evaluation costs, with precise statistics, one forward pass over the training
batches (BN; bounded to N batches by ``precise_bn_batches``) and one over each split: ``μ_G``
comes from the train split's own evaluation (:func:`evaluate` with ``set_global_mean``),
whose features are computed before any logit needs ``μ_G``.

:func:`nc_two_pass` is the one evaluation loop: the trainer's :func:`evaluate_splits`, ``gnc
evaluate`` (:mod:`gnc.saved_runs`) and ``gnc.measure`` all feed it, so they compute the same
numbers the same way.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from gnc.config import EVAL_STATS
from gnc.metrics import NCStatistics, etf_distances
from gnc.models.classifier import FeatureClassifier
from gnc.rundir import save_classifier_record
from gnc.runtime import all_reduce_mean_, all_reduce_sum_
from gnc.validation import NonFiniteError, trusted_inputs

__all__ = ["EVAL_STATS", "etf_distances_of", "evaluate", "evaluate_splits", "nc_two_pass",
           "quantiles", "recompute_statistics", "save_classifier"]

MARGIN_QUANTILES = 101  # points of the sorted cosine margins kept per metrics line
# Pass 2 reads pass 1's features, labels and logits from memory up to this many bytes; above
# it the data is read (and the model run) a second time.
DEFAULT_CACHE_BYTES = 2**30


def quantiles(sorted_values: Tensor, n: int = MARGIN_QUANTILES) -> list[float]:
    """``n`` evenly spaced quantiles of a 1-D tensor (float64), ``[]`` when it is empty."""
    if sorted_values.numel() == 0:
        return []
    q = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.quantile(sorted_values.double().cpu(), q).tolist()


def check_bn_batches(max_batches: Any) -> None:
    """Raise ``ValueError`` unless ``max_batches`` is an int >= 0 (0: the whole loader)."""
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"Expected `max_batches` to be an int >= 0 (0: the whole loader), "
                         f"but got {max_batches!r}")


@torch.no_grad()
def recompute_bn(module: nn.Module, loader: Iterable, device: torch.device,
                 forward: Callable[[Tensor], Any] | None = None, *,
                 max_batches: int = 0) -> None:
    """"Precise BN": every BatchNorm of ``module`` gets, as running statistics, the cumulative
    average (momentum None) of its batch statistics over one pass of ``loader``, or over its
    first ``max_batches`` batches when ``max_batches > 0`` (all of them when it has fewer).

    The bounded form is fvcore's ``update_bn_stats(model, data_loader, num_iters)``, which
    detectron2's ``PreciseBN`` hook runs (``TEST.PRECISE_BN.NUM_ITER``, default 200): the
    ``running_mean`` and ``running_var`` of each BN are the plain averages of the first
    ``num_iters`` batches' means and (unbiased) variances — what momentum None computes,
    ``r ← r + (x − r)/t`` at batch t. fvcore asserts that the loader has ``num_iters``
    batches; here a shorter loader is simply used whole.

    A batch of one sample after the first (the short last batch of a loader that keeps it)
    with one value per channel (vectors) is left out: it has no batch variance, and
    BatchNorm1d refuses it in training mode; an image of one sample still counts. Only the
    BN layers are put in training mode (the caller puts the rest in eval mode); ``forward``
    (default ``module``) maps a batch of inputs through them. Under DDP every rank averages
    its own first ``max_batches`` batches, then the ranks' results are averaged.
    Momenta and eval mode come back even when a batch fails.
    """
    check_bn_batches(max_batches)
    bns = bn_layers(module)
    if not bns:
        return
    forward = module if forward is None else forward
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.train()
    t = 0
    try:
        # islice stops after the last batch it yields: the loader is not read further
        for batch in itertools.islice(loader, max_batches or None):
            x = batch[0]
            if t and x.shape[0] == 1 and x[0].numel() == x.shape[1]:
                continue  # one value per channel: BatchNorm1d in training mode refuses it
            t += 1
            # momentum None's average, 1/t from a host count (as fvcore does): torch computes
            # 1/float(num_batches_tracked), a device read per BN layer per batch on a GPU
            for m in bns:
                m.momentum = 1.0 / t
            forward(x.to(device, non_blocking=True))
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            m.eval()
    for m in bns:
        all_reduce_mean_(m.running_mean)
        all_reduce_mean_(m.running_var)


@torch.no_grad()
def recompute_statistics(model: FeatureClassifier, loader: Iterable, device: torch.device,
                         mean_loader: Iterable | None = None, *, bn_batches: int = 0,
                         global_mean: bool = True) -> None:
    """Set BatchNorm's running statistics from ``loader`` and the ETF head's ``μ_G`` from
    ``mean_loader`` (default: ``loader``).

    BatchNorm: :func:`recompute_bn` over the backbone (its first ``bn_batches`` batches when
    > 0). Give it training batches *as trained on* (augmented), as pycls and detectron2 do:
    the layers after a BN learnt to expect the statistics of augmented batches, and
    statistics of un-augmented images (zero-padded crops change them) cost CIFAR-10 three
    points of train accuracy at the end of training.
    ``μ_G``: the mean of the normalised features over ``mean_loader`` in eval mode, with the
    new BN statistics — the un-augmented split that the evaluation measures. ``global_mean=
    False`` leaves it to the evaluation of that split (:func:`evaluate` with
    ``set_global_mean=True``), which computes the same features anyway: one pass fewer.
    """
    was_training = model.training
    model.eval()
    recompute_bn(model.backbone, loader, device, forward=model.features, max_batches=bn_batches)
    if global_mean and model.head.tracks_global_mean:
        total, n = None, torch.zeros((), dtype=torch.float64, device=device)
        for x, _ in loader if mean_loader is None else mean_loader:
            h = model.features(x.to(device, non_blocking=True))
            total, n = _add_to_mean(total, n, h)
        _set_global_mean(model, total, n)
    model.train(was_training)


def _add_to_mean(total: Tensor | None, n: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 running sum of the rows of ``h`` and their count (in place)."""
    s = h.double().sum(0)
    n += h.shape[0]
    return (s if total is None else total + s), n


def _set_global_mean(model: FeatureClassifier, total: Tensor | None, n: Tensor) -> None:
    """``μ_G = total / n`` over all ranks into the head (nothing when no batch was seen)."""
    if total is not None:
        all_reduce_sum_(total)
        all_reduce_sum_(n)
        model.head.set_global_mean((total / n).to(model.head.mu_G.dtype))


def _outputs(model: FeatureClassifier, loader, device: torch.device):
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, h = model(x)
        yield h, y, logits


def _outputs_after_global_mean(model: FeatureClassifier, loader, device: torch.device,
                               max_cache_bytes: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """:func:`_outputs`, with the head's ``μ_G`` set first to the mean of the features over
    ``loader`` (as :func:`recompute_statistics`): the logits depend on it (``b = −W μ_G``).

    The features and labels are computed once and kept while they take at most
    ``max_cache_bytes``; then ``μ_G`` is set and the logits ``head(h)`` come from the kept
    features — exactly the model's eval-mode ``forward``. Beyond the budget the data are
    read (and the model run) again, as with a separate ``μ_G`` pass.
    """
    cache: deque | None = deque()
    cached = 0
    total, n = None, torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        h = model.features(x.to(device, non_blocking=True))
        total, n = _add_to_mean(total, n, h)
        if cache is not None:
            y = y.to(device, non_blocking=True)
            cached += h.numel() * h.element_size() + y.numel() * y.element_size()
            cache = cache if cached <= max_cache_bytes else None
            if cache is not None:
                cache.append((h, y))
    _set_global_mean(model, total, n)
    if cache is None:
        yield from _outputs(model, loader, device)
        return
    while cache:  # handed over one by one: the caller keeps what its own budget allows
        h, y = cache.popleft()
        yield h, y, model.head(h)


Outputs = Iterator[tuple[Tensor, Tensor, Tensor | None]]


def nc_two_pass(outputs: Callable[[], Outputs], new_stats: Callable[[Tensor], NCStatistics],
                classifier: Callable[[], tuple[Tensor, Tensor]], *,
                max_cache_bytes: int = DEFAULT_CACHE_BYTES) -> tuple[dict, dict, int]:
    """The evaluation loop: every NC metric from two passes over ``outputs()``.

    ``outputs()`` yields ``(h (B×d), y (B), logits (B×K) or None)`` per batch (a model run
    over a loader); ``new_stats(h)`` makes the :class:`~gnc.metrics.NCStatistics` from the
    first batch; ``classifier()`` gives ``(W (K×d), b (K))`` after pass 1. Pass 1 sums the
    class statistics, pass 2 the margins (they need the global class means). Pass 1's
    outputs are kept for pass 2 while they take at most ``max_cache_bytes``; beyond, pass 2
    calls ``outputs()`` again. Logits that are not (B×K) count as absent (then ``W h + b``).

    Returns ``(metrics, geometry, forward passes)``: ``metrics`` as
    :meth:`NCStatistics.compute` (``cos_margins`` a sorted CPU tensor), ``geometry`` the CPU
    tensors ``W``, ``b``, ``class_means`` (K×d float64, 0 for a class without samples),
    ``global_mean`` (d) and ``counts`` (K), for :func:`etf_distances_of` and
    :func:`save_classifier`.

    Nothing is read back from the device per batch: both passes (the model included) run
    inside :func:`gnc.validation.trusted_inputs`, so :class:`~gnc.metrics.NCStatistics`
    defers its value checks (NaN/Inf features, labels outside [0, K)) to ``compute``, which
    raises them; the model's own checks (the heads') are skipped. The host reads of one
    evaluation are those of ``compute`` and the geometry, whatever the number of batches.
    """
    stats: NCStatistics | None = None
    cache: list | None = []
    cached = 0
    with trusted_inputs():
        for h, y, logits in outputs():
            if stats is None:
                stats = new_stats(h)
            logits = _as_logits(logits, h.shape[0], stats.K)
            stats.update(h, y, logits)
            if cache is not None:
                cached += sum(t.numel() * t.element_size() for t in (h, y, logits)
                              if t is not None)
                if cached <= max_cache_bytes:
                    cache.append((h, y, logits))
                else:
                    cache = None
        if stats is None:
            raise ValueError("the evaluation loader produced no batches")
        W, b = classifier()
        for h, y, logits in cache if cache is not None else outputs():
            stats.update_margins(h, y, W, b, _as_logits(logits, h.shape[0], stats.K))
    metrics = stats.compute(W, b)
    means, mu_G, counts = stats.class_means()
    geometry = {"W": W.cpu().clone(), "b": b.cpu().clone(), "class_means": means.cpu(),
                "global_mean": mu_G.cpu(), "counts": counts.cpu()}
    metrics["cos_margins"] = metrics["cos_margins"].cpu()
    return metrics, geometry, 1 if cache is not None else 2


def _as_logits(logits: Tensor | None, n: int, K: int) -> Tensor | None:
    return logits if logits is not None and tuple(logits.shape) == (n, K) else None


def head_weights(head: nn.Module) -> tuple[Tensor, Tensor]:
    """``(W, b)`` of a head, detached; ``b`` is 0 for a head without bias."""
    W = head.weight.detach()
    b = getattr(head, "bias", None)  # a user's classifier (gnc measure) may have none
    return W, torch.zeros(W.shape[0], device=W.device, dtype=W.dtype) if b is None else b.detach()


@torch.no_grad()
def evaluate(model: FeatureClassifier, loader: Iterable, K: int, device: torch.device, *,
             geometry: dict | None = None, set_global_mean: bool = False,
             max_cache_bytes: int = DEFAULT_CACHE_BYTES) -> tuple[dict, Any]:
    """Every NC metric of ``model`` (eval mode, statistics as stored) over ``loader``
    (:func:`nc_two_pass`).

    Returns ``(metrics without cos_margins, sorted cos_margins tensor on the CPU)``.
    ``geometry``: a dict that, when given, receives :func:`nc_two_pass`'s geometry.
    ``set_global_mean``: for a head that :attr:`~gnc.heads.Head.tracks_global_mean`, first
    set its ``μ_G`` to the mean of the features over ``loader`` — what
    :func:`recompute_statistics` sets, without its pass: the features of pass 1 are computed
    first and its logits from them once ``μ_G`` is known (while the split's features and
    labels fit in ``max_cache_bytes``, the pass-1 cache limit; else one more pass).
    """
    was_training = model.training
    model.eval()
    first = ([_outputs_after_global_mean(model, loader, device, max_cache_bytes)]
             if set_global_mean and model.head.tracks_global_mean else [])

    def outputs() -> Outputs:  # the first pass sets μ_G before its logits, a second is plain
        return first.pop() if first else _outputs(model, loader, device)

    try:
        out, geo, _ = nc_two_pass(outputs, lambda h: NCStatistics(K, h.shape[1], device=device),
                                  lambda: head_weights(model.head),
                                  max_cache_bytes=max_cache_bytes)
    finally:
        model.train(was_training)
    if geometry is not None:
        geometry.update(geo)
    margins = out.pop("cos_margins")
    return out, margins


def etf_distances_of(geometry: dict, previous: dict | None) -> tuple[dict, dict]:
    """:func:`gnc.metrics.etf_distances` of an evaluation's ``geometry`` (see :func:`evaluate`).

    ``H`` is the centred means of the classes with samples; a split that lacks a class has
    NaN H-side distances. Returns ``(distances, state for the next call)``.
    """
    present = geometry["counts"] > 0
    means = geometry["class_means"].double()
    H = (means[present] - geometry["global_mean"].double()).T  # (d, K')
    return etf_distances(geometry["W"].double(), H, previous)


def evaluate_splits(model: FeatureClassifier, loaders: dict, K: int, device: torch.device, *,
                    set_global_mean: bool = False, etf_prev: dict | None = None
                    ) -> tuple[dict, dict, Tensor, dict]:
    """The trainer's evaluation: :func:`evaluate` of every split of ``loaders`` ("train"
    first: with ``set_global_mean`` its features set ``μ_G``), the test split's keys prefixed
    ``test_``, each split's ``cos_margins`` as :func:`quantiles`, and the train split's ETF
    distances from ``etf_prev`` (:func:`etf_distances_of`).

    Returns ``(row, the ETF state for the next call, the train split's sorted margins, its
    geometry)``. NaN/Inf features are a :class:`~gnc.validation.NonFiniteError` naming the
    split.
    """
    row: dict = {}
    margins, geometry = None, {}
    for split, loader in loaders.items():
        geo: dict = {}
        try:
            metrics, split_margins = evaluate(model, loader, K, device, geometry=geo,
                                              set_global_mean=set_global_mean and split == "train")
        except NonFiniteError as err:
            raise NonFiniteError(f"the {split} features are NaN/Inf at evaluation") from err
        prefix = "" if split == "train" else "test_"
        row.update({prefix + k: v for k, v in metrics.items()})
        row[prefix + "cos_margins"] = quantiles(split_margins)
        if split == "train":
            distances, etf_prev = etf_distances_of(geo, etf_prev)
            row.update(distances)
            margins, geometry = split_margins, geo
    return row, etf_prev or {}, margins, geometry


def save_classifier(run_dir: str | Path, head: nn.Module, geometry: dict, epoch: int,
                    split: str = "train") -> Path:
    """Write the classifier and the class means of one evaluation, atomically.

    The file (:func:`gnc.rundir.classifier_path`) holds ``epoch``, ``split``, ``W`` (K×d),
    ``b`` (K; zeros for a head without bias, as the metrics used), ``class_means`` (K×d
    float64, the split's ``μ_c``; 0 for a class without samples), ``global_mean`` (d),
    ``counts`` (K) and, for the ETF heads, ``U`` (d×K: the rotation, ``W = √(K/(K−1)) M Uᵀ``),
    all on the CPU — the geometry of training, to study after it. Returns the path.
    """
    record = {"epoch": epoch, "split": split,
              **{k: geometry[k] for k in ("W", "b", "class_means", "global_mean", "counts")}}
    U = getattr(head, "U", None)
    if isinstance(U, Tensor):
        record["U"] = U.detach().cpu().clone()
    return save_classifier_record(run_dir, record)


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers whose running statistics :func:`recompute_statistics` sets."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
