"""The ``gnc`` command line (DESIGN §3).

Every :class:`~gnc.config.TrainConfig` field is a flag of ``gnc train`` and of ``gnc
experiment`` (there but ``method`` and ``seed``), made from the field's metadata: the flag
``--field-name``, its help, its choices, and the type of its annotation. A ``bool`` field is a
pair ``--x`` / ``--no-x``; a ``dict`` or ``list`` field takes JSON; a field that may be unset
(``int | None``) also takes ``none``. Every flag defaults to None, "not given": a preset's
value stays unless a flag overrides it (:func:`train_config_from_args`).

Errors of the user — bad settings or inputs (``ValueError``), missing or unwritable files
(``OSError``), a diverged run (``FloatingPointError``), CUDA out of memory — are one line on
stderr and exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import shlex
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # imported lazily at run time (start-up time)
    from gnc.config import TrainConfig


class CLIError(Exception):
    """An error reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line too (then see ``--help``).

    ``populate(parser)``, if given, adds arguments on first use (parsing or help): the
    training flags come from :mod:`gnc.config`, which imports torch, and ``gnc --help`` does
    not need them.
    """

    def __init__(self, *args: Any,
                 populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _populated(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._populated()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._populated()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Errors that ``main`` reports as one line: bad settings or inputs (ValueError, which
# CheckpointError, WeightsError, NonFiniteError are), missing or unwritable files (OSError,
# e.g. DatasetNotFoundError), diverged training (FloatingPointError). CUDA running out of
# memory is one too, and so is the CPU's (:func:`_is_user_error`); other RuntimeErrors are
# bugs: a traceback.
USER_ERRORS = (CLIError, ValueError, OSError, FloatingPointError)


# torch's CPU allocator failing (a RuntimeError, not OutOfMemoryError): "[enforce fail at
# alloc_cpu.cpp:N] ... DefaultCPUAllocator: can't allocate memory: you tried to allocate B bytes"
CPU_OOM = "can't allocate memory"


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, USER_ERRORS):
        return True
    torch = sys.modules.get("torch")  # not imported: the error is not torch's
    return torch is not None and (isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and CPU_OOM in str(err)))


DEFAULT_BATCH_SIZE = 100  # `gnc train` on a dataset other than ufm without preset or flag

# `gnc experiment` takes every training flag but these (it runs every method x seed)
NOT_EXPERIMENT_FLAGS = ("method", "seed")
# Shortcuts for keys of `dataset_options` (flag, key, type, help), set over --dataset-options
DATASET_FLAGS = [
    ("--num-classes", "num_classes", int, "ufm: number of classes K"),
    ("--per-class", "per_class", int, "ufm: samples per class"),
    ("--subset", "subset", int, "keep this many training samples per class"),
    ("--transforms", "transforms", str, "torchvision sets: default | released (the paper "
     "code's; MNIST-like: 3x32x32)"),
]
# short metavars keep most flags on one line of --help
TRUST_HELP = ("load a checkpoint written by an earlier gnc (a full unpickle, which can run "
              "code: only for run directories you trust)")
_METAVARS = {int: "N", float: "X", str: "S"}


class _ExplicitNone:
    """The value of ``--feature-dim none`` (and of JSON ``null``): the field set to None,
    which the flags' default None ("not given") cannot say."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = _ExplicitNone()


# --------------------------------------------------------------------------- field types


def _optional(hint: Any) -> tuple[Any, bool]:
    """``(T, True)`` for the annotation ``T | None``, ``(hint, False)`` for any other."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


_INT_LIST = re.compile(r"\s*-?\d+(\s*,\s*-?\d+)*\s*")  # a list of ints without brackets


def _from_json(name: str, hint: Any, text: str) -> Any:
    """The value of the field ``name`` (annotation ``hint``) that the JSON ``text`` is;
    ``ValueError`` for invalid JSON or a value of another type."""
    from gnc.config import hint_name, is_type  # loaded with the train flags already

    if _INT_LIST.fullmatch(text) and is_type(hint, [0]):  # --eval-epochs 10,25,50
        text = f"[{text}]"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON {text!r} ({err})") from None
    if not is_type(hint, value):
        raise ValueError(f"Expected `{name}` to be {hint_name(hint)}, but got {text!r}")
    return value


def _json_flag(name: str, hint: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = _from_json(name, hint, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return EXPLICIT_NONE if value is None else value

    return parse


def _or_none(kind: type) -> Callable[[str], Any]:
    """``kind`` as an argparse type that also takes ``none``."""
    def parse(text: str) -> Any:
        return EXPLICIT_NONE if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names it: "invalid int value: 'x'"
    return parse


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _add_field_flag(p: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    """The flag of the TrainConfig field ``f``, from its annotation ``hint`` and metadata."""
    from gnc.config import is_type

    flag = "--" + f.name.replace("_", "-")
    text = f.metadata["help"].replace("%", "%%")
    kind, optional = _optional(hint)
    if kind is bool:  # --x / --no-x
        p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                       help=text)
    elif kind in _METAVARS:
        choices = f.metadata.get("choices")
        if choices and not all(_mentions(text, c) for c in choices):
            text = f"{' | '.join(choices)}: {text}"
        p.add_argument(flag, dest=f.name, type=_or_none(kind) if optional else kind,
                       choices=choices, default=None, help=text,
                       metavar=_METAVARS[kind] + ("|none" if optional else ""))
    else:
        is_type(hint, None)  # TypeError for an annotation JSON does not describe
        p.add_argument(flag, dest=f.name, type=_json_flag(f.name, hint), default=None,
                       help=text, metavar="JSON")


def _add_train_flags(p: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """One flag per TrainConfig field (all defaulting to None = "not given"), but those in
    ``exclude``; the DATASET_FLAGS after --dataset-options."""
    from gnc.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            p.set_defaults(**{f.name: None})  # train_config_from_args reads every field
        else:
            _add_field_flag(p, f, hints[f.name])
        if f.name == "dataset_options":
            for flag, key, typ, text in DATASET_FLAGS:
                p.add_argument(flag, dest=key, type=typ, default=None, help=text,
                               metavar=_METAVARS[typ])


TRAIN_FLAGS_EPILOG = (
    "Every setting of a run (TrainConfig) is a flag; a flag given overrides the preset. "
    "true/false settings: --x / --no-x; N|none: 'none' unsets it; JSON: e.g. --milestones "
    "'[100, 150]'. --dataset-options updates the preset's options, and --num-classes, "
    "--per-class, --subset, --transforms update those.")


def train_config_from_args(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """The preset's config (or ``base``, or the defaults), overridden by every flag given.

    ``dataset_options``: the preset's (none if ``--dataset`` names another dataset), updated
    with the keys of ``--dataset-options``, then with ``--num-classes``, ``--per-class``,
    ``--subset``, ``--transforms`` (a key given both ways with two values is an error).
    """
    from gnc.config import TrainConfig
    from gnc.experiments import get_preset

    base = get_preset(args.preset).config if args.preset else (base or {})
    cfg = dict(base)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None and f.name != "dataset_options":
            cfg[f.name] = None if value is EXPLICIT_NONE else value
    options = dict(base.get("dataset_options", {}))
    if args.dataset is not None and args.dataset != base.get("dataset"):
        options = {}  # the preset's options belong to its own dataset
    given = args.dataset_options or {}
    options.update(given)
    for flag, key, _, _ in DATASET_FLAGS:
        value = getattr(args, key)
        if value is None:
            continue
        if key in given and given[key] != value:
            raise CLIError(f"{flag} {value} and --dataset-options {key}={given[key]!r} "
                           "disagree: give one")
        options[key] = value
    cfg["dataset_options"] = options
    if args.eval_epochs not in (None, EXPLICIT_NONE) and args.eval_every is None:
        cfg["eval_every"] = 0  # --eval-epochs alone: evaluate exactly there (and at the last)
    if "batch_size" not in cfg and cfg.get("dataset", "ufm") != "ufm":
        cfg["batch_size"] = DEFAULT_BATCH_SIZE  # the full batch suits UFM, not real data
    return TrainConfig.from_dict(cfg)


# runtime keys a resume takes from its own command, not from the run's config.json
RESUME_ANEW = frozenset({"device", "progress", "num_workers", "download", "until_epoch"})


def _resumed_config(args: argparse.Namespace) -> dict | None:
    """With ``--resume`` and no ``--preset``: the run's own ``config.json``, the base the flags
    override (``gnc train --out RUN --resume`` needs no flag of the run again), but where and
    how it ran (``device``, ``progress``, ``num_workers``, ``download``: this command's or the
    defaults) and its ``until_epoch`` (a resume without ``--until-epoch`` trains to the end);
    its ``data_dir`` and ``tensorboard`` stay."""
    from gnc.rundir import is_train_config, read_config

    if not args.resume or args.preset:
        return None
    try:
        config = read_config(args.out)
    except (OSError, ValueError):
        return None  # the trainer names what is wrong with the directory
    if not is_train_config(config):
        return None
    return {k: v for k, v in config.items() if k not in RESUME_ANEW}


def _cmd_train(args: argparse.Namespace) -> None:
    from gnc.rundir import strict_json
    from gnc.training import train

    cfg = train_config_from_args(args, _resumed_config(args))
    if cfg.method == "implicit-nograd" and args.backward not in (None, "none"):
        raise CLIError(f"--backward {args.backward} with --method implicit-nograd: that "
                       "ablation's backward is always none (use --method implicit)")
    if args.trust_checkpoint and not args.resume:
        raise CLIError("--trust-checkpoint applies to the checkpoint of --resume; without "
                       "--resume nothing is loaded")
    row = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                trust_checkpoint=args.trust_checkpoint)
    keys = ("epoch", "train_loss", "top1", "nc1", "nc3", "avg_cos_margin", "test_top1")
    print(strict_json({k: row[k] for k in keys if k in row}))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from gnc.rundir import strict_json
    from gnc.saved_runs import evaluate_checkpoints, evaluate_run

    if args.all and args.checkpoint is not None:
        raise CLIError("choose one of --checkpoint N (one epoch) and --all (every kept one)")
    if args.out is not None and not args.all:
        raise CLIError("--out is the metrics file of --all; without --all nothing is written")
    if args.all:
        rows = evaluate_checkpoints(args.run_dir, split=args.split, device=args.device,
                                    out=args.out, save_classifier=args.save_classifier,
                                    trust_checkpoint=args.trust_checkpoint,
                                    data_dir=args.data_dir)
        for row in rows:
            row.pop("cos_margins")
            print(strict_json(row))
        return
    metrics = evaluate_run(args.run_dir, split=args.split, device=args.device,
                           checkpoint=args.checkpoint, save_classifier=args.save_classifier,
                           trust_checkpoint=args.trust_checkpoint, data_dir=args.data_dir)
    metrics.pop("cos_margins")
    print(strict_json(metrics, indent=1))


def _cmd_presets(args: argparse.Namespace) -> None:
    from gnc.experiments import PRESETS

    width = max(len(n) for n in PRESETS)
    for name, preset in PRESETS.items():
        print(f"{name.ljust(width)}  {preset.summary}")


def _cmd_experiment(args: argparse.Namespace) -> None:
    import dataclasses

    from gnc.experiments import run_experiment

    # The preset (or the defaults) with every flag given, as `gnc train` resolves them; the
    # settings are shared by every method x seed (fairness), each run records them in its
    # config.json, and a finished run made with other settings is refused.
    cfg = train_config_from_args(args)
    overrides = {k: v for k, v in dataclasses.asdict(cfg).items()
                 if k not in NOT_EXPERIMENT_FLAGS}
    methods = args.methods.split(",") if args.methods else None
    argv = getattr(args, "argv", None)  # main([...]) sets it; None: the program's own
    argv = argv if argv is not None else sys.argv[1:] if argv_is_cli() else None
    command = "gnc " + shlex.join(argv) if argv is not None else None  # pastes back
    run_experiment(args.preset, args.out, seeds=args.seeds, methods=methods,
                   overrides=overrides, command=command, report=not args.no_report,
                   trust_checkpoint=args.trust_checkpoint, jobs=args.jobs,
                   jobs_mode=args.jobs_mode)
    if not args.no_report:
        print(f"report: {Path(args.out) / 'report.md'}")


def _cmd_report(args: argparse.Namespace) -> None:
    from gnc.experiments import get_preset, resolved_config
    from gnc.report import make_report

    preset = get_preset(args.preset) if args.preset else None
    table_epochs = preset.table_epochs if preset else None
    if args.table_epochs:
        try:
            a, b = (int(e) for e in args.table_epochs.split(","))
        except ValueError:
            raise CLIError(f"bad --table-epochs {args.table_epochs!r}: expected A,B, "
                           "e.g. 50,200") from None
        if min(a, b) < 1:
            raise CLIError(f"bad --table-epochs {args.table_epochs!r}: epochs start at 1")
        table_epochs = (a, b)
    path = make_report(
        args.exp_dir, title=f"{preset.name}: {preset.summary}" if preset else None,
        table_epochs=table_epochs,
        notes=f"Preset notes: {preset.notes}" if preset else None,
        command=args.command, machine=args.machine, out_dir=args.out,
        preset_config=resolved_config(preset) if preset else None, jobs=args.jobs,
        unfinished=args.unfinished,
    )
    print(f"report: {path}")


def _one_line(err: BaseException) -> str:
    """``gnc: error: <message>``: the first line of the message (the type if it is empty)."""
    text = str(err).strip() or type(err).__name__
    if CPU_OOM in text:  # torch's allocator message without its source location
        text = "out of CPU memory: " + text[text.index(CPU_OOM):].split(". Error code")[0]
    return f"gnc: error: {text.splitlines()[0]}"


def argv_is_cli() -> bool:
    return bool(sys.argv) and Path(sys.argv[0]).name in ("gnc", "__main__.py")


# TrainConfig fields that `gnc bench` sets from its own flags, not from --set
_BENCH_FLAGS = {"method": "--methods", "device": "--device", "data_dir": "--data-dir"}


def _overrides(items: Sequence[str]) -> dict:
    """``["width=16", "solve_device=cpu"]`` → ``{"width": 16, "solve_device": "cpu"}``.

    A value is JSON of the field's type; a ``str`` field also takes the raw string. The
    values are checked by :meth:`TrainConfig.validate` when the bench builds its trainer.
    """
    from gnc.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise CLIError(f"bad --set {item!r}: expected KEY=VALUE (a TrainConfig field)")
        if key in _BENCH_FLAGS:
            raise CLIError(f"bad --set {item!r}: give {key} by {_BENCH_FLAGS[key]}")
        if key not in hints:
            names = ", ".join(k for k in hints if k not in _BENCH_FLAGS)
            raise CLIError(f"bad --set {item!r}: unknown key {key!r}; choose from {names}")
        if hints[key] is str:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            out[key] = value if isinstance(value, str) else text
            continue
        try:
            out[key] = _from_json(key, hints[key], text)
        except ValueError as err:
            raise CLIError(f"bad --set {item!r}: {err}") from None
    return out


def _cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from gnc import bench
    from gnc.runtime import check_device

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(args.device)  # ValueError: one line
    overrides = _overrides(args.set or [])  # bad --set values: one line before any timing
    if args.repeats < 1:
        raise CLIError(f"Expected --repeats >= 1, but got {args.repeats}")
    epoch = (args.epoch if args.epoch is not None
             else "cifar10-resnet18" if args.device.startswith("cuda") else "none")
    methods = args.methods.split(",") if args.methods is not None else bench.STEP_METHODS
    # every flag checked before the first timing: a bad later one threw the earlier away
    run_layer, run_steps = args.sizes != "none", args.steps != "none"
    sizes = bench.parse_sizes(args.sizes) if run_layer and args.sizes is not None else None
    polar = args.polar.split(",") if args.polar is not None else None
    bench.check_polar_methods(polar or ())  # ValueError: one line
    cases = (bench.step_cases_by_name(args.steps, args.device)
             if run_steps and args.steps is not None else None)
    if epoch == "none" and (args.methods is not None or args.set):
        raise CLIError(f"{'--methods' if args.methods is not None else '--set'} applies to "
                       "the epoch case: give --epoch PRESET")
    if epoch != "none":
        from gnc.experiments import get_preset
        from gnc.heads import METHODS

        get_preset(epoch)  # ValueError: one line
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise CLIError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if args.profile:
        if epoch == "none":
            raise CLIError("--profile profiles the epoch case: give --epoch PRESET")
        for method in methods:
            print(bench.profile_epoch(epoch, method, torch.device(args.device),
                                      data_dir=args.data_dir, **overrides))
        return
    records = []
    if run_layer:
        kw = {"sizes": sizes} if sizes is not None else {}
        if polar is not None:
            kw["polar_methods"] = polar
        records += bench.bench_layer(device=args.device, repeats=args.repeats, **kw)
    if run_steps:
        records += bench.bench_steps(cases, device=args.device, repeats=min(args.repeats, 3))
    if epoch != "none":
        records += bench.bench_epochs(epoch, device=args.device, methods=methods,
                                      data_dir=args.data_dir, **overrides)
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=1))
        return
    print(bench.format_table(records))
    for line in bench.speedups(records) + bench.step_overheads(records):
        print(line)


def _cmd_measure(args: argparse.Namespace) -> None:
    from gnc.measure import expand_weights, measure_files, write_measure_dir
    from gnc.rundir import strict_json

    if args.overwrite and not args.out:
        raise CLIError("--overwrite replaces the directory of --out; without --out nothing "
                       "is written")
    single = bool(args.out) and args.out.endswith(".json")
    if single and len(expand_weights(args.weights or [])) > 1:
        raise CLIError("several checkpoints make several rows: give --out a directory "
                       "(metrics.jsonl), not a .json file")
    if single and Path(args.out).exists() and not args.overwrite:  # before measuring
        raise CLIError(f"{args.out} exists; choose another --out or pass --overwrite")
    rows = measure_files(
        args.model, args.weights, dataset=args.dataset, data_dir=args.data_dir,
        split=args.split, batch_size=args.batch_size, device=args.device,
        eval_stats=args.eval_stats, features=args.features, classifier=args.classifier,
        num_workers=args.num_workers, trust_checkpoint=args.trust_checkpoint)
    if single:  # one checkpoint: one JSON object
        (row, _), = rows
        Path(args.out).write_text(strict_json(row, indent=1) + "\n")
        return
    if args.out:
        config = {"measure": {k: getattr(args, k) for k in (
            "model", "weights", "dataset", "split", "eval_stats", "features", "classifier")},
            "model": args.model, "dataset": args.dataset, "method": "measured"}
        out = write_measure_dir(args.out, _echo(rows), config, overwrite=args.overwrite)
        print(f"metrics: {out / 'metrics.jsonl'}")
        return
    for _ in _echo(rows):
        pass


def _echo(rows):
    """Print each row (without its margin quantiles) as one JSON line, as it comes."""
    from gnc.rundir import strict_json

    for row, margins in rows:
        print(strict_json({k: v for k, v in row.items() if k != "cos_margins"}), flush=True)
        yield row, margins


def build_parser() -> argparse.ArgumentParser:
    from gnc.jobs import JOBS_MODES  # no torch: the fork server may still be importing it

    parser = _Parser(
        prog="gnc", description="Guided neural collapse: nearest-simplex-ETF classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("presets", help="list the experiment presets")
    p.set_defaults(func=_cmd_presets)

    # a short usage line: the full list of the training flags follows under "options"
    p = sub.add_parser("train", help="train one run (method x seed) into a run directory",
                       usage="gnc train [--preset NAME] --out DIR [training flags]",
                       epilog=TRAIN_FLAGS_EPILOG, populate=_add_train_flags)
    p.add_argument("--preset", help="start from this preset (gnc presets lists them)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.pt (if damaged: the newest usable "
                        "epoch_XXXX.pt); without --preset, OUT/config.json is the base the "
                        "flags override (no --until-epoch: to the last epoch)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (default: refuse)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="NC metrics of a run's last (or any kept) checkpoint")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--split", default="train", help="train | test")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--checkpoint", type=int, metavar="N",
                   help="the checkpoint of epoch N (default: the last)")
    p.add_argument("--all", action="store_true",
                   help="every kept checkpoint, by epoch; one JSON line each appended to "
                   "--out and printed")
    p.add_argument("--out", help="metrics file of --all (default RUN/evaluate_SPLIT.jsonl)")
    p.add_argument("--save-classifier", action="store_true",
                   help="also write RUN/classifier/epoch_XXXX.pt (W, b, class means, U; "
                   "epoch_XXXX_test.pt for --split test)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--data-dir", help="read the run's named dataset (cifar10, mnist, ...) "
                   "from here instead of its own data_dir (the data moved; not for npz:/"
                   "imagefolder: paths)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "experiment", help="every method x seed of a preset or of your settings, then the report",
        usage="gnc experiment [PRESET] --out DIR [--seeds N] [--methods M,...] [training flags]",
        description="Train every method x seed with one set of settings, then write the "
        "report: a preset's, with any training flag overriding it, or, without a preset, "
        "the flags alone (e.g. gnc experiment --dataset npz:x.npz --model mlp --out runs/x).",
        epilog=TRAIN_FLAGS_EPILOG,
        populate=lambda p: _add_train_flags(p, exclude=NOT_EXPERIMENT_FLAGS))
    p.add_argument("preset", nargs="?", help="preset to start from (gnc presets lists them); "
                   "omit it to give every setting by flags")
    p.add_argument("--seeds", type=int, help="number of seeds 1..N (default: the preset's, "
                   "else 5)")
    p.add_argument("--methods", help="comma-separated methods (default: the preset's; "
                   "ablations: implicit-nograd, standard-unnormalized)")
    p.add_argument("--out", required=True, help="experiment directory")
    p.add_argument("--no-report", action="store_true", help="train only; `gnc report` later")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP + " (the "
                   "checkpoints of interrupted runs it resumes)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs in flight at once, each in its own process with max(1, cores "
                   "// N) threads (--jobs-mode streams: all in this process); a failed run "
                   "does not stop the others (default 1: one after the other in this "
                   "process)")
    p.add_argument("--jobs-mode", default="auto", choices=JOBS_MODES,
                   help="how --jobs runs share a GPU: plain processes (time-slicing), "
                   "the CUDA MPS daemon started as the user (falls back to processes), or "
                   "streams: no worker processes, this one advances the runs a step each in "
                   "turn, each on a CUDA stream of its own (for --graph-step; on a CPU the "
                   "runs one after the other, interleaved); auto: mps when the runs use CUDA")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("report", help="figures and report.md from an experiment directory")
    p.add_argument("exp_dir", help="experiment directory (gnc experiment --out)")
    p.add_argument("--preset", help="preset the runs came from (title, table epochs)")
    p.add_argument("--out", help="write report.md and figures here (default: EXP_DIR)")
    p.add_argument("--command", help="the command that produced the runs (shown on top)")
    p.add_argument("--machine", help="where the runs ran (default: this machine)")
    p.add_argument("--table-epochs", help="the two epochs of the top-1 table, A,B "
                   "(default: the preset's)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="processes that draw the figures (default 1: this one)")
    p.add_argument("--unfinished", action="store_true",
                   help="include runs without DONE at the epochs they evaluated (an "
                   "interrupted experiment); the report lists them")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "measure", help="NC metrics of any model's penultimate layer (torchvision or a run)",
        usage="gnc measure --model torchvision:NAME|run:RUN_DIR [--weights PATH|GLOB ...] "
        "[--dataset NAME] [--split train|test] [--out FILE.json|DIR]",
        description="Neural-collapse metrics at the input of the model's last nn.Linear "
        "(forward hooks; gnc.measure). Several --weights (a glob) measure a whole run: one "
        "line per checkpoint in OUT/metrics.jsonl, which `gnc report` plots when OUT is "
        "EXP/<name>/seed<k>.")
    p.add_argument("--model", required=True, help="torchvision:NAME (the architecture with K "
                   "outputs from the dataset, weights from --weights) or run:RUN_DIR (a gnc "
                   "run; its newest checkpoint without --weights)")
    p.add_argument("--weights", nargs="+", metavar="PATH", help="weights files or glob "
                   "patterns (a state dict, or a dict with 'model'/'state_dict'); read from "
                   "files only, never downloaded; the epoch is the file's 'epoch' entry, else "
                   "the last number in its name, else its index")
    p.add_argument("--dataset", help="dataset name, npz:PATH or imagefolder:PATH (default for "
                   "run:RUN_DIR: the run's own)")
    p.add_argument("--data-dir", help="where datasets are read from (default data/; a "
                   "run:RUN_DIR without --dataset: the run's own, unless given)")
    p.add_argument("--split", default="train", help="train | test")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader workers")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--eval-stats", default="running", help="running (default: BatchNorm "
                   "statistics as stored; for a gnc run, those of its own evaluation) | "
                   "precise (recomputed over the measured data first, un-augmented: not "
                   "gnc train's pass over augmented training batches)")
    p.add_argument("--features", help="layer whose output are the features (default: the "
                   "classifier's input)")
    p.add_argument("--classifier", help="classifier layer (default: the last nn.Linear the "
                   "forward pass uses)")
    p.add_argument("--out", help="FILE.json (one checkpoint) or a directory: config.json, "
                   "metrics.jsonl, cos_margins.npy, DONE (default: JSON lines on stdout)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the measurement already in OUT (default: refuse)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP + " (the "
                   "run's own checkpoint; --weights files are never unpickled)")
    p.set_defaults(func=_cmd_measure)

    p = sub.add_parser("bench", help="timings and memory: the nearest-ETF layer, training steps")
    p.add_argument("--sizes", help="layer sizes DxK, comma-separated (default 512x10,512x50,"
                   "512x100,2048x1000; 'none' skips the layer)")
    p.add_argument("--steps", help="training-step cases (default ufm100,ufm1000,resnet18,"
                   "resnet50-k1000; 'none' skips them)")
    p.add_argument("--polar", help="polar factors of the layer and head cases: auto (the "
                   "eigensolvers), newton_schulz (default both)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median; at "
                   "most 3 for the training steps, 1 for the paper's riemannian/ddn layer "
                   "and the largest layers: their notes say so; the epoch case times one "
                   "epoch after a warm-up one)")
    p.add_argument("--epoch", help="time whole training epochs of this preset per method "
                   "(default cifar10-resnet18 on CUDA, 'none' on CPU)")
    p.add_argument("--methods", help="methods of the epoch case (default standard,fixed,"
                   "implicit)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a training setting of the epoch case (repeatable), e.g. "
                   "--set solve_device=cpu --set dataset_options='{\"subset\": 50}'")
    p.add_argument("--data-dir", default="data", help="where the epoch case reads its data "
                   "(random images of the same shape when absent)")
    p.add_argument("--profile", action="store_true", help="instead of timing the epoch case, "
                   "profile one epoch per method: kernel launches and host waits per step, "
                   "time in the backbone and the head, the top operators")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=_cmd_bench)
    return parser


# The modules each command imports (lazily): imported by main under _start_up. A command
# that trains in this process also imports TRAINING_IMPORTS there: torch._dynamo, which the
# first torch.optim step would import (~900 modules, 1 s); a Ctrl-C inside that import can
# become another error (a RuntimeError of triton's class set-up) that torch's optional-
# import guards swallow, and the run would go on as if no Ctrl-C had come
_COMMAND_MODULES = {
    "_cmd_train": ("gnc.training",), "_cmd_experiment": ("gnc.experiments",),
    "_cmd_evaluate": ("gnc.evaluation",), "_cmd_measure": ("gnc.measure",),
    "_cmd_report": ("gnc.report", "gnc.experiments"), "_cmd_bench": ("gnc.bench",),
}
TRAINING_IMPORTS = ("torch._dynamo",)


def _command_modules(args: argparse.Namespace) -> tuple[str, ...]:
    """What ``main`` imports under :func:`_start_up` for the parsed command."""
    modules = _COMMAND_MODULES.get(args.func.__name__, ())
    trains = args.func.__name__ in ("_cmd_train", "_cmd_bench") or (
        args.func.__name__ == "_cmd_experiment"  # else its workers train
        and (args.jobs == 1 or args.jobs_mode == "streams"))
    return modules + TRAINING_IMPORTS if trains else modules


def _stop_fork_server() -> None:
    """The workers' fork server, if this process started one (:func:`gnc.jobs.prestart`)."""
    jobs = sys.modules.get("gnc.jobs")
    if jobs is not None:
        jobs.stop_fork_server()


def _interrupted_at_start_up(signum, frame) -> None:
    os.write(2, b"gnc: interrupted\n")
    _stop_fork_server()
    os._exit(130)  # nothing is written yet: no clean-up to run


@contextlib.contextmanager
def _start_up():
    """While the command line is parsed and the command's modules imported, SIGINT ends the
    process at once with "gnc: interrupted" and status 130: a ``KeyboardInterrupt`` raised
    inside an import (torch's, NumPy's) can surface as another error with a traceback.
    Outside the main thread, or where SIGINT is ignored, nothing changes."""
    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN or previous is None:
            raise ValueError("leave it alone")
        signal.signal(signal.SIGINT, _interrupted_at_start_up)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _prestart_workers(argv: Sequence[str]) -> None:
    """``gnc experiment|report ... --jobs N`` with N > 1: start the workers' fork server now,
    so that its import of torch overlaps this process's (the parse imports torch); see
    :func:`gnc.jobs.prestart`. A bad value is left to the real parse."""
    if not argv or argv[0] not in ("experiment", "report"):
        return
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    peek.add_argument("--jobs", type=int, default=1)
    peek.add_argument("--no-report", action="store_true")
    peek.add_argument("--jobs-mode", default="auto")
    try:
        args = peek.parse_known_args(argv[1:])[0]
    except argparse.ArgumentError:
        return
    if args.jobs <= 1:  # nothing to start, and gnc.jobs left unimported
        return
    from gnc.jobs import REPORT_PRELOAD, experiment_preload, prestart, uses_workers

    if uses_workers(args.jobs, args.jobs_mode, report=not args.no_report):
        prestart(REPORT_PRELOAD if argv[0] == "report"
                 else experiment_preload(report=not args.no_report))


def _done_with_sigint() -> None:
    """The command has finished and written everything: a Ctrl-C in the seconds of the
    interpreter's teardown (torch's finalizers) would end a successful command with a
    traceback or a death by SIGINT; from here on it is ignored, and the exit status is 0."""
    with contextlib.suppress(ValueError):  # not the main thread: nothing to do
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _resume_hint(args: argparse.Namespace | None) -> str:
    """How an interrupted ``gnc train`` or ``gnc experiment`` goes on (else nothing)."""
    func = getattr(args, "func", None)
    if func is _cmd_train:
        return (f" (gnc train --out {shlex.quote(str(args.out))} --resume continues from its "
                "last checkpoint)")
    if func is _cmd_experiment:
        return " (the same command again resumes the unfinished runs)"
    return ""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``gnc``: errors are one line on stderr and a non-zero exit; Ctrl-C
    anywhere, the parse and its lazy imports (torch) included, is "gnc: interrupted", 130."""
    args = None
    try:
        with _start_up():  # Ctrl-C while importing: exit at once (an import torn by
            _prestart_workers(sys.argv[1:] if argv is None else list(argv))
            args = build_parser().parse_args(argv)  # KeyboardInterrupt may become an
            args.argv = None if argv is None else [str(a) for a in argv]  # its command
            for module in _command_modules(args):  # ImportError)
                importlib.import_module(module)
        args.func(args)
        if argv is None:  # the program itself, not a caller's main([...])
            _done_with_sigint()
    except KeyboardInterrupt:
        print("gnc: interrupted" + _resume_hint(args), file=sys.stderr)
        _stop_fork_server()
        sys.exit(130)
    except Exception as err:
        if not _is_user_error(err):
            raise  # a bug: its traceback
        print(_one_line(err), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
