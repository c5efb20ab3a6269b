"""The training loop for the three methods: runs you can resume, under DDP too.

The loop alone: the config is :mod:`gnc.config`, what it builds :mod:`gnc.build`, the
device and the process group :mod:`gnc.runtime`, the files :mod:`gnc.rundir`, the checkpoint
and the resume :mod:`gnc.checkpoints`, the evaluation :mod:`gnc.evaluation`.

What a run directory holds is :mod:`gnc.rundir`'s docstring.

``resume=True`` continues from ``checkpoints/last.pt`` to the same result as an uninterrupted
run: the data order is a function of (seed, epoch) and the RNG states are checkpointed. An
unreadable ``last.pt`` falls back to the newest readable ``epoch_XXXX.pt``; a fresh run into a
directory that holds a run is refused unless ``overwrite=True`` (see :mod:`gnc.rundir`).

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in ``DistributedDataParallel``,
the stratified sampler splits every global batch over the ranks, class statistics and NC
metrics are all-reduced (so every rank solves the same nearest-ETF problem) and only rank 0
writes files.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Generator
from pathlib import Path

import torch

from gnc.build import (
    build_model,
    build_training_optimizer,
    build_training_scheduler,
    load_data,
    make_train_loaders,
)
from gnc.checkpoints import (
    has_checkpoint,
    resume_training,
    save_checkpoint,
    training_checkpoint,
)
from gnc.config import TrainConfig
from gnc.data import DatasetBundle, set_loader_epoch
from gnc.etf import NS_RESIDUAL_TOL
from gnc.evaluation import evaluate_splits, recompute_statistics, save_classifier
from gnc.graphs import GraphedHeadStep
from gnc.heads import ImplicitETFHead
from gnc.losses import classification_loss
from gnc.memory import PeakMemory
from gnc.optim import PER_STEP_SCHEDULES
from gnc.rundir import (
    RunLock,
    append_metrics,
    claim_run_dir,
    clear_done,
    prepare_run_dir,
    read_metrics,
    save_margins,
    write_config,
)
from gnc.runtime import (
    StepTimer,
    init_distributed,
    resolve_device,
    seed_everything,
    sum_over_ranks,
    summary_writer_class,
    wrap_distributed,
)
from gnc.step import GraphedStep, StaticStep, accumulate_step
from gnc.validation import NonFiniteError, all_finite_params, trusted_inputs

logger = logging.getLogger(__name__)

# The step loop reads the loss on the host only every this many steps (and at the epoch end).
NONFINITE_CHECK_EVERY = 25


# --------------------------------------------------------------------------- helpers


def _progress_bar(total: int, initial: int, disable: bool, desc: str):
    """A tqdm bar; without tqdm installed (a bare GPU machine), a silent stand-in."""
    try:
        from tqdm import tqdm
    except ImportError:
        from types import SimpleNamespace

        return SimpleNamespace(disable=True, update=lambda n=1: None, close=lambda: None,
                               set_postfix=lambda **kw: None)
    return tqdm(total=total, initial=initial, unit="step", disable=disable,
                dynamic_ncols=True, desc=desc)


# --------------------------------------------------------------------------- the loop


class Trainer:
    """One run: model, data, optimiser and the run directory. Use :func:`train`."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
                 overwrite: bool = False,
                 data: tuple[DatasetBundle, DatasetBundle] | None = None, *,
                 trust_checkpoint: bool = False,
                 stream: torch.cuda.Stream | None = None, peak_memory: bool = True) -> None:
        """``data``: the (training, un-augmented evaluation) bundles, when not loaded from
        ``cfg`` (benchmarks on synthetic data). ``trust_checkpoint``: a resume may unpickle a
        checkpoint of an older gnc in full (see :func:`gnc.checkpoints.load_checkpoint`).
        ``stream``: the CUDA stream the run's work is issued on (its caller makes it current
        around every call, :mod:`gnc.interleave`); the captured step is captured on it, so
        that graphs of runs on other streams share no cuBLAS workspace. ``peak_memory``
        False: the run shares its process with others (:mod:`gnc.interleave`), whose memory
        no measure can tell from its own: ``peak_mem_mb`` is written as null.

        Rank 0 holds :func:`gnc.rundir.run_lock` on ``out_dir`` from before the directory is
        prepared (or resumed) to the end of :meth:`fit` (:class:`gnc.rundir.RunLockedError`
        when another process holds it); an error here releases it."""
        self._lock = RunLock(out_dir)
        self.stream, self.peak_memory = stream, peak_memory
        try:
            self._setup(cfg, out_dir, resume, overwrite, data, trust_checkpoint)
        except BaseException:
            self._lock.release()
            raise

    def _setup(self, cfg: TrainConfig, out_dir: str | Path, resume: bool, overwrite: bool,
               data: tuple[DatasetBundle, DatasetBundle] | None,
               trust_checkpoint: bool) -> None:
        cfg.validate()
        writer_class = summary_writer_class() if cfg.tensorboard else None
        if resume and overwrite:
            raise ValueError("choose one of resume (continue the run) and overwrite (replace it)")
        self.cfg, self.out = cfg, Path(out_dir)
        self.trust_checkpoint = trust_checkpoint
        self.dist = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.dist)
        claim_run_dir(self.out, self._lock, resume=resume, overwrite=overwrite,
                      dist=self.dist, device=self.device)
        seed_everything(cfg.seed)
        if data is None:
            data = load_data(cfg), load_data(cfg, augment=False)
        self.bundle, self.eval_bundle = data
        self.K = self.bundle.num_classes
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
        self.model = build_model(cfg, self.bundle, self.device)
        if cfg.graph_head and isinstance(self.model.head, ImplicitETFHead):
            if self.device.type != "cuda" or self.dist.world_size > 1:
                raise ValueError("graph_head captures CUDA graphs: it needs one process on a "
                                 f"CUDA device, not {self.dist.world_size} on {self.device}")
            self.model.head_step = GraphedHeadStep(self.model.head)
        self.optimizer = build_training_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.ddp = wrap_distributed(self.model, self.dist, self.device)
        self.train_loader, self.eval_loaders = make_train_loaders(
            cfg, self.bundle, self.eval_bundle, self.device, self.dist, self.model)
        # one-cycle steps after every optimiser step, the others once per epoch
        self.step_schedule_per_step = cfg.schedule in PER_STEP_SCHEDULES
        self.scheduler = build_training_scheduler(cfg, self.optimizer, len(self.train_loader))
        self.epoch, self.step = 0, 0
        self._etf_prev: dict = {}  # nearest ETFs of W and H at the last evaluation (etf_distances)
        # the last trained epoch's statistics, and whether its evaluation is logged: a run
        # stopped before an evaluation that a resume's config asks for makes it up from these
        self._epoch_stats: dict = {}
        self._evaluated = True
        self._elapsed_before, self._t_start = 0.0, None  # elapsed_s: _elapsed
        self.memory = PeakMemory(self.device) if self.peak_memory else None  # fit() starts it
        self.writer = None
        if self.dist.is_main and (not resume or self.out.is_dir()):
            self._lock.acquire()  # makes the directory (a no-op when held since above)
        if resume:
            self._resume()
        elif self.dist.is_main:
            prepare_run_dir(self.out, overwrite=overwrite)
        if self.dist.is_main:
            write_config(self.out, cfg.to_dict())
            if writer_class is not None:  # a resume hides the events after its checkpoint,
                # as it drops their metrics.jsonl lines (a kill after the log, before the save)
                self.writer = writer_class(str(self.out / "tb"),
                                           purge_step=self.epoch + 1 if resume else None)

    def release_lock(self) -> None:
        """Give back the run directory's lock (:meth:`fit` does at its end): for a trainer
        that is used without :meth:`fit`."""
        self._lock.release()

    # ----------------------------------------------------------------- checkpointing
    def _parts(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "scaler": self.scaler}

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` (and ``epoch_XXXX.pt`` when due) atomically, on rank 0 only."""
        if not self.dist.is_main:
            return
        progress = {"epoch": self.epoch, "step": self.step, "etf_prev": self._etf_prev,
                    "epoch_stats": self._epoch_stats, "evaluated": self._evaluated,
                    "elapsed_s": self._elapsed()}
        save_checkpoint(self.out, training_checkpoint(self.cfg, self._parts(), progress),
                        keep=self._is_due(self.cfg.checkpoint_every))

    def _is_due(self, every: int) -> bool:
        return bool(every) and self.epoch % every == 0

    def _resume(self) -> None:
        """Continue from the newest usable checkpoint (:func:`gnc.checkpoints.resume_training`)."""
        progress = resume_training(self.out, self.cfg, self._parts(),
                                   trust_checkpoint=self.trust_checkpoint,
                                   is_main=self.dist.is_main)
        self.epoch, self.step = progress["epoch"], progress["step"]
        self._etf_prev = progress["etf_prev"]  # the last evaluation's ETFs ("moved" after it)
        self._epoch_stats, self._evaluated = progress["epoch_stats"], progress["evaluated"]
        self._elapsed_before = progress["elapsed_s"]

    # ----------------------------------------------------------------- one epoch
    def train_epoch(self, bar) -> dict:
        """One epoch (:meth:`epoch_steps` to its end); returns its statistics."""
        return drain(self.epoch_steps(bar))

    def epoch_steps(self, bar) -> Generator[None, None, dict]:
        """One epoch, pausing (``yield``) after every step; returns its statistics. On a GPU
        nothing in a step waits for the device: losses and accuracy add up on the device,
        step times are CUDA events, and the loss is checked for NaN/Inf every
        :data:`NONFINITE_CHECK_EVERY` steps and at the end of the epoch."""
        model, device = self.model, self.device
        self.ddp.train()
        set_loader_epoch(self.train_loader, self.epoch)
        timer = StepTimer(device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        loss_sum, correct, bad = zero.clone(), zero.clone(), zero.clone()
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        seen = steps = 0
        lr_used = self.optimizer.param_groups[0].get("lr", math.nan)
        show = bar is not None and not bar.disable
        graph, batches = None, self.train_loader
        if self.cfg.graph_step:  # the capture-ready step (gnc.step): a CUDA graph on a GPU
            if getattr(self, "step_graph", None) is None:  # built at the first epoch
                self.step_graph = GraphedStep(StaticStep(
                    model, self.optimizer, self.cfg.loss, device,
                    world_size=self.dist.world_size), stream=self.stream)
            graph = self.step_graph
            batches = range(graph.static.begin_epoch(self.train_loader, self.step))
            # its accumulators, on the device, updated in place by every step
            loss_sum, correct, bad, first_bad = (graph.static.loss_sum, graph.static.correct,
                                                 graph.static.bad, graph.static.first_bad)
        for batch in batches:
            with trusted_inputs():  # validated at load time; the loss is checked here
                if graph is not None:  # one mark mid-step: after the loss, or the replay
                    timer.mark()
                    graph.run(timer.mark)
                    timer.mark()
                    seen += graph.static.batch_size
                else:
                    x, y = batch
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    timer.mark()
                    logits, _ = self.ddp(x, y)
                    loss = classification_loss(self.cfg.loss, logits, y)
                    timer.mark()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)  # fp16: skipped when gradients overflow
                    # a step skipped for overflowing gradients counts as a bad step (its loss
                    # may be finite); read before update() resets it, on the device
                    overflow = self._overflowed()
                    self.scaler.update()
                    model.head.after_optimizer_step()
                    if self.step_schedule_per_step:
                        lr_used = self.optimizer.param_groups[0].get("lr", math.nan)
                        self.scheduler.step()
                    timer.mark()
                    accumulate_step((loss_sum, correct, bad, first_bad), loss, logits, y,
                                    self.step + 1, overflow)
                    seen += y.numel()
            steps += 1
            self.step += 1
            if steps % NONFINITE_CHECK_EVERY == 0:
                self._check_finite(bad, first_bad, steps, end=False)
            if bar is not None:
                bar.update(1)
                if show and steps % NONFINITE_CHECK_EVERY == 0:
                    bar.set_postfix(loss=f"{float(loss_sum) / max(steps - float(bad), 1):.4f}",
                                    acc=f"{100 * float(correct) / seen:.1f}")
            yield
        if graph is not None:
            graph.static.end_epoch()
        self._check_finite(bad, first_bad, steps, end=True)
        if not self.step_schedule_per_step:
            lr_used = self.optimizer.param_groups[0].get("lr", math.nan)  # this epoch's
            self.scheduler.step()
        self.epoch += 1
        t_fwd, t_bwd = timer.times_ms()
        loss_sum, bad, correct, seen_all, n_steps = sum_over_ranks(
            [float(loss_sum), float(bad), float(correct), seen, steps], device)
        return self._polar_residual() | {
            "lr": float(lr_used),  # the rate the epoch trained with (onecycle: its last step's)
            "train_loss": loss_sum / max(n_steps - bad, 1),
            "train_batch_top1": 100.0 * correct / seen_all,
            "skipped_steps": int(bad),
            "time_forward_ms": statistics.fmean(t_fwd),
            "time_backward_ms": statistics.fmean(t_bwd),
            "time_forward_ms_median": statistics.median(t_fwd),
            "time_backward_ms_median": statistics.median(t_bwd),
        }

    def _overflowed(self) -> torch.Tensor | None:
        """Whether the scaler skipped this step for Inf/NaN gradients (a device bool; None
        without fp16)."""
        if not self.scaler.is_enabled():
            return None
        found = self.scaler._found_inf_per_device(self.optimizer)  # torch keeps no public read
        return sum(found.values()).to(self.device) > 0

    def _polar_residual(self) -> dict:
        """``{"polar_residual": r}``, the epoch's largest Newton–Schulz residual max|UᵀU − I|
        (empty unless the head used it), with a warning when the iteration did not converge."""
        residual = self.model.head.pop_polar_residual()
        if residual is None:
            return {}
        if not residual <= NS_RESIDUAL_TOL and self.dist.is_main:
            logger.warning("epoch %d: the Newton–Schulz polar factor reached only max|UᵀU − I| = "
                           "%.2e > %.1e (σ_min(C) below what its schedule assumes); "
                           "--polar-method auto solves exactly", self.epoch, residual,
                           NS_RESIDUAL_TOL)
        return {"polar_residual": residual}

    def _check_finite(self, bad: torch.Tensor, first_bad: torch.Tensor, steps: int,
                      end: bool) -> None:
        """Raise "training diverged" for a non-finite loss (fp16: only when every step of
        the epoch overflowed — the scaler skips the others) or non-finite weights."""
        n_bad = int(sum_over_ranks([float(bad)], self.device)[0])
        if self.scaler.is_enabled():
            diverged = end and n_bad == steps * self.dist.world_size
        else:
            diverged = n_bad > 0
        if end and not diverged and not all_finite_params(self.model):
            raise self._diverged("the weights are NaN/Inf", self.epoch + 1, self.step)
        if diverged:
            step = int(first_bad)
            what = ("every step overflowed in fp16 (the GradScaler skipped them all)"
                    if self.scaler.is_enabled() else "the loss is NaN/Inf")
            if not all_finite_params(self.model):
                what += " and the weights are NaN/Inf"
            raise self._diverged(what, self.epoch + 1, step if step > 0 else self.step)

    def _diverged(self, what: str, epoch: int, step: int) -> FloatingPointError:
        """The error of a divergence found at (1-based) ``epoch`` and global ``step``: in an
        epoch, its index + 1; at its evaluation (``self.epoch`` already counts it), itself."""
        kept = ("the last checkpoint is kept" if has_checkpoint(self.out)
                else "no checkpoint was written yet")
        return FloatingPointError(
            f"training diverged: {what} at epoch {epoch}, step {step} (try a smaller --lr); "
            f"{kept}"
        )

    def evaluate_epoch(self, row: dict) -> dict:
        """NC metrics of both splits (:func:`gnc.evaluation.evaluate_splits`); first, with
        ``eval_stats="precise"``, the BN statistics recomputed over training batches, and μ_G
        set by the train split's evaluation before its logits."""
        if not all_finite_params(self.model):
            raise self._diverged("the weights are NaN/Inf", self.epoch, self.step)
        precise = self.cfg.eval_stats == "precise"
        if precise:
            self._precise_statistics()
        try:
            metrics, self._etf_prev, margins, geometry = evaluate_splits(
                self.model, self.eval_loaders, self.K, self.device, set_global_mean=precise,
                etf_prev=self._etf_prev)
        except NonFiniteError as err:
            raise self._diverged(str(err), self.epoch, self.step) from err
        row.update(eval_stats=self.cfg.eval_stats, **metrics)
        if self.dist.is_main:
            save_margins(self.out, margins.numpy())
            if self.cfg.save_classifier:
                save_classifier(self.out, self.model.head, geometry, self.epoch, "train")
        return row

    def _precise_statistics(self) -> None:
        """BN statistics over one pass of training batches as trained on (the next epoch's
        order and augmentation, so training is unchanged), or its first
        ``precise_bn_batches``; μ_G is left to the train split's evaluation."""
        rng = torch.get_rng_state()  # the PIL path draws its augmentation from it
        set_loader_epoch(self.train_loader, self.epoch)
        recompute_statistics(self.model, self.train_loader, self.device,
                             bn_batches=self.cfg.precise_bn_batches, global_mean=False)
        torch.set_rng_state(rng)

    def log(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        append_metrics(self.out, row)  # fsynced; a torn line is dropped on resume
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def _evaluation_due(self) -> bool:
        """Whether the epoch just trained is one that ``cfg`` evaluates: the last, one of
        ``eval_every``, or one of ``eval_epochs``."""
        cfg = self.cfg
        return (self.epoch == cfg.epochs or self._is_due(cfg.eval_every)
                or self.epoch in (cfg.eval_epochs or ()))

    def _elapsed(self) -> float:
        """Wall seconds of training: this invocation's, plus those its checkpoint counted."""
        since = 0.0 if self._t_start is None else time.perf_counter() - self._t_start
        return self._elapsed_before + since

    def _log_evaluation(self, stats: dict) -> dict:
        """Evaluate the epoch just trained (its training ``stats`` beside) and log the row."""
        # `lr` is the epoch's own (in stats); older checkpoints' stats lack it: the rate now
        row = {"epoch": self.epoch, "step": self.step,
               "lr": self.optimizer.param_groups[0].get("lr", math.nan), **stats}
        row = self.evaluate_epoch(row)
        row["train_top1"] = row["top1"]
        row["peak_mem_mb"] = None if self.memory is None else self.memory.mb
        row["elapsed_s"] = self._elapsed()
        self.log(row)
        self._evaluated = True
        return row

    def fit(self, progress_bar: Callable | None = None) -> dict:
        """Train to ``cfg.epochs`` (or ``cfg.until_epoch``); returns the last metrics row.
        ``progress_bar``: a factory like :func:`tqdm.tqdm` (``total``, ``initial``,
        ``disable``, ``desc``) for the step bar (default: tqdm on rank 0)."""
        return drain(self.fit_steps(progress_bar))

    def fit_steps(self, progress_bar: Callable | None = None) -> Generator[None, None, dict]:
        """:meth:`fit`, pausing (``yield``) after every training step: a caller may advance
        several runs in turn (:mod:`gnc.interleave`). Closing it early (``close()``) releases
        the run directory as :meth:`fit`'s end does; the last checkpoint stays."""
        cfg = self.cfg
        steps = len(self.train_loader)
        if steps == 0:
            self._lock.release()
            raise ValueError("the training loader has no batches (batch size above the data?)")
        stop = cfg.last_epoch
        if self.epoch < stop and self.dist.is_main:
            # the run goes on: a DONE of an earlier stop ("stopped after epoch E") no longer
            # says where it is, and a report must not take it as finished meanwhile
            clear_done(self.out)
        bar = (progress_bar or _progress_bar)(total=stop * steps, initial=self.epoch * steps,
                            disable=not (cfg.progress and self.dist.is_main),
                            desc=f"{cfg.method} seed {cfg.seed}")
        self._t_start = time.perf_counter()
        row: dict = {}
        if self.memory is not None:
            self.memory.start()
        try:
            if not self._evaluated and self._evaluation_due():  # resumed where it stopped
                row = self._log_evaluation(self._epoch_stats)
                self.save_checkpoint()
            while self.epoch < stop:
                stats = yield from self.epoch_steps(bar)
                self._epoch_stats, self._evaluated = stats, False
                evaluate = self._evaluation_due()
                if evaluate:
                    row = self._log_evaluation(stats)
                # last.pt follows the evaluations (cheap for UFM's 2000 one-step epochs) and
                # the stop of `until_epoch`, from which --resume continues
                if evaluate or self._is_due(cfg.checkpoint_every) or self.epoch == stop:
                    self.save_checkpoint()
            if not row and self.dist.is_main:  # nothing evaluated now: the run's last row
                rows = read_metrics(self.out / "metrics.jsonl")
                row = rows[-1] if rows else {}
        finally:
            if self.memory is not None:
                self.memory.stop()
            bar.close()
            if self.writer is not None:
                self.writer.close()
            self._lock.release()
        return row


def drain(steps: Generator[None, None, dict]) -> dict:
    """Run ``steps`` (:meth:`Trainer.fit_steps`, :meth:`Trainer.epoch_steps`) to its end;
    returns its value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          overwrite: bool = False, trust_checkpoint: bool = False,
          progress_bar: Callable | None = None) -> dict:
    """Train one run into ``out_dir`` (see the module docstring); returns the last metrics.

    A directory that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it) is given; a missing or empty one is fine.
    ``trust_checkpoint``: a resume may unpickle a checkpoint of an older gnc in full;
    ``progress_bar``: see :meth:`Trainer.fit`.
    """
    return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite,
                   trust_checkpoint=trust_checkpoint).fit(progress_bar)
