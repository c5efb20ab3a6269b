"""A saved run evaluated again: ``gnc evaluate`` of its newest or every kept checkpoint.

:func:`load_run` rebuilds a run's model from its ``config.json`` and a checkpoint (``gnc
measure`` loads its runs so too); :func:`evaluate_run` and :func:`evaluate_checkpoints` feed
it to :func:`gnc.evaluation.evaluate`, the trainer's own evaluation, so the numbers are
computed the same way as the logged ones.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from gnc.build import build_model, load_data
from gnc.checkpoints import (
    checkpoint_of_epoch,
    kept_checkpoints,
    load_latest_checkpoint,
    load_model_state,
)
from gnc.config import TrainConfig
from gnc.data import DatasetBundle, check_split, make_loader
from gnc.evaluation import etf_distances_of, evaluate, quantiles, save_classifier
from gnc.models.classifier import FeatureClassifier
from gnc.rundir import (
    DATA_PREFIXES,
    append_metrics,
    read_config,
    resolve_data_paths,
    run_lock,
)
from gnc.runtime import resolve_device

__all__ = ["evaluate_checkpoints", "evaluate_run", "load_run"]


def load_run(run_dir: str | Path, device: str = "auto", *, action: str = "load",
             checkpoint: int | None = None, trust_checkpoint: bool = False,
             kept: dict[int, Path] | None = None, data_dir: str | Path | None = None
             ) -> tuple[TrainConfig, FeatureClassifier, dict]:
    """The config, the model and facts of a run's newest readable checkpoint.

    The checkpoint is ``checkpoints/last.pt``, or when that is unreadable the newest readable
    ``epoch_XXXX.pt`` (with a warning); with ``checkpoint=N`` the one of epoch N (see
    :func:`gnc.checkpoints.kept_checkpoints`). Errors are one line starting ``cannot {action}
    RUN:``. Returns ``(config, model on the device, {"bundle", "epoch", "device"})``.
    Checkpoints are read as plain data; ``trust_checkpoint`` lets one of an older gnc be
    unpickled in full (see :func:`gnc.checkpoints.load_checkpoint`); ``kept``: the
    :func:`gnc.checkpoints.kept_checkpoints` of the run, when known.

    Relative data paths (``data_dir`` and the path of ``npz:PATH`` / ``imagefolder:PATH``)
    are read as the run was: kept when they exist from the current directory, else taken
    relative to the directory the run was trained from (recorded in its checkpoints), else
    relative to ``run_dir`` (see :func:`gnc.rundir.resolve_data_paths`). ``data_dir``: read
    the datasets from there instead of the run's own ``data_dir`` (the data moved). The
    returned config holds the paths used.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir, action)
    if data_dir is not None:
        dataset = str(config.get("dataset", ""))
        if dataset.startswith(DATA_PREFIXES):
            raise ValueError(f"cannot {action} {run_dir}: --data-dir is where named datasets "
                             f"are read from; this run's dataset {dataset} is a path of its "
                             "own (put the file back there, or train on the moved one)")
        config = {**config, "data_dir": str(data_dir)}
    if checkpoint is None:
        ckpt, path = load_latest_checkpoint(run_dir, action, trust_checkpoint=trust_checkpoint)
    else:
        if kept is None:
            kept = kept_checkpoints(run_dir, trust_checkpoint=trust_checkpoint)
        ckpt = checkpoint_of_epoch(run_dir, checkpoint, action, kept,
                                   trust_checkpoint=trust_checkpoint)
        path = kept[checkpoint]
    cfg = TrainConfig.from_dict(resolve_data_paths(config, run_dir, ckpt.get("cwd")))
    dev = resolve_device(device)
    bundle = load_data(cfg, augment=False)
    model = build_model(cfg, bundle).to(dev)
    try:  # copies the CPU tensors onto the model's device
        load_model_state(model, ckpt["model"], path)
    except ValueError as err:
        raise type(err)(f"cannot {action} {run_dir}: {err}") from None
    return cfg, model, {"bundle": bundle, "epoch": ckpt["epoch"], "device": dev}


def _evaluate_loaded(run_dir: Path, cfg: TrainConfig, model: FeatureClassifier, info: dict,
                     split: str, save: bool, previous: dict | None) -> tuple[dict, dict]:
    """One checkpoint's row (metrics, ETF distances against ``previous``, ``epoch``,
    ``split``, margin quantiles) and the ETF state for the next one."""
    bundle = info["bundle"]
    loader = make_loader(bundle, cfg.eval_batch_size, split=split)
    geometry: dict = {}
    metrics, margins = evaluate(model, loader, bundle.num_classes, info["device"],
                                geometry=geometry)
    distances, state = etf_distances_of(geometry, previous)
    if save:
        save_classifier(run_dir, model.head, geometry, info["epoch"], split)
    row = {"epoch": info["epoch"], "split": split, **metrics, **distances,
           "cos_margins": quantiles(margins)}
    return row, state


def _check_has_split(split: str, cfg: TrainConfig, bundle: DatasetBundle) -> None:
    if split == "test" and bundle.test is None:
        raise ValueError(f"dataset '{cfg.dataset}' has no test split")


def evaluate_run(run_dir: str | Path, split: str = "train", device: str = "auto", *,
                 checkpoint: int | None = None, save_classifier: bool = False,
                 trust_checkpoint: bool = False, data_dir: str | Path | None = None) -> dict:
    """NC metrics of a run's newest readable checkpoint on ``split`` (``gnc evaluate``).

    ``checkpoint=N``: the checkpoint of epoch N instead (``--checkpoint N``). Besides the
    metrics of :func:`evaluate` the result has ``epoch``, ``split``, the ETF distances of
    :func:`gnc.metrics.etf_distances` (``etf_*_moved`` NaN: one checkpoint has no previous
    evaluation) and ``cos_margins`` (101 quantiles). ``save_classifier`` also writes
    :func:`gnc.evaluation.save_classifier`'s file. The model is evaluated with the statistics its
    checkpoint stores (precise ones when the epoch was evaluated in training with
    ``eval_stats="precise"``). Checkpoint fallback, data paths and ``trust_checkpoint`` as
    in :func:`load_run` (and ``data_dir``). With ``save_classifier`` (a write into the run) it holds
    :func:`gnc.rundir.run_lock` on the run, as :func:`evaluate_checkpoints` does.
    """
    check_split(split)  # before any loading
    run_dir = Path(run_dir)
    if save_classifier:  # a write into the run: one writer (its training holds the lock)
        read_config(run_dir, "evaluate")  # not a run: say so, and leave no .lock in it
    with run_lock(run_dir, create=False) if save_classifier else contextlib.nullcontext():
        cfg, model, info = load_run(run_dir, device, action="evaluate", checkpoint=checkpoint,
                                    trust_checkpoint=trust_checkpoint, data_dir=data_dir)
        _check_has_split(split, cfg, info["bundle"])
        return _evaluate_loaded(run_dir, cfg, model, info, split, save_classifier, None)[0]


def evaluate_checkpoints(run_dir: str | Path, split: str = "train", device: str = "auto", *,
                         out: str | Path | None = None, save_classifier: bool = False,
                         trust_checkpoint: bool = False,
                         data_dir: str | Path | None = None) -> list[dict]:
    """:func:`evaluate_run` of every kept checkpoint, by epoch (``gnc evaluate --all``).

    Appends one JSON line per checkpoint to ``out`` (default ``RUN/evaluate_{split}.jsonl``;
    never the training's ``metrics.jsonl``) as it goes, and returns the rows. ``etf_*_moved``
    is measured from the previous checkpoint of the sequence. Data are loaded and the model
    built once. ``trust_checkpoint`` and ``data_dir`` as in :func:`load_run`. When it writes
    into the run (``out`` not given, or ``save_classifier``) it holds
    :func:`gnc.rundir.run_lock` on it for the whole pass; metrics appended elsewhere (one
    ``write`` per line) need no lock.
    """
    run_dir = Path(run_dir)
    check_split(split)
    read_config(run_dir, "evaluate")  # not a run: say so, and leave no .lock in it
    inside = out is not None and _check_metrics_out(run_dir, Path(out))
    into_run = out is None or save_classifier or inside
    with run_lock(run_dir, create=False) if into_run else contextlib.nullcontext():
        return _evaluate_checkpoints(run_dir, split, device, out, save_classifier,
                                     trust_checkpoint, data_dir)


def _check_metrics_out(run_dir: Path, out: Path) -> bool:
    """Whether ``out`` (``--all``'s metrics file) lies in the run directory; ``ValueError``
    for a folder, a missing folder, or a file of the run's own there (its config, metrics,
    checkpoints: lines appended to them would corrupt the run): inside the run only a
    top-level ``*.jsonl`` other than ``metrics.jsonl``."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the metrics file (e.g. "
                         f"{out / 'evaluate_train.jsonl'})")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    try:
        rel = out.resolve().relative_to(run_dir.resolve())
    except ValueError:
        return False
    if len(rel.parts) != 1 or out.suffix != ".jsonl" or out.name == "metrics.jsonl":
        raise ValueError(f"--out {out} is a file of the run {run_dir} itself; in the run only "
                         "a new *.jsonl beside metrics.jsonl (default evaluate_SPLIT.jsonl)")
    return True


def _evaluate_checkpoints(run_dir: Path, split: str, device: str, out: str | Path | None,
                          save_classifier: bool, trust_checkpoint: bool,
                          data_dir: str | Path | None) -> list[dict]:
    kept = kept_checkpoints(run_dir, trust_checkpoint=trust_checkpoint)
    if not kept:
        raise FileNotFoundError(f"cannot evaluate {run_dir}: no checkpoint in "
                                f"{run_dir / 'checkpoints'}")
    cfg, model, info = load_run(run_dir, device, action="evaluate", checkpoint=next(iter(kept)),
                                trust_checkpoint=trust_checkpoint, kept=kept,
                                data_dir=data_dir)
    _check_has_split(split, cfg, info["bundle"])
    path = Path(out) if out is not None else run_dir / f"evaluate_{split}.jsonl"
    rows, state = [], None
    for epoch in kept:
        if epoch != info["epoch"]:
            ckpt = checkpoint_of_epoch(run_dir, epoch, "evaluate", kept,
                                       trust_checkpoint=trust_checkpoint)
            try:
                load_model_state(model, ckpt["model"], kept[epoch])
            except ValueError as err:
                raise type(err)(f"cannot evaluate {run_dir}: {err}") from None
            info["epoch"] = epoch
        row, state = _evaluate_loaded(run_dir, cfg, model, info, split, save_classifier, state)
        append_metrics(path.parent, row, path.name)
        rows.append(row)
    return rows
