"""Timing and memory of the nearest-ETF layer (``gnc bench``).

Each case times forward and backward separately and reports medians over ``repeats`` runs
after one warm-up. Cases:

- ``layer``: ``nearest_etf`` at (d, K) for ``exact/closed_form`` (ours) and
  ``riemannian/ddn`` (the paper's), on the same inputs: random Frobenius-normalised class
  means and a random warm start ``U_prev``, float32 as in training.
- ``svd``: one ``torch.linalg.svd`` of a d×K float32 matrix, the floor of any exact method.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from gnc.etf import nearest_etf

DEFAULT_SIZES = ((512, 10), (512, 50), (512, 100), (2048, 1000))
# The paper's DDN backward costs ~p²·dK flops (p = K(K+1)/2); above this it takes minutes.
DDN_MAX_FLOPS = 2e11


@dataclass
class BenchRecord:
    """One row of ``gnc bench``: medians in milliseconds, peak memory in MiB."""

    case: str
    method: str
    device: str
    forward_ms: float | None
    backward_ms: float | None
    peak_mem_mb: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds (device-synchronised), after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def layer_inputs(d: int, K: int, device: torch.device, dtype=torch.float32, seed: int = 0):
    """Random normalised class means, a random point of St(d,K) and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    H_bar = torch.randn(d, K, generator=g, dtype=torch.float64)
    H_bar = H_bar - H_bar.mean(dim=1, keepdim=True)
    H_bar = H_bar / H_bar.norm()
    U_prev, _ = torch.linalg.qr(torch.randn(d, K, generator=g, dtype=torch.float64))
    G = torch.randn(d, K, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (H_bar, U_prev, G))


def time_layer(
    d: int, K: int, solver: str, backward: str, device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median forward and backward time (ms) of ``nearest_etf`` at (d, K)."""
    H_bar, U_prev, G = layer_inputs(d, K, device)

    def forward():
        H = H_bar.clone().requires_grad_()
        return H, nearest_etf(H, U_prev, solver=solver, backward=backward)

    H, U = forward()
    t_fwd = median_ms(forward, device, repeats)

    def backward_once():
        H, U = forward()
        _sync(device)
        t0 = time.perf_counter()
        U.backward(G)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    backward_once()
    t_bwd = statistics.median(backward_once() for _ in range(repeats))
    return t_fwd, t_bwd


def time_svd(d: int, K: int, device: torch.device, repeats: int) -> float:
    C = torch.randn(d, K, device=device)
    return median_ms(lambda: torch.linalg.svd(C, full_matrices=False), device, repeats)


def bench_layer(
    sizes=DEFAULT_SIZES, *, device: str | torch.device = "cpu", repeats: int = 5,
    paper_repeats: int = 1,
) -> list[BenchRecord]:
    """Forward/backward of ours vs the paper's at each (d, K), plus the SVD floor at the largest."""
    device = torch.device(device)
    records = []
    for d, K in sizes:
        case = f"layer {d}x{K}"
        fwd, bwd = time_layer(d, K, "exact", "closed_form", device, repeats)
        records.append(BenchRecord(case, "exact/closed_form", str(device), fwd, bwd))
        p = K * (K + 1) // 2
        if p * p * d * K > DDN_MAX_FLOPS:
            est = p * p * d * K / 4e10
            records.append(BenchRecord(
                case, "riemannian/ddn", str(device), None, None,
                note=f"skipped: the dense DDN backward would take ~{est:.0f} s",
            ))
        else:
            fwd, bwd = time_layer(d, K, "riemannian", "ddn", device, paper_repeats)
            records.append(BenchRecord(case, "riemannian/ddn", str(device), fwd, bwd))
    d, K = max(sizes, key=lambda s: s[0] * s[1])
    records.append(BenchRecord(
        f"svd {d}x{K}", "torch.linalg.svd float32", str(device), time_svd(d, K, device, repeats),
        None, note="floor: one thin SVD of a d×K matrix",
    ))
    return records


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def format_table(records: list[BenchRecord]) -> str:
    """A plain-text table of the records, with forward+backward totals."""
    head = ("case", "method", "device", "fwd ms", "bwd ms", "total ms", "peak MiB", "note")
    rows = []
    for r in records:
        total = None if r.forward_ms is None else r.forward_ms + (r.backward_ms or 0.0)
        rows.append((r.case, r.method, r.device, _fmt(r.forward_ms), _fmt(r.backward_ms),
                     _fmt(total), _fmt(r.peak_mem_mb), r.note))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
             for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def speedups(records: list[BenchRecord]) -> list[str]:
    """Lines comparing ours with the paper's and with the SVD floor."""
    out = []
    by_case: dict[str, dict[str, BenchRecord]] = {}
    for r in records:
        by_case.setdefault(r.case, {})[r.method] = r
    svd = next((r for r in records if r.case.startswith("svd")), None)
    for case, methods in by_case.items():
        ours, paper = methods.get("exact/closed_form"), methods.get("riemannian/ddn")
        if ours and paper and paper.forward_ms is not None:
            ratio = (paper.forward_ms + paper.backward_ms) / (ours.forward_ms + ours.backward_ms)
            out.append(f"{case}: exact/closed_form is {ratio:.0f}x faster than riemannian/ddn")
        if ours and svd and case.split()[-1] == svd.case.split()[-1]:
            ratio = (ours.forward_ms + ours.backward_ms) / svd.forward_ms
            out.append(f"{case}: exact/closed_form forward+backward = {ratio:.2f}x one SVD")
    return out


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"512x10,2048x1000"`` → ``[(512, 10), (2048, 1000)]``."""
    sizes = []
    for item in text.split(","):
        try:
            d, K = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad size {item!r}: expected DxK, e.g. 512x10") from None
        if K < 2 or d < K:
            raise ValueError(f"bad size {item!r}: need K >= 2 and d >= K")
        sizes.append((d, K))
    return sizes

