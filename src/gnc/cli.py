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
    ("--model", "model", str, "backbone (ufm, mlp, cnn1d, resnet18/34/50/101/152, "
     "resnext50_32x4d, resnext101_32x8d, wide_resnet50_2/101_2, vgg11/13/16_bn)"),
    ("--method", "method", str, "standard | fixed | implicit | implicit-nograd | "
                                "standard-unnormalized"),
    ("--epochs", "epochs", int, "epochs (UFM: full-batch iterations)"),
    ("--batch-size", "batch_size", int, "global batch size (0 = full batch; default: the "
                                        "preset's, else 100; full batch for ufm)"),
    ("--sampler", "sampler", str, "stratified (equal class shares per batch, epochs cut to "
     "the smallest class) | shuffle (the data's own distribution)"),
    ("--imbalance", "imbalance", float, "long tail R in (0, 1]: class c keeps "
     "floor(n_max*R^(c/(K-1))) training samples (1: as is)"),
    ("--label-noise", "label_noise", float, "p in [0, 1]: floor(p*N) training labels "
     "re-drawn uniformly over the K classes"),
    ("--optimizer", "optimizer", str, "sgd | adam | adamw | agd"),
    ("--lr", "lr", float, "learning rate (agd: its gain; onecycle: the maximum)"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--weight-decay", "weight_decay", float, "weight decay"),
    ("--schedule", "schedule", str, "none | step | multistep | cosine | onecycle"),
    ("--gamma", "gamma", float, "step/multistep: lr factor per decay (0.1)"),
    ("--step-every", "step_every", int, "step: decay every N epochs"),
    ("--loss", "loss", str, "ce | dr (dot regression)"),
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
    ("--polar-method", "polar_method", str, "auto | svd | gram | newton_schulz: the implicit "
     "head's polar factor (newton_schulz: matrix products only, no host sync on a GPU)"),
]
# `gnc experiment` takes every training flag but these (it runs every method x seed)
NOT_EXPERIMENT_FLAGS = ("method", "seed")
DATASET_FLAGS = [
    ("--num-classes", "num_classes", int, "ufm: number of classes K"),
    ("--per-class", "per_class", int, "ufm: samples per class"),
    ("--subset", "subset", int, "keep this many training samples per class"),
    ("--transforms", "transforms", str, "torchvision sets: default | released (the paper "
     "code's; MNIST-like: 3x32x32)"),
]


def _add_train_flags(p: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """The training flags (all defaulting to None = "not given"), but those whose
    TrainConfig field is in ``exclude``."""
    for flag, dest, typ, text in TRAIN_FLAGS + DATASET_FLAGS:
        if dest in exclude:
            p.set_defaults(**{dest: None})  # train_config_from_args reads every dest
            continue
        # short metavars keep each flag on one line of --help
        p.add_argument(flag, dest=dest, type=typ, default=None, help=text,
                       metavar={int: "N", float: "X"}.get(typ, "S"))
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
    p.add_argument("--graph-head", action="store_true", default=None,
                   help="replay the implicit head's training step from CUDA graphs (one "
                   "process on a GPU; needs --polar-method newton_schulz)")
    p.add_argument("--no-bias", dest="bias", action="store_false", default=None,
                   help="no classifier bias, non-affine BatchNorm")
    p.add_argument("--save-classifier", action="store_true", default=None,
                   help="write OUT/classifier/epoch_XXXX.pt (W, b, class means, U) at every "
                   "evaluation")


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
    for dest in ("download", "tensorboard", "progress", "compile", "channels_last",
                 "graph_head", "save_classifier", "bias"):
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
    from gnc.training import evaluate_checkpoints, evaluate_run

    if args.all and args.checkpoint is not None:
        raise CLIError("choose one of --checkpoint N (one epoch) and --all (every kept one)")
    if args.out is not None and not args.all:
        raise CLIError("--out is the metrics file of --all; without --all nothing is written")
    if args.all:
        rows = evaluate_checkpoints(args.run_dir, split=args.split, device=args.device,
                                    out=args.out, save_classifier=args.save_classifier)
        for row in rows:
            row.pop("cos_margins")
            print(json.dumps(row))
        return
    metrics = evaluate_run(args.run_dir, split=args.split, device=args.device,
                           checkpoint=args.checkpoint, save_classifier=args.save_classifier)
    metrics.pop("cos_margins")
    print(json.dumps(metrics, indent=1))


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
    import torch

    from gnc import bench

    _check_device(args.device)
    if args.repeats < 1:
        raise CLIError(f"Expected --repeats >= 1, but got {args.repeats}")
    epoch = args.epoch or ("cifar10-resnet18" if args.device.startswith("cuda") else "none")
    methods = args.methods.split(",") if args.methods else bench.STEP_METHODS
    if args.profile:
        if epoch == "none":
            raise CLIError("--profile profiles the epoch case: give --epoch PRESET")
        for method in methods:
            print(bench.profile_epoch(epoch, method, torch.device(args.device),
                                      data_dir=args.data_dir, **_overrides(args.set or [])))
        return
    records = []
    if args.sizes != "none":
        kw = {"sizes": bench.parse_sizes(args.sizes)} if args.sizes else {}
        if args.polar:
            kw["polar_methods"] = args.polar.split(",")
        records += bench.bench_layer(device=args.device, repeats=args.repeats, **kw)
    if args.steps != "none":
        cases = bench.step_cases_by_name(args.steps, args.device) if args.steps else None
        records += bench.bench_steps(cases, device=args.device, repeats=min(args.repeats, 3))
    if epoch != "none":
        records += bench.bench_epochs(epoch, device=args.device, methods=methods,
                                      data_dir=args.data_dir, **_overrides(args.set or []))
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=1))
        return
    print(bench.format_table(records))
    for line in bench.speedups(records) + bench.step_overheads(records):
        print(line)


def _cmd_measure(args: argparse.Namespace) -> None:
    from gnc.measure import expand_weights, measure_files, write_measure_dir

    if args.overwrite and not args.out:
        raise CLIError("--overwrite replaces the directory of --out; without --out nothing "
                       "is written")
    single = bool(args.out) and args.out.endswith(".json")
    if single and len(expand_weights(args.weights or [])) > 1:
        raise CLIError("several checkpoints make several rows: give --out a directory "
                       "(metrics.jsonl), not a .json file")
    rows = measure_files(
        args.model, args.weights, dataset=args.dataset, data_dir=args.data_dir,
        split=args.split, batch_size=args.batch_size, device=args.device,
        eval_stats=args.eval_stats, features=args.features, classifier=args.classifier,
        num_workers=args.num_workers)
    if single:  # one checkpoint: one JSON object
        (row, _), = rows
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
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
    for row, margins in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "cos_margins"}), flush=True)
        yield row, margins


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gnc", description="Guided neural collapse: nearest-simplex-ETF classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("presets", help="list the experiment presets")
    p.set_defaults(func=_cmd_presets)

    # a short usage line: the full list of the training flags follows under "options"
    p = sub.add_parser("train", help="train one run (method x seed) into a run directory",
                       usage="gnc train [--preset NAME] --out DIR [training flags]")
    p.add_argument("--preset", help="start from this preset (gnc presets lists them)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (default: refuse)")
    _add_train_flags(p)
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
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "experiment", help="every method x seed of a preset or of your settings, then the report",
        usage="gnc experiment [PRESET] --out DIR [--seeds N] [--methods M,...] [training flags]",
        description="Train every method x seed with one set of settings, then write the "
        "report: a preset's, with any training flag overriding it, or, without a preset, "
        "the flags alone (e.g. gnc experiment --dataset npz:x.npz --model mlp --out runs/x).")
    p.add_argument("preset", nargs="?", help="preset to start from (gnc presets lists them); "
                   "omit it to give every setting by flags")
    p.add_argument("--seeds", type=int, help="number of seeds 1..N (default: the preset's, "
                   "else 5)")
    p.add_argument("--methods", help="comma-separated methods (default: the preset's; "
                   "ablations: implicit-nograd, standard-unnormalized)")
    p.add_argument("--out", required=True, help="experiment directory")
    p.add_argument("--no-report", action="store_true", help="train only; `gnc report` later")
    _add_train_flags(p, exclude=NOT_EXPERIMENT_FLAGS)
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

    p = sub.add_parser(
        "measure", help="NC metrics of any model's penultimate layer (torchvision or a run)",
        usage="gnc measure --model torchvision:NAME|run:RUN_DIR [--weights PATH|GLOB ...] "
        "[--dataset NAME] [--split train|test] [--out FILE.json|DIR]",
        description="Neural-collapse metrics at the input of the model's last nn.Linear "
        "(forward hooks; gnc.measure). Several --weights (a glob) measure a whole run: one "
        "line per checkpoint in OUT/metrics.jsonl, which `gnc report` plots when OUT is "
        "EXP/<name>/seed<k>.")
    p.add_argument("--model", required=True, help="torchvision:NAME (random init, K from the "
                   "dataset) or run:RUN_DIR (a gnc run; its newest checkpoint without --weights)")
    p.add_argument("--weights", nargs="+", metavar="PATH", help="weights files or glob "
                   "patterns (a state dict, or a dict with 'model'/'state_dict'); read from "
                   "files only, never downloaded; the epoch is the file's 'epoch' entry, else "
                   "the last number in its name, else its index")
    p.add_argument("--dataset", help="dataset name, npz:PATH or imagefolder:PATH (default for "
                   "run:RUN_DIR: the run's own)")
    p.add_argument("--data-dir", default="data", help="where datasets are read from")
    p.add_argument("--split", default="train", help="train | test")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader workers")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--eval-stats", default="running", help="running (default: BatchNorm "
                   "statistics as stored) | precise (recomputed over the data first)")
    p.add_argument("--features", help="layer whose output are the features (default: the "
                   "classifier's input)")
    p.add_argument("--classifier", help="classifier layer (default: the last nn.Linear the "
                   "forward pass uses)")
    p.add_argument("--out", help="FILE.json (one checkpoint) or a directory: config.json, "
                   "metrics.jsonl, cos_margins.npy, DONE (default: JSON lines on stdout)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the measurement already in OUT (default: refuse)")
    p.set_defaults(func=_cmd_measure)

    p = sub.add_parser("bench", help="timings and memory: the nearest-ETF layer, training steps")
    p.add_argument("--sizes", help="layer sizes DxK, comma-separated (default 512x10,512x50,"
                   "512x100,2048x1000; 'none' skips the layer)")
    p.add_argument("--steps", help="training-step cases (default ufm100,ufm1000,resnet18,"
                   "resnet50-k1000; 'none' skips them)")
    p.add_argument("--polar", help="polar factors of the layer and head cases: auto (the "
                   "eigensolvers), newton_schulz (default both)")
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
    p.add_argument("--profile", action="store_true", help="instead of timing the epoch case, "
                   "profile one epoch per method: kernel launches and host waits per step, "
                   "time in the backbone and the head, the top operators")
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
