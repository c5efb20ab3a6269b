"""``FeatureClassifier``: backbone → features on the τ-sphere → classifier head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureClassifier(nn.Module):
    r"""``logits = head(τ · h/‖h‖)`` with ``h = backbone(x)`` (DESIGN §1, "Features").

    Args:
        backbone: module mapping inputs to (B, d) features.
        head: a head of :mod:`gnc.heads` (``head(features, targets) -> logits``).
        tau: the temperature, i.e. the radius of the feature sphere; ``None`` leaves the
            features unnormalised (the paper's "standard-unnormalized" ablation).
        amp_dtype: run the backbone under ``torch.autocast`` in this dtype (bf16/fp16); the
            normalisation and the head (hence the nearest-ETF solve) stay in float32.

    Returns ``(logits, features)``: the metrics need the normalised features.

    ``head_step``, when set (e.g. a :class:`gnc.graphs.GraphedHeadStep`), replaces the call
    of the head in training mode; it is not part of the state dict.
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module, tau: float | None = 1.0,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if tau is not None and not tau > 0:
            raise ValueError(f"Expected `tau` to be positive or None, but got {tau}")
        self.backbone, self.head, self.tau, self.amp_dtype = backbone, head, tau, amp_dtype
        self.head_step = None

    def features(self, x: Tensor) -> Tensor:
        """Backbone features, normalised onto the sphere of radius τ (B×d)."""
        amp = self.amp_dtype is not None
        # no weight-cast cache: each weight is cast once per forward anyway, and a cache
        # cannot be captured in a CUDA graph (torch's make_graphed_callables refuses it)
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=amp,
                            cache_enabled=False):
            h = self.backbone(x)
        h = h.flatten(1).float() if amp else h.flatten(1)
        if self.tau is None:
            return h
        return self.tau * h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # labelled ranges for `gnc bench --profile` (a no-op cost without a profiler)
        with torch.profiler.record_function("gnc.backbone"):
            h = self.features(x)
        head = self.head_step if self.training and self.head_step is not None else self.head
        with torch.profiler.record_function("gnc.head"):
            return head(h, targets), h

    def extra_repr(self) -> str:
        return f"tau={self.tau}"
