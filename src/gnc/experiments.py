"""Experiment presets (a registry of named configurations) and the multi-seed runner.

Every preset holds one set of hyperparameters shared by all methods (fairness: a preset's
learning rate is chosen for the ``standard`` method, never for ``implicit``). Values the
paper states are marked "paper"; the rest are our choices and say so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gnc.checkpoints import RESUMABLE_KEYS, has_checkpoint
from gnc.config import (
    RUNTIME_KEYS,
    TrainConfig,
    config_differences,
    describe_config,
    uses_implicit_head,
)
from gnc.heads import PAPER_METHODS, normalizes_features
from gnc.jobs import (
    JOBS_MODES,
    PLAIN_ERRORS,
    Outcome,
    experiment_preload,
    first_line,
    in_worker,
    prestart,
    report_progress,
    run_many,
    threads_per_job,
    uses_workers,
)
from gnc.optim import check_resume_length
from gnc.rundir import is_done, mark_done, read_config, stopped_after
from gnc.runtime import summary_writer_class
from gnc.training import Trainer, drain

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

METHODS = PAPER_METHODS  # a preset's default methods
MAX_SEEDS = 1000  # an experiment's seeds are 1..N, each a run directory


@dataclass(frozen=True)
class Preset:
    """A named experiment: the shared training config, seeds and what the report shows."""

    name: str
    summary: str  # one line for `gnc presets`
    config: dict  # TrainConfig fields
    seeds: int = 5
    methods: tuple[str, ...] = METHODS
    # epochs of the top-1 table (paper's Table 1 form); None: the report's default
    table_epochs: tuple[int, int] | None = (1, 10)
    gpu: bool = False  # sized for a GPU: run_experiment warns when it trains on the CPU
    notes: str = ""  # where the values come from (paper / our choice, and how lr was picked)

    def train_config(self, **overrides) -> TrainConfig:
        return TrainConfig.from_dict({**self.config, **overrides})


def _ufm(K: int, d: int, batch_size: int = 0) -> dict:
    return {
        "dataset": "ufm", "dataset_options": {"num_classes": K, "per_class": 100},
        "model": "ufm", "feature_dim": d, "batch_size": batch_size, "epochs": 2000,
        "optimizer": "sgd", "lr": 1.0, "momentum": 0.9, "weight_decay": 0.0, "tau": 5.0,
        "eval_every": 20, "eval_test": False,
    }


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


_UFM_NOTES = ("K, N = 100 per class, d and the 2000 full-batch iterations: paper. SGD with "
              "momentum 0.9, no weight decay, tau and lr: our choice. Weight decay 0 because "
              "with normalised features it only shrinks the free features, which raises the "
              "effective step size until training goes unstable (with 5e-4 every normalised "
              "method blew up near iteration 950). lr and tau were picked for `standard` from "
              "lr in {0.1, 1, 10} x tau in {1, 5} as the pair with the lowest final train "
              "loss of `standard` at seed 1, ties within 1% going to the smaller lr (ufm10, "
              "final loss: tau=5: 0.0545, 0.0343, 0.0342; tau=1: 1.42, 1.377, 1.377).")

for _K, _d, _batch in ((10, 512, 0), (100, 512, 0), (200, 512, 0), (1000, 1024, 10_000)):
    register(Preset(
        f"ufm{_K}",
        f"unconstrained features, K={_K}, N={100 * _K}, d={_d}, "
        + (f"batch {_batch}, 2000 epochs of {100 * _K // _batch} steps" if _batch
           else "full batch, 2000 iterations"),
        _ufm(_K, _d, _batch), table_epochs=(100, 500),
        notes=_UFM_NOTES + (" Batch 10,000 (10/class, ours, not the paper's full batch): the "
                            "full batch of 100,000 does not fit a step in memory on CPU; the "
                            "2000 epochs are then 10 steps each (20,000 iterations)."
                            if _batch else ""),
    ))

register(Preset(
    "mnist1d",
    "MNIST-1D (generated, 4000 train / 1000 test), 1-D CNN, 40 epochs, batch 100 (CPU, ~1 min)",
    {"dataset": "mnist1d", "dataset_options": {"num_samples": 5000}, "model": "cnn1d",
     "width": 64, "epochs": 40, "batch_size": 100, "optimizer": "sgd", "lr": 0.05,
     "momentum": 0.9, "weight_decay": 5e-4, "tau": 5.0, "schedule": "cosine", "eval_every": 2},
    table_epochs=(4, 20),
    notes="Not in the paper's tables: every value is our choice; lr picked for `standard` "
          "from {0.01, 0.05, 0.2} by final train loss at seed 1 (0.085, 0.048, 0.049).",
))
register(Preset(
    "digits",
    "scikit-learn digits (8x8, K=10), MLP, 60 epochs, batch 100 (CPU, under a minute)",
    {"dataset": "digits", "model": "mlp", "width": 128, "feature_dim": 64, "epochs": 60,
     "batch_size": 100, "optimizer": "sgd", "lr": 0.2, "momentum": 0.9,
     "weight_decay": 5e-4, "tau": 5.0, "schedule": "cosine", "eval_every": 2},
    table_epochs=(6, 30),
    notes="Not in the paper: a laptop-sized real dataset. Every value is our choice; lr "
          "picked for `standard` from {0.01, 0.05, 0.2} by final train loss at seed 1 "
          "(0.083, 0.055, 0.046).",
))
register(Preset(
    "cifar10-small",
    "real CIFAR-10 JPEGs, 300 train images/class, ResNet-18 of width 16, 12 epochs (CPU, "
    "~3 min/run)",
    {"dataset": "cifar10", "dataset_options": {"subset": 300}, "model": "resnet18",
     "width": 16, "epochs": 12, "batch_size": 100, "optimizer": "sgd", "lr": 0.05,
     "momentum": 0.9, "weight_decay": 5e-4, "tau": 5.0, "schedule": "cosine", "eval_every": 2,
     "eval_batch_size": 500, "data_on_device": "on"},
    seeds=3, table_epochs=(2, 12),
    notes="A CPU-sized stand-in for the paper's CIFAR-10 runs: subset, width and epochs are "
          "our choice so a run takes minutes on 2 cores; the paper's own setting is "
          "`cifar10-resnet18`. Data: ../shared/data/cifar10-jpg.tar.gz unpacked into "
          "--data-dir. SGD momentum 0.9, weight decay 5e-4, cosine schedule: our choice.",
))

# The paper's real-data settings (for a GPU). Paper: 200 epochs, batch 256, feature
# normalisation with a temperature, 5 seeds, median and range. Optimiser values below are
# our choice where the paper does not state them (SGD momentum 0.9, lr 0.05, weight decay
# 5e-4, cosine schedule); AGD for cifar10-vgg13 (ours, as its note says: the release has no
# VGG script). Stratified batches hold batch // K samples of every class.
_PAPER = {"epochs": 200, "batch_size": 256, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
          "weight_decay": 5e-4, "tau": 5.0, "schedule": "cosine", "eval_every": 10,
          "eval_batch_size": 1000, "num_workers": 8, "amp": "bf16", "channels_last": True}
_PAPER_NOTES = ("Paper: dataset, backbone, 200 epochs, batch 256, 5 seeds, normalised "
                "features. Our choice: optimiser settings (lr chosen for `standard`), tau=5, "
                "evaluation every 10 epochs; for the CIFAR ResNets the CIFAR stem (3x3, no "
                "max-pool; the released resnet.py keeps the ImageNet stem: --no-small-input), "
                "STL-10 and ImageNet keep the ImageNet stem. Speed (ours; "
                "results unaffected beyond bf16 "
                "noise): the backbone in bf16 autocast and channels-last layout, images "
                "kept and augmented on the GPU (--data-on-device), cudnn.benchmark. Table "
                "epochs 50 and 200: the paper's Table 1.")
_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "imagenet": 1000}  # K of the paper data


def _batch_words(data: str, extra: dict) -> tuple[str, str]:
    """The summary's batch, and a note when stratified batches cannot hold the paper's 256."""
    batch, K = extra.get("batch_size", 256), _CLASSES[data]
    if extra.get("sampler", "stratified") != "stratified" or batch % K == 0:
        return f"batch {batch}", ""
    held = batch // K * K
    return (f"batch {held} ({batch // K} a class; paper {batch})",
            f" Stratified batches hold batch // K = {batch // K} samples of each of the {K} "
            f"classes: {held} a step, not the paper's {batch} (the released code's "
            "StratifiedKFold batches hold ~256 in the data's class proportions).")


for _name, _data, _model, _extra in (
    ("cifar10-resnet18", "cifar10", "resnet18", {}),
    ("cifar100-resnet18", "cifar100", "resnet18", {}),
    ("cifar100-resnet50", "cifar100", "resnet50", {}),
    ("stl10-resnet18", "stl10", "resnet18", {"batch_size": 250}),
    ("imagenet-resnet50", "imagenet", "resnet50", {"epochs": 90, "eval_every": 5,
                                                   "sampler": "shuffle"}),
    ("cifar10-vgg13", "cifar10", "vgg13_bn", {"optimizer": "agd", "lr": 1.0,
                                              "weight_decay": 0.0}),
):
    _batch_summary, _batch_note = _batch_words(_data, _extra)
    register(Preset(
        _name,
        f"paper setting: {_data}, {_model}, {_extra.get('epochs', 200)} epochs, "
        f"{_batch_summary}{', AGD' if _extra.get('optimizer') == 'agd' else ''} (GPU)",
        {"dataset": _data, "model": _model, **_PAPER, **_extra},
        table_epochs=(50, _extra.get("epochs", 200)), gpu=True,
        notes=_PAPER_NOTES + _batch_note + {
            "stl10-resnet18": " STL-10 batch 250: ours (divisible by K=10).",
            "imagenet-resnet50": " ImageNet differs from the above: 90 epochs, evaluation "
                                 "every 5 epochs, table epochs 50 and 90 (ours), and shuffled "
                                 "rather than class-stratified batches (K=1000 > batch 256); "
                                 "classes absent from a batch keep their running mean.",
            "cifar10-vgg13": " VGG-13: AGD with gain 1 (`lr`) and biases, no weight decay, the "
                             "cosine schedule: ours (the released code runs AGD only in its "
                             "MNIST scripts, with gain 10, no bias and no schedule; it has no "
                             "VGG script).",
        }.get(_name, ""),
    ))


# The released code's MNIST setting (scripts/mnist/resnet18/*.sh): ResNet-18 with the
# released resnet.py's ImageNet stem, AGD (gain 10, its only setting; no weight decay, no
# schedule), --no-bias, temperature 5, batch 256, 200 epochs, stratified batches, seeds 1..3,
# its MNIST transforms.
register(Preset(
    "mnist-resnet18-agd",
    "released-code setting: MNIST (3-channel 32 px, RandomRotation(25)), resnet18 (ImageNet "
    "stem), AGD gain 10, no bias, 200 epochs, batch 250 stratified (25 a class; released "
    "256) (GPU)",
    {"dataset": "mnist", "dataset_options": {"transforms": "released"}, "model": "resnet18",
     "small_input": False,
     "epochs": 200, "batch_size": 256, "sampler": "stratified", "optimizer": "agd",
     "lr": 10.0, "bias": False, "schedule": "none", "weight_decay": 0.0, "tau": 5.0,
     "eval_every": 5, "eval_batch_size": 1000, "num_workers": 8},
    seeds=3, table_epochs=(50, 200), gpu=True,
    notes="The paper's released scripts for MNIST/ResNet-18: the released resnet.py (the "
          "ImageNet stem, 7x7 stride 2 and max-pool, on 32 px), AGD with gain 10 (`lr` is "
          "AGD's gain), no bias (logits W h, non-affine BatchNorm), temperature 5, batch 256, "
          "200 epochs, constant step, seeds 1-3, evaluation every 5 epochs (its validate_NC "
          "interval), and its MNIST transforms (dataset option transforms=released). Ours: "
          "stratified batches of 25 per class (250) for all three methods — the released "
          "scripts stratify the implicit method only, with StratifiedKFold batches of ~256 "
          "in the data's class proportions, and shuffle the others; the released fixed head "
          "keeps a bias -W mean(h) under --no-bias; the rotation runs on the host (PIL path, "
          "8 workers). docs/design-notes.md lists every difference found.",
))

# Long-tailed CIFAR (the released code's IMBALANCECIFAR10/100, imb_factor 0.01): the paper
# settings above on a long-tailed training split, with shuffled batches.
_LT_NOTES = ("Long tail (released code's imb_factor): class c keeps "
             "floor(n_max * 0.01^(c/(K-1))) training samples (CIFAR-10: 5000 ... 50, "
             "12,406 in all; CIFAR-100: 500 ... 5, 10,847), a seeded choice; the test split "
             "stays balanced. Shuffled batches (the natural, long-tailed distribution), not "
             "stratified ones: the stratified sampler would cut every class to the tail's "
             "size each epoch. Classes absent from a batch keep their running mean. Other "
             "values as the balanced preset (ours, not tuned for the long tail). ")
for _name, _data in (("cifar10-lt-resnet18", "cifar10"), ("cifar100-lt-resnet18", "cifar100")):
    register(Preset(
        _name,
        f"long-tailed {_data} (R = 0.01), resnet18, 200 epochs, batch 256 shuffled (GPU)",
        {"dataset": _data, "model": "resnet18", **_PAPER, "imbalance": 0.01,
         "sampler": "shuffle"},
        table_epochs=(50, 200), gpu=True, notes=_LT_NOTES + _PAPER_NOTES,
    ))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
    return PRESETS[name]



def run_dir(out: str | Path, method: str, seed: int) -> Path:
    """Where ``gnc experiment`` puts one run: ``OUT/<method>/seed<k>/``."""
    return Path(out) / method / f"seed{seed}"


def resolved_config(preset: Preset, **overrides) -> dict:
    """The preset's full config (every :class:`TrainConfig` field) with ``overrides``, as
    ``config.json`` stores it."""
    return preset.train_config(**overrides).to_dict()


def _config_mismatch(path: Path, cfg: TrainConfig, ignore: frozenset | set) -> str | None:
    """How the run at ``path`` (its ``config.json``) differs from ``cfg``; None if it does not."""
    try:
        saved = read_config(path, "reuse")
        changed = config_differences(saved, cfg, ignore=ignore)
    except FileNotFoundError:
        return "it has no config.json"
    except ValueError as err:
        return f"its config.json cannot be used ({str(err).split(': ', 1)[-1]})"
    return f"it was made with {', '.join(changed)}" if changed else None


def _check_existing_run(path: Path, cfg: TrainConfig) -> None:
    """Refuse a finished (or interrupted) run made with settings other than ``cfg``.

    A finished run (``DONE``) is reused only if every setting that changes its result is the
    same (:data:`gnc.config.RUNTIME_KEYS` may differ, and ``save_classifier`` when it is now
    off: the run's classifier files are extra; now on, they would be missing); an interrupted
    one (checkpoint, no ``DONE``) resumes, which may also change what resuming allows
    (``epochs``, ...).
    """
    if is_done(path) and stopped_after(path) is None:
        extra = set() if cfg.save_classifier else {"save_classifier"}
        why = _config_mismatch(path, cfg, RUNTIME_KEYS | extra)
        state = "finished"
    elif has_checkpoint(path):
        why = _config_mismatch(path, cfg, RESUMABLE_KEYS)
        state = "interrupted"
        started = read_config(path, "reuse").get("epochs") if why is None else None
        if isinstance(started, int) and started != cfg.epochs:
            check_resume_length(path, cfg, started)  # before any run of the experiment starts
    else:
        return
    if why is not None:
        raise ValueError(
            f"the {state} run {path} does not match this experiment: {why}; "
            "use another --out, or delete that run to redo it"
        )


def custom_preset(config: dict | None = None, *, name: str = "custom") -> Preset:
    """A preset for your own settings (``gnc experiment`` without a preset name).

    ``config`` holds :class:`TrainConfig` fields (the rest take their defaults); the
    summary (the report's title) is :func:`describe_config` of it, and the top-1 table uses
    the report's default epochs.
    """
    config = {k: v for k, v in (config or {}).items() if k not in ("method", "seed")}
    TrainConfig.from_dict(config)  # unknown keys fail here, before any training
    return Preset(name, describe_config(config), config, table_epochs=None,
                  notes="Settings given on the command line (no preset); the config of "
                        "every run is in its config.json.")


def run_experiment(
    preset: Preset | str | None,
    out: str | Path,
    *,
    seeds: int | None = None,
    methods: Sequence[str] | None = None,
    overrides: dict | None = None,
    report: bool = True,
    command: str | None = None,
    trust_checkpoint: bool = False,
    jobs: int = 1,
    jobs_mode: str = "auto",
) -> list[Path]:
    """Train every method × seed of ``preset`` into ``out`` and write the report.

    ``preset`` is a :class:`Preset`, a registered name, or None for your own settings: then
    ``overrides`` are the whole config (on top of the :class:`TrainConfig` defaults), e.g.
    ``run_experiment(None, "runs/mine", overrides={"dataset": "npz:data/x.npz", "model":
    "mlp", "batch_size": 100})``, and the report's title describes them. With a preset,
    ``overrides`` replace its values and the report's title names them. Every run's
    ``config.json`` records the settings it was made with.

    A run with a ``DONE`` file is skipped; one with a checkpoint but no ``DONE`` (an
    interrupted experiment) resumes from it; the rest start afresh. Seeds are 1..N.
    Everything is checked before any training: the configs, and that every existing run of
    this command's methods × seeds was made with the same settings (its ``config.json``; see
    :data:`RUNTIME_KEYS` for those that may differ). Other runs already in ``out`` (another
    method or seed) are left as they are and enter the report, whose setup section lists the
    settings in which its runs differ (and warns when they are different tasks).
    Returns the run directories. ``trust_checkpoint``: an interrupted run's checkpoint of an
    older gnc may be unpickled in full (see :func:`gnc.checkpoints.load_checkpoint`).

    ``jobs`` > 1: that many runs in flight at once, each in its own worker process with
    ``max(1, cores // jobs)`` torch threads (:mod:`gnc.jobs`; ``jobs_mode``: ``auto |
    processes | mps``, how they share a GPU). Each run's results are those of the same run
    trained alone with that thread count: on the CPU its ``metrics.jsonl`` is bitwise equal
    (but for the time and memory fields) to the sequential run's after
    ``torch.set_num_threads(max(1, cores // jobs))`` (the thread count changes the order of
    float sums). ``jobs_mode="streams"``: no worker processes; this process advances the
    runs a step each in turn, each on a CUDA stream of its own (:mod:`gnc.interleave`; for
    captured steps, ``graph_step``), with this process's threads: on the CPU bitwise the
    sequential runs. ``jobs=1`` trains the runs one after the other in this process, with
    its thread count. A run that fails does not stop the others; after all have ended, the
    failed ones (no ``DONE``, no report) are listed in one ``ValueError``, and the same call
    again retries them.

    Raises:
        ValueError: unknown preset or method, ``seeds`` < 1, ``jobs`` < 1, an invalid config,
            an existing run made with other settings, or failed runs.
    """
    if command is None:  # a call from Python: the report names it
        command = _python_call(preset, out, seeds, methods, overrides, jobs)
    if preset is None:
        preset, overrides = custom_preset(overrides), None
    preset = get_preset(preset) if isinstance(preset, str) else preset
    methods = tuple(dict.fromkeys(methods or preset.methods))  # a method named twice: once
    for m in methods:
        normalizes_features(m)  # raises on an unknown method before any training
    if seeds is not None and not 1 <= seeds <= MAX_SEEDS:
        raise ValueError(f"Expected `seeds` in [1, {MAX_SEEDS}], but got {seeds}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Expected `jobs` >= 1, but got {jobs}")
    if jobs_mode not in JOBS_MODES:
        raise ValueError(f"Expected `jobs_mode` in {', '.join(JOBS_MODES)}, but got "
                         f"{jobs_mode!r}")
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--jobs starts processes of its own: not under torchrun")
    n_seeds = seeds or preset.seeds
    plan = []
    for method in methods:
        for seed in range(1, n_seeds + 1):
            settings = {**(overrides or {}), "method": method, "seed": seed}
            if not uses_implicit_head(method):  # the other heads have no step to capture
                settings["graph_head"] = False
            cfg = preset.train_config(**settings)
            cfg.validate()
            path = run_dir(out, method, seed)
            _check_existing_run(path, cfg)
            plan.append((path, cfg))
    if any(cfg.tensorboard for _, cfg in plan):
        summary_writer_class()  # one error before any run, not one a run
    if preset.gpu and plan and _on_cpu(plan[0][1].device):
        logger.warning("%s is sized for a GPU: on the CPU each run takes hours to days "
                       "(`gnc presets` marks the CPU-sized presets)", preset.name)
    if jobs > 1:  # the workers' fork server, unless the CLI started it (the report's too)
        if uses_workers(jobs, jobs_mode, report):
            prestart(experiment_preload(report))
        _run_in_parallel(plan, Path(out), jobs=jobs, jobs_mode=jobs_mode,
                         trust_checkpoint=trust_checkpoint)
    else:
        _run_one_by_one(plan, Path(out), trust_checkpoint)
    if report:
        from gnc.report import make_report

        make_report(out, title=f"{preset.name}: {preset.summary}",
                    table_epochs=preset.table_epochs, command=command,
                    notes=f"Preset notes: {preset.notes}",
                    preset_config=resolved_config(preset), jobs=jobs)
    return [path for path, _ in plan]


def _python_call(preset: str | Preset | None, out: str | Path, seeds: int | None,
                 methods: Sequence[str] | None, overrides: dict | None, jobs: int) -> str:
    """``run_experiment(...)`` as called (the command of a report made from Python)."""
    name = preset.name if isinstance(preset, Preset) else preset
    args = [repr(name), repr(str(out))] + [
        f"{k}={v!r}" for k, v in (("seeds", seeds), ("methods", methods and list(methods)),
                                  ("overrides", overrides), ("jobs", jobs if jobs != 1 else None))
        if v]
    return f"run_experiment({', '.join(args)})  # Python: gnc.experiments.run_experiment"


def _on_cpu(device: str) -> bool:
    """Whether a run given ``--device device`` trains on the CPU (``auto``: without CUDA)."""
    import torch

    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def _train_run(path: Path, cfg: TrainConfig, trust_checkpoint: bool) -> None:
    """Train one run of an experiment (:func:`_run_steps` to its end); in a worker of
    :func:`gnc.jobs.run_many`, its epochs feed the parent's bar."""
    drain(_run_steps(path, cfg, trust_checkpoint,
                     progress=report_progress if in_worker() else None))


def _run_steps(path: Path, cfg: TrainConfig, trust_checkpoint: bool,
               shared: bool = False, *, stream: torch.cuda.Stream | None = None,
               progress: Callable[[int], None] | None = None) -> Generator[None, None, None]:
    """Train one run of an experiment (resumed when it has a checkpoint) and mark it DONE,
    pausing after every step (:meth:`gnc.training.Trainer.fit_steps`; with ``shared``, a
    task of :func:`gnc.interleave.run_interleaved`, which gives ``stream``: the process's
    memory is not the run's alone, no ``peak_mem_mb``). ``progress(n)``: ``n`` more epochs
    done (instead of the run's own step bar)."""
    resume = has_checkpoint(path)
    # a run killed before its first checkpoint has nothing to resume: start it afresh
    trainer = Trainer(cfg, path, resume=resume, overwrite=not resume,
                      trust_checkpoint=trust_checkpoint, stream=stream,
                      peak_memory=not shared)
    try:
        yield from trainer.fit_steps(None if progress is None else _epoch_feed(cfg, progress))
    finally:  # closed before its first step, fit_steps has nothing to release
        trainer.release_lock()
    if cfg.last_epoch == cfg.epochs:
        mark_done(path)
    else:  # reported at the epochs it reached; a later --until-epoch (or none) continues it
        mark_done(path, f"stopped after epoch {cfg.until_epoch}")


def _done(path: Path, cfg: TrainConfig) -> bool:
    """Whether the run at ``path`` has gone as far as ``cfg`` asks: finished, or stopped by
    ``until_epoch`` at or after ``cfg.until_epoch``."""
    if not is_done(path):
        return False
    stopped = stopped_after(path)
    return stopped is None or (cfg.until_epoch is not None and stopped >= cfg.until_epoch)


def _epoch_feed(cfg: TrainConfig, progress: Callable[[int], None]) -> type:
    """A progress-bar factory for :meth:`gnc.training.Trainer.fit` that reports each finished
    epoch to ``progress`` (the one bar of all the runs: :func:`gnc.jobs.report_progress` in a
    worker); ``disable`` is set, so the loop computes no bar text (a host sync per step)."""

    class EpochFeed:
        disable = True

        def __init__(self, total: int, initial: int, **_) -> None:
            self.steps = max(1, total // max(cfg.epochs, 1))  # per epoch
            self.done = initial
            progress(initial // self.steps)  # a resumed run's trained epochs

        def update(self, n: int = 1) -> None:
            before, self.done = self.done // self.steps, self.done + n
            progress(self.done // self.steps - before)

        def set_postfix(self, **_) -> None:
            pass

        def close(self) -> None:
            pass

    return EpochFeed


def _relative_cost(method: str) -> float:
    """A run's time relative to the standard head's, for the order of the ``--jobs`` queue:
    the implicit head's step is the slowest (its polar factor and backward)."""
    return 2.0 if uses_implicit_head(method) else 1.0


def _one_device(runs: list[tuple[Path, TrainConfig]]) -> torch.device:
    """The device of every run (``--jobs-mode streams`` runs them in one process on one)."""
    from gnc.runtime import resolve_device

    devices = {resolve_device(cfg.device) for _, cfg in runs}
    if len(devices) != 1:
        raise ValueError("--jobs-mode streams runs every run on one device, not on "
                         + ", ".join(sorted(map(str, devices))))
    return devices.pop()


def _run_in_parallel(plan: list[tuple[Path, TrainConfig]], out: Path, *, jobs: int,
                     jobs_mode: str, trust_checkpoint: bool) -> None:
    """Train the unfinished runs of ``plan``, ``jobs`` at a time (:func:`run_experiment`);
    raise the failed ones after all have ended."""
    import torch

    # seed-major (every method's seed 1, then seed 2, ...), the slowest method first within
    # a seed: the waves balance, and a stopped experiment lacks whole seeds, not a method
    methods = dict.fromkeys(cfg.method for _, cfg in plan)  # in the plan's order
    slow_first = {m: i for i, m in enumerate(sorted(methods, key=lambda m: -_relative_cost(m)))}
    todo = sorted(((path, cfg) for path, cfg in plan if not _done(path, cfg)),
                  key=lambda item: (item[1].seed, slow_first[item[1].method]))
    for path, cfg in plan:
        if _done(path, cfg):
            logger.info("%s: finished, skipped", path)
    if not todo:  # a rerun after the end (killed in its report, say): the report alone
        return
    names = [_run_name(path, out) for path, _ in todo]
    show = any(cfg.progress for _, cfg in plan)
    cuda = any(cfg.device.startswith("cuda") or (cfg.device == "auto" and
                                                 torch.cuda.is_available())
               for _, cfg in todo)
    progress = {"progress_total": sum(cfg.last_epoch for _, cfg in plan) if show else 0,
                "progress_initial": sum(cfg.last_epoch for path, cfg in plan
                                        if _done(path, cfg)),
                "desc": f"{len(plan)} runs, {jobs} at a time"}
    quiet = [(path, dataclasses.replace(cfg, progress=False)) for path, cfg in todo]
    if jobs_mode == "streams":
        from gnc.interleave import run_interleaved

        device = _one_device(todo)
        if any(cfg.graph_head for _, cfg in todo):  # make_graphed_callables: torch's stream
            raise ValueError("--graph-head captures every run's head on one stream (one "
                             "cuBLAS workspace for graphs replayed at once): not with "
                             "--jobs-mode streams; --graph-step captures each run on its own")
        logger.info("%d runs, %d at a time in this process, a step of each in turn%s",
                    len(todo), jobs, " on CUDA streams" if device.type == "cuda" else "")
        if device.type == "cuda" and not all(cfg.graph_step for _, cfg in todo):
            logger.warning("--jobs-mode streams without --graph-step: one host thread "
                           "launches every kernel of every run (expect no gain)")
        outcomes = run_interleaved(
            [(name, _run_steps, (path, cfg, trust_checkpoint, True))
             for name, (path, cfg) in zip(names, quiet, strict=True)],
            jobs=jobs, device=device, **progress)
    else:
        if jobs_mode == "mps" and not cuda:  # MPS shares a GPU: nothing to start for CPU runs
            logger.info("--jobs-mode mps: the runs use no GPU; plain processes")
            jobs_mode = "processes"
        logger.info("%d runs, %d at a time, %d threads each", len(todo), jobs,
                    threads_per_job(jobs))
        outcomes = run_many([(name, _train_run, (path, cfg, trust_checkpoint))
                             for name, (path, cfg) in zip(names, quiet, strict=True)],
                            jobs=jobs, mode=jobs_mode, cuda=cuda, **progress)
    _raise_failed([o for o in outcomes if not o.ok], len(todo))


def _run_name(path: Path, out: Path) -> str:
    """A run's name in logs and errors: ``method/seedk`` under the experiment ``out``."""
    return path.relative_to(out).as_posix() if path.is_relative_to(out) else str(path)


def _run_one_by_one(plan: list[tuple[Path, TrainConfig]], out: Path,
                    trust_checkpoint: bool) -> None:
    """Train the unfinished runs of ``plan`` one after the other in this process
    (:func:`run_experiment` with ``jobs=1``); a failed run does not stop the others (as in
    :func:`_run_in_parallel`): they are raised after the last."""
    failed, todo = [], 0
    for path, cfg in plan:
        if _done(path, cfg):
            logger.info("%s: finished, skipped", path)
            continue
        todo += 1
        try:
            _train_run(path, cfg, trust_checkpoint)
        except Exception as err:  # noqa: BLE001 -- its outcome, as a worker's
            name = _run_name(path, out)
            failed.append(Outcome(name, error=first_line(err)))
            logger.error("%s failed: %s", name, failed[-1].error,
                         exc_info=not isinstance(err, PLAIN_ERRORS))  # a bug: its traceback
    _raise_failed(failed, todo)


def _raise_failed(failed: list[Outcome], total: int) -> None:
    """One ``ValueError`` listing the ``failed`` of ``total`` runs, if any (first line: how
    many and which; then one line each, its error's first line)."""
    if not failed:
        return
    others = "" if len(failed) == total else "; the others finished"
    errors = {o.error for o in failed}  # first lines
    why = (f"all with {errors.pop()}" if len(errors) == 1 and len(failed) > 1
           else "each one's error is above") + others
    raise ValueError(
        f"{len(failed)} of {total} runs failed: {', '.join(o.name for o in failed)} "
        f"({why}); the same command again retries them\n"
        + "\n".join(f"  {o.name}: {o.error}" for o in failed))
