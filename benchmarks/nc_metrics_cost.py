"""What the streaming NC metrics cost: NCStatistics.update, update_margins and compute().

Issue 18, item 1 (an evaluation at the cost of a forward pass). Synthetic float32 features
of one split — ``N`` samples, ``K`` balanced classes, class means ``3·randn`` plus unit
noise, a random classifier and its logits — go through both passes in batches, inside
``trusted_inputs`` as the evaluation runs them (:func:`gnc.evaluation.nc_two_pass`), then
``compute()``. ``compute()`` is broken down by the private (``_``) functions and methods of
:mod:`gnc.metrics` it calls (each timed inclusively, with a device synchronisation around
it; ``rest`` is what no top-level one covers, the public ``class_means()`` among it), so
the table follows whatever ``compute()`` does. ``etf_distances`` (the evaluation's ETF
study, outside ``compute()``) is timed apart.
Every phase runs ``--repeats`` times; the table has the medians (ms).

    PYTHONPATH=src python3 benchmarks/nc_metrics_cost.py [--device cuda] \\
        [--sizes 10x512,100x512] [--n 50000] [--batch 1000] [--repeats 3] \\
        [--linalg-device same,cpu] [--linalg-threads default,1] [--json out.json]

``--linalg-device``: where ``compute()`` does its float64 linear algebra (the
``linalg_device`` argument of :class:`~gnc.metrics.NCStatistics`; ``same`` = the statistics'
device, the default); ``--linalg-threads``: its ``linalg_threads`` (eigensolvers at once on
the CPU; ``default`` = ``torch.get_num_threads()``). Comma lists measure every combination;
the lines under the table give the largest relative difference of any float metric from the
first combination's.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import platform
import statistics
import time
from collections import defaultdict

import torch

from gnc import metrics as M
from gnc.metrics import NCStatistics, etf_distances
from gnc.validation import trusted_inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Breakdown:
    """Times (inclusive, synchronised) of the gnc.metrics functions and NCStatistics methods
    called while installed; ``top`` sums those not called from another timed one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self.top = 0.0
        self._depth = 0
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            _sync(self.device)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                elapsed = time.perf_counter() - start
                self._depth -= 1
                self.times[name] += elapsed
                if self._depth == 0:
                    self.top += elapsed
        return timed

    def __enter__(self) -> Breakdown:
        for name, fn in vars(M).items():
            if inspect.isfunction(fn) and fn.__module__ == M.__name__ and name.startswith("_") \
                    and not name.startswith(("_check", "_shape")):
                self._saved.append((M, name, fn))
                setattr(M, name, self._wrap(name, fn))
        for name, fn in vars(NCStatistics).items():
            if inspect.isfunction(fn) and name.startswith("_") and not name.startswith("__") \
                    or name == "sync":
                self._saved.append((NCStatistics, name, fn))
                setattr(NCStatistics, name, self._wrap(f".{name}", fn))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)


def _data(K: int, d: int, n: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    h = (3 * torch.randn(K, d, generator=g))[y] + torch.randn(n, d, generator=g)
    W = torch.randn(K, d, generator=g) / math.sqrt(d)
    b = 0.1 * torch.randn(K, generator=g)
    data = {"h": h, "y": y, "W": W, "b": b, "logits": h @ W.T + b}
    return {k: v.to(device) for k, v in data.items()}


def _one(data: dict, K: int, d: int, batch: int, device: torch.device,
         kwargs: dict) -> tuple[dict[str, float], dict]:
    """One evaluation's phases (seconds) and its metrics."""
    times: dict[str, float] = {}
    h, y, logits, W, b = (data[k] for k in ("h", "y", "logits", "W", "b"))
    chunks = list(zip(h.split(batch), y.split(batch), logits.split(batch), strict=True))
    _sync(device)
    start = time.perf_counter()
    stats = NCStatistics(K, d, device=device, **kwargs)
    with trusted_inputs():
        for hb, yb, lb in chunks:
            stats.update(hb, yb, lb)
        _sync(device)
        times["update"] = time.perf_counter() - start
        start = time.perf_counter()
        stats.sync()  # the last flush of the per-class second moments
        _sync(device)
        times["sync (flush)"] = time.perf_counter() - start
        start = time.perf_counter()
        for hb, yb, lb in chunks:
            stats.update_margins(hb, yb, W, b, lb)
        _sync(device)
        times["update_margins"] = time.perf_counter() - start
    with Breakdown(device) as parts:
        start = time.perf_counter()
        metrics = stats.compute(W, b)
        _sync(device)
        total = time.perf_counter() - start
    times["compute()"] = total
    for name, seconds in sorted(parts.times.items(), key=lambda kv: -kv[1]):
        times[f"  {name}"] = seconds
    times["  rest"] = total - parts.top
    means, mu_G, counts = stats.class_means()
    start = time.perf_counter()
    etf_distances(W.double(), (means[counts > 0] - mu_G).T)
    _sync(device)
    times["etf_distances"] = time.perf_counter() - start
    return times, metrics


def _rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for key, x in a.items():
        y = b.get(key)
        if isinstance(x, float) and isinstance(y, float) and not (math.isnan(x) and
                                                                    math.isnan(y)):
            worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-300))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="10x512,100x512", help="KxD,KxD,...")
    parser.add_argument("--n", type=int, default=50_000, help="samples of the split")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--linalg-device", default="same",
                        help="comma list of where compute() runs its linear algebra: "
                             "same (the statistics' device), cpu, cuda")
    parser.add_argument("--linalg-threads", default="default",
                        help="comma list of eigensolvers at once on the CPU: default "
                             "(torch.get_num_threads()) or a number")
    parser.add_argument("--json", help="also write the medians (ms) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# torch {torch.__version__}, {device} ({name or platform.machine()}), "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}; N={args.n}, batch {args.batch}, "
          f"median of {args.repeats} (ms)")
    results: dict[str, dict[str, float]] = {}
    for size in args.sizes.split(","):
        K, d = map(int, size.lower().split("x"))
        data = _data(K, d, args.n, device)
        for linalg in args.linalg_device.split(","):
            for threads in args.linalg_threads.split(","):
                kwargs = {} if linalg == "same" else {"linalg_device": linalg}
                if threads != "default":  # (before linalg_threads existed: only defaults)
                    kwargs["linalg_threads"] = int(threads)
                runs, first = defaultdict(list), None
                _one(data, K, d, args.batch, device, kwargs)  # warm-up (kernels, allocator)
                for _ in range(args.repeats):
                    times, metrics = _one(data, K, d, args.batch, device, kwargs)
                    for key, seconds in times.items():
                        runs[key].append(1e3 * seconds)
                    first = first or metrics
                column = f"K={K} d={d} linalg={linalg} threads={threads}"
                results[column] = {k: statistics.median(v) for k, v in runs.items()}
                results[column]["_metrics"] = {k: v for k, v in first.items()
                                               if isinstance(v, float)}
    rows = list(dict.fromkeys(k for col in results.values() for k in col if k != "_metrics"))
    columns = list(results)
    print("| phase (ms) | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for row in rows:
        cells = [f"{results[c][row]:.1f}" if row in results[c] else "" for c in columns]
        print(f"| {row} | " + " | ".join(cells) + " |")
    by_size = defaultdict(list)
    for column in columns:
        by_size[column.split(" linalg=")[0]].append(column)
    for group in by_size.values():
        for column in group[1:]:
            diff = _rel_diff(results[group[0]]["_metrics"], results[column]["_metrics"])
            first = " ".join(group[0].split(" ")[2:])
            print(f"# {column}: largest relative metric difference from {first}: {diff:.2e}")
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
