"""The capture-ready training step (``--graph-step``, issue 18): one CUDA graph per step.

On a GPU a ResNet-18 step on 250 CIFAR images is bound by kernel launches (~8 ms,
``shared/GPU-THROUGHPUT.md``). :class:`StaticStep` is the trainer's step written so that it
can be captured whole: the batch (the sampler's indices and, for device-resident images, the
crop/flip draws, pre-drawn for the whole epoch and copied to the device once), the gather,
crop, flip and normalisation, the forward, the loss, the backward, the optimiser step, the
heads' state updates and the epoch's statistics (loss sum, correct, non-finite steps) are
device operations on tensors that stay in place, indexed by a device tensor ``i``: nothing is
read back to the host and no Python branch depends on a tensor's value.

What changes against the eager loop body (``Trainer.epoch_steps``), bitwise the same on the
CPU (``tests/test_step.py``):

- the optimisers' step-dependent scalars (the learning rate, Adam's bias corrections, AdamW's
  decay factor) are computed on the host once per epoch, exactly as torch computes them, and
  copied to the device as a table read with ``i``; the update itself is torch's single-tensor
  algorithm (``torch.optim.SGD/Adam/AdamW``; :class:`gnc.optim.AGD` with its step size
  computed on the device) with those scalars as 0-d tensors, each operation applied to a
  parameter group at once (``torch._foreach_*``: one kernel per operation instead of one
  per parameter, 241 fewer kernels a ResNet-18 SGD step; on the CPU the same per-tensor
  operations, so bitwise the same). Adam's ``state["step"]`` (a CPU tensor) is advanced on
  the host at the end of the epoch;
- the fixed head's EMA weight of μ_G comes from its ``steps`` buffer on the device;
- the implicit head needs ``polar_method="newton_schulz"`` with ``ns_fallback=False``.

Eager, whatever the device: the first step of training (the optimiser's state does not exist
yet, the implicit head's first step solves δ = 0 with the eigensolver) runs the plain loop
body on the same batch. :class:`GraphedStep` runs the steps: on a CUDA device it warms up on
a side stream, restores model, buffers, optimiser state, the step's accumulators and the RNG
in place (``copy_`` from clones), captures ``step(i)`` with :func:`torch.cuda.graph` and then
replays it; the graph advances ``i`` itself, so a replay needs no input from the host. During
warm-up and capture the implicit head runs matrix products only
(:func:`gnc.etf.products_only`, as ``--graph-head`` does). A capture that fails leaves the
state restored and the run continues with the eager capture-ready step after ONE warning; a
plan of another shape (a different number of steps per epoch) is captured again. On the
CPU nothing is captured: the capture-ready step runs eagerly (what the tests check).

Several runs in one process (``gnc experiment --jobs-mode streams``, :mod:`gnc.interleave`;
``benchmarks/gpu_throughput.py``): ``GraphedStep(..., stream=s)``
warms up, captures and replays on a stream of its own, so that the graphs of different runs
may run at the same time; each capture has its own memory pool (``torch.cuda.graph``'s
default) and, on its own stream, its own cuBLAS workspace.

``--graph-head`` stays separate (it captures the head only, with ``make_graphed_callables``)
and cannot be combined with ``--graph-step``, whose graph holds the head already.

Not supported (refused by :meth:`gnc.config.TrainConfig.validate` or here, one line each):
several processes (DDP), fp16 autocast (its ``GradScaler`` reads back whether a gradient
overflowed; bf16 autocast is captured: :class:`gnc.models.FeatureClassifier` runs autocast
without its weight-cast cache, which a graph cannot hold),
``torch.compile``, the per-step ``onecycle`` schedule (it also cycles the momentum, a
constant of the graph), batches of unequal size. Nothing of it has run on a GPU yet: the
capture path is exercised on the CPU with a stand-in for :func:`torch.cuda.graph`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from gnc.class_means import ema_weight, running_average
from gnc.data.device import DeviceImageLoader
from gnc.data.sampler import TensorBatchLoader
from gnc.etf import products_only
from gnc.graphs import capture_failure
from gnc.heads import FixedETFHead, ImplicitETFHead, StandardHead
from gnc.losses import classification_loss
from gnc.optim import AGD, _position_norms, _scale, position_factor
from gnc.validation import check_features

__all__ = ["HOST_READ_OPS", "GraphedStep", "HostReadError", "NoHostReads", "StaticStep",
           "accumulate_step", "cuda_graph"]

logger = logging.getLogger(__name__)

# warm-up iterations before the capture (as torch's recipe: lets cuBLAS/cuDNN set up)
WARMUP_ITERS = 3

# aten operators that read a device tensor on the host (or check an error there)
HOST_READ_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal",
    "aten::allclose", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
    "aten::bincount", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::linalg_svd", "aten::_linalg_svd", "aten::linalg_eigh", "aten::_linalg_eigh",
    "aten::linalg_cholesky", "aten::linalg_solve", "aten::linalg_inv", "aten::cholesky",
    "aten::inverse", "aten::_linalg_check_errors",
})


class HostReadError(RuntimeError):
    """An operator inside :class:`NoHostReads` would read the device on the host."""


class NoHostReads(TorchDispatchMode):
    """Raise :class:`HostReadError` on any operator of :data:`HOST_READ_OPS` and on any copy
    between devices: on a GPU each would wait for the device (and break a capture).

    The checked linalg operators also reach ``_linalg_check_errors`` (the host read); the
    ``_ex`` variants (``cholesky_ex``, ``inv_ex``, ``solve_ex``) do not check and pass.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in HOST_READ_OPS:
            raise HostReadError(f"{name} reads the device on the host")
        if name in ("aten::_to_copy", "aten::copy_", "aten::to"):
            devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, Tensor)}
            target = kwargs.get("device")
            if target is not None:
                devices.add(torch.device(target))
            if len(devices) > 1:
                raise HostReadError(f"{name} copies between devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


class NotCapturable(RuntimeError):
    """A step that runs, but whose graph would not replay as the eager step does."""


class RandomDraws(TorchDispatchMode):
    """Notes the first operator that draws from a random generator (torch tags them
    ``nondeterministic_seeded``: dropout, ``bernoulli_``, ``rand``, ...) in :attr:`seen`."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.seen is None and torch.Tag.nondeterministic_seeded in func.tags:
            self.seen = func._schema.name
        return func(*args, **(kwargs or {}))


def _one_line(err: BaseException) -> str:
    return (f"{type(err).__name__}: {err}".splitlines() or [type(err).__name__])[0]



def _fixed_head_train(head: FixedETFHead) -> Callable:
    """The fixed head's training forward with its EMA weight read from the ``steps`` buffer
    on the device (``FixedETFHead.forward`` takes it from the host-side count, which a
    captured graph would freeze); the same operations otherwise."""

    def forward(features: Tensor, targets: Tensor | None = None) -> Tensor:
        check_features(features, head.d)
        h = features.to(head.weight.dtype)
        mu_G = h.mean(dim=0)  # one process: the batch's global mean
        alpha = ema_weight(head.steps + 1, dtype=torch.float64)  # this step's number
        head._store(None, running_average(head.mu_G, mu_G.detach(), alpha))
        return head._train_logits(h, head.weight, mu_G)

    return forward


def accumulate_step(stats: tuple[Tensor, Tensor, Tensor, Tensor], loss: Tensor, logits: Tensor,
                    y: Tensor, step: Tensor | int, overflow: Tensor | None = None) -> None:
    """Add one step to an epoch's statistics ``(loss_sum, correct, bad, first_bad)``, in place
    and on the device (no host read): a NaN/Inf loss, or a step the fp16 scaler skipped
    (``overflow``), counts as bad and adds no loss; ``first_bad`` keeps the number of the
    first bad step (-1: none yet). The one body of the eager loop's and the capture-ready
    step's bookkeeping, so the two stay bitwise the same."""
    loss_sum, correct, bad, first_bad = stats
    loss = loss.detach()
    finite = torch.isfinite(loss)
    if overflow is not None:
        finite &= ~overflow
    if not isinstance(step, Tensor):
        step = torch.full_like(first_bad, step)
    first_bad.copy_(torch.where(finite | (first_bad >= 0), first_bad, step))
    loss_sum += torch.where(finite, loss, 0.0)
    bad += ~finite
    correct += (logits.detach().argmax(1) == y).sum()


class StaticStep:
    """The trainer's step on static device tensors: ``step(i)`` trains on batch ``i`` of the
    epoch (``i`` a 0-d long device tensor, advanced in place) without reading the device.

    Args:
        model: a :class:`~gnc.models.classifier.FeatureClassifier` (one process, no DDP).
        optimizer: the trainer's ``torch.optim.SGD``/``Adam``/``AdamW`` or
            :class:`~gnc.optim.AGD` (its state is shared: checkpoints see every step).
        loss: the loss name (:func:`gnc.losses.classification_loss`).
        device: where the model and the data are.
        world_size: the number of processes (must be 1).

    Per epoch: :meth:`begin_epoch` (the plan and the optimiser's scalars to the device, the
    accumulators zeroed), then one :meth:`step` (or :meth:`eager_step` while not
    :meth:`ready`) per batch, then :meth:`end_epoch`. The accumulators ``loss_sum``,
    ``correct``, ``bad`` and ``first_bad`` are those of the eager loop.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: str,
                 device: torch.device, *, world_size: int = 1) -> None:
        if world_size != 1 or isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(f"graph_step runs one process, not {world_size} (DDP's gradient "
                             "all-reduce is not part of the captured step)")
        head = model.head
        if isinstance(head, ImplicitETFHead) and (head.polar_method != "newton_schulz"
                                                  or head.ns_fallback):
            raise ValueError("graph_step needs the implicit head with polar_method "
                             "newton_schulz and ns_fallback=False (the eigensolvers sync)")
        if not isinstance(head, (StandardHead, FixedETFHead, ImplicitETFHead)):
            raise ValueError(f"graph_step does not know the head {type(head).__name__}")
        self.kind = self._optimizer_kind(optimizer)
        self.model, self.optimizer, self.loss, self.device = model, optimizer, loss, device
        self.head = head
        self.head_fn = _fixed_head_train(head) if isinstance(head, FixedETFHead) else None
        zeros = {"dtype": torch.float64, "device": device}
        self.index = torch.zeros((), dtype=torch.long, device=device)  # the batch i
        self.step0 = torch.zeros((), dtype=torch.long, device=device)  # global step at start
        self.loss_sum = torch.zeros((), **zeros)
        self.correct = torch.zeros((), **zeros)
        self.bad = torch.zeros((), **zeros)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.plan: Tensor | None = None  # (rows, steps, B) long: indices (and crop/flip)
        self.scalars: Tensor | None = None  # (steps, columns) float64: the optimiser's
        self.loader = None
        self.batch_size = 0
        self.static_steps = 0  # capture-ready steps this epoch (Adam's host step count)
        self.plan_changed = False  # the plan was reallocated: a captured graph is stale
        self.position = 0  # steps run in this epoch (the host's copy of ``index``)
        self._ready = False
        self._lrs: dict[int, Tensor] = {}  # SGD's −lr per parameter (:meth:`_lr_like`)

    # ------------------------------------------------------------------ the optimiser
    @staticmethod
    def _optimizer_kind(opt: torch.optim.Optimizer) -> str:
        if isinstance(opt, AGD):
            return "agd"
        if type(opt) is torch.optim.SGD:
            kind = "sgd"
        elif type(opt) in (torch.optim.Adam, torch.optim.AdamW):
            kind = "adam"
        else:
            raise ValueError(f"graph_step supports SGD, Adam, AdamW and AGD, not "
                             f"{type(opt).__name__}")
        for g in opt.param_groups:
            if g.get("maximize") or g.get("differentiable") or g.get("fused") \
                    or g.get("amsgrad") or g.get("capturable") \
                    or isinstance(g["lr"], Tensor):
                raise ValueError("graph_step supports the default options of "
                                 f"{type(opt).__name__} only (no maximize, differentiable, "
                                 "fused, amsgrad, capturable or tensor lr)")
        return kind

    def _group_scalars(self, group: dict, t: int) -> list[float]:
        """The step-dependent scalars of one parameter group at optimiser step ``t`` (1, 2,
        ...), computed as torch's single-tensor code computes them in Python."""
        lr = group["lr"]
        if self.kind in ("sgd", "agd"):
            return [-lr if self.kind == "sgd" else lr]
        beta1, beta2 = group["betas"]
        step = float(t)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        return [bias_correction2 ** 0.5, -step_size, 1 - lr * group["weight_decay"]]

    def ready(self) -> bool:
        """Whether :meth:`step` can run: the optimiser has its state for every parameter
        (after one eager step) and the implicit head has taken its first (δ = 0) step.
        Once true it stays true (nothing removes the state): checked no more."""
        if self._ready:
            return True
        if isinstance(self.head, ImplicitETFHead) and self.head.num_steps == 0:
            return False
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                if self.kind == "adam" and "step" not in state:
                    return False
                if self.kind == "sgd" and group["momentum"] != 0 \
                        and state.get("momentum_buffer") is None:
                    return False
                if self.kind == "agd" and p.grad is None:
                    return False
        self._ready = True
        return True

    @torch.no_grad()
    def _optimizer_step(self, row: Tensor) -> None:
        """The optimiser's update with the scalars of ``row``: torch's single-tensor
        arithmetic, the scalars as 0-d tensors cast to the parameters' dtype (as the kernel
        casts a Python scalar), with ``torch._foreach_*`` over the parameters of a group
        that share a dtype and device."""
        groups = self.optimizer.param_groups
        if self.kind == "agd":
            self._agd_step(row)
            return
        width = 1 if self.kind == "sgd" else 3
        update = self._sgd_foreach if self.kind == "sgd" else self._adam_foreach
        for g, group in enumerate(groups):
            cols = [row[g * width + j] for j in range(width)]
            buckets: dict[tuple, list[Tensor]] = {}  # foreach needs one dtype and device
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.dtype, p.device), []).append(p)
            for (dtype, _), params in buckets.items():
                update(params, group, *(c.to(dtype) for c in cols))

    def _sgd_foreach(self, params: list[Tensor], group: dict, neg_lr: Tensor) -> None:
        """torch's single-tensor SGD for parameters of one dtype and device at once
        (``torch._foreach_*``: an operation for all of them, not one per parameter; on the
        CPU the same per-tensor operations). The update ``p + g·(−lr)`` is ``addcmul`` with a
        tensor of ``−lr`` per parameter (filled on the device each step), the form that is
        bitwise ``p.add_(g, alpha=−lr)``."""
        state = self.optimizer.state
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            bufs = [state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] \
                else bufs
        lrs = [self._lr_like(p) for p in params]
        torch._foreach_zero_(lrs)
        torch._foreach_add_(lrs, neg_lr, alpha=1)  # alpha: the Tensor overload, no .item()
        torch._foreach_addcmul_(params, grads, lrs)

    def _lr_like(self, p: Tensor) -> Tensor:
        """A persistent tensor shaped like ``p`` for :meth:`_sgd_foreach`'s learning rate."""
        if id(p) not in self._lrs:
            self._lrs[id(p)] = torch.empty_like(p, memory_format=torch.preserve_format)
        return self._lrs[id(p)]

    def _adam_foreach(self, params: list[Tensor], group: dict, bc2_sqrt: Tensor,
                      neg_step_size: Tensor, decay: Tensor) -> None:
        """torch's single-tensor Adam/AdamW for parameters of one dtype and device at once,
        its operations in its order (``torch._foreach_*``; the scalars as 0-d tensors of the
        parameters' dtype)."""
        state = self.optimizer.state
        grads = [p.grad for p in params]
        beta1, beta2 = group["betas"]
        if group["weight_decay"] != 0:
            if group.get("decoupled_weight_decay", type(self.optimizer) is torch.optim.AdamW):
                torch._foreach_mul_(params, decay)  # 1 - lr·weight_decay
            else:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        exp_avgs = [state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, neg_step_size), denom)

    def _agd_step(self, row: Tensor) -> None:
        """:meth:`gnc.optim.AGD.step` with G and η on the device (the eager one reads G)."""
        groups = self.optimizer.param_groups
        matrices = [p for g in groups for p in g["params"] if p.grad is not None and p.ndim >= 2]
        num_layers = len(matrices)
        if num_layers == 0:
            return
        norms = {p: _position_norms(p.grad) for p in matrices}
        transposed = self.optimizer.is_transposed
        G = sum(_scale(p, transposed(p)) * norms[p].sum() for p in matrices).double() / num_layers
        eta = torch.log((1 + torch.sqrt(1 + 4 * G)) / 2)
        for g, group in enumerate(groups):
            neg_step = -(row[g] * eta / num_layers)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim >= 2:
                    p.addcmul_(p.grad * position_factor(p, norms[p], transposed(p)), neg_step)
                else:
                    p.addcmul_(p.grad, neg_step)

    # ------------------------------------------------------------------ the epoch
    def _epoch_plan(self, loader) -> Tensor:
        """(rows, steps, B) long on the host: what ``loader`` would yield this epoch (the
        sampler's index batches; for device images also the crop offsets and flips, drawn
        from the loader's generator as its iteration draws them)."""
        batches = [torch.as_tensor(b, dtype=torch.long) for b in loader.batch_sampler]
        sizes = {len(b) for b in batches}
        if len(sizes) > 1:
            raise ValueError(f"graph_step needs batches of one size, got sizes {sorted(sizes)}")
        if not batches:
            raise ValueError("graph_step: the loader has no batches")
        plan = torch.cat(batches)[None]
        if isinstance(loader, DeviceImageLoader) and loader.augment:
            plan = torch.cat([plan, loader._draws(plan.shape[1])])
        return plan.view(plan.shape[0], len(batches), -1)

    def begin_epoch(self, loader, global_step: int) -> int:
        """Prepare an epoch of ``loader`` (its epoch set already) starting after
        ``global_step`` optimiser steps; returns the number of steps. One copy of the plan
        and one of the scalars to the device; the static tensors keep their storage."""
        if not isinstance(loader, (DeviceImageLoader, TensorBatchLoader)):
            raise ValueError("graph_step needs in-memory data: device-resident images "
                             f"(--data-on-device) or a tensor dataset, not {type(loader).__name__}")
        self.loader = loader
        plan = self._epoch_plan(loader)
        steps, self.batch_size = plan.shape[1], plan.shape[2]
        table = torch.tensor([[x for group in self.optimizer.param_groups
                               for x in self._group_scalars(group, global_step + k + 1)]
                              for k in range(steps)], dtype=torch.float64)
        self.plan = self._into(self.plan, plan)
        self.scalars = self._into(self.scalars, table)
        with torch.no_grad():
            for t in (self.loss_sum, self.correct, self.bad, self.index):
                t.zero_()
            self.first_bad.fill_(-1)
            self.step0.fill_(global_step)
        self.static_steps = 0
        self.position = 0  # the host's copy of ``index``: GraphedStep.run advances it
        return steps

    def _into(self, static: Tensor | None, host: Tensor) -> Tensor:
        if static is not None and static.shape == host.shape:
            # pageable source: CUDA waits for the stream, then stages it (once an epoch)
            static.copy_(host, non_blocking=True)
            return static
        self.plan_changed = True
        return host.to(self.device)

    def end_epoch(self) -> None:
        """Advance the host-side step count of Adam's state by the capture-ready steps."""
        if self.kind == "adam" and self.static_steps:
            for state in self.optimizer.state.values():
                state["step"] += self.static_steps
        self.static_steps = 0

    # ------------------------------------------------------------------ the step
    def batch(self, i: Tensor) -> tuple[Tensor, Tensor]:
        """Batch ``i`` of the epoch, as the loader yields it, by device operations."""
        plan = self.plan.index_select(1, i.view(1)).squeeze(1)  # (rows, B)
        if isinstance(self.loader, DeviceImageLoader):
            return self.loader._batch(plan)
        idx = plan[0]
        x, y = (t[idx] for t in self.loader.tensors)
        return x, y

    def _accumulate(self, loss: Tensor, logits: Tensor, y: Tensor, i: Tensor) -> None:
        """The eager loop's statistics (:func:`accumulate_step`); then ``i += 1``."""
        with torch.no_grad():
            accumulate_step((self.loss_sum, self.correct, self.bad, self.first_bad),
                            loss, logits, y, self.step0 + i + 1)
            i += 1

    def _forward(self, x: Tensor, y: Tensor) -> Tensor:
        model = self.model
        if self.head_fn is None:
            logits, _ = model(x, y)
            return logits
        saved, model.head_step = model.head_step, self.head_fn
        try:
            logits, _ = model(x, y)
        finally:
            model.head_step = saved
        return logits

    def step(self, i: Tensor, mark: Callable[[], None] | None = None) -> None:
        """Train on batch ``i`` by device operations only; ``mark`` (eager only) is called
        after the loss, as the loop's timer is."""
        x, y = self.batch(i)
        logits = self._forward(x, y)
        loss = classification_loss(self.loss, logits, y)
        if mark is not None:
            mark()
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates (a graph's pool)
        loss.backward()
        self._optimizer_step(self.scalars.index_select(0, i.view(1)).squeeze(0))
        self.head.after_optimizer_step()
        self._accumulate(loss, logits, y, i)

    def eager_step(self, i: Tensor, mark: Callable[[], None] | None = None) -> None:
        """The eager loop's body on batch ``i`` (torch's optimiser step, the heads' own
        forward): the first step of training."""
        x, y = self.batch(i)
        logits, _ = self.model(x, y)
        loss = classification_loss(self.loss, logits, y)
        if mark is not None:
            mark()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.head.after_optimizer_step()
        self._accumulate(loss, logits, y, i)

    # ------------------------------------------------------------------ snapshots
    def state_tensors(self) -> list[Tensor]:
        """Every tensor a step changes: parameters, buffers (non-persistent too), the
        optimiser's state on the device, the accumulators and ``i``."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values()
                        if isinstance(v, Tensor) and v.device == self.index.device]
        return tensors + [self.index, self.loss_sum, self.correct, self.bad, self.first_bad]


def cuda_graph(fn: Callable[[], None], stream: torch.cuda.Stream | None = None
               ) -> Callable[[], None]:
    """Capture ``fn`` in a :class:`torch.cuda.CUDAGraph` with a memory pool of its own, on
    ``stream`` (default: torch's capture stream); returns its ``replay``, which runs on the
    stream current at the call."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, stream=stream):  # pool=None: a private pool
            fn()
    except BaseException:
        # a failure inside the capture makes the graph's exit fail too, before it switches
        # back from its capture stream: the caller's work would stay on that stream
        torch.cuda.set_stream(current)
        raise
    return graph.replay


class GraphedStep:
    """Runs the epoch's steps of a :class:`StaticStep`: eager until it is ready, then (on a
    CUDA device) from one captured graph, else the capture-ready step eagerly.

    Args:
        static: the step.
        capture: capture a graph (default: on a CUDA device).
        graph_factory: ``fn -> replay``, the capture (default :func:`cuda_graph` on
            ``stream``; tests pass a stand-in that runs ``fn``).
        warmup_iters: warm-up steps before the capture (their effects are undone).
        stream: a CUDA stream of this run's own for the warm-up, the capture and the
            replays (default: warm-up on a fresh side stream, capture on torch's capture
            stream, replays on the current stream). It must be the current stream whenever
            :meth:`run` is called (a trainer run by :mod:`gnc.interleave`: everything of the
            run is issued on its stream), else :meth:`run` raises ValueError: the epoch's
            other work (:meth:`StaticStep.begin_epoch`'s copies and resets, the loop's reads
            of the accumulators, its step timer) is issued on the current stream, and on
            another stream it would race with the replays.
    """

    def __init__(self, static: StaticStep, *, capture: bool | None = None,
                 graph_factory: Callable | None = None, warmup_iters: int = WARMUP_ITERS,
                 stream: torch.cuda.Stream | None = None) -> None:
        if stream is not None and static.device.type != "cuda":
            raise ValueError(f"a stream needs a CUDA device, not {static.device}")
        self.static = static
        self.stream = stream
        self.capture = static.device.type == "cuda" if capture is None else capture
        self.graph_factory = graph_factory or functools.partial(cuda_graph, stream=stream)
        self.warmup_iters = warmup_iters
        self._replay: Callable[[], None] | None = None
        self.failed: str | None = None  # why the capture failed: steps then run eagerly
        self.captures = self.replays = 0

    def run(self, mark: Callable[[], None]) -> None:
        """One step at ``static.index``; ``mark`` is called once (after the loss when the
        step runs eagerly, after the replay otherwise)."""
        s = self.static
        self._check_stream()
        position, s.position = s.position, s.position + 1
        if not s.ready():
            s.eager_step(s.index, mark)
            return
        s.static_steps += 1
        # the warm-up runs the steps at position, position + 1, ...: within the epoch's plan
        # (past its end a GPU would fault on the index); else later, or never for an epoch
        # shorter than the warm-up
        room = s.plan.shape[1] - position >= self.warmup_iters
        stale = self._replay is None or s.plan_changed
        if self.capture and not self.failed and stale and room:
            self._capture()
        if not self.capture or self.failed or self._replay is None or s.plan_changed:
            s.step(s.index, mark)  # no (current) graph: the capture-ready step, eagerly
            return
        self._replay()  # on the current stream: ``stream`` when there is one
        mark()
        self.replays += 1
        # what the captured Python did on the host, a replay does not: the heads' host-side
        # step count (and with it, that the implicit head has a residual to report)
        if isinstance(s.head, (FixedETFHead, ImplicitETFHead)):
            s.head.advance_host_steps(1)

    def _check_stream(self) -> None:
        """Refuse to run with a ``stream`` that is not the current one: nothing would order
        the replays on it against the epoch's work on the current stream (class docstring)."""
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.static.device)
        if self.stream != current:
            raise ValueError(f"GraphedStep(stream={self.stream}) must run with its stream "
                             f"current, not {current} (torch.cuda.stream(stream) around "
                             "the epoch, as gnc.interleave does)")

    def _snapshot(self) -> dict:
        s = self.static
        snap = {"tensors": [t.detach().clone() for t in s.state_tensors()],
                "rng": torch.get_rng_state()}
        if s.device.type == "cuda":
            snap["cuda_rng"] = torch.cuda.get_rng_state(s.device)
        if isinstance(s.head, (FixedETFHead, ImplicitETFHead)):
            snap["head"] = s.head.snapshot()
        return snap

    @torch.no_grad()
    def _restore(self, snap: dict, rng: bool = False) -> None:
        """Back to ``snap``, in place; the RNG states only with ``rng`` (after the warm-up:
        after a capture, which consumed none, the generator is left to the graph)."""
        s = self.static
        for t, saved in zip(s.state_tensors(), snap["tensors"], strict=True):
            t.copy_(saved)
        if rng:
            torch.set_rng_state(snap["rng"])
            if "cuda_rng" in snap:
                torch.cuda.set_rng_state(snap["cuda_rng"], s.device)
        if "head" in snap:
            s.head.restore(snap["head"])

    def _capture(self) -> None:
        s = self.static
        s.plan_changed = False
        snap = self._snapshot()
        cuda = s.device.type == "cuda"
        implicit = isinstance(s.head, ImplicitETFHead)
        # A graph reads the CUDA generator's seed and offset from one pair of device tensors
        # that every graph of the process shares (torch fills them as a replay starts): the
        # graphs of runs on other streams would draw each other's numbers.
        draws = RandomDraws() if self.stream is not None else None
        try:
            with products_only() if implicit else contextlib.nullcontext():
                side = caller = None
                if cuda:
                    side = self.stream if self.stream is not None else torch.cuda.Stream(s.device)
                    caller = torch.cuda.current_stream(s.device)
                    side.wait_stream(caller)
                try:
                    with (torch.cuda.stream(side) if side is not None
                          else contextlib.nullcontext()), draws or contextlib.nullcontext():
                        for _ in range(self.warmup_iters):
                            s.step(s.index)
                finally:  # a failed warm-up too: the restores below come after its kernels
                    if side is not None:
                        caller.wait_stream(side)
                if draws is not None and draws.seen:
                    raise NotCapturable(
                        f"the step draws random numbers ({draws.seen}) and its graph would "
                        "replay beside other runs' graphs on their streams, which share the "
                        "CUDA generator's seed and offset")
                self._restore(snap, rng=True)
                s.optimizer.zero_grad(set_to_none=True)  # backward allocates in the pool
                self._replay = self.graph_factory(lambda: s.step(s.index))
            self.captures += 1
        except Exception as err:  # noqa: BLE001 -- any capture failure: train on, eagerly
            self.failed = capture_failure(err)
            self._replay = None
            self._restore(snap, rng=True)
            logger.warning("the training step could not be captured in a CUDA graph (%s); "
                           "it runs eagerly", self.failed,
                           exc_info=not isinstance(err, NotCapturable))
        finally:  # the warm-up (and a stand-in's capture) ran steps: undo them
            self._restore(snap)
