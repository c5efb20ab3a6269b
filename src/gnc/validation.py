"""Input checks shared by the modules."""

from __future__ import annotations

import torch
from torch import Tensor


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
