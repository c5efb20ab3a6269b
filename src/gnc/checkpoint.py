"""Saving, finding and loading the files of a run directory robustly (DESIGN §3).

The promises:

- a write never leaves a half-written file under the final name: :func:`atomic_save` and
  :func:`atomic_write_text` write a temporary file, ``fsync`` it and rename it over the
  target; :func:`append_line` writes one ``metrics.jsonl`` line in a single ``write`` and
  ``fsync``s it, so a kill leaves at most one torn last line, which :func:`read_metrics`
  drops;
- every checkpoint is loaded onto the CPU (``map_location="cpu"``): the RNG states must stay
  CPU ``ByteTensor`` objects, and ``load_state_dict`` moves model and optimiser tensors to the
  device of the module they are loaded into;
- a damaged file is one clear line (:class:`CheckpointError`, a ``ValueError`` naming the
  file and what is wrong); an unreadable ``last.pt`` falls back to the newest readable
  ``epoch_XXXX.pt``, with a warning;
- a fresh run never destroys an earlier one: :func:`prepare_run_dir` refuses a directory
  that holds results unless asked to overwrite it.

Checkpoints are pickles (they hold NumPy's RNG state), so only load run directories you
trust.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = frozenset(
    {"config", "epoch", "step", "model", "optimizer", "scheduler", "scaler", "rng"}
)
RUN_ENTRIES = ("config.json", "metrics.jsonl", "cos_margins.npy", "DONE", "checkpoints", "tb",
               "classifier", "evaluate_train.jsonl", "evaluate_test.jsonl")
DATA_PREFIXES = ("npz:", "imagefolder:")  # dataset names that carry a path
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


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


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that a crash leaves either the old file or the new one.

    Writes ``PATH.tmp`` in the same folder, ``fsync``s it, then renames it over ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with the guarantee of :func:`atomic_save`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline in one ``write``, then ``fsync``: a kill tears at most it."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's (CPU and every CUDA device's) RNGs."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_bytes(t: Any, name: str) -> torch.Tensor:
    """``t`` as the CPU ``ByteTensor`` that ``set_rng_state`` accepts."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise CheckpointError(f"the {name} RNG state is not a uint8 tensor")
    return t.cpu()


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned, wherever its tensors were loaded.

    CUDA states are restored for the devices present (a run saved on more GPUs than this
    machine has restores the first ones).
    """
    torch.set_rng_state(_cpu_bytes(state["torch"], "torch"))
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_cpu_bytes(s, "CUDA"), i)


# --------------------------------------------------------------------------- reading


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, loaded onto the CPU and checked to be one of ours.

    Raises :class:`CheckpointError` (one line naming ``path``) for an empty, truncated or
    foreign file.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, not a torch file, unpickling errors ...
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({reason})") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a gnc checkpoint (a {type(ckpt).__name__})")
    missing = sorted(CHECKPOINT_KEYS - ckpt.keys())
    if missing:
        raise CheckpointError(f"{path} is not a gnc checkpoint (missing keys {missing})")
    bad = [k for k, kind in (("epoch", int), ("config", dict), ("model", dict), ("rng", dict))
           if not isinstance(ckpt[k], kind)]
    if bad:
        raise CheckpointError(f"{path} is not a gnc checkpoint (bad {bad})")
    return ckpt


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """``checkpoints/last.pt`` (when present), then the ``epoch_XXXX.pt`` files, newest first."""
    folder = Path(run_dir) / "checkpoints"
    last = [folder / "last.pt"] if (folder / "last.pt").exists() else []
    epochs = [p for p in folder.glob("epoch_*.pt") if _EPOCH_FILE.fullmatch(p.name)]
    epochs.sort(key=lambda p: int(_EPOCH_FILE.fullmatch(p.name).group(1)), reverse=True)
    return last + epochs


def load_latest_checkpoint(run_dir: Path, action: str = "resume") -> tuple[dict, Path]:
    """The newest readable checkpoint of ``run_dir`` and its path.

    ``last.pt`` first; when it is unreadable, the newest readable ``epoch_XXXX.pt``, with a
    warning that names the fallback and its epoch. Raises ``FileNotFoundError`` when the run
    has no checkpoint and :class:`CheckpointError` when none is readable; both messages start
    with ``cannot {action} RUN_DIR:``.
    """
    run_dir = Path(run_dir)
    paths = checkpoint_paths(run_dir)
    if not paths:
        raise FileNotFoundError(
            f"cannot {action} {run_dir}: no checkpoint at {run_dir / 'checkpoints' / 'last.pt'}")
    errors = []
    for path in paths:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if errors:
            logger.warning("%s; falling back to %s (epoch %d)", "; ".join(errors), path,
                           ckpt["epoch"])
        return ckpt, path
    raise CheckpointError(f"cannot {action} {run_dir}: no readable checkpoint "
                          f"({'; '.join(errors)})")


# --------------------------------------------------------------------------- metrics.jsonl


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``, without torn, non-object or epoch-less lines.

    A missing file has no rows. Every dropped line is reported by a warning.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
        else:
            logger.warning("%s:%d: dropped a line that is not a metrics row (torn write?)",
                           path, n)
    return rows


def trim_metrics(path: Path, epoch: int) -> None:
    """Rewrite ``metrics.jsonl`` with only its readable rows of epochs ``<= epoch``."""
    keep = [row for row in read_metrics(path) if row["epoch"] <= epoch]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


# --------------------------------------------------------------------------- run directories


def holds_results(run_dir: Path) -> bool:
    """Whether a fresh run into ``run_dir`` would destroy something.

    Only a missing or empty folder, or one a run left before its first evaluation (a
    ``config.json``, an empty ``metrics.jsonl``, no ``*.pt`` checkpoint, ``tb/``) holds
    nothing; any other entry counts as a result.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return False
    for entry in run_dir.iterdir():
        if entry.name not in RUN_ENTRIES or entry.name in ("DONE", "cos_margins.npy"):
            return True
        if entry.name == "metrics.jsonl" and entry.read_text().strip():
            return True
        if entry.name in ("checkpoints", "classifier") and any(entry.glob("*.pt")):
            return True
        if entry.name.startswith("evaluate_") and entry.read_text().strip():
            return True
    return False


def check_fresh_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Raise ``ValueError`` if a fresh run would destroy results in ``run_dir`` unasked."""
    if not overwrite and holds_results(run_dir):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or "
                         "--overwrite to replace it")


def prepare_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a fresh run: an empty ``metrics.jsonl``, ``checkpoints/``.

    With ``overwrite`` the entries of an earlier run (:data:`RUN_ENTRIES`) are removed first;
    other files are left alone. Without it, see :func:`check_fresh_run_dir`.
    """
    run_dir = Path(run_dir)
    check_fresh_run_dir(run_dir, overwrite=overwrite)
    if overwrite and run_dir.exists():
        for name in RUN_ENTRIES:
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
