"""The run directory: the only code that reads or writes one (DESIGN §3).

A run directory holds ``config.json`` (:func:`write_config` / :func:`read_config`),
``metrics.jsonl`` (:func:`append_metrics` / :func:`read_metrics`), ``checkpoints/last.pt``
and ``checkpoints/epoch_XXXX.pt`` (:func:`save_checkpoint`, :func:`kept_checkpoints`,
:func:`load_latest_checkpoint`), ``cos_margins.npy`` (:func:`save_margins` /
:func:`read_margins`), ``classifier/epoch_XXXX.pt`` (:func:`save_classifier_record`),
``evaluate_SPLIT.jsonl`` and, once ``gnc experiment`` has finished the run, ``DONE``
(:func:`mark_done` / :func:`is_done`).

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


def kept_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """Epoch → file of every checkpoint a run kept, by epoch: the ``epoch_XXXX.pt`` files and
    ``last.pt`` (read to learn its epoch; left out when unreadable or when an epoch file has
    the same epoch)."""
    paths = checkpoint_paths(Path(run_dir))
    kept = {int(_EPOCH_FILE.fullmatch(p.name).group(1)): p for p in paths
            if p.name != "last.pt"}
    if paths and paths[0].name == "last.pt":
        try:
            kept.setdefault(load_checkpoint(paths[0])["epoch"], paths[0])
        except CheckpointError as err:
            logger.warning("%s", err)
    return dict(sorted(kept.items()))


def checkpoint_of_epoch(run_dir: str | Path, epoch: int, action: str,
                        kept: dict[int, Path] | None = None) -> dict:
    """The checkpoint of ``epoch`` (``epoch_XXXX.pt``, else ``last.pt`` if it is that epoch),
    among ``kept`` (default: :func:`kept_checkpoints`, which reads ``last.pt``)."""
    run_dir = Path(run_dir)
    kept = kept_checkpoints(run_dir) if kept is None else kept
    if epoch not in kept:
        have = ", ".join(map(str, kept)) or "none"
        raise FileNotFoundError(f"cannot {action} {run_dir}: no checkpoint of epoch {epoch} "
                                f"(kept epochs: {have}; see --checkpoint-every)")
    try:
        return load_checkpoint(kept[epoch])
    except CheckpointError as err:
        raise CheckpointError(f"cannot {action} {run_dir}: {err}") from None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run has a ``checkpoints/last.pt`` (something to resume)."""
    return (Path(run_dir) / "checkpoints" / "last.pt").exists()


def save_checkpoint(run_dir: str | Path, ckpt: dict, *, keep: bool = False) -> None:
    """Write ``ckpt`` as ``checkpoints/last.pt`` and, with ``keep``, as
    ``checkpoints/epoch_XXXX.pt`` of its epoch, atomically."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, folder / "last.pt")
    if keep:
        atomic_save(ckpt, folder / f"epoch_{ckpt['epoch']:04d}.pt")


# --------------------------------------------------------------------------- metrics.jsonl


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (or ``evaluate_SPLIT.jsonl``) in file order, without
    torn, non-UTF-8, non-object or epoch-less lines.

    A missing file has no rows. Every dropped line is reported by a warning naming the file
    and line. (A resumed run may repeat an epoch: callers that want one row per epoch keep
    the later one.)
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not JSON (a torn write?), line skipped", path, n)
            continue
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            rows.append(row)
        else:
            what = "no integer `epoch`" if isinstance(row, dict) else "not a JSON object"
            logger.warning("%s:%d: %s, line skipped", path, n, what)
    return rows


def append_metrics(run_dir: str | Path, row: dict, name: str = "metrics.jsonl") -> None:
    """Append one row to the run's ``metrics.jsonl`` (or ``name``), fsynced."""
    append_line(Path(run_dir) / name, json.dumps(row))


def trim_metrics(path: Path, epoch: int) -> None:
    """Rewrite ``metrics.jsonl`` with only its readable rows of epochs ``<= epoch``."""
    keep = [row for row in read_metrics(path) if row["epoch"] <= epoch]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


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


def is_done(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "DONE").exists()


def save_margins(run_dir: str | Path, margins: np.ndarray) -> None:
    """Write ``cos_margins.npy``: every sorted per-sample cosine margin, atomically."""
    path = Path(run_dir) / "cos_margins.npy"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(margins), allow_pickle=False)
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_margins(run_dir: str | Path) -> np.ndarray | None:
    """The sorted margins of ``cos_margins.npy``; None when absent, or (with a warning) when
    it is not a readable 1-D numeric array."""
    path = Path(run_dir) / "cos_margins.npy"
    if not path.exists():
        return None
    try:
        margins = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        logger.warning("%s: unreadable (%s), using the metrics' margin quantiles", path, err)
        return None
    if margins.ndim != 1 or not np.issubdtype(margins.dtype, np.number):
        logger.warning("%s: not a 1-D numeric array, using the metrics' margin quantiles", path)
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
