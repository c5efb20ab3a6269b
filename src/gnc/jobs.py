"""Run many training runs at once: a pool of worker processes (``gnc experiment --jobs N``).

:func:`run_many` runs tasks (module-level functions and their arguments, e.g. one training run
each) in ``N`` worker processes. Every task runs as it would alone, in its own process: its
own seed, data order, augmentation and files are the task's business.

- **Start-up.** Workers are forked by a *fork server* (``multiprocessing``'s ``forkserver``: a
  fresh Python that imports :data:`PRELOAD` — torch and the training code; with
  :data:`REPORT_PRELOAD` where the workers draw the report — once, and forks a worker per
  request), never by the parent (``fork`` of a process that may have started CUDA or its
  OpenMP threads is unsafe). A spawned worker spends 2–5 s importing torch before its first
  step, more than a small run trains; a forked one starts in milliseconds.
  :func:`prestart` starts the server early (``gnc experiment --jobs N`` does it before it
  imports torch itself), so its imports overlap the parent's. Where there is no fork server
  (Windows), ``spawn``. Each worker takes the parent's environment and working directory as
  they are at :func:`run_many` (the server's are those it started with), and the platform's
  default start method for processes of its own (a DataLoader's workers).

- **Threads.** Each worker runs ``torch.set_num_threads(threads_per_job(N))``:
  ``max(1, cores // N)`` with ``cores = len(os.sched_getaffinity(0))``. The order of floating-
  point sums, hence a run's trajectory, depends on the thread count, so a run of ``--jobs N``
  is bitwise equal (on the CPU) to the same run trained alone with that many threads
  (``torch.set_num_threads(threads_per_job(N))``), not to one trained with all the cores.
  ``gnc experiment`` without ``--jobs`` (one run at a time, in the process itself) leaves the
  thread count alone, as before.
- **Failures.** A task that raises does not stop the others: its outcome carries the first
  line of its error (and the parent logs it as it happens); a worker that dies (killed, a
  crash) fails its task and is replaced while tasks remain.
- **Progress and logs.** :func:`report_progress` in a task feeds one bar in the parent (total
  given by the caller); the workers' log records (``warnings`` included) are sent to the
  parent and handled there by the logger of the same name, so they reach stderr as the
  parent's own do, without breaking the bar.
- **On a GPU** (``mode``): ``processes`` are plain processes, which take turns on the GPU
  (time-slicing); ``mps`` starts the CUDA MPS control daemon as the user (its pipe and log
  folders in a fresh temporary folder, given to the workers by ``CUDA_MPS_PIPE_DIRECTORY`` /
  ``CUDA_MPS_LOG_DIRECTORY``), so that kernels of different runs may overlap, and stops it at
  the end (``echo quit | nvidia-cuda-mps-control``); the GPU's compute mode is never changed.
  When the daemon is missing or does not work (a sandbox, a GPU that refuses it), one warning
  and plain processes. ``auto``: ``mps`` when the runs use CUDA, else ``processes``. One MPS
  client's fatal fault ends every client: with MPS a crash fails every run in flight. The
  third way, ``streams``, is no pool of processes: one process advancing the runs a step each
  in turn, each on a CUDA stream of its own (:mod:`gnc.interleave`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import connection
from pathlib import Path

logger = logging.getLogger(__name__)

JOBS_MODES = ("auto", "processes", "mps", "streams")  # streams: gnc.interleave
MPS_CONTROL = "nvidia-cuda-mps-control"
# run with the MPS environment before the workers start: does a CUDA client get served?
MPS_PROBE = ("-c", "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()")
# imported once by the fork server, before it forks the workers; torch._dynamo (~1 s) is
# what building a torch.optim optimiser imports on first use
PRELOAD = ("gnc.experiments", "torch._dynamo")
# what the workers that draw the report's figures need (matplotlib; gnc.report.write_figures):
# added to PRELOAD by an experiment that writes its report, alone for gnc report --jobs N
REPORT_PRELOAD = ("gnc.report",)


def uses_workers(jobs: int, jobs_mode: str, report: bool) -> bool:
    """Whether ``gnc experiment --jobs N`` starts worker processes (from the fork server): for
    its runs (``streams`` runs them in this process) or to draw its report's figures."""
    return jobs > 1 and (jobs_mode != "streams" or report)


def experiment_preload(report: bool) -> tuple[str, ...]:
    """What the fork server of ``gnc experiment --jobs N`` imports: :data:`PRELOAD`, and
    :data:`REPORT_PRELOAD` when the same workers then draw the report."""
    return PRELOAD + REPORT_PRELOAD if report else PRELOAD


# errors that are the task's own outcome (bad settings, divergence, files): logged in one line;
# the rest (likely bugs) with their traceback
PLAIN_ERRORS = (ValueError, OSError, FloatingPointError)


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn`` (module docstring)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def prestart(preload: Sequence[str] = PRELOAD) -> None:
    """Start the fork server of :func:`run_many` now, importing ``preload``; it keeps running
    for this process's later calls. Call it before importing torch to overlap the imports.
    Nothing where the start method is ``spawn`` or the server already runs."""
    if start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    # started with SIGINT ignored (kept across its exec): a Ctrl-C to the process group
    # while it imports torch printed its KeyboardInterrupt traceback beside our one line
    # (multiprocessing ignores SIGINT there only after the imports); the workers it forks
    # restore the default handler (_worker). Where SIGINT cannot be set (not the main
    # thread), as before.
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        forkserver.ensure_running()
        return
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def threads_per_job(jobs: int) -> int:
    """The torch thread count of each of ``jobs`` runs in flight: ``max(1, cores() // jobs)``."""
    return max(1, cores() // jobs)


@dataclass
class Outcome:
    """What became of one task of :func:`run_many`."""

    name: str
    result: object = None
    error: str | None = None  # the first line of its error; None: it succeeded

    @property
    def ok(self) -> bool:
        return self.error is None


# ------------------------------------------------------------------------------ workers

_to_parent = None  # in a worker: the queue to the parent


def in_worker() -> bool:
    """Whether this process is a worker of :func:`run_many`."""
    return _to_parent is not None


def report_progress(n: int) -> None:
    """In a worker of :func:`run_many`: ``n`` more units of the parent's bar are done;
    elsewhere nothing."""
    if _to_parent is not None and n:
        _to_parent.send(("progress", n))


class _Channel:
    """A worker's end of its pipe to the parent; sends from any thread."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        with self.lock:
            self.conn.send(msg)


class _ForwardHandler(logging.handlers.QueueHandler):
    """Sends each record (formatted, picklable) to the parent."""

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.send(("log", record))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists
        pass
    return True


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the process that started it dies (the fork
    server, which ends when ``parent`` does; or ``parent`` itself when spawned), so a SIGKILL
    of the parent alone leaves no orphan training on; elsewhere nothing."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if not _alive(parent) or os.getppid() == 1:  # it died before the line above
        os._exit(1)


def stop_fork_server() -> None:
    """End the fork server :func:`prestart` started, if any: after an early Ctrl-C it would
    go on importing torch (seconds of a core) before it noticed that gnc is gone."""
    server = sys.modules.get("multiprocessing.forkserver")
    pid = getattr(getattr(server, "_forkserver", None), "_forkserver_pid", None)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _worker(tasks, results, parent: int, threads: int, env: dict, cwd: str,
            level: int, sigint_ignored: bool = False) -> None:
    """A worker: runs the tasks read from ``tasks`` until None; sends "ready", then per task
    its progress and log records and "done"/"failed" through ``results``. SIGINT as in the
    parent: ignored if it was started so (a background job of a script), else Ctrl-C."""
    global _to_parent
    # the fork server ignores SIGINT (prestart): Ctrl-C raises KeyboardInterrupt here again
    signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored
                  else signal.default_int_handler)
    try:
        _to_parent = channel = _Channel(results)
        channel.send(("ready",))
        _die_with_parent(parent)
        os.environ.clear()  # the parent's, not the fork server's; before any CUDA call
        os.environ.update(env)  # (CUDA_VISIBLE_DEVICES, MPS's are read when CUDA starts)
        os.chdir(cwd)  # the parent's now: relative paths mean what they mean there
        # a child of the fork server has "forkserver" as its default start method: a run's
        # DataLoader would start its workers through a fork server of its own, importing
        # torch and unpickling the dataset every epoch (20x slower on digits); the
        # platform's default, as in a process of its own
        multiprocessing.set_start_method(None, force=True)
        root = logging.getLogger()
        root.handlers[:] = [_ForwardHandler(channel)]
        root.setLevel(level)
        logging.captureWarnings(True)
        import torch

        torch.set_num_threads(threads)
        while (task := tasks.recv()) is not None:
            index, func, args = task
            try:
                result = func(*args)
            except Exception as err:
                tb = None if isinstance(err, PLAIN_ERRORS) else traceback.format_exc()
                channel.send(("failed", index, first_line(err), tb))
            else:
                channel.send(("done", index, result))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):  # Ctrl-C (the whole process
        return  # group gets it: the parent reports), or the parent is gone
    # the end: everything is sent (pipes have no feeder thread), then out without the
    # interpreter's slow clean-up (seconds with torch loaded; the tasks closed their files),
    # but with the libraries' exit hooks (--compile's compile-worker pool and its semaphores)
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


# ------------------------------------------------------------------------------ MPS


@dataclass
class _MPS:
    exe: str
    folder: Path
    env: dict
    timeout_s: float = 60.0  # for the quit command: a daemon that hangs must not hang us

    def stop(self) -> None:
        """``echo quit | nvidia-cuda-mps-control``, then remove the folder."""
        try:
            subprocess.run([self.exe], input="quit\n", env={**os.environ, **self.env},
                           capture_output=True, text=True, timeout=self.timeout_s,
                           check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            logger.warning("could not stop the CUDA MPS daemon (%s): %s", self.folder, err)
        shutil.rmtree(self.folder, ignore_errors=True)


def _output_line(result: subprocess.CompletedProcess) -> str:
    lines = f"{result.stderr or ''}\n{result.stdout or ''}".strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def start_mps(*, probe: bool, timeout_s: float = 300.0) -> _MPS | None:
    """Start the CUDA MPS control daemon as the user, in a fresh temporary folder; None (and
    one warning) when it is missing or does not start. ``probe``: also check that a CUDA
    process of this Python is served through it (needs a GPU). ``timeout_s``: the most the
    probe may take (a client that hangs under MPS counts as a failure); starting the daemon
    and stopping it get ``min(60, timeout_s)`` each.

    Whatever ends this call early (KeyboardInterrupt, a SIGTERM turned into SystemExit) stops
    a daemon it started: ``-d`` detaches it, so nothing else would."""
    exe = shutil.which(MPS_CONTROL)
    if exe is None:
        logger.warning("CUDA MPS: %s not found; the runs share the GPU as plain "
                       "processes (time-slicing)", MPS_CONTROL)
        return None
    folder = Path(tempfile.mkdtemp(prefix="gnc-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for d in env.values():
        Path(d).mkdir()
    control_s = min(60.0, timeout_s)
    mps, why = None, None
    try:
        started = subprocess.run([exe, "-d"], env={**os.environ, **env}, capture_output=True,
                                 text=True, timeout=control_s, check=False)
        if started.returncode:
            why = f"{MPS_CONTROL} -d: {_output_line(started)}"
        else:
            mps = _MPS(exe, folder, env, timeout_s=control_s)
            if probe:
                served = subprocess.run([sys.executable, *MPS_PROBE], env={**os.environ, **env},
                                        capture_output=True, text=True, timeout=timeout_s,
                                        check=False)
                if served.returncode:
                    why = f"a CUDA process fails under it: {_output_line(served)}"
    except (OSError, subprocess.TimeoutExpired) as err:
        why = str(err)
    except BaseException:  # interrupted: leave no daemon behind
        if mps is not None:
            mps.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if why is None:
        logger.info("CUDA MPS daemon started (%s)", folder)
        return mps
    if mps is not None:
        mps.stop()
    shutil.rmtree(folder, ignore_errors=True)
    logger.warning("CUDA MPS: the daemon did not start (%s); the runs share "
                   "the GPU as plain processes (time-slicing)", why)
    return None


def _check_mode(mode: str) -> None:
    if mode not in JOBS_MODES or mode == "streams":
        raise ValueError(f"Expected `jobs_mode` in auto, processes, mps, but got {mode!r} "
                         "(streams: one process, gnc.interleave.run_interleaved)")


@contextlib.contextmanager
def launch(mode: str, *, cuda: bool) -> Iterator[dict]:
    """The environment of the workers for ``mode`` (see the module docstring), with the MPS
    daemon running for the block when it is used."""
    _check_mode(mode)
    # a probe that hangs must not eat a short device loan: a working daemon answers in seconds
    mps = (start_mps(probe=cuda, timeout_s=60.0) if mode == "mps" or (mode == "auto" and cuda)
           else None)
    try:
        yield dict(mps.env) if mps else {}
    finally:
        if mps:
            mps.stop()


# ------------------------------------------------------------------------------ the parent


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def epoch_bar(total: int, initial: int, desc: str | None):
    """One tqdm bar (in epochs) for all the runs; a silent stand-in without tqdm or total."""
    if total <= 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU machine
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="epoch", dynamic_ncols=True, desc=desc)


def writing_around(bar: object) -> contextlib.AbstractContextManager:
    """A block that writes to stderr without breaking ``bar`` (tqdm's external write mode)."""
    write_mode = getattr(bar, "external_write_mode", None)
    return write_mode() if write_mode else contextlib.nullcontext()


def _handle_log(record: logging.LogRecord, bar, task: str | None = None) -> None:
    """A worker's log record, as this process's, naming the ``task`` it came from."""
    if task is not None:
        record.msg, record.args = f"{task}: {record.getMessage()}", None
    with writing_around(bar):
        logging.getLogger(record.name).handle(record)


@dataclass
class _Worker:
    proc: multiprocessing.process.BaseProcess
    tasks: object  # the parent's end of its task pipe
    results: object  # the parent's end of its result pipe
    index: int | None = None  # the task it runs; None: told to end
    ready: bool = False  # it has started (sent "ready")


def _death(exitcode: int | None) -> str:
    """How a worker process ended: "killed by SIGKILL", "exit status 1"."""
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


_START_FAILED = ("the worker processes of --jobs could not start (one ended: {}); a script that "
                 "calls this with jobs > 1 must guard its top level with "
                 "`if __name__ == \"__main__\":` (they import it)")


def run_many(tasks: Sequence[tuple[str, Callable, tuple]], *, jobs: int, mode: str = "auto",
             cuda: bool = False, progress_total: int = 0, progress_initial: int = 0,
             desc: str | None = None) -> list[Outcome]:
    """Run ``tasks`` (``(name, function, args)``; the function importable by name, e.g. a
    module-level one, and the arguments and result picklable) in ``jobs`` worker processes,
    each with :func:`threads_per_job` threads; returns their outcomes in order, failed ones
    included, after every task has ended. ``mode``: ``auto | processes | mps`` (module
    docstring); ``cuda``: the tasks use a GPU (``auto`` then uses MPS, which is probed).
    ``progress_total`` > 0: one bar in this process, fed by :func:`report_progress`.

    Raises:
        ValueError: ``jobs`` < 1 or an unknown ``mode``.
        RuntimeError: a worker died before it could take a task (e.g. the spawned process
            failed to import the calling script).
    """
    if jobs < 1:
        raise ValueError(f"Expected `jobs` >= 1, but got {jobs}")
    _check_mode(mode)
    if not tasks:
        return []
    ctx = multiprocessing.get_context(start_method())
    if ctx.get_start_method() == "forkserver":
        prestart()  # nothing when it runs already
    threads = threads_per_job(jobs)
    level = logging.getLogger().getEffectiveLevel()
    outcomes: list[Outcome | None] = [None] * len(tasks)
    pending = deque(range(len(tasks)))
    workers: dict[int, _Worker] = {}  # slot -> its worker
    bar = _NoBar()

    def start(slot: int, env: dict) -> None:
        task_out, task_in = ctx.Pipe(duplex=False)
        result_out, result_in = ctx.Pipe(duplex=False)
        # not daemonic: a run's DataLoader starts worker processes of its own (--num-workers),
        # which a daemonic process may not; the workers end with run_many (below) or with
        # the parent (_die_with_parent), not by the daemon flag
        proc = ctx.Process(target=_worker, name=f"gnc-job-{slot}", daemon=False,
                           args=(task_out, result_in, os.getpid(), threads,
                                 {**os.environ, **env}, os.getcwd(), level,
                                 signal.getsignal(signal.SIGINT) is signal.SIG_IGN))
        proc.start()
        task_out.close()  # the worker's ends
        result_in.close()
        workers[slot] = _Worker(proc, task_in, result_out)
        feed(slot)

    def feed(slot: int) -> None:
        """The next task to the worker in ``slot``, or None (its end)."""
        worker = workers[slot]
        worker.index = pending.popleft() if pending else None
        with contextlib.suppress(OSError):  # a dead worker: seen at its sentinel
            if worker.index is None:
                worker.tasks.send(None)
            else:
                _, func, args = tasks[worker.index]
                worker.tasks.send((worker.index, func, tuple(args)))

    def finish(index: int, outcome: Outcome, tb: str | None = None) -> None:
        outcomes[index] = outcome
        if not outcome.ok:
            with writing_around(bar):
                logger.error("%s failed: %s%s", outcome.name, outcome.error,
                             f"\n{tb.rstrip()}" if tb else "")

    def handle(slot: int, msg: tuple) -> None:
        worker = workers[slot]
        if msg[0] == "progress":
            bar.update(msg[1])
        elif msg[0] == "log":
            _handle_log(msg[1], bar, None if worker.index is None else tasks[worker.index][0])
        elif msg[0] == "ready":
            worker.ready = True
        else:  # "done" / "failed": its next task
            index = msg[1]
            if msg[0] == "done":
                finish(index, Outcome(tasks[index][0], result=msg[2]))
            else:
                finish(index, Outcome(tasks[index][0], error=msg[2]), tb=msg[3])
            feed(slot)

    def receive(slot: int) -> None:
        """Every message waiting from the worker in ``slot``."""
        worker = workers[slot]
        while True:
            try:
                if not worker.results.poll():
                    return
                msg = worker.results.recv()
            except (EOFError, OSError):  # its end is closed (it ended)
                return
            handle(slot, msg)

    def ended(slot: int, env: dict) -> None:
        """The worker in ``slot`` ended: its last messages, then its task fails if it had one
        (it died), and another worker takes its place while tasks remain."""
        receive(slot)
        worker = workers.pop(slot)
        worker.proc.join()
        for conn in (worker.tasks, worker.results):
            conn.close()
        if not worker.ready:
            raise RuntimeError(_START_FAILED.format(_death(worker.proc.exitcode)))
        if worker.index is not None and outcomes[worker.index] is None:
            why = f"its worker process died ({_death(worker.proc.exitcode)})"
            finish(worker.index, Outcome(tasks[worker.index][0], error=why))
            if pending:
                start(slot, env)

    with launch(mode, cuda=cuda) as env:
        bar = epoch_bar(progress_total, progress_initial, desc)
        try:
            for slot in range(min(jobs, len(tasks))):
                start(slot, env)
            while workers:
                by_conn = {w.results: slot for slot, w in workers.items()}
                by_sentinel = {w.proc.sentinel: slot for slot, w in workers.items()}
                for ready in connection.wait([*by_conn, *by_sentinel]):
                    if ready in by_conn and by_conn[ready] in workers:
                        receive(by_conn[ready])
                    elif ready in by_sentinel and by_sentinel[ready] in workers:
                        ended(by_sentinel[ready], env)
        finally:
            bar.close()
            for worker in workers.values():
                if worker.proc.is_alive():
                    worker.proc.terminate()
                    worker.proc.join(timeout=10)
                for conn in (worker.tasks, worker.results):
                    conn.close()
    return outcomes  # type: ignore[return-value]
