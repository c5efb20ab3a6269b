"""The run directory: the only code that reads or writes one (DESIGN §3).

A run directory holds ``config.json`` (:func:`write_config` / :func:`read_config`),
``metrics.jsonl`` (:func:`append_metrics` / :func:`read_metrics`), ``checkpoints/last.pt``
and ``checkpoints/epoch_XXXX.pt`` (their insides and reading: :mod:`gnc.checkpoints`),
``cos_margins.npy`` (:func:`save_margins` / :func:`read_margins`),
``classifier/epoch_XXXX.pt`` (:func:`save_classifier_record`), ``evaluate_SPLIT.jsonl`` and,
once ``gnc experiment`` has finished the run, ``DONE`` (:func:`mark_done` / :func:`is_done`).

What the files hold (DESIGN §3), as :class:`gnc.training.Trainer` writes them:

- ``config.json``: the full resolved :class:`TrainConfig` (with ``method`` and ``seed``);
- ``metrics.jsonl``: one JSON object per evaluated epoch — ``epoch``, ``step``, ``lr`` (the
  rate the epoch trained with; per-step schedules: its last step's), ``skipped_steps`` (NaN/Inf
  losses, and under fp16 the steps the GradScaler skipped),
  ``train_loss`` and ``train_batch_top1`` (mean loss and accuracy over the epoch's training
  batches, each from its step's own forward pass), ``elapsed_s`` (wall seconds of training
  up to this row, summed over the invocations that trained the run: a resume goes on from its
  checkpoint's count, so the work a kill lost is counted once), the time per step split into
  ``time_forward_ms`` / ``time_backward_ms`` (means; ``_median`` too), ``peak_mem_mb`` (peak
  memory above the level at the start of training: CUDA allocator, or sampled RSS on CPU;
  null for runs that share their process, ``--jobs-mode streams``) and
  every key of :func:`gnc.metrics.nc_metrics` on the train split (``cos_margins`` as 101
  quantiles of the sorted per-sample margins; ``top1`` also as ``train_top1``), then the test
  split's prefixed ``test_``, and the train split's distances to the nearest simplex ETFs
  (``etf_w_dist``, ``etf_h_dist``, ``etf_wh_dist``, ``etf_w_moved``, ``etf_h_moved``:
  :func:`gnc.metrics.etf_distances`; the ``_moved`` ones null at the first evaluation). A
  value that is NaN or ±Inf is written as ``null`` (strict JSON, :func:`strict_json`);
- ``classifier/epoch_XXXX.pt`` with ``save_classifier``: W, b, the train class means and U
  at every evaluation (:func:`gnc.evaluation.save_classifier`);
- ``cos_margins.npy``: every sorted per-sample train cosine margin at the last evaluation;
- ``checkpoints/last.pt`` (and ``epoch_XXXX.pt`` every ``checkpoint_every`` epochs), written
  to a temporary file and renamed, so a crash never leaves a corrupt checkpoint;
- ``tb/``: TensorBoard events when enabled.

The promises:

- a write never leaves a half-written file under the final name: :func:`atomic_save`,
  :func:`atomic_write_text` and :func:`atomic_write` (any writer) write a temporary file,
  ``fsync`` it and rename it over the target; :func:`append_line` appends one
  ``metrics.jsonl`` line and ``fsync``s it, cuts a failed append off again, and ends a torn
  line a kill left before it writes the next, so a kill leaves at most one torn line, which
  :func:`read_metrics` drops;
- a full disk or a folder that cannot be written is one line naming the file; temporary
  files have names of their own, and those of a killed write are removed on resume;
- one writer: :func:`run_lock` holds the directory for the process that trains into it;
- a fresh run never destroys an earlier one: :func:`prepare_run_dir` refuses a directory
  that holds results unless asked to overwrite it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from gnc.config import TrainConfig
from gnc.runtime import is_int, sum_over_ranks

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"  # run_lock's file: its holder's PID; never a result, never removed
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # a reader may lock without writing
RUN_ENTRIES = ("config.json", "metrics.jsonl", "cos_margins.npy", "DONE", "checkpoints", "tb",
               "classifier", "evaluate_train.jsonl", "evaluate_test.jsonl", LOCK_FILE)
DATA_PREFIXES = ("npz:", "imagefolder:")  # names with a path: gnc.data.datasets._PATH_DATASETS
# the temporaries of temporary_path (.NAME.<pid>.<8 hex>.tmp) and of older gnc (NAME.tmp of a
# file it writes): a user's own *.tmp files are not ours to remove
_TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp|(?:[\w.-]+\.pt|config\.json|"
                        r"cos_margins\.npy|DONE)\.tmp")


class RunLockedError(ValueError):
    """The run directory is held by another gnc process (:func:`run_lock`)."""


# --------------------------------------------------------------------------- writing


def _fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (``fsync`` acts on the file, whichever descriptor)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename) to disk; best effort, not every OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def temporary_path(path: Path) -> Path:
    """A fresh temporary name next to ``path``: ``.NAME.<pid>.<random>.tmp`` (two writers
    never share one; :func:`remove_stale_temporaries` clears those a kill left)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files of writes that were killed (``.NAME.*.tmp`` and the older
    ``NAME.tmp``) from the run directory, ``checkpoints/`` and ``classifier/``; returns
    them."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "classifier"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if (_TEMPORARY.fullmatch(entry.name) and entry.is_file()
                    and not entry.is_symlink()):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    if removed:
        logger.warning("removed %d temporary file(s) of an interrupted write: %s",
                       len(removed), ", ".join(str(p) for p in removed))
    return removed


def _write_error(err: BaseException, path: Path) -> BaseException | None:
    """A one-line error naming ``path`` for a failed write, or None to re-raise ``err``:
    a full disk (``ENOSPC``, or torch's ``unexpected pos`` from its zip writer) and a
    folder or file this process may not write."""
    text = str(err)
    if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(err, RuntimeError) and ("unexpected pos" in text
                                               or "No space left" in text)):
        return OSError(f"no space left on the device writing {path}")
    if isinstance(err, RuntimeError) and "file write failed" in text:  # torch's zip writer
        return OSError(f"writing {path} failed (is the disk full?)")
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return OSError(f"read-only file system writing {path}")
    if isinstance(err, PermissionError):
        return PermissionError(f"permission denied writing {path} (is {path.parent} "
                               "writable?)")
    return None


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a temporary file next to ``path``, ``fsync`` it and rename it over
    ``path``; a failure removes the temporary file and names ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        _replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        better = _write_error(err, path)
        if better is not None:
            raise better from err
        raise


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that a crash leaves either the old file or the new one.

    Writes ``.NAME.<pid>.<random>.tmp`` in the same folder, ``fsync``s it, then renames it
    over ``path``. A full disk is ``OSError("no space left on the device writing PATH")``.
    """
    def write(tmp: Path) -> None:
        open(tmp, "wb").close()  # a folder we may not write: Python's error, not torch's
        torch.save(obj, tmp)

    atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with the guarantee of :func:`atomic_save`."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _open_in_run(path: Path, flags: int) -> int:
    """``os.open`` of a file gnc writes in place (``.lock``, ``metrics.jsonl``,
    ``evaluate_SPLIT.jsonl``): never through a symbolic link (a run directory from someone
    else could point one at any file of yours, which the write would truncate or extend)
    and only a regular file (a FIFO would block). The renames of :func:`atomic_write`
    replace a link itself, not its target."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(f"{path} is a symbolic link: gnc writes no file of a run directory "
                          "through a link (remove it)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file (remove it)")
    os.set_blocking(fd, True)
    return fd


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline, then ``fsync``. A failed write (a full disk) is cut off
    again, and a file that a killed writer left without its final newline gets one first:
    a torn line stays a line of its own (dropped by :func:`read_metrics`), never the start of
    the next row."""
    try:
        fd = _open_in_run(Path(path), os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            data = (line + "\n").encode("utf-8")
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:  # a full disk, or a Ctrl-C between two partial writes
                with suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    except OSError as err:
        better = _write_error(err, Path(path))
        if better is not None:
            raise better from err
        raise


MAX_COUNT = 2**53  # epochs and steps above it are no count (10**30 overflowed a tensor)


# --------------------------------------------------------------------------- metrics.jsonl


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (or ``evaluate_SPLIT.jsonl``) in file order, without
    torn, non-UTF-8, non-object or epoch-less lines (or a file that is not a regular one).

    A missing file has no rows. Every dropped line is reported by a warning naming the file
    and line. (A resumed run may repeat an epoch: callers that want one row per epoch keep
    the later one.)
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("%s:%d: not UTF-8, line skipped", path, n)
            continue
        try:
            row = json.loads(line)
        except ValueError as err:  # JSONDecodeError, or an integer of over 4300 digits
            why = "a torn write?" if isinstance(err, json.JSONDecodeError) else err
            logger.warning("%s:%d: not JSON (%s), line skipped", path, n, why)
            continue
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if is_int(epoch) and 0 <= epoch <= MAX_COUNT:
            rows.append(row)
        else:
            what = ("not a JSON object" if not isinstance(row, dict)
                    else "no integer `epoch` in [0, 2**53]")
            logger.warning("%s:%d: %s, line skipped", path, n, what)
    return rows


def strict_json(value: object, indent: int | None = None) -> str:
    """``value`` as strict JSON (one line unless ``indent``): NaN and ±Inf written as ``null``
    (Python's ``NaN`` literal is not JSON: other languages' readers refuse the line), as in
    ``summary.json``."""
    return json.dumps(_finite_or_null(value), indent=indent, allow_nan=False)


def _finite_or_null(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def append_metrics(run_dir: str | Path, row: dict, name: str = "metrics.jsonl") -> None:
    """Append one row to the run's ``metrics.jsonl`` (or ``name``), fsynced
    (:func:`strict_json`: a non-finite value is ``null``)."""
    append_line(Path(run_dir) / name, strict_json(row))


def trim_metrics(path: Path, epoch: int) -> None:
    """Rewrite ``metrics.jsonl`` with only its readable rows of epochs ``<= epoch``."""
    keep = [row for row in read_metrics(path) if row["epoch"] <= epoch]
    atomic_write_text(path, "".join(strict_json(row) + "\n" for row in keep))


# --------------------------------------------------------------------------- config, DONE, margins


def write_config(run_dir: str | Path, config: dict) -> None:
    """Write the run's ``config.json`` (a resolved config as a JSON object), atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))


def read_config(run_dir: str | Path, action: str = "read") -> dict:
    """The run's ``config.json`` as a dict.

    Raises ``FileNotFoundError`` when it is missing and ``ValueError`` when it is not a
    UTF-8 JSON object; both messages start ``cannot {action} RUN:`` and name the file.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"cannot {action} {run_dir}: not a run directory ({path} is "
                                "missing)")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"cannot {action} {run_dir}: {path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot {action} {run_dir}: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"cannot {action} {run_dir}: {path} is not a JSON object")
    return config


def mark_done(run_dir: str | Path, how: str = "finished") -> None:
    """Write ``DONE``: the run is complete (``gnc report`` reports only these)."""
    atomic_write_text(Path(run_dir) / "DONE", how + "\n")


def clear_done(run_dir: str | Path) -> None:
    """Remove ``DONE`` (a run that trains on is not complete), durably; nothing if absent."""
    path = Path(run_dir) / "DONE"
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)


def is_done(run_dir: str | Path) -> bool:
    """Whether ``DONE`` exists: the run finished, or stopped where it was asked to
    (:func:`stopped_after`)."""
    return (Path(run_dir) / "DONE").exists()


_STOPPED = re.compile(r"stopped after epoch (\d+)")


def stopped_after(run_dir: str | Path) -> int | None:
    """The epoch of a ``DONE`` written as ``mark_done(run, f"stopped after epoch {E}")`` (a
    run trained with ``until_epoch``, to be continued); None when the run finished or has no
    ``DONE``."""
    path = Path(run_dir) / "DONE"
    if not path.is_file():
        return None
    match = _STOPPED.match(path.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def save_margins(run_dir: str | Path, margins: np.ndarray) -> None:
    """Write ``cos_margins.npy``: every sorted per-sample cosine margin, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(margins), allow_pickle=False)

    atomic_write(Path(run_dir) / "cos_margins.npy", write)


def read_margins(run_dir: str | Path) -> np.ndarray | None:
    """The sorted margins of ``cos_margins.npy``; None when absent, or (with a warning) when
    it is not a readable 1-D numeric array."""
    path = Path(run_dir) / "cos_margins.npy"
    if not path.exists():
        return None
    if not path.is_file():  # a FIFO would block the read
        logger.warning("%s is not a regular file, using the metrics' margin quantiles", path)
        return None
    try:  # mapped first: a header that declares more than the file holds is a ValueError
        margins = np.array(np.load(path, allow_pickle=False, mmap_mode="r"))
    except (OSError, ValueError, EOFError) as err:
        logger.warning("%s: unreadable (%s), using the metrics' margin quantiles", path, err)
        return None
    if margins.ndim != 1 or not (np.issubdtype(margins.dtype, np.floating)
                                 or np.issubdtype(margins.dtype, np.integer)):
        logger.warning("%s: not a 1-D array of real numbers, using the metrics' margin "
                       "quantiles", path)
        return None
    return margins


def classifier_path(run_dir: str | Path, epoch: int, split: str = "train") -> Path:
    """``RUN/classifier/epoch_XXXX.pt`` (``epoch_XXXX_test.pt`` for the test split's means)."""
    suffix = "" if split == "train" else f"_{split}"
    return Path(run_dir) / "classifier" / f"epoch_{epoch:04d}{suffix}.pt"


def save_classifier_record(run_dir: str | Path, record: dict) -> Path:
    """Write one evaluation's classifier record (tensors and ints; see
    :func:`gnc.evaluation.save_classifier`) to :func:`classifier_path`; returns the path."""
    path = classifier_path(run_dir, record["epoch"], record["split"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(record, path)
    return path


# --------------------------------------------------------------------------- run directories


def _holder_pid(f) -> str:
    """The PID in a held lock file; its holder writes it just after taking the lock, so an
    empty file is read again for up to 0.2 s before the PID is "unknown"."""
    for _ in range(10):
        f.seek(0)
        pid = f.read(32).strip()
        if pid:
            return pid
        time.sleep(0.02)
    return "unknown"


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` (see :func:`run_lock`): :meth:`acquire`,
    :meth:`release`. Within one process the lock is re-entrant (counted per directory)."""

    _held: dict[Path, list] = {}  # resolved run directory -> [open lock file, count]

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.key: Path | None = None

    @property
    def held(self) -> bool:
        return self.key is not None

    def acquire(self, *, create: bool = True, wait: bool = False,
                reader: bool = False) -> RunLock:
        """Take the lock (``create``: make the directory first; without it a missing
        directory is not locked: there is nothing to protect); :class:`RunLockedError`
        naming the holder's PID when another process holds it, or with ``wait``, wait
        for it (a report into the same folder: the later one reads what the earlier wrote).
        ``reader``: the caller only reads the directory, which may be read-only (an archived
        or shared experiment): where ``.lock`` cannot be opened for writing, a shared lock
        is taken on it opened for reading (writers still wait or are refused; readers go
        together), or, where it can be neither made nor read, none is (with a warning)."""
        if self.key is not None or (not create and not self.run_dir.is_dir()):
            return self
        import fcntl  # POSIX only, like the rest of the run-directory handling

        if create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        key = self.run_dir.resolve()
        if key in self._held:
            self._held[key][1] += 1
            self.key = key
            return self
        path = key / LOCK_FILE
        try:  # held until release: the lock lives with its open file
            f = os.fdopen(_open_in_run(path, os.O_RDWR | os.O_CREAT), "r+")
        except OSError as err:
            f = self._for_reading(path, err) if reader else None
            if f is None and reader and err.errno in _NOT_WRITABLE:
                logger.warning("%s cannot be locked (%s): reading it without the lock",
                               self.run_dir, os.strerror(err.errno))
                return self
            if f is None:
                better = _write_error(err, path)
                if better is not None:
                    raise better from err
                raise
        mode = fcntl.LOCK_EX if f.writable() else fcntl.LOCK_SH
        try:
            fcntl.flock(f.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(f)
            if not wait:
                f.close()
                raise RunLockedError(f"{self.run_dir} is in use by another gnc process "
                                     f"(PID {pid}); wait for it or use another --out") from None
            logger.warning("%s is in use by another gnc process (PID %s): waiting for it",
                           self.run_dir, pid)
            try:
                fcntl.flock(f.fileno(), mode)
            except BaseException:
                f.close()
                raise
        except BaseException:
            f.close()
            raise
        if f.writable():  # the holder's PID, for the message of a second process
            try:  # unbuffered: a full disk fails here, not again in close()
                os.ftruncate(f.fileno(), 0)
                os.pwrite(f.fileno(), f"{os.getpid()}\n".encode(), 0)
            except OSError as err:
                f.close()
                better = _write_error(err, path)
                if better is not None:
                    raise better from err
                raise
        self._held[key] = [f, 1]
        self.key = key
        return self

    @staticmethod
    def _for_reading(path: Path, err: OSError) -> TextIO | None:
        """``.lock`` opened for reading where it cannot be opened for writing, or None."""
        if err.errno not in _NOT_WRITABLE:
            return None
        try:
            return os.fdopen(_open_in_run(path, os.O_RDONLY), "r")
        except OSError:
            return None

    def release(self) -> None:
        """Give the lock back (closing its file releases the ``flock``); idempotent."""
        key, self.key = self.key, None
        if key is None or key not in self._held:
            return
        self._held[key][1] -= 1
        if self._held[key][1] <= 0:
            f, _ = self._held.pop(key)
            f.close()


@contextmanager
def run_lock(run_dir: str | Path, *, create: bool = True, wait: bool = False,
             reader: bool = False) -> Iterator[RunLock]:
    """Hold an exclusive lock on ``run_dir`` (``fcntl.flock(LOCK_EX | LOCK_NB)`` on
    ``RUN/.lock``, which records the holder's PID) for the block: one writer per run
    directory. A second process gets :class:`RunLockedError` ("RUN is in use by another gnc
    process (PID N); wait for it or use another --out"). The OS releases the lock when its
    process dies, however it dies; ``.lock`` itself stays (it is never a result).
    ``create``, ``wait``, ``reader``: as :meth:`RunLock.acquire` takes them."""
    lock = RunLock(run_dir).acquire(create=create, wait=wait, reader=reader)
    try:
        yield lock
    finally:
        lock.release()


def _is_gnc_config(path: Path) -> bool:
    """Whether ``path`` is a ``config.json`` gnc wrote (:func:`is_train_config`)."""
    if not path.is_file():  # a FIFO would block the read
        return False
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return is_train_config(config)


def is_train_config(config: object) -> bool:
    """Whether ``config`` is what ``gnc train`` writes to ``config.json``: an object of
    TrainConfig keys with ``method`` and ``seed`` (an older run's may lack newer keys)."""
    names = set(TrainConfig.__dataclass_fields__)
    return (isinstance(config, dict) and {"method", "seed"} <= config.keys()
            and set(config) <= names)


def holds_results(run_dir: Path) -> bool:
    """Whether a fresh run into ``run_dir`` would destroy something.

    Only a missing or empty folder, or one a run left before its first evaluation (a
    ``config.json``, an empty ``metrics.jsonl``, no ``*.pt`` checkpoint, ``tb/``, ``.lock``)
    holds nothing; any other entry counts as a result, and so does a ``config.json`` without
    the ``metrics.jsonl`` or ``checkpoints/`` of a run that is not a gnc config (yours).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return False
    started = (run_dir / "metrics.jsonl").is_file() or (run_dir / "checkpoints").is_dir()
    for entry in run_dir.iterdir():
        if entry.name not in RUN_ENTRIES or entry.name in ("DONE", "cos_margins.npy"):
            return True
        if entry.name.endswith((".json", ".jsonl")) and not entry.is_file():
            return True  # a FIFO (reading it would block), a folder: not ours to remove
        if entry.name == "config.json" and not started and not _is_gnc_config(entry):
            return True
        if entry.name == "metrics.jsonl" and entry.read_text(errors="replace").strip():
            return True
        if entry.name in ("checkpoints", "classifier") and any(entry.glob("*.pt")):
            return True
        if entry.name.startswith("evaluate_") and entry.read_text(errors="replace").strip():
            return True
    return False


def check_fresh_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Raise ``ValueError`` if a fresh run would destroy results in ``run_dir`` unasked."""
    if not overwrite and holds_results(run_dir):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or "
                         "--overwrite to replace it")


def claim_run_dir(run_dir: Path, lock: RunLock, *, resume: bool, overwrite: bool, dist: Any,
                  device: torch.device) -> None:
    """Rank 0's checks of ``run_dir`` before any work, changing nothing: another writer
    (``lock``, taken here when the directory exists), a run already there without ``resume``
    or ``overwrite`` (:func:`check_fresh_run_dir`). Under DDP (``dist``: the process group's
    ``is_main`` and ``world_size``) every rank learns the outcome, so the others end with one
    line too (they went on into DDP's set-up and died there with a gloo/NCCL traceback)."""
    refusal = None
    if dist.is_main:
        try:
            if run_dir.is_dir():
                lock.acquire(create=False)
            if not resume:
                check_fresh_run_dir(run_dir, overwrite=overwrite)
        except ValueError as err:
            refusal = err
    if dist.world_size > 1 and sum_over_ranks([float(refusal is not None)], device)[0]:
        if refusal is None:
            raise ValueError(f"{run_dir}: refused by rank 0 (its error says why)")
    if refusal is not None:
        lock.release()
        raise refusal


def prepare_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a fresh run: an empty ``metrics.jsonl``, ``checkpoints/``.

    With ``overwrite`` the entries of an earlier run (:data:`RUN_ENTRIES`) are removed first;
    other files are left alone. Without it, see :func:`check_fresh_run_dir`.
    """
    run_dir = Path(run_dir)
    check_fresh_run_dir(run_dir, overwrite=overwrite)
    if overwrite and run_dir.exists():
        for name in RUN_ENTRIES:
            if name == LOCK_FILE:  # the lock of this very run (removing it would break it)
                continue
            entry = run_dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "metrics.jsonl", "")


# --------------------------------------------------------------------------- data paths


def _resolve(path: str, bases: list[Path]) -> str:
    """``path`` unchanged when absolute or present from the cwd, else the first base's hit."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return path
    for base in bases:
        if (base / p).exists():
            return str(base / p)
    return path


def resolve_data_paths(config: dict, run_dir: Path, train_cwd: str | None = None) -> dict:
    """``config`` with its relative data paths made to work from the current directory.

    ``data_dir`` and the path of an ``npz:PATH`` / ``imagefolder:PATH`` dataset are kept
    when absolute or present relative to the current directory; otherwise they are tried
    relative to ``train_cwd`` (the directory the run was trained from, recorded in its
    checkpoints), then relative to ``run_dir``; a path found nowhere is kept, for the data
    loader's own error.
    """
    bases = [Path(train_cwd)] if train_cwd else []
    bases.append(Path(run_dir))
    out = dict(config)
    if isinstance(out.get("data_dir"), str):
        out["data_dir"] = _resolve(out["data_dir"], bases)
    name = out.get("dataset", "")
    for prefix in DATA_PREFIXES:
        if isinstance(name, str) and name.startswith(prefix):
            out["dataset"] = prefix + _resolve(name[len(prefix):], bases)
    return out
