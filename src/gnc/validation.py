"""Input checks shared by the modules, and the switch that skips the costly ones.

The switch (:func:`trusted_inputs`) only decides whether the checks that read tensor values
run; it never changes what is computed. Policies that do change the computation (e.g. the
Newton–Schulz fallback of :func:`gnc.declarative.nearest_etf`) are explicit arguments.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_VALUE_CHECKS = contextvars.ContextVar("gnc_value_checks", default=True)


class NonFiniteError(ValueError):
    """An input holds NaN or Inf values (e.g. the features of a diverged model).

    A ``ValueError``, so existing ``except ValueError`` still catches it; callers that detect
    divergence catch this type instead of parsing the message.
    """


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite.

    One reduction instead of a full boolean mask: a NaN or Inf anywhere makes the sum
    non-finite; only then (or on a rare overflow of the sum itself) is the exact check run.
    """
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def value_checks_enabled() -> bool:
    """False inside :func:`trusted_inputs`, and while ``torch.compile`` or ``torch.export``
    traces the code: a host read there breaks the graph (``torch.export`` refuses it), and
    the state the checks protect is kept by on-device checks as well (the running means of
    :class:`~gnc.class_means.ClassMeanTracker` and the heads' ``μ_G``)."""
    return _VALUE_CHECKS.get() and not torch.compiler.is_compiling()


@contextlib.contextmanager
def trusted_inputs() -> Iterator[None]:
    """Skip the input checks that read tensor values (NaN/Inf, label range).

    Each such check copies a result to the host, which on a GPU waits for all queued work:
    several per step serialise the host with the device. The trainer validates its data once
    at load time and checks the loss for NaN every few steps, so inside its step the heads and
    the class-mean tracker check shapes and dtypes only. API calls outside keep every check.
    Only checks are skipped: every computation is the same inside and outside.
    """
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def check_features(features: Tensor, d: int, *, rows: str = "B",
                   values: bool | None = None) -> None:
    """Raise ``ValueError`` unless ``features`` is a floating-point (rows, d) tensor, and
    :class:`NonFiniteError` if it holds NaN or Inf.

    Args:
        features: the tensor to check.
        d: expected feature dimension.
        rows: the name of the first dimension in the message (``"B"`` a batch, ``"N"`` a
            dataset).
        values: run the NaN/Inf check (a host read); default: unless inside
            :func:`trusted_inputs`.
    """
    if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != d:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"Expected `features` to have shape ({rows}, d={d}), but got {got}")
    if not features.is_floating_point():
        raise ValueError(f"Expected `features` to be floating point, but got {features.dtype}")
    if values is None:
        values = value_checks_enabled()
    if values and not all_finite(features):
        raise NonFiniteError("Expected `features` to be finite, but got NaN or Inf values")


def all_finite_params(model: nn.Module) -> bool:
    """Whether every parameter is finite (one host sync: a NaN/Inf makes its sum non-finite)."""
    sums = [p.detach().float().sum() for p in model.parameters()]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return True
    return all(all_finite(p.detach()) for p in model.parameters())
