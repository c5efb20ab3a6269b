"""Peak memory of a stretch of work: CUDA allocator peak on GPU, sampled RSS on CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Callable

import torch


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def release_freed_memory() -> None:
    """Give the heap that freed objects left back to the system: glibc's ``malloc_trim(0)``
    (no-op elsewhere). Without it an earlier run's freed heap stays in the resident set and
    serves the next run, whose growth above it then reads about zero. (No ``gc.collect()``:
    0.1 s a call with torch loaded; garbage still in a cycle is not reused either.)"""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def rss_bytes() -> int:
    """Current resident-set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at :meth:`start`, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` (reset at start). On CPU: the resident-set
    size, sampled every ``interval`` seconds by a daemon thread — the process's lifetime
    ``ru_maxrss`` would hide every run after the largest one when runs share a process.

    Example:
        >>> with PeakMemory(torch.device("cpu")) as mem:
        ...     x = torch.ones(2**20)
        >>> mem.mb >= 0
        True
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        release_freed_memory()
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def mb(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return (max(self.peak, rss_bytes()) - self.base) / 2**20

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
