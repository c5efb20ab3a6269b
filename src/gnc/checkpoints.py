"""Training checkpoints: what one holds, how it is read safely, how a resume puts it back.

``checkpoints/last.pt`` and ``checkpoints/epoch_XXXX.pt`` of a run directory
(:mod:`gnc.rundir`, which writes them atomically) hold :func:`training_checkpoint`: the
config, the epoch and step, the state of the model, optimiser, scheduler and gradient
scaler, every RNG state and the loop's own progress (the last evaluation's nearest ETFs,
the last epoch's statistics). :func:`resume_training` puts it back, so a resumed run
continues exactly as an uninterrupted one.

The promises:

- every checkpoint is loaded onto the CPU (``map_location="cpu"``): the RNG states must stay
  CPU ``ByteTensor`` objects, and ``load_state_dict`` moves model and optimiser tensors to the
  device of the module they are loaded into;
- a damaged file is one clear line (:class:`CheckpointError`, a ``ValueError`` naming the
  file and what is wrong: :func:`checkpoint_problem` checks the insides, :func:`foreign_config`
  that it is this run's); an unusable ``last.pt`` falls back to the newest usable
  ``epoch_XXXX.pt``, with a warning.

Checkpoints hold plain data only (tensors, numbers, strings, lists and dicts: the RNG states
too, see :func:`gnc.runtime.rng_state`) and are read with ``torch.load(weights_only=True)``,
which never runs code from the file. A checkpoint of an older gnc (NumPy's RNG state as a
pickled object) loads only with ``trust_checkpoint=True`` (``--trust-checkpoint``), by a full
unpickle, with a warning; without it, it is a :class:`CheckpointError` that says so.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gnc.config import OUTPUT_KEYS, RUNTIME_KEYS, TrainConfig, config_differences
from gnc.optim import check_optimizer_state, check_resume_length
from gnc.rundir import (
    MAX_COUNT,
    atomic_save,
    is_train_config,
    read_config,
    remove_stale_temporaries,
    trim_metrics,
)
from gnc.runtime import check_rng_state, is_int, rng_state, set_rng_state

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = frozenset(
    {"config", "epoch", "step", "model", "optimizer", "scheduler", "scaler", "rng"}
)
# Keys a resumed run may change, and in which a checkpoint's config may differ from its run's
# config.json: where and how it runs, what it writes besides its results, and its length (a
# longer schedule continues the same run).
RESUMABLE_KEYS = RUNTIME_KEYS | OUTPUT_KEYS | {"epochs"}
TRUST_HINT = "pass --trust-checkpoint if you trust this run directory"
# How data orders are seeded (gnc.data.sampler.epoch_seed); checkpoints before it (no key) were
# seeded by seed + epoch, and a resume of one goes on in the new order
DATA_ORDER = 2
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def _torch_load(path: Path, trust_checkpoint: bool) -> Any:
    """``torch.load(weights_only=True)``; a file that needs more (a checkpoint of an older
    gnc) is unpickled in full only with ``trust_checkpoint``, with a warning."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # not torch.save's format: no checkpoint at all
            raise CheckpointError(f"{path} is truncated or not a checkpoint (not a torch "
                                  "file)") from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f" (it refers to {found.group(1)})" if found else ""
        if not trust_checkpoint:
            raise CheckpointError(
                f"{path} holds Python objects besides plain data{what}, as checkpoints "
                f"written by earlier gnc versions do; it was not unpickled: {TRUST_HINT}") from None
    except Exception as err:  # truncated zip, not a torch file ...
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({reason})") from err
    logger.warning("%s: an older checkpoint, unpickled in full (--trust-checkpoint)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({reason})") from err


def checkpoint_problem(ckpt: dict) -> str | None:
    """What is wrong inside a loaded checkpoint dict (its epoch, step, RNG states, optimiser,
    scheduler and scaler states, the types a resume relies on), or None."""
    epoch, step, config = ckpt["epoch"], ckpt["step"], ckpt["config"]
    if not isinstance(config, dict):
        return f"its config is a {type(config).__name__}, not a dict"
    if not is_int(epoch) or not 0 <= epoch <= MAX_COUNT:
        return f"its epoch {epoch!r} is not an integer in [0, 2**53]"
    epochs = config.get("epochs")
    if is_int(epochs) and epoch > epochs:
        return f"its epoch {epoch} is past the {epochs} epochs of its config"
    if not is_int(step) or not 0 <= step <= MAX_COUNT:
        return f"its step {step!r} is not an integer in [0, 2**53]"
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in model.items()):
        return "its model is not a state dict (names to tensors)"
    optimizer = ckpt["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        return "its optimizer state is not a dict of state and param_groups"
    for key in ("scheduler", "scaler"):
        if not isinstance(ckpt[key], dict):
            return f"its {key} state is a {type(ckpt[key]).__name__}, not a dict"
    rng = check_rng_state(ckpt["rng"])
    if rng:
        return rng
    if not isinstance(ckpt.get("etf_prev", {}), dict):
        return "its etf_prev is not a dict"
    if not isinstance(ckpt.get("cwd", ""), str):
        return "its cwd is not a string"
    stats = ckpt.get("epoch_stats", {})
    if not (isinstance(stats, dict) and all(
            isinstance(k, str) and (is_int(v) or isinstance(v, float)) for k, v in stats.items())):
        return "its epoch_stats is not a dict of names to numbers"
    if not isinstance(ckpt.get("evaluated", True), bool):
        return "its evaluated flag is not a bool"
    elapsed = ckpt.get("elapsed_s", 0.0)
    if not (isinstance(elapsed, int | float) and not isinstance(elapsed, bool)
            and math.isfinite(elapsed) and elapsed >= 0):
        return f"its elapsed_s {elapsed!r} is not a finite number of seconds >= 0"
    if not is_int(ckpt.get("data_order", DATA_ORDER)):
        return "its data_order is not an integer"
    return None


def foreign_config(ckpt_config: dict, run_config: dict) -> list[str]:
    """The result-changing keys in which a checkpoint's config differs from its run's
    ``config.json`` (``key=checkpoint's (now config.json's)``): non-empty for another run's
    checkpoint copied in."""
    try:
        run = TrainConfig.from_dict(run_config)
    except (ValueError, TypeError):
        return []  # a config.json that is no config: its reader reports it
    try:
        return config_differences(ckpt_config, run, ignore=RESUMABLE_KEYS)
    except (ValueError, TypeError) as err:
        return [f"its config is not valid ({str(err).splitlines()[0]})"]


def load_checkpoint(path: Path, *, trust_checkpoint: bool = False,
                    run_config: dict | None = None) -> dict:
    """The checkpoint at ``path``, loaded onto the CPU and checked to be one of ours.

    Read with ``torch.load(weights_only=True)``: a file that holds other Python objects (a
    checkpoint of an older gnc, or anything planted) is refused unless ``trust_checkpoint``,
    which unpickles it in full with a warning. With ``run_config`` (the run's
    ``config.json``) a checkpoint whose config differs from it in a key that changes results
    is refused as another run's.

    Raises :class:`CheckpointError` (one line naming ``path``) for an empty, truncated,
    foreign, damaged or untrusted file.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    ckpt = _torch_load(path, trust_checkpoint)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a gnc checkpoint (a {type(ckpt).__name__})")
    missing = sorted(CHECKPOINT_KEYS - ckpt.keys())
    if missing:
        raise CheckpointError(f"{path} is not a gnc checkpoint (missing keys {missing})")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}")
    if run_config is not None:
        differs = foreign_config(ckpt["config"], run_config)
        if differs:
            raise CheckpointError(f"{path} belongs to another run: differs from config.json "
                                  f"in {', '.join(differs)}")
    return ckpt


def _run_config(run_dir: Path) -> dict | None:
    """The run's ``config.json`` when readable (else None: its reader reports it)."""
    try:
        return read_config(run_dir)
    except (OSError, ValueError):
        return None


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """``checkpoints/last.pt`` (when present), then the ``epoch_XXXX.pt`` files, newest first."""
    folder = Path(run_dir) / "checkpoints"
    last = [folder / "last.pt"] if (folder / "last.pt").exists() else []
    epochs = [p for p in folder.glob("epoch_*.pt") if _EPOCH_FILE.fullmatch(p.name)]
    epochs.sort(key=lambda p: int(_EPOCH_FILE.fullmatch(p.name).group(1)), reverse=True)
    return last + epochs


def load_latest_checkpoint(run_dir: Path, action: str = "resume", *,
                           trust_checkpoint: bool = False) -> tuple[dict, Path]:
    """The newest usable checkpoint of ``run_dir`` and its path.

    ``last.pt`` first; when it is unreadable, damaged, untrusted (see
    :func:`load_checkpoint`) or another run's, the newest usable ``epoch_XXXX.pt``, with a
    warning that names the fallback and its epoch. Raises ``FileNotFoundError`` when the run
    has no checkpoint and :class:`CheckpointError` when none is usable; both messages start
    with ``cannot {action} RUN_DIR:``.
    """
    run_dir = Path(run_dir)
    paths = checkpoint_paths(run_dir)
    if not paths:
        hint = ""
        if action == "resume" and not (run_dir / "config.json").exists():
            hint = " (no run has trained there: leave out --resume to start one)"
        elif action == "resume" and is_train_config(_run_config(run_dir)):
            hint = " (it stopped before its first checkpoint: start it again with --overwrite)"
        raise FileNotFoundError(f"cannot {action} {run_dir}: no checkpoint at "
                                f"{run_dir / 'checkpoints' / 'last.pt'}{hint}")
    run_config = _run_config(run_dir)
    errors = []
    for path in paths:
        try:
            ckpt = load_checkpoint(path, trust_checkpoint=trust_checkpoint,
                                   run_config=run_config)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if errors:
            logger.warning("%s; falling back to %s (epoch %d)", "; ".join(errors), path,
                           ckpt["epoch"])
        return ckpt, path
    raise CheckpointError(f"cannot {action} {run_dir}: no readable checkpoint "
                          f"({'; '.join(errors)})")


def kept_checkpoints(run_dir: str | Path, *, trust_checkpoint: bool = False) -> dict[int, Path]:
    """Epoch → file of every checkpoint a run kept, by epoch: the ``epoch_XXXX.pt`` files and
    ``last.pt`` (read to learn its epoch; left out when unusable or when an epoch file has
    the same epoch)."""
    paths = checkpoint_paths(Path(run_dir))
    kept = {int(_EPOCH_FILE.fullmatch(p.name).group(1)): p for p in paths
            if p.name != "last.pt"}
    if paths and paths[0].name == "last.pt":
        try:
            kept.setdefault(load_checkpoint(paths[0], trust_checkpoint=trust_checkpoint,
                                            run_config=_run_config(Path(run_dir)))["epoch"],
                            paths[0])
        except CheckpointError as err:
            logger.warning("%s", err)
    return dict(sorted(kept.items()))


def checkpoint_of_epoch(run_dir: str | Path, epoch: int, action: str,
                        kept: dict[int, Path] | None = None, *,
                        trust_checkpoint: bool = False) -> dict:
    """The checkpoint of ``epoch`` (``epoch_XXXX.pt``, else ``last.pt`` if it is that epoch),
    among ``kept`` (default: :func:`kept_checkpoints`, which reads ``last.pt``)."""
    run_dir = Path(run_dir)
    if kept is None:
        kept = kept_checkpoints(run_dir, trust_checkpoint=trust_checkpoint)
    if epoch not in kept:
        have = ", ".join(map(str, kept)) or "none"
        raise FileNotFoundError(f"cannot {action} {run_dir}: no checkpoint of epoch {epoch} "
                                f"(kept epochs: {have}; see --checkpoint-every)")
    try:
        ckpt = load_checkpoint(kept[epoch], trust_checkpoint=trust_checkpoint,
                               run_config=_run_config(run_dir))
    except CheckpointError as err:
        raise CheckpointError(f"cannot {action} {run_dir}: {err}") from None
    if ckpt["epoch"] != epoch:
        raise CheckpointError(f"cannot {action} {run_dir}: {kept[epoch]} holds epoch "
                              f"{ckpt['epoch']}, not {epoch}")
    return ckpt


def state_dict_mismatch(model_state: dict[str, Tensor], state: dict[str, Tensor]
                        ) -> str | None:
    """The first key of ``model_state`` missing from ``state`` or of another shape there,
    else the first key of ``state`` the model lacks, in words; None when they fit."""
    for key, value in model_state.items():
        if key not in state:
            return f"key {key!r} of the model is missing from the file"
        got = state[key]
        if got.layout != torch.strided or got.is_meta:  # load_state_dict's traceback
            where = "a meta tensor" if got.is_meta else f"a {got.layout} tensor"
            return f"key {key!r} is {where} in the file, not values"
        if tuple(got.shape) != tuple(value.shape):
            return (f"key {key!r} has shape {tuple(got.shape)} in the file but "
                    f"{tuple(value.shape)} in the model")
        if (got.is_floating_point(), got.is_complex()) != (value.is_floating_point(),
                                                           value.is_complex()):
            return f"key {key!r} is {got.dtype} in the file but {value.dtype} in the model"
    for key in state:
        if key not in model_state:
            return f"the file has key {key!r}, which the model does not"
    return None


def load_model_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """``model.load_state_dict(state)`` (strict); a state that does not fit is one
    :class:`CheckpointError` naming ``path`` and the first key that differs."""
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(f"{path} does not fit the model: {problem}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} does not fit the model: "
                              f"{str(err).strip().splitlines()[0]}") from None


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


# --------------------------------------------------------------------------- a training run's state


class Stateful(Protocol):
    """A part of a run that a checkpoint holds: model, optimiser, scheduler, scaler."""

    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


def training_checkpoint(cfg: TrainConfig, parts: dict[str, Stateful], progress: dict) -> dict:
    """The checkpoint of a training run: its config, each part's ``state_dict()`` (``model``,
    ``optimizer``, ``scheduler``, ``scaler``), every RNG state, the working directory
    (relative data paths start there) and ``progress`` (``epoch``, ``step`` and the loop's
    own: ``etf_prev``, ``epoch_stats``, ``evaluated``, ``elapsed_s``)."""
    return {"config": cfg.to_dict(), **progress,
            **{name: part.state_dict() for name, part in parts.items()},
            "rng": rng_state(), "cwd": os.getcwd(), "data_order": DATA_ORDER}


def resume_training(run_dir: Path, cfg: TrainConfig, parts: dict[str, Stateful], *,
                    trust_checkpoint: bool = False, is_main: bool = True) -> dict:
    """Put the newest usable checkpoint of ``run_dir`` back (:func:`load_latest_checkpoint`):
    each part's state and the RNG states; returns its progress (``epoch``, ``step``,
    ``etf_prev``, ``epoch_stats``, ``evaluated``, ``elapsed_s``; the last four default for
    older files).

    ``cfg`` may differ from the checkpoint's config in :data:`RESUMABLE_KEYS` only; a longer
    schedule must be one that continues the same run (:func:`gnc.optim.check_resume_length`).
    Everything is checked before anything is written. With ``is_main`` the temporaries of a
    killed save are removed and the rows of ``metrics.jsonl`` after the checkpoint's epoch
    (a crash between the two), and torn or foreign lines, are dropped.
    """
    ckpt, path = load_latest_checkpoint(run_dir, "resume", trust_checkpoint=trust_checkpoint)
    changed = config_differences(ckpt["config"], cfg, ignore=RESUMABLE_KEYS)
    if changed:
        raise ValueError(f"cannot resume {run_dir}: the configuration differs in "
                         f"{', '.join(changed)}")
    started = ckpt["config"].get("epochs", cfg.epochs)
    if started != cfg.epochs:
        check_resume_length(run_dir, cfg, started)
    if ckpt["epoch"] > cfg.epochs:
        raise ValueError(f"{run_dir} has trained {ckpt['epoch']} epochs; --epochs "
                         f"{cfg.epochs} is fewer")
    for name, part in parts.items():
        if name == "model":
            load_model_state(part, ckpt["model"], path)
            continue
        try:
            part.load_state_dict(ckpt[name])
            if name == "optimizer":  # torch takes any values: the first step would fail
                check_optimizer_state(part)
        except Exception as err:  # a state of another shape: the file's fault, one line
            reason = (str(err).strip() or type(err).__name__).splitlines()[0]
            raise CheckpointError(f"cannot resume {run_dir}: the {name} state in {path} "
                                  f"does not fit ({reason})") from None
    try:
        set_rng_state(ckpt["rng"])
    except ValueError as err:
        raise CheckpointError(f"cannot resume {run_dir}: {path}: {err}") from None
    if is_main:
        remove_stale_temporaries(run_dir)
        trim_metrics(run_dir / "metrics.jsonl", ckpt["epoch"])
        if ckpt.get("data_order") != DATA_ORDER and ckpt["epoch"] < cfg.epochs:
            logger.warning("%s was started by an older gnc, whose data orders were seeded by "
                           "seed + epoch (seeds shared them, shifted by an epoch): its epochs "
                           "from %d on use the new data orders and augmentation draws",
                           run_dir, ckpt["epoch"] + 1)
    return {"epoch": ckpt["epoch"], "step": ckpt["step"],
            "etf_prev": ckpt.get("etf_prev") or {}, "epoch_stats": ckpt.get("epoch_stats", {}),
            "evaluated": ckpt.get("evaluated", True),
            "elapsed_s": float(ckpt.get("elapsed_s", 0.0))}
