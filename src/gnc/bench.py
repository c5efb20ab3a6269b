"""Timing and memory of the nearest-ETF layer (``gnc bench``).

Each case times forward and backward separately and reports medians over ``repeats`` runs
after one warm-up. Cases:

- ``layer``: ``nearest_etf`` at (d, K) for ``exact/closed_form`` (ours) and
  ``riemannian/ddn`` (the paper's), on the same inputs: random Frobenius-normalised class
  means and a random warm start ``U_prev``, float32 as in training.
- ``head``: a training-mode :class:`~gnc.heads.ImplicitETFHead` (class means, solve,
  logits, cross-entropy, backward) on K features, at the largest size.
- ``svd``: one ``torch.linalg.svd`` of a d×K float32 matrix, the floor of any exact method.
- ``step``: a whole training step (forward = model + loss; backward = backward + optimiser
  step) per method for the UFM and ResNet cases, with peak memory:
  ``torch.cuda.max_memory_allocated`` above the pre-step level on GPU, the peak resident-set
  size above the starting level (sampled every 2 ms) on CPU.
- ``epoch``: whole training epochs of a preset; its forward and backward columns are the
  epoch's *mean* step times (the share of the epoch spent outside the steps needs their sum).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from gnc.declarative import nearest_etf
from gnc.memory import PeakMemory
from gnc.validation import trusted_inputs

DEFAULT_SIZES = ((512, 10), (512, 50), (512, 100), (2048, 1000))
# The paper's DDN backward costs ~p²·dK flops (p = K(K+1)/2); above this it takes minutes.
DDN_MAX_FLOPS = 2e11
# Layers above this d·K² are timed once (after the warm-up): 10240x10000 takes seconds a call.
BIG_LAYER_FLOPS = 1e11


def _has_pymanopt() -> bool:
    import importlib.util

    return importlib.util.find_spec("pymanopt") is not None


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
    epoch_s: float | None = None  # epoch cases: wall seconds of one training epoch
    data_wait_pct: float | None = None  # epoch cases: share of the epoch outside the steps
    started_at: float | None = None  # epoch cases: Unix time the timed epoch began

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


def layer_inputs(d: int, K: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random normalised class means, a random point of St(d,K) and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    H_bar = torch.randn(d, K, generator=g, dtype=torch.float64)
    H_bar = H_bar - H_bar.mean(dim=1, keepdim=True)
    H_bar = H_bar / H_bar.norm()
    U_prev, _ = torch.linalg.qr(torch.randn(d, K, generator=g, dtype=torch.float64))
    G = torch.randn(d, K, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (H_bar, U_prev, G))


# the layer's polar factor: the eigensolvers ("auto") or the sync-free iteration
BENCH_POLAR_METHODS = ("auto", "newton_schulz")
LAYER_ROWS = {"auto": "exact/closed_form", "newton_schulz": "exact/closed_form newton_schulz"}
HEAD_ROWS = {"auto": "ImplicitETFHead", "newton_schulz": "ImplicitETFHead newton_schulz"}
NS_ROW = LAYER_ROWS["newton_schulz"]


def time_layer(
    d: int, K: int, solver: str, backward: str, device: torch.device, repeats: int,
    polar_method: str = "auto",
) -> tuple[float, float]:
    """Median forward and backward time (ms) of ``nearest_etf`` at (d, K), as in training
    (:func:`gnc.validation.trusted_inputs`: no value checks)."""
    H_bar, U_prev, G = layer_inputs(d, K, device)

    def forward():
        H = H_bar.clone().requires_grad_()
        with trusted_inputs():
            return H, nearest_etf(H, U_prev, solver=solver, backward=backward,
                                  polar_method=polar_method, ns_fallback=False)

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


def time_head(d: int, K: int, device: torch.device, repeats: int,
              polar_method: str = "auto") -> tuple[float, float]:
    """Median forward/backward (ms) of a training-mode ImplicitETFHead on K features (one per
    class: the smallest class-stratified batch; the logits' products grow with the batch)."""
    from gnc.heads import ImplicitETFHead

    g = torch.Generator().manual_seed(0)
    head = ImplicitETFHead(d, K, polar_method=polar_method, ns_fallback=False).to(device)
    h0 = torch.randn(K, d, generator=g).to(device)
    y = torch.arange(K, device=device)
    fwd, bwd = [], []
    for i in range(repeats + 1):
        h = h0.clone().requires_grad_()
        _sync(device)
        t0 = time.perf_counter()
        with trusted_inputs():
            loss = torch.nn.functional.cross_entropy(head(h, y), y)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        if i:  # the first call is the δ = 0 step
            fwd.append((t1 - t0) * 1e3)
            bwd.append((time.perf_counter() - t1) * 1e3)
    return statistics.median(fwd), statistics.median(bwd)


def time_svd(d: int, K: int, device: torch.device, repeats: int) -> float:
    C = torch.randn(d, K, device=device)
    return median_ms(lambda: torch.linalg.svd(C, full_matrices=False), device, repeats)


def check_polar_methods(polar_methods: Sequence[str]) -> None:
    """``ValueError`` naming any of ``polar_methods`` not in :data:`BENCH_POLAR_METHODS`."""
    unknown = set(polar_methods) - set(BENCH_POLAR_METHODS)
    if unknown:
        raise ValueError(f"unknown polar method(s) {sorted(unknown)}; choose from "
                         f"{', '.join(BENCH_POLAR_METHODS)}")


def bench_layer(
    sizes=DEFAULT_SIZES, *, device: str | torch.device = "cpu", repeats: int = 5,
    paper_repeats: int = 1, polar_methods: Sequence[str] = BENCH_POLAR_METHODS,
) -> list[BenchRecord]:
    """Forward/backward of ours (per polar method: ``auto`` = the eigensolvers,
    ``newton_schulz``) vs the paper's at each (d, K), plus the head's training step and the
    SVD floor at the largest size (skipped above :data:`BIG_LAYER_FLOPS`)."""
    check_polar_methods(polar_methods)
    device = torch.device(device)
    records = []
    for d, K in sizes:
        case = f"layer {d}x{K}"
        reps = repeats if d * K * K <= BIG_LAYER_FLOPS else 1
        note = "" if reps == repeats else "1 timed run"
        for polar in polar_methods:
            fwd, bwd = time_layer(d, K, "exact", "closed_form", device, reps, polar)
            records.append(BenchRecord(case, LAYER_ROWS[polar], str(device), fwd, bwd,
                                       note=note))
        p = K * (K + 1) // 2
        if not _has_pymanopt():
            records.append(BenchRecord(case, "riemannian/ddn", str(device), None, None,
                                       note="skipped: pymanopt is not installed"))
        elif p * p * d * K > DDN_MAX_FLOPS:
            est = p * p * d * K / 4e10  # seconds at ~40 GFLOP/s
            when = f"~{est:.0f} s" if est < 3600 else "hours"
            records.append(BenchRecord(
                case, "riemannian/ddn", str(device), None, None,
                note=f"skipped: the dense DDN backward ({p}x{d * K} constraint Jacobian) "
                     f"would take {when}",
            ))
        else:
            fwd, bwd = time_layer(d, K, "riemannian", "ddn", device, paper_repeats)
            runs = f"{paper_repeats} timed run{'s' if paper_repeats > 1 else ''}"
            records.append(BenchRecord(case, "riemannian/ddn", str(device), fwd, bwd,
                                       note="" if paper_repeats == repeats else runs))
    d, K = max(sizes, key=lambda s: s[0] * s[1])
    if d * K * K > BIG_LAYER_FLOPS:
        return records
    for polar in polar_methods:
        fwd, bwd = time_head(d, K, device, repeats, polar)
        records.append(BenchRecord(f"head {d}x{K}", HEAD_ROWS[polar], str(device), fwd, bwd,
                                   note=f"training step of the head, batch of {K} features"))
    records.append(BenchRecord(
        f"svd {d}x{K}", "torch.linalg.svd float32", str(device),
        time_svd(d, K, device, repeats), None, note="floor: one thin SVD of a d×K matrix",
    ))
    return records


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def format_table(records: list[BenchRecord]) -> str:
    """A plain-text table of the records, with forward+backward totals."""
    head = ("case", "method", "device", "fwd ms", "bwd ms", "total ms", "peak MiB", "note")
    epochs = any(r.epoch_s is not None for r in records)
    if epochs:
        head = head[:-1] + ("s/epoch", "data wait %", "note")
    rows = []
    for r in records:
        total = None if r.forward_ms is None else r.forward_ms + (r.backward_ms or 0.0)
        row = (r.case, r.method, r.device, _fmt(r.forward_ms), _fmt(r.backward_ms),
               _fmt(total), _fmt(r.peak_mem_mb))
        if epochs:
            row += (_fmt(r.epoch_s), _fmt(r.data_wait_pct))
        rows.append((*row, r.note))
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
        ns = methods.get(NS_ROW)
        if ours and ns and ns.forward_ms is not None:
            ratio = (ns.forward_ms + ns.backward_ms) / (ours.forward_ms + ours.backward_ms)
            out.append(f"{case}: newton_schulz forward+backward = {ratio:.2f}x the eigensolver's")
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



# --------------------------------------------------------------------------- training steps

@dataclass(frozen=True)
class StepCase:
    """One training step to time: a backbone on a batch, the three heads on top."""

    name: str
    model: str
    K: int
    batch: int
    in_shape: tuple[int, ...]  # () for ufm: the batch is sample indices
    feature_dim: int | None = None
    num_samples: int | None = None  # ufm: number of free feature vectors
    note: str = ""
    small_input: bool | None = None  # the backbone's stem (None: by image size)


GPU_STEPS = (
    StepCase("ufm100", "ufm", 100, 10_000, (), 512, 10_000, "full batch"),
    StepCase("ufm1000", "ufm", 1000, 10_000, (), 1024, 100_000, "batch 10k of N=100k"),
    StepCase("resnet18", "resnet18", 10, 256, (3, 32, 32)),
    StepCase("resnet50-k1000", "resnet50", 1000, 256, (3, 224, 224)),
)
# On a 2-core CPU the image steps would take minutes: smaller batches, said in the table.
CPU_STEPS = GPU_STEPS[:2] + (
    StepCase("resnet18", "resnet18", 10, 64, (3, 32, 32), note="CPU: batch 64, not 256"),
    StepCase("resnet50-k1000", "resnet50", 1000, 16, (3, 64, 64), small_input=False,
             note="CPU: batch 16 at 64x64, not 256 at 224x224"),  # the GPU case's stem
)
STEP_METHODS = ("standard", "fixed", "implicit")


def time_step(case: StepCase, method: str, device: torch.device, repeats: int) -> BenchRecord:
    """Median forward (model + loss) and backward (+ SGD step, and the head's
    ``after_optimizer_step``: ``standard`` renormalises its rows) of one training step."""
    import torch.nn.functional as F

    from gnc.heads import make_head
    from gnc.models import FeatureClassifier, build_backbone

    g = torch.Generator().manual_seed(0)
    backbone, d = build_backbone(case.model, in_shape=case.in_shape,
                                 num_samples=case.num_samples, feature_dim=case.feature_dim,
                                 small_input=case.small_input)
    model = FeatureClassifier(backbone, make_head(method, d, case.K), tau=5.0).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                          momentum=0.9)
    y = (torch.arange(case.batch) % case.K).to(device)
    if case.in_shape == ():
        x = torch.randperm(case.num_samples, generator=g)[: case.batch].to(device)
    else:
        x = torch.randn(case.batch, *case.in_shape, generator=g).to(device)
    fwd, bwd = [], []

    def step() -> None:
        _sync(device)
        t0 = time.perf_counter()
        logits, _ = model(x, y)
        loss = F.cross_entropy(logits, y)
        _sync(device)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.head.after_optimizer_step()
        _sync(device)
        fwd.append((t1 - t0) * 1e3)
        bwd.append((time.perf_counter() - t1) * 1e3)

    step()  # warm-up: allocations, first-step solve without U_prev
    fwd.clear(), bwd.clear()
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            step()
    peak = mem.mb
    return BenchRecord(f"step {case.name}", method, str(device), statistics.median(fwd),
                       statistics.median(bwd), peak, case.note)


def bench_steps(
    cases: Sequence[StepCase] | None = None, *, device: str | torch.device = "cpu",
    repeats: int = 3, methods: Sequence[str] = STEP_METHODS,
) -> list[BenchRecord]:
    """Whole training steps per method (GPU sizes on CUDA, reduced sizes on CPU, each in a
    fresh process so that its peak memory is its own)."""
    device = torch.device(device)
    if cases is None:
        cases = GPU_STEPS if device.type == "cuda" else CPU_STEPS
    jobs = [(case, m, device, repeats) for case in cases for m in methods]
    if device.type == "cuda":
        return [time_step(*job) for job in jobs]
    # CPU: a fresh process per case, or the allocator's cache from the previous case hides
    # this one's peak resident memory.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
        return [pool.submit(time_step, *job).result() for job in jobs]


def step_overheads(records: list[BenchRecord]) -> list[str]:
    """Every method's step (or epoch) time relative to ``standard``'s, per case."""
    out = []
    steps: dict[str, dict[str, BenchRecord]] = {}
    for r in records:
        if r.case.startswith(("step ", "epoch ")):
            steps.setdefault(r.case, {})[r.method] = r

    def cost(r: BenchRecord) -> float:
        return r.epoch_s if r.epoch_s is not None else r.forward_ms + r.backward_ms

    for case, by_method in steps.items():
        base = by_method.get("standard")
        if base is None:
            continue
        t0 = cost(base)
        for m, r in by_method.items():
            if m != "standard":
                t = cost(r)
                out.append(f"{case}: {m} = {t / t0:.3f}x standard "
                           f"({100 * (t / t0 - 1):+.1f}%)")
    return out


def step_cases_by_name(names: str, device: str | torch.device) -> list[StepCase]:
    """``"ufm100,resnet18"`` → the cases of that name for ``device``."""
    table = GPU_STEPS if torch.device(device).type == "cuda" else CPU_STEPS
    by_name = {c.name: c for c in table}
    out = []
    for name in names.split(","):
        if name not in by_name:
            raise ValueError(f"unknown step case {name!r}; choose from {', '.join(by_name)}")
        out.append(by_name[name])
    return out


# --------------------------------------------------------------------------- whole epochs


def synthetic_cifar10(num_train: int = 50_000, num_test: int = 10_000, seed: int = 0):
    """Random uint8 images of CIFAR-10's shape, as torchvision ``CIFAR10`` datasets with the
    CIFAR-10 transforms, in (training, evaluation) bundles — for the epoch bench without data."""
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    from gnc.data import DatasetBundle
    from gnc.data.vision import NORMALIZATION

    g = torch.Generator().manual_seed(seed)
    mean, std = NORMALIZATION["cifar10"]
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    augmented = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm])

    def split(n: int, transform) -> tvd.CIFAR10:
        ds = tvd.CIFAR10.__new__(tvd.CIFAR10)  # no files: the arrays are the dataset
        ds.data = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        ds.targets = (torch.arange(n) % 10).tolist()
        ds.transform, ds.target_transform, ds.transforms = transform, None, None
        ds.classes = [str(c) for c in range(10)]
        return ds

    def bundle(train_tf) -> DatasetBundle:
        train, test = split(num_train, train_tf), split(num_test, T.Compose(norm))
        return DatasetBundle(train, test, 10, (3, 32, 32), torch.tensor(train.targets),
                             "random-cifar10", tuple(train.classes))

    return bundle(augmented), bundle(T.Compose(norm))


@contextmanager
def _epoch_trainer(preset: str, method: str, device: torch.device, epochs: int,
                   data_dir: str, overrides: dict, *, stream: torch.cuda.Stream | None = None
                   ) -> Iterator[tuple[Any, str]]:
    """A :class:`~gnc.training.Trainer` of ``preset`` for ``method`` in a temporary run
    directory, and a note on its data: real data when ``data_dir`` has it, otherwise
    :func:`synthetic_cifar10` (said in the note). ``stream``: the trainer's (its caller makes
    it current, :mod:`gnc.interleave`)."""
    import tempfile

    from gnc.build import load_data
    from gnc.data import DatasetNotFoundError
    from gnc.experiments import get_preset
    from gnc.training import Trainer

    cfg = get_preset(preset).train_config(
        **{"method": method, "device": str(device), "data_dir": data_dir, "progress": False,
           "epochs": epochs, "eval_every": 10**6, **overrides})
    try:
        data, note = (load_data(cfg), load_data(cfg, augment=False)), "real data"
    except DatasetNotFoundError:
        if cfg.dataset != "cifar10":  # a file the user named (npz:, imagefolder:, ...): theirs
            raise
        per_class = cfg.dataset_options.get("subset")  # a small stand-in when asked for
        sizes = (10 * per_class, 10 * per_class) if per_class else ()
        data, note = synthetic_cifar10(*sizes), "random images of CIFAR's shape"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, data=data, stream=stream)
        note += f", {len(trainer.train_loader)} steps, data on device: " + (
            "yes" if type(trainer.train_loader).__name__ == "DeviceImageLoader" else "no")
        try:
            yield trainer, note
        finally:
            trainer.release_lock()


# settings of the implicit head that an epoch record names next to the method
HEAD_SETTINGS = ("polar_method", "graph_head", "solve_device")


def time_epoch(preset: str, method: str, device: torch.device, *, epochs: int = 2,
               data_dir: str = "data", before_timed: Callable[[], object] | None = None,
               **overrides) -> BenchRecord:
    """Seconds of the last of ``epochs`` training epochs of ``preset`` (the first warms up
    cuDNN's autotuner and the allocator), its mean step times and the peak memory.

    Data as :func:`_epoch_trainer` finds it. "data wait" is the share of the epoch spent
    outside the timed steps: fetching batches. ``before_timed()`` is called after the
    warm-up, just before the timed epoch (e.g. a barrier, so that benches of several
    processes time the same seconds).
    """
    with _epoch_trainer(preset, method, device, epochs, data_dir, overrides) as (trainer, note):
        for _ in range(epochs - 1):
            trainer.train_epoch(None)
        _sync(device)
        if before_timed is not None:
            before_timed()
        with PeakMemory(device) as mem:
            started_at = time.time()
            t0 = time.perf_counter()
            stats = trainer.train_epoch(None)
            _sync(device)
            seconds = time.perf_counter() - t0
        steps = len(trainer.train_loader)
    busy = (stats["time_forward_ms"] + stats["time_backward_ms"]) * steps / 1e3
    head_settings = [f"{k}={overrides[k]}" for k in HEAD_SETTINGS if k in overrides]
    if head_settings and method.startswith("implicit"):  # label the variant in the table
        method = f"{method} ({', '.join(head_settings)})"
    return BenchRecord(f"epoch {preset}", method, str(device), stats["time_forward_ms"],
                       stats["time_backward_ms"], mem.mb, note, epoch_s=seconds,
                       data_wait_pct=max(0.0, 100 * (1 - busy / seconds)),
                       started_at=started_at)


# CUDA runtime calls that make the host wait for the device
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "cudaMemcpy")
_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def _count_ops(event) -> int:
    """``aten::`` operators below a profiler event (nested ones included)."""
    return sum(child.name.startswith("aten::") + _count_ops(child)
               for child in event.cpu_children)


def profile_epoch(preset: str, method: str, device: torch.device, *, data_dir: str = "data",
                  top: int = 12, **overrides) -> str:
    """Where one training epoch of ``preset`` spends its time, per step (after a warm-up
    epoch), from ``torch.profiler``: kernel launches and host-device synchronisations (CUDA
    runtime calls), the time inside the model's ``gnc.backbone`` / ``gnc.head`` ranges (host
    and device), and the ``top`` operators by self time (device time on a GPU). For finding
    what makes a head launch-bound or wait on the device; the profiler slows the epoch."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _epoch_trainer(preset, method, device, 2, data_dir, overrides) as (trainer, note):
        trainer.train_epoch(None)
        _sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            trainer.train_epoch(None)
            _sync(device)
            seconds = time.perf_counter() - t0
        steps = len(trainer.train_loader)
    events = prof.key_averages()
    count = {e.key: e.count for e in events}
    by_key = {e.key: e for e in events}

    def per_step(n: float) -> str:
        return f"{n / steps:.1f}"

    settings = "".join(f" {k}={v}" for k, v in overrides.items())
    lines = [f"## {preset} / {method}{settings} on {device} ({note}); profiled epoch "
             f"{seconds:.2f} s", ""]
    if cuda:
        lines.append(f"per step: {per_step(sum(count.get(k, 0) for k in _LAUNCH_CALLS))} "
                     "kernel launches, host waits: " + ", ".join(
                         f"{k} {per_step(count[k])}" for k in _SYNC_CALLS if k in count))
    for name in ("gnc.backbone", "gnc.head"):
        if name in by_key:
            e = by_key[name]
            ops = sum(_count_ops(ev) for ev in prof.events() if ev.name == name)
            lines.append(f"{name}: host {e.cpu_time_total / 1e3 / steps:.3f} ms/step" + (
                f", device {e.device_time_total / 1e3 / steps:.3f} ms/step" if cuda else "")
                + f", {per_step(ops)} operators/step (forward, nested included)")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines += ["", "```", events.table(sort_by=sort, row_limit=top, max_name_column_width=60),
              "```", ""]
    return "\n".join(lines)


def bench_epochs(preset: str = "cifar10-resnet18", *, device: str | torch.device = "cpu",
                 methods: Sequence[str] = STEP_METHODS, **kw) -> list[BenchRecord]:
    """:func:`time_epoch` for each method (same data, same settings)."""
    device = torch.device(device)
    return [time_epoch(preset, m, device, **kw) for m in methods]
