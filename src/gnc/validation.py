"""Input checks shared by the modules, and the switch that skips the costly ones."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

_VALUE_CHECKS = contextvars.ContextVar("gnc_value_checks", default=True)


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
    """False inside :func:`trusted_inputs`."""
    return _VALUE_CHECKS.get()


@contextlib.contextmanager
def trusted_inputs() -> Iterator[None]:
    """Skip the input checks that read tensor values (NaN/Inf, label range).

    Each such check copies a result to the host, which on a GPU waits for all queued work:
    several per step serialise the host with the device. The trainer validates its data once
    at load time and checks the loss for NaN every few steps, so inside its step the heads and
    the class-mean tracker check shapes and dtypes only. API calls outside keep every check.
    """
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)
