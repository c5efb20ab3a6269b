"""Running centred class means, the target ``H̄`` of the nearest-ETF problem (DESIGN §1).

From a batch of features ``h_i`` (d) with labels ``y_i``:

    μ_c = mean of the h_i with y_i = c,   μ_G = mean of all h_i,   m_c = μ_c − μ_G,
    Hb  = [m_0, ..., m_{K−1}]  (d x K)

and the running estimate, column by column (classes absent from the batch keep their
column, classes never seen have column 0):

    H̄_c ← (1 − β_c) · sg(H̄_c) + β_c · m_c,        then   H̄ ← H̄ / ‖H̄‖_F

where ``sg`` stops the gradient (the old estimate is detached, gradient flows only through
the current batch's contribution ``β_c · m_c``) and

- ``"ema"``: ``β_c = α_t = max(2/(t+1), 1e-4)`` with ``t`` the update count (1 for the first
  update, which therefore takes the batch as is); a class seen for the first time takes its
  batch mean as is (``β_c = 1``) instead of being averaged with its placeholder 0;
- ``"cma"``: the cumulative average weighted by per-class sample counts,
  ``β_c = n_c / (N_c + n_c)`` with ``n_c`` the batch count and ``N_c`` the count seen before.

The same rule keeps a running global mean ``μ_G`` for evaluation (weight ``α_t``, or
``n/(N + n)`` for CMA), where the bias is ``−W μ_G``.

Under ``torch.distributed`` (initialised) the per-class sums and counts are all-reduced
before the means are formed, so every rank gets the same ``H̄`` and ``μ_G``. The sums go
through the autograd-aware ``torch.distributed.nn.functional.all_reduce``, whose backward
sums the gradients over ranks: each rank's features get the gradient of the summed loss of
all ranks, which DDP's gradient averaging turns into the gradient of the mean loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from gnc.runtime import all_reduce_sum_, differentiable_sum
from gnc.validation import check_features, value_checks_enabled

__all__ = ["UPDATES", "ClassMeanTracker", "ClassMeans", "ema_weight", "running_average"]

UPDATES = ("ema", "cma")  # exponential moving / cumulative average
# Floor of the EMA weight α_t: the running means keep following the features late in training.
MIN_EMA_WEIGHT = 1e-4


def ema_weight(t: int | Tensor, *, dtype: torch.dtype | None = None) -> float | Tensor:
    """``α_t = max(2/(t+1), 1e-4)``, the weight of the t-th update (t = 1, 2, ...).

    The first update (``α_1 = 1``) takes the batch as is. ``t`` a Python int gives a float;
    an integer tensor gives a tensor of ``dtype`` (on its device: no host read).
    """
    if isinstance(t, Tensor):
        return (2.0 / (t + 1).to(dtype)).clamp_min(MIN_EMA_WEIGHT)
    return max(2.0 / (t + 1), MIN_EMA_WEIGHT)


_HALF = (torch.float16, torch.bfloat16)


def running_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a running statistic kept for a module of ``dtype``: float32 at least.
    In bfloat16, once the EMA weight α_t falls below ~2⁻⁸ both ``(1 − α)·old`` and
    ``α·new`` round away and the average stops moving (measured: μ_G still 1.79 from the
    data's mean after 2000 steps, 0.25 in float32)."""
    dtype = dtype or torch.get_default_dtype()
    return torch.float32 if dtype in _HALF else dtype


def keep_running_wide(module: nn.Module, before: dict[str, Tensor]) -> None:
    """After ``module._apply`` (``.to``, ``.half()``, ``.bfloat16()``): put back, on their new
    device, the running statistics named in ``before`` (their tensors before it) that were
    cast to half precision, in :func:`running_dtype`."""
    for name, old in before.items():
        new = getattr(module, name)
        if new is not None and new.dtype in _HALF:
            setattr(module, name, old.to(device=new.device, dtype=running_dtype(old.dtype)))


def running_average(old: Tensor, new: Tensor, weight: float | Tensor) -> Tensor:
    """``(1 − w)·old + w·new``: the EMA (``w = α_t``) and CMA (``w = n/(N + n)``) update."""
    return old * (1 - weight) + new * weight


class ClassMeans(NamedTuple):
    """What :class:`ClassMeanTracker` returns for a batch."""

    H_bar: Tensor  # (d, K) Frobenius-normalised running centred means, grad via this batch
    mu_G: Tensor  # (d,) the batch's global mean (of all ranks), differentiable


def _frobenius_normalise(H: Tensor) -> Tensor:
    """``H / ‖H‖_F``, and ``H`` itself (zero) when its norm is 0, with a finite gradient."""
    norm = torch.linalg.matrix_norm(H)
    return H / torch.where(norm > 0, norm, torch.ones_like(norm))


def _check_inputs(features: Tensor, labels: Tensor, d: int, K: int) -> None:
    check_features(features, d)
    if features.shape[0] == 0:
        raise ValueError("Expected `features` to hold at least one sample, but got B=0")
    B = features.shape[0]
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (B,):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"Expected `labels` to have shape (B={B},), but got {got}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"Expected `labels` to be an integer tensor, but got {labels.dtype}")
    if not value_checks_enabled():
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= K:
        raise ValueError(
            f"Expected `labels` to be in [0, K={K}), but got values in [{low}, {high}]"
        )


class ClassMeanTracker(nn.Module):
    r"""Running, Frobenius-normalised centred class means ``H̄`` (d x K) and global mean.

    See the module docstring for the update rule. Calling the module updates the running
    estimate (in training and in eval mode alike; the caller decides when to call it).

    Args:
        d: feature dimension.
        K: number of classes.
        update: ``"ema"`` (default) or ``"cma"``.
        device, dtype: of the buffers (computations use the wider of this and the features'
            dtype); the running means stay float32 for a half-precision ``dtype`` (also
            after ``.to(torch.bfloat16)``): see :func:`running_dtype`.

    Shape:
        - features: (B, d), B >= 1, floating point, finite
        - labels: (B,), integer in [0, K)
        - output: :class:`ClassMeans` with ``H_bar`` (d, K) and ``mu_G`` (d,)

    Attributes (buffers, all in ``state_dict``):
        H_bar_raw: (d, K) the running centred means before the Frobenius normalisation.
        mu_G: (d,) the running global mean (for evaluation).
        counts: (K,) int64, samples seen per class (over all ranks); ``counts > 0`` = seen.
        t: () int64, the number of updates so far.

    Examples::

        >>> tracker = ClassMeanTracker(d=64, K=10)
        >>> H_bar, mu_G = tracker(torch.randn(32, 64), torch.arange(32) % 10)
        >>> H_bar.shape, mu_G.shape
        (torch.Size([64, 10]), torch.Size([64]))
    """

    H_bar_raw: Tensor
    mu_G: Tensor
    counts: Tensor
    t: Tensor

    def __init__(
        self,
        d: int,
        K: int,
        update: str = "ema",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"Expected `update` to be one of {UPDATES}, but got {update!r}")
        if d < 1 or K < 2:
            raise ValueError(f"Expected `d` >= 1 and `K` >= 2, but got d={d}, K={K}")
        self.d, self.K, self.update = d, K, update
        factory = {"device": device, "dtype": running_dtype(dtype)}
        self.register_buffer("H_bar_raw", torch.zeros(d, K, **factory))
        self.register_buffer("mu_G", torch.zeros(d, **factory))
        self.register_buffer("counts", torch.zeros(K, dtype=torch.long, device=device))
        self.register_buffer("t", torch.zeros((), dtype=torch.long, device=device))

    def _apply(self, fn, recurse: bool = True):
        before = {"H_bar_raw": self.H_bar_raw, "mu_G": self.mu_G}
        super()._apply(fn, recurse)
        keep_running_wide(self, before)  # a half-precision module keeps them in float32
        return self

    def extra_repr(self) -> str:
        return f"d={self.d}, K={self.K}, update={self.update!r}"

    def reset(self) -> None:
        """Forget all updates."""
        for buffer in (self.H_bar_raw, self.mu_G, self.counts, self.t):
            buffer.zero_()

    @property
    def H_bar(self) -> Tensor:
        """The current running estimate, Frobenius-normalised (d x K, no gradient)."""
        return _frobenius_normalise(self.H_bar_raw.detach())

    def forward(self, features: Tensor, labels: Tensor) -> ClassMeans:
        """Update the running means with a batch and return ``(H̄, μ_G of the batch)``."""
        if torch.compiler.is_compiling():
            # Eager inside a compiled model: AOTAutograd recomputes β in the backward from
            # the counts this update has changed in place (torch 2.11 to 2.14): a wrong
            # gradient, 2/(t+3) for 2/(t+2).
            return torch.compiler.disable(type(self)._update)(self, features, labels)
        return self._update(features, labels)

    def _update(self, features: Tensor, labels: Tensor) -> ClassMeans:
        _check_inputs(features, labels, self.d, self.K)
        dtype = torch.promote_types(features.dtype, self.H_bar_raw.dtype)
        sums, counts = self._batch_sums(features.to(dtype), labels.to(torch.long))
        n = counts.sum()
        mu_G = sums.sum(dim=0) / n  # (d,)
        Hb = (sums / counts.clamp_min(1)[:, None] - mu_G).T  # (d, K); absent columns unused
        beta, gamma = self._weights(counts, dtype)  # (K,), ()
        H_raw = running_average(self.H_bar_raw.to(dtype), Hb, beta)  # old part has no grad
        # A batch with NaN/Inf features (unchecked inside the trainer's step, an fp16 overflow)
        # or finite ones whose sums overflow (1e38 in float32) leaves the running state as it
        # was, decided on the device without a host sync.
        ok = torch.isfinite(sums).all() & torch.isfinite(mu_G).all() & torch.isfinite(H_raw).all()
        H_raw = torch.where(ok, H_raw, self.H_bar_raw.to(dtype))
        with torch.no_grad():
            self.mu_G.copy_(torch.where(ok, running_average(self.mu_G, mu_G, gamma), self.mu_G))
            self.H_bar_raw.copy_(H_raw)
            self.counts += counts * ok
            self.t += ok.long()
        return ClassMeans(_frobenius_normalise(H_raw), mu_G)

    def _batch_sums(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-class sums (K, d) and counts (K,) of the batch, summed over ranks."""
        sums = h.new_zeros(self.K, self.d).index_add(0, y, h)
        # not bincount: on a GPU it reads max(y) back to size its output (a host sync)
        counts = torch.zeros(self.K, dtype=torch.long, device=y.device).index_add_(
            0, y, torch.ones_like(y))
        return differentiable_sum(sums), all_reduce_sum_(counts)

    def _weights(self, counts: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Weights of the batch: per class ``β`` (0 if absent) and for the global mean.

        Formed in float32 at least, then cast: counts above 65504 are Inf in float16."""
        present, new = counts > 0, self.counts == 0
        wide = torch.promote_types(dtype, torch.float32)
        if self.update == "ema":
            gamma = ema_weight(self.t + 1, dtype=wide)  # t+1: this update's number
            beta = torch.where(new, torch.ones_like(gamma), gamma).expand(self.K)
            beta = torch.where(present, beta, torch.zeros_like(beta))
        else:
            total = (self.counts + counts).to(wide)
            beta = counts.to(wide) / total.clamp_min(1)
            gamma = counts.sum().to(wide) / total.sum()
        if wide != dtype:
            beta, gamma = beta.to(dtype), gamma.to(dtype)
        return beta, gamma
