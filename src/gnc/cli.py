"""The ``gnc`` command line (DESIGN §3). Errors are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn


class CLIError(Exception):
    """An error reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line too (then see ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Errors of the library (and of torch) that ``main`` reports as one line: bad settings or
# inputs (ValueError), missing or unwritable files (OSError, e.g. DatasetNotFoundError),
# diverged training (FloatingPointError), device failures (RuntimeError, e.g. CUDA OOM).
USER_ERRORS = (CLIError, ValueError, OSError, FloatingPointError, RuntimeError)

DEFAULT_BATCH_SIZE = 100  # `gnc train` on a dataset other than ufm without preset or flag


# (flag, TrainConfig field, type, help): explicit flags override the preset.
TRAIN_FLAGS = [
    ("--dataset", "dataset", str, "dataset name, npz:PATH or imagefolder:PATH"),
    ("--model", "model", str, "backbone (ufm, mlp, cnn1d, resnet18/34/50, vgg11/13/16_bn)"),
    ("--method", "method", str, "standard | fixed | implicit | implicit-nograd | "
                                "standard-unnormalized"),
    ("--epochs", "epochs", int, "epochs (UFM: full-batch iterations)"),
    ("--batch-size", "batch_size", int, "global batch size (0 = full batch; default: the "
                                        "preset's, else 100; full batch for ufm)"),
    ("--optimizer", "optimizer", str, "sgd | adam | adamw | agd"),
    ("--lr", "lr", float, "learning rate"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--weight-decay", "weight_decay", float, "weight decay"),
    ("--schedule", "schedule", str, "none | step | multistep | cosine (per epoch)"),
    ("--tau", "tau", float, "feature-sphere radius (temperature)"),
    ("--feature-dim", "feature_dim", int, "feature dimension d (adds a projection)"),
    ("--width", "width", int, "backbone base width"),
    ("--delta", "delta", float, "proximal weight of the nearest-ETF problem"),
    ("--solver", "solver", str, "exact | riemannian (the paper's)"),
    ("--backward", "backward", str, "closed_form | ddn (the paper's) | none"),
    ("--eval-every", "eval_every", int, "evaluate the NC metrics every N epochs"),
    ("--checkpoint-every", "checkpoint_every", int, "keep a checkpoint every N epochs"),
    ("--seed", "seed", int, "seed of everything"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--amp", "amp", str, "none | bf16 | fp16 (backbone autocast)"),
    ("--data-dir", "data_dir", str, "where datasets are read from"),
    ("--num-workers", "num_workers", int, "data-loader workers"),
    ("--data-on-device", "data_on_device", str, "auto | on | off: image pixels kept on the "
     "device, augmented there (auto: on a GPU that holds them)"),
    ("--eval-stats", "eval_stats", str, "precise (default: BN statistics and mu_G recomputed "
     "over the training split before each evaluation) | running (the paper's protocol)"),
    ("--solve-device", "solve_device", str, "auto | same | cpu: where the implicit head's "
     "exact solve runs"),
]
DATASET_FLAGS = [
    ("--num-classes", "num_classes", int, "ufm: number of classes K"),
    ("--per-class", "per_class", int, "ufm: samples per class"),
    ("--subset", "subset", int, "keep this many training samples per class"),
]


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for flag, dest, typ, text in TRAIN_FLAGS + DATASET_FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=text)
    p.add_argument("--download", action="store_true", default=None,
                   help="allow torchvision to download a missing dataset")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="write TensorBoard events to OUT/tb")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the backbone (the head stays eager)")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory layout for image backbones (GPU)")


def train_config_from_args(args: argparse.Namespace):
    """The preset's config (or the defaults), overridden by every flag given."""
    from gnc.experiments import get_preset
    from gnc.training import TrainConfig

    base = get_preset(args.preset).config if args.preset else {}
    cfg = dict(base)
    cfg["dataset_options"] = dict(base.get("dataset_options", {}))
    for _, dest, _, _ in TRAIN_FLAGS:
        if getattr(args, dest) is not None:
            cfg[dest] = getattr(args, dest)
    if args.dataset is not None and args.dataset != base.get("dataset"):
        cfg["dataset_options"] = {}  # the preset's options belong to its own dataset
    for _, dest, _, _ in DATASET_FLAGS:
        if getattr(args, dest) is not None:
            cfg["dataset_options"][dest] = getattr(args, dest)
    for dest in ("download", "tensorboard", "progress", "compile", "channels_last"):
        if getattr(args, dest) is not None:
            cfg[dest] = getattr(args, dest)
    if "batch_size" not in cfg and cfg.get("dataset", "ufm") != "ufm":
        cfg["batch_size"] = DEFAULT_BATCH_SIZE  # the full batch suits UFM, not real data
    return TrainConfig.from_dict(cfg)


def _cmd_train(args: argparse.Namespace) -> None:
    from gnc.training import train

    cfg = train_config_from_args(args)
    row = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    keys = ("epoch", "train_loss", "top1", "nc1", "nc3", "avg_cos_margin", "test_top1")
    print(json.dumps({k: row[k] for k in keys if k in row}))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from gnc.training import evaluate_run

    metrics = evaluate_run(args.run_dir, split=args.split, device=args.device)
    metrics.pop("cos_margins")
    print(json.dumps(metrics, indent=1))


def _cmd_presets(args: argparse.Namespace) -> None:
    from gnc.experiments import PRESETS

    width = max(len(n) for n in PRESETS)
    for name, preset in PRESETS.items():
        print(f"{name.ljust(width)}  {preset.summary}")


def _cmd_experiment(args: argparse.Namespace) -> None:
    from gnc.experiments import run_experiment

    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.device is not None:
        overrides["device"] = args.device
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.eval_every is not None:
        overrides["eval_every"] = args.eval_every
    overrides["progress"] = not args.no_progress
    methods = args.methods.split(",") if args.methods else None
    command = "gnc " + " ".join(sys.argv[1:]) if argv_is_cli() else None
    run_experiment(args.preset, args.out, seeds=args.seeds, methods=methods,
                   overrides=overrides, command=command, report=not args.no_report)
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
        table_epochs = (a, b)
    path = make_report(
        args.exp_dir, title=f"{preset.name}: {preset.summary}" if preset else None,
        table_epochs=table_epochs,
        notes=f"Preset notes: {preset.notes}" if preset else None,
        command=args.command, machine=args.machine, out_dir=args.out,
        preset_config=resolved_config(preset) if preset else None,
    )
    print(f"report: {path}")


def _one_line(err: BaseException) -> str:
    """``gnc: error: <message>``: the first line of the message (the type if it is empty)."""
    text = str(err).strip() or type(err).__name__
    return f"gnc: error: {text.splitlines()[0]}"


def _check_device(name: str) -> None:
    """One line for a device torch does not know, or CUDA asked for where there is none."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"Expected --device to be cpu, cuda or cuda:N, but got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} was asked for, but no CUDA device is available")


def argv_is_cli() -> bool:
    return bool(sys.argv) and Path(sys.argv[0]).name in ("gnc", "__main__.py")


def _overrides(items: Sequence[str]) -> dict:
    """``["width=16", "solve_device=cpu"]`` → ``{"width": 16, "solve_device": "cpu"}``."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CLIError(f"bad --set {item!r}: expected KEY=VALUE (a TrainConfig field)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_bench(args: argparse.Namespace) -> None:
    from gnc import bench

    _check_device(args.device)
    if args.repeats < 1:
        raise CLIError(f"Expected --repeats >= 1, but got {args.repeats}")
    records = []
    if args.sizes != "none":
        kw = {"sizes": bench.parse_sizes(args.sizes)} if args.sizes else {}
        records += bench.bench_layer(device=args.device, repeats=args.repeats, **kw)
    if args.steps != "none":
        cases = bench.step_cases_by_name(args.steps, args.device) if args.steps else None
        records += bench.bench_steps(cases, device=args.device, repeats=min(args.repeats, 3))
    epoch = args.epoch or ("cifar10-resnet18" if args.device.startswith("cuda") else "none")
    if epoch != "none":
        methods = args.methods.split(",") if args.methods else bench.STEP_METHODS
        records += bench.bench_epochs(epoch, device=args.device, methods=methods,
                                      data_dir=args.data_dir, **_overrides(args.set or []))
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=1))
        return
    print(bench.format_table(records))
    for line in bench.speedups(records) + bench.step_overheads(records):
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gnc", description="Guided neural collapse: nearest-simplex-ETF classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("presets", help="list the experiment presets")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("train", help="train one run (method x seed) into a run directory")
    p.add_argument("--preset", help="start from this preset (gnc presets lists them)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (default: refuse)")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="NC metrics of a run's last checkpoint")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--split", default="train", help="train | test")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("experiment", help="every method x seed of a preset, then the report")
    p.add_argument("preset", help="preset name (gnc presets lists them)")
    p.add_argument("--seeds", type=int, help="number of seeds (default: the preset's)")
    p.add_argument("--methods", help="comma-separated methods (default: the preset's; "
                   "ablations: implicit-nograd, standard-unnormalized)")
    p.add_argument("--out", required=True, help="experiment directory")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--eval-every", type=int, help="override the preset's evaluation interval")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--data-dir", help="where datasets are read from")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="train only; `gnc report` later")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("report", help="figures and report.md from an experiment directory")
    p.add_argument("exp_dir", help="experiment directory (gnc experiment --out)")
    p.add_argument("--preset", help="preset the runs came from (title, table epochs)")
    p.add_argument("--out", help="write report.md and figures here (default: EXP_DIR)")
    p.add_argument("--command", help="the command that produced the runs (shown on top)")
    p.add_argument("--machine", help="where the runs ran (default: this machine)")
    p.add_argument("--table-epochs", help="the two epochs of the top-1 table, A,B "
                   "(default: the preset's)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", help="timings and memory: the nearest-ETF layer, training steps")
    p.add_argument("--sizes", help="layer sizes DxK, comma-separated (default 512x10,512x50,"
                   "512x100,2048x1000; 'none' skips the layer)")
    p.add_argument("--steps", help="training-step cases (default ufm100,ufm1000,resnet18,"
                   "resnet50-k1000; 'none' skips them)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    p.add_argument("--epoch", help="time whole training epochs of this preset per method "
                   "(default cifar10-resnet18 on CUDA, 'none' on CPU)")
    p.add_argument("--methods", help="methods of the epoch case (default standard,fixed,"
                   "implicit)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a training setting of the epoch case (repeatable), e.g. "
                   "--set solve_device=cpu --set dataset_options='{\"subset\": 50}'")
    p.add_argument("--data-dir", default="data", help="where the epoch case reads its data "
                   "(random images of the same shape when absent)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``gnc``: errors are one line on stderr and a non-zero exit."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(_one_line(err), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gnc: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
