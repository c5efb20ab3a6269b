"""Device operations in one captured training step, per method: what a CUDA graph replays.

A captured ResNet-18 step on 250 CIFAR images is launch-bound on an H100/H200 (each tiny
kernel costs a few µs however little it computes), so the implicit head's cost over the
standard head's is, to first order, its extra kernels. This counts the operators that run
a kernel (views excluded) in one capture-ready step (:class:`gnc.step.StaticStep`, under
:func:`gnc.etf.products_only` as during a capture), on the CPU, for the preset's
architecture (d = 512, K = 10, δ as the preset; a narrow width and small batch: the count
does not depend on them), and splits the implicit head's by where they run:

    python benchmarks/step_kernels.py [--preset cifar10-resnet18] [--width 8] [--batch-size 20]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gnc.declarative as declarative
from gnc.bench import _epoch_trainer
from gnc.etf import products_only
from gnc.step import StaticStep
from gnc.validation import trusted_inputs

METHODS = ("standard", "fixed", "implicit")
# operators that only make views (no kernel on a GPU)
VIEWS = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::t", "aten::transpose", "aten::permute",
    "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select",
    "aten::alias", "aten::detach", "aten::as_strided", "aten::_reshape_alias",
    "aten::reshape", "aten::lift_fresh", "aten::promote_types", "aten::result_type",
})
# the implicit head's parts, by the function they run in
PARTS = {"polar_newton_schulz": "polar factor (forward)", "lyapunov_solve": "Lyapunov (backward)"}


class KernelCount(TorchDispatchMode):
    """Counts the operators that are not views, by the part (:data:`PARTS`) they run in."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: collections.Counter = collections.Counter()
        self.where = ["rest"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name not in VIEWS:
            self.parts[self.where[-1]] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def tagging(self):
        """Attribute the operators of :data:`PARTS`'s functions to them."""
        saved = {name: getattr(declarative, name) for name in PARTS}

        def wrap(name, fn):
            @functools.wraps(fn)
            def tagged(*a, **kw):
                self.where.append(PARTS[name])
                try:
                    return fn(*a, **kw)
                finally:
                    self.where.pop()
            return tagged

        for name, fn in saved.items():
            setattr(declarative, name, wrap(name, fn))
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(declarative, name, fn)


def count(preset: str, method: str, overrides: dict) -> collections.Counter:
    """Kernels of one capture-ready step of ``method`` as replays run it: after the first
    (eager) step and one capture-ready step (its one-off allocations)."""
    with _epoch_trainer(preset, method, torch.device("cpu"), 1, "none", overrides) as (tr, _):
        static = StaticStep(tr.model, tr.optimizer, tr.cfg.loss, tr.device)
        static.begin_epoch(tr.train_loader, 0)
        mode = KernelCount()
        with trusted_inputs():
            static.eager_step(static.index)
            with products_only():
                static.step(static.index)
            with products_only(), mode.tagging(), mode:
                static.step(static.index)
    return mode.parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cifar10-resnet18")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=20)
    args = ap.parse_args()
    overrides = {"width": args.width, "batch_size": args.batch_size, "graph_step": True,
                 "polar_method": "newton_schulz", "data_on_device": "on", "amp": "none",
                 "channels_last": False, "dataset_options": {"subset": 6}}
    counts = {m: count(args.preset, m, overrides if m == "implicit" else
                       {k: v for k, v in overrides.items() if k != "polar_method"})
              for m in METHODS}
    base = sum(counts["standard"].values())
    print(f"kernels in one captured step of {args.preset} (views excluded)")
    print(f"  {'method':<10}{'kernels':>9}{'over standard':>15}  of which")
    for m, parts in counts.items():
        total = sum(parts.values())
        split = ", ".join(f"{name} {parts[name]}" for name in PARTS.values() if parts[name])
        print(f"  {m:<10}{total:>9}{total - base:>+15}  {split}")


if __name__ == "__main__":
    main()
