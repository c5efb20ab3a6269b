"""The implicit head's training step replayed from CUDA graphs (``--graph-head``).

On a GPU a ResNet-18 step on CIFAR images takes ~8 ms and is bound by kernel launches; the
implicit head adds many small operators (class means, the Newton–Schulz polar
factor, the Lyapunov backward, the buffer updates: hundreds a step, counted in ``docs/bench.md``).
Captured once, its forward and its backward are one graph launch each
(:func:`torch.cuda.make_graphed_callables`). Possible because, with
``polar_method="newton_schulz"``, the step reads nothing back from the device (no ``svd`` /
``eigh`` sync, no Python branch on a tensor's value): ``tests/test_newton_schulz.py`` runs it
on "meta" tensors.

What a replay cannot do, :class:`GraphedHeadStep` does eagerly:

- the first step (δ = 0 and no ``U_prev``: the eigensolver's rank-deficient solve);
- a batch whose shape, dtype or gradient need differs from the captured one (a partial last
  batch), and evaluation (the model calls the head itself in eval mode);
- the host-side step counter, which the captured Python code does not advance
  (:meth:`~gnc.heads.ImplicitETFHead.advance_host_steps`).

Capturing runs the step several times (warm-up, then capture); the head's buffers are
restored afterwards, so the run is the same as without graphs up to float summation order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from gnc.etf import products_only
from gnc.heads import ImplicitETFHead

logger = logging.getLogger(__name__)

# warm-up iterations before capture (torch's default: lets cuBLAS/cuSOLVER set up workspaces)
WARMUP_ITERS = 3


def capture_failure(err: BaseException) -> str:
    """A failed capture in one line, its cause first: an error inside
    ``torch.cuda.graph`` makes the graph's exit raise a second one ("operation failed due
    to a previous error during capture"), which hides the first in ``__context__``."""
    def line(e: BaseException) -> str:
        return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0]

    cause = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return line(err) if cause is None else f"{line(cause)}; then {line(err)}"


class GraphedHeadStep:
    """``step(features, targets) -> logits``: ``head``'s training forward from a CUDA graph,
    its backward from another; eager where a graph cannot serve (see the module docstring).

    Not an ``nn.Module``: it holds the head without becoming part of the model's state dict.

    Args:
        head: an :class:`~gnc.heads.ImplicitETFHead` with ``polar_method="newton_schulz"``
            and ``ns_fallback=False`` (nothing read on the host).
        make_graphed: the capture function (default
            :func:`torch.cuda.make_graphed_callables`; tests pass a stand-in).
    """

    def __init__(self, head: ImplicitETFHead, make_graphed: Callable | None = None) -> None:
        if not isinstance(head, ImplicitETFHead) or head.polar_method != "newton_schulz":
            raise ValueError("a CUDA-graphed head needs the implicit head with "
                             "polar_method='newton_schulz' (the eigensolvers sync the host)")
        if head.ns_fallback:
            raise ValueError("a CUDA-graphed head needs ns_fallback=False (the fallback reads "
                             "the Newton–Schulz residual on the host)")
        self.head = head
        self.make_graphed = make_graphed or torch.cuda.make_graphed_callables
        self._graphed: Callable | None = None
        self._key: tuple | None = None
        self.replays = 0
        self.failed: str | None = None  # why the capture failed: the step then stays eager

    @staticmethod
    def _key_of(features: Tensor, targets: Tensor) -> tuple:
        return (features.shape, features.dtype, features.device, features.requires_grad,
                targets.shape, targets.dtype)

    def __call__(self, features: Tensor, targets: Tensor) -> Tensor:
        head = self.head
        if not head.training or head.num_steps == 0 or self.failed:
            return head(features, targets)
        key = self._key_of(features, targets)
        if self._graphed is None:
            self._capture(features, targets)
            self._key = key
        if self.failed or key != self._key:
            return head(features, targets)
        logits = self._graphed(features, targets)
        head.advance_host_steps(1)  # the replay advanced the device's `steps` only
        self.replays += 1
        return logits

    def _capture(self, features: Tensor, targets: Tensor) -> None:
        head = self.head
        saved = head.snapshot()
        sample = (features.detach().clone().requires_grad_(features.requires_grad),
                  targets.detach().clone())

        def step(h: Tensor, y: Tensor) -> Tensor:
            return head(h, y)

        current = torch.cuda.current_stream() if torch.cuda.is_available() else None
        try:  # warm-up steps and capture run the same (products-only) kernels
            with products_only():
                self._graphed = self.make_graphed(step, sample,
                                                  num_warmup_iters=WARMUP_ITERS)
        except Exception as err:  # noqa: BLE001 -- any capture failure: train on, eagerly
            if current is not None:  # torch.cuda.graph's failed exit keeps its capture stream
                torch.cuda.set_stream(current)
            self.failed = capture_failure(err)
            logger.warning("the implicit head's step could not be captured in a CUDA graph "
                           "(%s); it runs eagerly", self.failed, exc_info=True)
        finally:  # the warm-up steps changed the running means, U, W, μ_G and the counts
            head.restore(saved)
