"""Many runs in one process, a step of each in turn (``gnc experiment --jobs-mode streams``).

On a GPU a captured training step (``--graph-step``) is one graph launch: one host thread can
issue the replays of several runs faster than the card runs them, and replays on different
CUDA streams may run at the same time. :func:`run_interleaved` keeps ``jobs`` runs in flight
in this process and advances them one step each in turn (round robin), each on a stream of
its own — option (a) of issue 18, beside the worker processes (plain or under CUDA MPS) of
:mod:`gnc.jobs`.

A run is a generator that pauses after every step (:meth:`gnc.training.Trainer.fit_steps`).
What keeps each run as it would be alone, between its turns and the others':

- **its RNGs**: the states of torch's CPU generator, of the run's CUDA device's, NumPy's and
  Python's are set to the run's before each of its turns and kept after it (a checkpoint
  saves the run's own); each run starts from the states the process had at the start;
- **its context variables** (:func:`gnc.validation.trusted_inputs`): each run's turns run in
  a :class:`contextvars.Context` of its own;
- **its CUDA stream**: every turn of a run (set-up, steps, evaluations, checkpoints) runs
  with the run's stream current, so the run's work is ordered on it and waits for no other
  run; its captured step is captured on it (a cuBLAS workspace of its own). A finished run's
  stream serves the next run of its slot. A step that draws random numbers (dropout: VGG
  on images over 64 px) is not captured but runs eagerly (one warning): every graph of a
  process reads the CUDA generator's seed and offset from one pair of device tensors,
  filled as a replay starts, so concurrent replays would draw each other's numbers.

On the CPU there are no streams: the runs take turns on all of the process's threads, and
each run's results are bitwise those of the same runs one after the other (``--jobs 1``) —
the stand-in that the tests check; it is not faster.

Shared by the runs in flight: the process (its memory: an experiment's runs write no
``peak_mem_mb``, since no measure tells one run's from the others'; a run's step times are
those seen on its stream while the others run), ``torch.backends.cudnn.benchmark``. A turn
costs ~90 µs of host time on a 2-core CPU (NumPy's legacy state get/set are 70 of them),
against a captured step's milliseconds on a GPU.

A run that raises ends with its outcome (the first line of its error, logged as it happens)
and the next queued run takes its slot; the others go on. On a GPU an asynchronous fault
(an illegal memory access) ends the process's CUDA context, and so every run in flight — as
one MPS client's fault does. An interrupt (``KeyboardInterrupt``) closes every run in flight
(their ``finally`` blocks: run directories released; a second interrupt meanwhile waits for
the others to close) and is raised again; the runs' last checkpoints stay for a rerun to
resume.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import logging
import random
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gnc.jobs import PLAIN_ERRORS, Outcome, epoch_bar, first_line, writing_around

__all__ = ["RunStates", "run_interleaved"]

logger = logging.getLogger(__name__)

_RUN_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar("gnc_run_name",
                                                                       default=None)


class _NameTheRun(logging.Filter):
    """A log record made in a run's turn begins with the run's name (as the records a
    ``--jobs`` worker forwards do): "fixed/seed2: NC1 undefined: ..."."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = _RUN_NAME.get()
        if name is not None and getattr(record, "gnc_run", None) is None:
            record.msg, record.args, record.gnc_run = f"{name}: {record.getMessage()}", None, name
        return True


@contextlib.contextmanager
def _records_name_their_run() -> Iterator[None]:
    handlers, name_filter = list(logging.getLogger().handlers), _NameTheRun()
    for handler in handlers:
        handler.addFilter(name_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(name_filter)


def _rng_states(device: torch.device) -> tuple:
    """The process's RNG states that a run may draw from: torch's CPU and ``device``'s
    (CUDA), NumPy's, Python's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _set_rng_states(states: tuple, device: torch.device) -> None:
    cpu, cuda, numpy, python = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    np.random.set_state(numpy)
    random.setstate(python)


@dataclass
class RunStates:
    """What one run keeps of its own between its turns (module docstring): RNG states, a
    context, a CUDA stream. ``with states.turn(): ...`` runs a turn."""

    device: torch.device
    rng: tuple  # its RNG states (:func:`_rng_states`) at the end of its last turn
    stream: torch.cuda.Stream | None = None
    context: contextvars.Context = field(default_factory=contextvars.copy_context)

    @classmethod
    def now(cls, device: torch.device, stream: torch.cuda.Stream | None = None) -> RunStates:
        """A run that starts from the process's RNG states as they are now."""
        return cls(device, _rng_states(device), stream)

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        _set_rng_states(self.rng, self.device)
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None \
                    else contextlib.nullcontext():
                yield
        finally:
            self.rng = _rng_states(self.device)

    def run(self, fn: Callable, *args):
        """``fn(*args)`` as a turn of this run, in its context."""
        with self.turn():
            return self.context.run(fn, *args)


@dataclass
class _Run:
    index: int
    states: RunStates
    steps: Generator
    slot: int


def run_interleaved(tasks: Sequence[tuple[str, Callable[..., Generator], tuple]], *,
                    jobs: int, device: torch.device | str = "cpu", progress_total: int = 0,
                    progress_initial: int = 0, desc: str | None = None) -> list[Outcome]:
    """Run ``tasks`` (``(name, function, args)``), ``jobs`` at a time, in this process, one
    step of each in turn (module docstring); returns their outcomes in order, failed ones
    included, after every task has ended.

    ``function(*args, stream=s, progress=p)`` returns a generator that pauses (``yield``)
    after each step and returns the task's result: ``s`` the CUDA stream of its slot on a
    CUDA ``device`` (None on the CPU), ``p(n)`` reports ``n`` more units done to the one
    progress bar (``progress_total`` > 0; its units are the caller's, e.g. epochs).

    Raises:
        ValueError: ``jobs`` < 1.
    """
    if jobs < 1:
        raise ValueError(f"Expected `jobs` >= 1, but got {jobs}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    outcomes: list[Outcome | None] = [None] * len(tasks)
    if not tasks:
        return []
    start_rng = _rng_states(device)
    pending = deque(range(len(tasks)))
    streams: dict[int, torch.cuda.Stream | None] = {}  # slot -> its stream
    active: list[_Run] = []
    bar = epoch_bar(progress_total, progress_initial, desc)
    stack = contextlib.ExitStack()

    def fill() -> None:
        """Start queued tasks in the free slots."""
        free = sorted(set(range(jobs)) - {run.slot for run in active})
        while free and pending:
            slot, index = free.pop(0), pending.popleft()
            if slot not in streams:
                streams[slot] = torch.cuda.Stream(device) if device.type == "cuda" else None
            states = RunStates(device, start_rng, streams[slot])
            name, func, args = tasks[index]
            states.context.run(_RUN_NAME.set, name)
            try:
                steps = states.run(functools.partial(func, *args, stream=streams[slot],
                                                     progress=bar.update))
            except Exception as err:  # noqa: BLE001 -- its outcome, as a failed step's
                finish(index, err)
                free.insert(0, slot)  # still free: the next task
                continue
            active.append(_Run(index, states, steps, slot))

    def finish(index: int, err: BaseException | None = None, result: object = None) -> None:
        name = tasks[index][0]
        if err is None:
            outcomes[index] = Outcome(name, result=result)
            return
        outcomes[index] = Outcome(name, error=first_line(err))
        tb = None if isinstance(err, PLAIN_ERRORS) else traceback.format_exc()
        with writing_around(bar):
            logger.error("%s failed: %s%s", name, outcomes[index].error,
                         f"\n{tb.rstrip()}" if tb else "")

    try:
        stack.enter_context(_records_name_their_run())
        fill()
        while active:
            for run in list(active):
                try:
                    run.states.run(next, run.steps)
                    continue
                except StopIteration as end:
                    finish(run.index, result=end.value)
                except Exception as err:  # noqa: BLE001 -- this run's end, not the others'
                    finish(run.index, err)
                active.remove(run)
                del run
                gc.collect()  # its trainer, data and graphs: their memory for the next run
                fill()
    finally:
        interrupt = None
        for run in active:  # an interrupt: every run's finally blocks, in its own turn
            try:
                run.states.run(run.steps.close)
            except BaseException as err:  # noqa: BLE001 -- close the others first
                if isinstance(err, Exception):
                    logger.warning("%s: closing it failed: %s", tasks[run.index][0],
                                   first_line(err))
                else:  # another Ctrl-C: raised once every run is closed
                    interrupt = interrupt or err
        active.clear()
        _set_rng_states(start_rng, device)
        bar.close()
        stack.close()
        if interrupt is not None:
            raise interrupt
    return outcomes  # type: ignore[return-value]
