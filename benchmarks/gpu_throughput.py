"""Stage 1 of the GPU check (issue 18): what one card gives for many small runs.

    PYTHONPATH=src python3 benchmarks/gpu_throughput.py OUT.json [--device cuda] \
        [--data-dir data] [--jobs 1,2,4,8] [--parts steps,...] [--budget-s 240] \
        [--deadline-s BUDGET+20] [--rounds 80] [--conv-shapes 64x32,128x16,256x8,512x4] \
        [--conv-batch 250] [--set KEY=VALUE ...]

Writes one JSON object to OUT.json, rewritten after every measurement (a call cut by its
time limit still returns what it had): each time whole (a temporary file renamed over it,
:func:`write_atomic`) and with ``best`` chosen from everything measured so far. SIGTERM
(``timeout``'s end of stage 1) exits through the ``finally`` blocks (:func:`sigterm_as_exit`):
the bench processes are killed, the MPS daemon stopped, and the file written once more, with
``stopped`` saying why it ended early. In this order (the time each takes on the card
decides what fits in stage 1's five minutes):

- ``steps``: per method, the epoch bench (`gnc.bench.time_epoch`) eager (the preset as it is,
  bf16 autocast) and with the captured step (``graph_step``, also bf16, the implicit head with
  the Newton–Schulz polar factor): ms per step, s per epoch, peak MiB;
- ``eval_s``: one evaluation (precise statistics + train + test split), median of 3;
  ``eval_s_precise_bn_20``: the same with the precise-BN pass bounded to 20 batches;
- ``sync_free``: whether (up to) 10 replayed steps of each method run under
  ``torch.cuda.set_sync_debug_mode("error")`` (CUDA only);
- ``streams``: option (a), one process driving N runs of the standard method with the
  captured step as ``gnc experiment --jobs-mode streams`` drives them (each trainer's
  ``epoch_steps`` a step per turn under :class:`gnc.interleave.RunStates`: captured and
  replayed on a CUDA stream of its own, with a memory pool of its own; the loop's step
  timer, its NaN check every 25 steps and the turn's RNG swap included); R rounds
  (``--rounds``), each one step of every run in turn, one synchronize at the end: aggregate
  images/s, ms per step (with N = 1: one run's replays one after the other, the floor of one
  run, also ``replay_floor_ms``), the seconds spent building runs, the allocator's peak
  while each run was built (data, model, warm-up, capture) and each run's mean training loss
  (a check that concurrent replays do not disturb each other). The runs are built once for
  all N (the N runs are the first N of the next N's). Measured before the processes: it is
  the likelier winner (GPU-THROUGHPUT.md's estimate, 1.3–2× one graphed run, against
  0.96–1.24× for time-sliced processes) and the budget may end the part after it;
- ``jobs``: aggregate training images/s with N runs of the epoch bench in flight as plain
  processes (option (b) of the issue; the captured step when ``steps`` found it faster), and
  ``mps``: the best N under CUDA MPS when its daemon starts (its probe within
  :data:`MPS_PROBE_S`; skipped, and said so, with under :data:`MPS_MIN_LEFT_S` of the budget
  left); processes still running at ``--deadline-s`` are killed and that N is recorded as
  ``"timeout: ..."``. The N timed epochs start at one barrier (after each process's warm-up
  epoch) and ``img_per_s`` is all their images over the span from the first start to the
  last end (:func:`aggregate`; the sum of the per-process rates, ``img_per_s_sum``, counted
  benches that started apart as concurrent: on this CPU two tiny benches came out at
  exactly 2.0x one, 1.4x with the barrier);
- ``grouped_conv``: per ResNet-18 CIFAR conv shape (C channels at S×S, 3×3, batch 250, bf16,
  channels-last), forward+backward of one grouped conv (groups=5, 5·C channels) vs five
  dense convs on five streams vs five dense convs on one stream, ms each: whether packing
  five models into one network (vmap → grouped convs) could pay;
- ``best`` (rewritten with every save): the settings stage 2 uses (:func:`choose`: the faster
  step variant; the best N and how the runs share the card: ``streams`` — ``gnc experiment
  --jobs-mode streams`` — with the captured step when the best streams measurement beat every
  process measurement or none exists, else MPS or plain processes), with ``streams_win``:
  whether streams beat the processes (None: no process measurement).

Each part is recorded as an error string when it fails and the rest goes on; a part (for
``jobs`` and ``streams``: an N) that would start after ``--budget-s`` seconds is recorded as
``"skipped: budget"``, one left out of ``--parts`` as ``"skipped: --parts"`` (e.g.
``--parts streams,grouped_conv`` measures option (a) alone).

On a CPU with ``--set width=4 --set batch_size=10 --set 'dataset_options={"subset": 4}'
--rounds 2 --conv-shapes 4x8 --conv-batch 2`` every part runs in seconds
(tests/test_bench.py runs it; an epoch needs 4 steps: the warm-up before a capture reads
batches 1 to 3): no streams there, the "replays" are the capture-ready step run eagerly (a
stand-in for the capture, as tests/test_step.py uses).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

PRESET = "cifar10-resnet18"
METHODS = ("standard", "fixed", "implicit")
# the preset's bf16 autocast is kept: it is captured (autocast without its weight cache)
CAPTURED = {"graph_step": True, "polar_method": "newton_schulz", "data_on_device": "on"}
DEFAULT_JOBS = 4  # stage 2's N when no process measurement exists (as gpu_check.sh's)
CONV_SHAPES = "64x32,128x16,256x8,512x4"  # ResNet-18's CIFAR stages: channels x size
SKIPPED = "skipped: budget"
NOT_ASKED = "skipped: --parts"
TIMEOUT = "timeout"  # a process part cut at the deadline (its processes killed)
DEADLINE_AFTER_BUDGET_S = 20.0  # default deadline: gpu_check.sh kills stage 1 at budget + 30
MPS_MIN_LEFT_S = 60.0  # the mps part needs this much budget: the probe, then N processes
MPS_PROBE_S = 30.0  # the most the MPS probe may take (a client that hangs is a failure)
PARTS = ("steps", "eval_s", "sync_free", "jobs", "mps", "streams", "grouped_conv")
_now = time.monotonic  # the budget's clock (tests replace it)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` in one step: written to a temporary file in
    the same folder, flushed to the disk, then renamed over ``path``. A kill mid-write leaves
    the previous version (stage 2 reads a cut-off file as no result at all)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the half-written file only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_terminated: list[int] = []  # the SIGTERM received under sigterm_as_exit (exit_if_terminated)


def _exit_on_sigterm(signum: int, frame) -> None:
    # once: `timeout` signals its child and then the child's group, so a second SIGTERM
    # would land in the finally blocks that the first one runs
    first = not _terminated
    _terminated.append(signum)
    if first:
        sys.exit(128 + signum)  # 143: as a kill by SIGTERM, but through the finally blocks


def exit_if_terminated() -> None:
    """Exit as :func:`_exit_on_sigterm` does when a SIGTERM came and its SystemExit was
    swallowed: Python only prints an exception raised where the handler happened to run in
    an at-fork hook, a finaliser or a callback (seen on the CPU: logging's lock release after
    a DataLoader forked its workers). Called between measurements (:func:`wait_all`, the
    budget's check)."""
    if _terminated:
        sys.exit(128 + _terminated[0])


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (``timeout``'s end of stage 1) as ``sys.exit(143)`` for the block: Python's
    default ends the process at once, skipping the ``finally`` blocks that stop the MPS
    daemon (detached: it would outlive us), kill the bench processes and write the last
    result."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _terminated.clear()


@contextlib.contextmanager
def sync_errors(device: torch.device) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block on CUDA; nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def step_variants(device: torch.device, data_dir: str, overrides: dict) -> dict:
    from gnc.bench import time_epoch

    out = {}
    for method in METHODS:
        for name, extra in (("eager", {}), ("captured", CAPTURED)):
            settings = {**overrides, **extra}
            if method != "implicit":
                settings.pop("polar_method", None)
            try:
                r = time_epoch(PRESET, method, device, data_dir=data_dir, **settings)
                out[f"{method}/{name}"] = {
                    "step_ms": r.forward_ms + r.backward_ms, "epoch_s": r.epoch_s,
                    "peak_mem_mb": r.peak_mem_mb, "note": r.note}
            except Exception as err:  # noqa: BLE001 -- a variant that fails is a result
                out[f"{method}/{name}"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return out


PRECISE_BN_BATCHES = 20  # the bounded precise-BN pass timed beside the full one


def eval_seconds(device: torch.device, data_dir: str, overrides: dict) -> dict:
    """Median seconds of one evaluation (precise statistics, train and test splits): with
    the BN pass over the whole train split ("full"), and bounded to
    :data:`PRECISE_BN_BATCHES` batches."""
    from gnc.bench import _epoch_trainer

    with _epoch_trainer(PRESET, "implicit", device, 1, data_dir, overrides) as (trainer, _):
        trainer.train_epoch(None)
        out = {}
        for bn_batches in (0, PRECISE_BN_BATCHES):  # the full precise-BN pass, then bounded
            trainer.cfg.precise_bn_batches = bn_batches
            times = []
            for _ in range(3):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.evaluate_epoch({})
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[bn_batches] = statistics.median(times)
    return {"full": out[0], f"precise_bn_{PRECISE_BN_BATCHES}": out[PRECISE_BN_BATCHES]}


def sync_free(device: torch.device, data_dir: str, overrides: dict) -> dict:
    """Per method: "ok" when 10 replays raise nothing under set_sync_debug_mode("error"),
    "not captured: <why>" when there was no graph to replay, else the error."""
    out = {}
    for method in METHODS:
        settings = {**overrides, **CAPTURED}
        if method != "implicit":
            settings.pop("polar_method")
        try:
            out[method] = replays_sync_free(method, device, data_dir, settings)
        except Exception as err:  # noqa: BLE001
            out[method] = _error(err)
    return out


def replays_sync_free(method: str, device: torch.device, data_dir: str, settings: dict
                      ) -> str:
    """:func:`sync_free` for one method. The capture is checked first: without a graph the
    steps run eagerly, and the first sync of the eager step would be the error recorded
    instead of why the capture failed. The replays run as the training loop runs them,
    inside :func:`gnc.validation.trusted_inputs` (the value checks read the device)."""
    from gnc.bench import _epoch_trainer
    from gnc.validation import trusted_inputs

    with _epoch_trainer(PRESET, method, device, 1, data_dir, settings) as (trainer, _):
        trainer.train_epoch(None)  # first step eager, warm-up, capture
        graph = trainer.step_graph
        if graph.failed is not None:
            return f"not captured: {graph.failed}"
        if graph.capture and not graph.captures:
            return "not captured: never captured (an epoch shorter than the warm-up)"
        n = graph.static.begin_epoch(trainer.train_loader, trainer.step)
        with trusted_inputs(), sync_errors(device):
            for _ in range(min(10, n)):  # replays of the next epoch's steps
                graph.run(lambda: None)
        return "ok" if graph.failed is None else f"not captured: {graph.failed}"


def barrier(folder: Path, n: int, timeout_s: float = 120.0) -> None:
    """Wait until ``n`` processes have reached this call (one file each in ``folder``), at
    most ``timeout_s`` (a process that failed before it must not hang the rest: their
    timed epochs then start apart, which ``start_spread_s`` shows)."""
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout_s
    while sum(1 for _ in folder.iterdir()) < n and time.monotonic() < deadline:
        time.sleep(0.002)


def aggregate(records: list[dict]) -> dict:
    """Images/s of benches that ran at once, from each one's ``images``, ``epoch_s`` and
    ``started_at`` (Unix time of its timed epoch): all images over the span from the first
    start to the last end (``img_per_s``; the timed epochs start at one barrier, so the span
    is the slowest epoch), next to the sum of the per-process rates (``img_per_s_sum``,
    which a staggered start would inflate) and how far apart they started."""
    starts = [r["started_at"] for r in records]
    span = max(r["started_at"] + r["epoch_s"] for r in records) - min(starts)
    return {"img_per_s": sum(r["images"] for r in records) / span,
            "img_per_s_sum": sum(r["images"] / r["epoch_s"] for r in records),
            "span_s": span, "start_spread_s": max(starts) - min(starts)}


def in_flight(n: int, device: str, data_dir: str, sets: list[str], env: dict | None = None,
              *, timeout_s: float = math.inf) -> dict | str:
    """N epoch benches of the standard method at once, their timed epochs started together
    (:func:`barrier`; one that fails before it counts as arrived): :func:`aggregate`
    images/s; :data:`TIMEOUT` (with the seconds) when they have not all ended within
    ``timeout_s``: then, as when this call is interrupted, the benches still running are
    killed (a bench stuck starting CUDA, say under MPS, would otherwise hold stage 1 until
    its kill)."""
    if timeout_s <= 0:  # the deadline has passed: none is started
        return f"{TIMEOUT}: the deadline had passed"
    with tempfile.TemporaryDirectory(prefix="gnc-in-flight-") as tmp:
        folder = Path(tmp) / "barrier"
        folder.mkdir()
        cmd = [sys.executable, str(Path(__file__).resolve()), "child", str(folder), str(n),
               "--device", device, "--data-dir", data_dir,
               *[a for s in sets for a in ("--set", s)]]
        t0 = time.perf_counter()
        procs, logs = [], []
        try:
            for k in range(n):  # files, not pipes: the parent polls instead of reading
                logs.append((open(Path(tmp) / f"{k}.out", "w+"),
                             open(Path(tmp) / f"{k}.err", "w+")))
                procs.append(subprocess.Popen(cmd, stdout=logs[-1][0], stderr=logs[-1][1],
                                              text=True, env={**os.environ, **(env or {})}))
            ended = wait_all(procs, folder, time.monotonic() + timeout_s)
            wall = time.perf_counter() - t0
            if not ended:
                return f"{TIMEOUT}: {n} processes killed after {wall:.0f} s"
            records, errors = [], []
            for p, (out, err) in zip(procs, logs, strict=True):
                out.seek(0)
                err.seek(0)
                if p.returncode:
                    errors.append((err.read().strip().splitlines() or ["?"])[-1][:200])
                else:
                    records.append(json.loads(out.read()))
        finally:
            kill_all(procs)
            for files in logs:
                for f in files:
                    f.close()
    rates = aggregate(records) if records else {"img_per_s": 0.0}
    return {"runs": n, **rates, "wall_s": wall, "errors": errors}


def wait_all(procs: list[subprocess.Popen], folder: Path, deadline: float) -> bool:
    """Wait until every one of ``procs`` has ended (True) or ``time.monotonic()`` passes
    ``deadline`` (False); one that fails arrives at the barrier in ``folder`` (the others
    must not wait for it)."""
    running = set(range(len(procs)))
    while running:
        exit_if_terminated()
        if time.monotonic() > deadline:
            return False
        for k in list(running):
            if procs[k].poll() is not None:
                running.discard(k)
                if procs[k].returncode:  # release the others waiting for it
                    (folder / f"failed-{procs[k].pid}").touch()
        time.sleep(0.01)
    return True


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL to those of ``procs`` still running, then reap them. (They stay in stage 1's
    process group: ``timeout``'s signals reach them even when this process cannot act.)"""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


def _child(argv: list[str]) -> None:
    """One bench of :func:`in_flight`: prints ``{"images", "epoch_s", "started_at"}``."""
    from gnc.bench import time_epoch

    ap = argparse.ArgumentParser(prog="gpu_throughput.py child")
    ap.add_argument("barrier", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    overrides = parse_set(args.set)
    record = time_epoch(PRESET, "standard", torch.device(args.device), data_dir=args.data_dir,
                        before_timed=lambda: barrier(args.barrier, args.n), **overrides)
    steps = int(record.note.split(" steps")[0].rsplit(" ", 1)[-1])
    images = steps * overrides.get("batch_size", 250)
    print(json.dumps({"images": images, "epoch_s": record.epoch_s,
                      "started_at": record.started_at}))


def mps_in_flight(n: int, device: str, data_dir: str, sets: list[str], *,
                  timeout_s: float = math.inf, probe_s: float = MPS_PROBE_S) -> dict | str:
    """:func:`in_flight` under CUDA MPS, or "unavailable" when its daemon does not start (or
    its probe, a CUDA process served through it, takes over ``probe_s``); the daemon's start
    and the processes end within ``timeout_s`` (:data:`TIMEOUT`). The daemon is stopped
    however this ends (with :func:`sigterm_as_exit`, also at stage 1's kill)."""
    from gnc.jobs import start_mps

    deadline = time.monotonic() + timeout_s
    daemon = start_mps(probe=True, timeout_s=min(probe_s, timeout_s))
    if daemon is None:
        return "unavailable"
    try:
        return in_flight(n, device, data_dir, sets, daemon.env,
                         timeout_s=deadline - time.monotonic())
    finally:
        daemon.stop()


def mps_part(result: dict, device: torch.device, left_s: float,
             run: Callable[[int], dict | str]) -> dict | str:
    """The ``mps`` record: ``run(n)`` with the best N of the ``jobs`` part, on CUDA only and
    only with at least :data:`MPS_MIN_LEFT_S` of the budget left (``left_s``): the probe and
    N processes' two epochs started later would run into stage 1's kill; else why not."""
    measured = _records(result, "jobs")
    if device.type != "cuda" or not measured:
        return "unavailable"
    if left_s < MPS_MIN_LEFT_S:
        return f"{SKIPPED} ({max(left_s, 0):.0f} s left, the part needs {MPS_MIN_LEFT_S:.0f} s)"
    return run(max(measured, key=lambda r: r["img_per_s"])["runs"])


def _stand_in_graph(fn):
    """The CPU's stand-in for :func:`gnc.step.cuda_graph`: the "capture" runs the step once
    (GraphedStep undoes it, as after a capture), a "replay" runs it again."""
    fn()
    return fn


class StreamRun:
    """One trainer with the captured step, advanced as ``gnc experiment --jobs-mode streams``
    advances it: its :meth:`~gnc.training.Trainer.epoch_steps` one step per turn, each turn
    under its :class:`gnc.interleave.RunStates` (its RNG states and context; on a GPU its
    stream current, on which its step is captured and replayed), epoch after epoch. On a CPU
    the capture is the stand-in: the "replays" run the capture-ready step eagerly."""

    def __init__(self, trainer, states) -> None:
        from gnc.step import GraphedStep, StaticStep

        self.trainer, self.states = trainer, states
        if trainer.device.type != "cuda":  # else epoch_steps captures on the run's stream
            trainer.step_graph = GraphedStep(
                StaticStep(trainer.model, trainer.optimizer, trainer.cfg.loss, trainer.device),
                capture=True, graph_factory=_stand_in_graph)
        self.epoch = None  # the running epoch's steps (a generator)
        self.epoch_ends = 0  # epochs ended (each one's end is host work: loss read, next plan)
        self.peak_mem_mb: float | None = None

    @property
    def graph(self):
        return self.trainer.step_graph

    def _advance(self) -> None:
        while True:  # past an epoch's last step: its end, then the next epoch's first step
            if self.epoch is None:
                self.epoch = self.trainer.epoch_steps(None)
            try:
                next(self.epoch)
                return
            except StopIteration:
                self.epoch = None
                self.epoch_ends += 1

    def step(self) -> None:
        """The next step, in the run's turn: the first trains eagerly, the second warms up,
        captures and replays, every later one replays."""
        self.states.run(self._advance)

    def steps_left(self) -> int:
        """Steps before this run's epoch ends: the step after them ends it and begins the
        next epoch (0 before the first epoch: its first step begins one)."""
        static = self.graph.static if self.graph is not None else None
        if self.epoch is None or static is None or static.plan is None:
            return 0
        return static.plan.shape[1] - static.position

    def clear_of_epoch_end(self, steps: int) -> None:
        """Untimed: if this run's epoch would end within its next ``steps`` steps, run it to
        the first step of its next epoch, so that those steps hold no end of an epoch. Left
        as it is when an epoch is too short to hold ``steps`` steps."""
        left = self.steps_left()
        if left < steps < self.graph.static.plan.shape[1]:
            for _ in range(left + 1):
                self.step()

    def epoch_loss(self) -> float:
        """The mean training loss of this epoch's steps so far (reads the device)."""
        static = self.graph.static
        return self.states.run(lambda: float(static.loss_sum) / max(1, static.position))


class StreamRuns:
    """Trainers of the standard method with the captured step (seeds ``seed``, ``seed + 1``,
    ...), each built in its own turn (on a GPU with a stream of its own current), trained
    one eager step and captured, built when first asked for:
    ``with StreamRuns(device, data_dir, overrides) as pool: pool.grow(n)``."""

    def __init__(self, device: torch.device, data_dir: str, overrides: dict) -> None:
        self.settings = {**overrides, **CAPTURED}
        self.settings.pop("polar_method")
        self.seed = self.settings.pop("seed", 0)
        self.device, self.data_dir = device, data_dir
        self.runs: list[StreamRun] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> StreamRuns:
        return self

    def __exit__(self, *exc) -> None:
        self.runs.clear()
        self._stack.close()  # the trainers, in reverse

    def grow(self, n: int) -> list[StreamRun]:
        """The first ``n`` runs, building those missing (with each one's allocator peak)."""
        from gnc.bench import _epoch_trainer
        from gnc.interleave import RunStates
        from gnc.memory import PeakMemory

        while len(self.runs) < n:
            seed = self.seed + len(self.runs)
            cuda = self.device.type == "cuda"
            states = RunStates.now(self.device,
                                   torch.cuda.Stream(self.device) if cuda else None)
            with PeakMemory(self.device) as mem:
                trainer, _ = states.run(self._stack.enter_context, _epoch_trainer(
                    PRESET, "standard", self.device, 1, self.data_dir,
                    {**self.settings, "seed": seed}, stream=states.stream))
                run = StreamRun(trainer, states)
                run.step()  # eager: the optimiser's state
                run.step()  # warm-up, capture, the first replay
                _sync(self.device)
            run.peak_mem_mb = mem.mb
            self.runs.append(run)
        return self.runs[:n]


def round_robin(runs: list[StreamRun], rounds: int, device: torch.device) -> float:
    """Seconds for ``rounds`` rounds of one step of every run in turn (each replay issued on
    its run's stream, as ``--jobs-mode streams`` issues it), with one synchronize at the
    end."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        for run in runs:
            run.step()
    _sync(device)
    return time.perf_counter() - t0


def streams_sweep(ns: list[int], device: torch.device, data_dir: str, overrides: dict, *,
                  rounds: int = 80, warmup: int = 3, done: Callable | None = None,
                  stop: Callable[[], bool] | None = None) -> list[dict | str]:
    """Option (a) for each N of ``ns``: N runs in one process (:class:`StreamRuns`, built
    once: the N runs are the first N of a larger N's), each replaying its captured step on
    its own stream, ``warmup`` then ``rounds`` timed rounds (:func:`round_robin`); a run
    whose epoch would end inside them is first run, untimed, into its next epoch
    (:meth:`StreamRun.clear_of_epoch_end`), so the rate is of training steps, not of N runs'
    epoch ends at once (``epoch_ends``: those timed all the same, 0 unless an epoch is
    shorter than ``warmup + rounds``). Per N:
    training images/s in all, ms per step (N = 1: one run's replays one after the other
    through the training loop, the floor of one run), the seconds spent building the runs
    added, each run's allocator peak while it
    was built, the memory reserved in all, the runs whose capture failed, and each run's mean
    training loss so far this epoch (read after the timing: NaN or a loss far from the N = 1
    run's would say that concurrent replays disturb each other).
    ``done(record)`` after each N; once ``stop()`` is true the rest are :data:`SKIPPED`."""
    records: list[dict | str] = []
    with StreamRuns(device, data_dir, overrides) as pool:
        for n in ns:
            if stop is not None and stop():
                records.append(SKIPPED)
            else:
                t0 = time.perf_counter()
                runs = pool.grow(n)
                build_s = time.perf_counter() - t0
                for run in runs:  # the timed steps: steps, not some runs' epoch ends
                    run.clear_of_epoch_end(warmup + rounds)
                round_robin(runs, warmup, device)
                ends = sum(r.epoch_ends for r in runs)
                seconds = round_robin(runs, rounds, device)
                batch = runs[0].graph.static.batch_size
                records.append({
                    "runs": n, "img_per_s": n * rounds * batch / seconds,
                    "ms_per_step": 1e3 * seconds / (n * rounds), "rounds": rounds,
                    "build_s": build_s, "peak_mem_mb": [r.peak_mem_mb for r in runs],
                    "replays": sum(r.graph.replays for r in runs),
                    "epoch_ends": sum(r.epoch_ends for r in runs) - ends,
                    "not_captured": [r.graph.failed or "never captured (an epoch shorter "
                                     "than the warm-up)" for r in runs
                                     if r.graph.failed or not r.graph.captures],
                    "train_loss": [r.epoch_loss() for r in runs]})
                if device.type == "cuda":
                    records[-1]["reserved_mb"] = torch.cuda.memory_reserved(device) / 2**20
                del runs
            if done is not None:
                done(records[-1])
    if device.type == "cuda":  # the trainers, their data, the graphs and their pools are gone
        gc.collect()
        torch.cuda.empty_cache()
    return records


def streams(n: int, device: torch.device, data_dir: str, overrides: dict, *,
            rounds: int = 80, warmup: int = 3) -> dict:
    """:func:`streams_sweep` for one N."""
    (record,) = streams_sweep([n], device, data_dir, overrides, rounds=rounds, warmup=warmup)
    return record


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"64x32,128x16"`` → ``[(64, 32), (128, 16)]`` (channels, size)."""
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]


def grouped_conv(device: torch.device, shapes: list[tuple[int, int]], *, batch: int = 250,
                 models: int = 5, repeats: int = 10) -> dict:
    """Per (C, S): forward+backward (input and weight gradients) of a 3×3 conv on ``batch``
    images of C channels at S×S, ``models`` times: as one grouped conv (groups=models,
    models·C channels), as dense convs each on its own stream, and as dense convs on one
    stream; median ms each. bf16 channels-last on CUDA (cudnn.benchmark on); float32 and no
    streams on a CPU."""
    import torch.nn.functional as F

    from gnc.bench import median_ms

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)

    def tensor(*shape: int, grad: bool = True) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen).to(device, dtype)
        if len(shape) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    def fwd_bwd(x, w, gy, groups: int = 1) -> None:
        y = F.conv2d(x, w, padding=1, groups=groups)
        torch.autograd.grad(y, (x, w), gy)

    streams = [torch.cuda.Stream(device) if cuda else None for _ in range(models)]
    out: dict = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "models": models,
                 "streams": cuda}
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for c, size in shapes:
            x, gy = tensor(batch, models * c, size, size), tensor(batch, models * c, size,
                                                                    size, grad=False)
            w = tensor(models * c, c, 3, 3)
            dense = [(tensor(batch, c, size, size), tensor(c, c, 3, 3),
                      tensor(batch, c, size, size, grad=False)) for _ in range(models)]

            def on_streams(dense=dense) -> None:
                if not cuda:
                    for args in dense:
                        fwd_bwd(*args)
                    return
                current = torch.cuda.current_stream(device)
                for s, args in zip(streams, dense, strict=True):
                    s.wait_stream(current)
                    with torch.cuda.stream(s):
                        fwd_bwd(*args)
                for s in streams:
                    current.wait_stream(s)

            variants = {"grouped_ms": lambda x=x, w=w, gy=gy: fwd_bwd(x, w, gy, models),
                        "streams_ms": on_streams,
                        "one_stream_ms": lambda dense=dense: [fwd_bwd(*a) for a in dense]}
            row = {}
            for name, fn in variants.items():
                fn()  # cuDNN's autotuner (median_ms warms up once more)
                row[name] = median_ms(fn, device, repeats)
            row["grouped_over_streams"] = row["grouped_ms"] / row["streams_ms"]
            out[f"{c}x{size}"] = row
            del x, gy, w, dense
    finally:
        torch.backends.cudnn.benchmark = saved
    return out


def _records(result: dict, key: str) -> list[dict]:
    """The measurements of a per-N part (not those recorded as an error or skipped)."""
    value = result.get(key)
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


def choose(result: dict) -> dict:
    """Stage 2's settings from what ``result`` holds: the captured step when it is faster for
    every method; the N (and MPS or plain processes) with the most images/s — or
    :data:`DEFAULT_JOBS` plain processes when no process measurement exists; then, with the
    captured step, streams (``--jobs-mode streams``) at their best N when that measurement
    (every capture made) beat the processes' best or there is none. ``streams_win``:
    whether it beat them (None: no process measurement)."""
    steps = result.get("steps")
    steps = steps if isinstance(steps, dict) else {}

    def epoch_s(key: str) -> float:
        rec = steps.get(key)
        return rec.get("epoch_s", float("inf")) if isinstance(rec, dict) else float("inf")

    captured = all(epoch_s(f"{m}/captured") < epoch_s(f"{m}/eager") for m in METHODS)
    jobs = [r for r in _records(result, "jobs") if r["img_per_s"] > 0]
    best = {"captured_step": captured, "jobs": DEFAULT_JOBS, "jobs_mode": "processes",
            "img_per_s": None, "measured": bool(jobs)}
    if jobs:
        top = max(jobs, key=lambda r: r["img_per_s"])
        best.update(jobs=top["runs"], img_per_s=top["img_per_s"])
        mps = result.get("mps")
        if isinstance(mps, dict) and mps["img_per_s"] > top["img_per_s"]:
            best.update(jobs=mps["runs"], jobs_mode="mps", img_per_s=mps["img_per_s"])
    ok = [r for r in _records(result, "streams") if not r["not_captured"] and r["img_per_s"] > 0]
    if ok:
        top = max(ok, key=lambda r: r["img_per_s"])
        win = None if best["img_per_s"] is None else top["img_per_s"] > best["img_per_s"]
        best.update(streams_runs=top["runs"], streams_img_per_s=top["img_per_s"],
                    streams_win=win)
        if captured and win is not False:  # a measurement beats an unmeasured default
            best.update(jobs=top["runs"], jobs_mode="streams", img_per_s=top["img_per_s"])
    return best


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--jobs", default="1,2,4,8", help="the N of the jobs and streams parts")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"the parts to run (default all: {','.join(PARTS)})")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="start no part after this many seconds (it is recorded as skipped)")
    ap.add_argument("--deadline-s", type=float,
                    help="cut the process parts (jobs, mps) still running this many seconds "
                         "after the start: their processes killed, recorded as timeout "
                         f"(default: the budget + {DEADLINE_AFTER_BUDGET_S:.0f}; before "
                         "stage 1's kill)")
    ap.add_argument("--rounds", type=int, default=80, help="timed rounds of the streams part")
    ap.add_argument("--conv-shapes", default=CONV_SHAPES, help="CxS,...: the grouped-conv part")
    ap.add_argument("--conv-batch", type=int, default=250)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    args.asked = set(args.parts.split(","))
    if args.asked - set(PARTS):
        ap.error(f"unknown part(s) {sorted(args.asked - set(PARTS))}; "
                 f"choose from {', '.join(PARTS)}")
    if args.deadline_s is None:
        args.deadline_s = args.budget_s + DEADLINE_AFTER_BUDGET_S
    return args


def _stopped(err: BaseException) -> str:
    """How a stage 1 that did not end by itself ended, for its file."""
    if isinstance(err, SystemExit) and err.code == 128 + signal.SIGTERM:
        return "SIGTERM (stage 1's time limit)"
    return _error(err) if str(err) else type(err).__name__


def stage1(args: argparse.Namespace) -> None:
    """The parts in order (module docstring), the file rewritten after each; whatever ends
    this (SIGTERM under :func:`sigterm_as_exit`, Ctrl-C, a bug) writes it once more."""
    asked = args.asked
    device, overrides = torch.device(args.device), parse_set(args.set)
    data_dir = args.data_dir
    result: dict = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    path = Path(args.out)
    start = _now()

    def save() -> None:
        # a kill at any point leaves a "best" chosen from everything measured so far
        result["best"] = choose(result)
        write_atomic(path, json.dumps(result, indent=1))

    def over_budget() -> bool:  # checked before each part and each N
        exit_if_terminated()
        return _now() - start > args.budget_s

    def until_deadline() -> float:
        return args.deadline_s - (_now() - start)

    def part(name: str, fn, *a, **kw):
        """fn(*a, **kw), its error as a string, or why it did not run."""
        if name not in asked:
            return NOT_ASKED
        if over_budget():
            return SKIPPED
        try:
            return fn(*a, **kw)
        except Exception as err:  # noqa: BLE001 -- a part that fails is a result
            return _error(err)

    try:
        result["steps"] = part("steps", step_variants, device, data_dir, overrides)
        save()
        evals = part("eval_s", eval_seconds, device, data_dir, overrides)
        for key in ("full", f"precise_bn_{PRECISE_BN_BATCHES}"):  # an error: in both
            name = "eval_s" if key == "full" else f"eval_s_{key}"
            result[name] = evals[key] if isinstance(evals, dict) else evals
        save()
        result["sync_free"] = part("sync_free", sync_free, device, data_dir, overrides)
        save()
        ns = [int(j) for j in args.jobs.split(",")]

        def streams_done(record: dict | str) -> None:
            result["streams"].append(record)
            if isinstance(record, dict) and record["runs"] == 1:
                result["replay_floor_ms"] = record["ms_per_step"]
            save()

        result["streams"] = []
        if "streams" not in asked:
            result["streams"] = [NOT_ASKED] * len(ns)
        else:  # the budget is checked before each N
            try:
                streams_sweep(ns, device, data_dir, overrides, rounds=args.rounds,
                              done=streams_done, stop=over_budget)
            except Exception as err:  # noqa: BLE001 -- this N and the rest are not measured
                streams_done(_error(err))
        save()
        # option (b), N processes, with the step variant stage 2 would use
        captured = choose(result)["captured_step"]
        sets = args.set + ([f"{k}={json.dumps(v)}" for k, v in CAPTURED.items()
                            if k != "polar_method"] if captured else [])
        result["jobs"] = []
        for n in ns:
            result["jobs"].append(part("jobs", in_flight, n, args.device, data_dir, sets,
                                       timeout_s=until_deadline()))
            save()
        result["mps"] = NOT_ASKED if "mps" not in asked else mps_part(
            result, device, args.budget_s - (_now() - start),
            lambda n: part("mps", mps_in_flight, n, args.device, data_dir, sets,
                           timeout_s=until_deadline()))
        save()
        result["grouped_conv"] = part("grouped_conv", grouped_conv, device,
                                      parse_shapes(args.conv_shapes), batch=args.conv_batch)
    except BaseException as err:  # SIGTERM (the time limit), Ctrl-C: said in the file
        result["stopped"] = _stopped(err)
        raise
    finally:
        result["elapsed_s"] = _now() - start
        save()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:  # one process of in_flight
        _child(argv[1:])
        return
    args = parse_args(argv)
    with sigterm_as_exit():
        stage1(args)


if __name__ == "__main__":
    main()
