"""Figures and tables from an experiment directory (``gnc report DIR``; DESIGN §4).

An experiment directory holds runs at ``DIR/<method>/seed<k>/``, each with ``config.json``,
``metrics.jsonl`` (one row per evaluated epoch), ``cos_margins.npy`` and, once the runner
has finished it, a ``DONE`` file. Only finished runs are reported and the others are listed,
unless ``unfinished`` (``gnc report --unfinished``) includes them at the epochs they reached.

:func:`make_report` writes ``DIR/report.md`` and, beside it,

- ``curves.png``: the headline grid of every curve below and the sorted cosine margins;
- ``curve_<key>.png``: one figure per quantity against epochs (``train_loss``,
  ``avg_cos_margin``, ``nc1``, ``nc3``, ``wh_equinorm``, ``train_top1``, ``test_top1``);
- ``cos_margins.png``: the sorted per-sample train cosine margins at the end of training
  ("PCM at EoT") against the sample rank normalised to [0, 1];
- ``etf_distances.png`` (when the runs logged them): the released code's ETF-distance study
  over training — the distances of W and H̄ to their nearest simplex ETFs, between the two
  ETFs, and how far each ETF moved since the previous evaluation
  (:func:`gnc.metrics.etf_distances`), with ``curve_<key>.png`` for each of those keys and
  for ``vci`` and ``numerical_rank``;
- ``summary.csv`` / ``summary.json``: every numeric metric per method and evaluated epoch
  over seeds — n, mean, std (ddof 1), median, min, max — the released code's seed statistics
  (``nc/seed_statistics.py``) in machine-readable form;
- ``report.json``: what the report was made with (title, command, machine, notes, table
  epochs, preset config), so that ``gnc report DIR`` alone redraws the experiment's own
  report (:func:`read_report_meta`).

Runs stopped by ``--until-epoch`` (``DONE`` says "stopped after epoch E") are reported as
such: the title and a list say where they stopped, and their last evaluation is not called
the end of training.

Every file is written atomically (a kill leaves the previous one or the new one); with
``jobs`` > 1 worker processes draw the figures (:func:`write_figures`), the same files.

Every curve is the median over seeds (line) with the min–max range over seeds (band), one
colour per method. Seeds are aligned by epoch (the epochs common to all seeds of a method).
Tables report ``median [min, max] (mean ± std)`` over seeds, std with ddof 1 (n/a for one
seed); NaN values are left out of all of them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves the backend alone
from matplotlib.ticker import MaxNLocator

from gnc.config import OUTPUT_KEYS, RUNTIME_KEYS, describe_config
from gnc.heads import METHOD_NAMES, METHODS, PAPER_METHODS
from gnc.rundir import (
    atomic_write,
    atomic_write_text,
    is_done,
    is_train_config,
    read_config,
    read_margins,
    read_metrics,
    run_lock,
    stopped_after,
    strict_json,
)

logger = logging.getLogger(__name__)

METHOD_ORDER = METHOD_NAMES
DISPLAY_NAMES = {name: spec.label for name, spec in METHODS.items()}
COLOURS = {
    "standard": "#1f77b4",  # blue
    "fixed": "#ff7f0e",  # orange
    "implicit": "#2ca02c",  # green
    "implicit-nograd": "#9467bd",  # purple
    "standard-unnormalized": "#8c564b",  # brown
}
_EXTRA_COLOURS = ("#7f7f7f", "#e377c2", "#bcbd22", "#17becf")  # methods not named above
DPI = 120
PCM_POINTS = 1000  # common grid of normalised sample ranks for the sorted margins
LOG_FLOOR = 1e-14  # log-scale curves draw smaller values (float64 rounding noise) here
# settings that make runs different tasks: the report warns when its runs differ in them
TASK_KEYS = ("dataset", "dataset_options", "model", "imbalance", "label_noise")
# figures leave out values beyond it: matplotlib's tick arithmetic overflows near float's max
PLOT_LIMIT = 1e300

# (metrics key, title, y-axis label, log y-axis when every value is positive)
CURVES = (
    ("train_loss", "Train loss", "the run's loss (CE in nats, or DR)", False),
    ("avg_cos_margin", "Average cosine margin (train)", "cosine margin", False),
    ("nc1", "NC1: within-class variability", "tr(Σ_W Σ_B†)/K", True),
    ("nc3", "NC3: self-duality", "‖WH/‖WH‖ − M/√(K−1)‖_F", True),
    ("wh_equinorm", "WH-equinorm", "|W-equinorm − H-equinorm|", False),
    ("train_top1", "Train top-1 accuracy", "accuracy (%)", False),
    ("test_top1", "Test top-1 accuracy", "accuracy (%)", False),
)
# Curves drawn as single figures only (not in the headline grid), when the runs logged them.
EXTRA_CURVES = (
    ("vci", "Variability collapse index (train)", "1 − tr(Σ_T†Σ_B)/min(d, K−1)", True),
    ("numerical_rank", "Numerical rank of the class features (train)",
     "mean_c (‖H_c‖_*/‖H_c‖_F)²", False),
)
# The ETF-distance study (gnc.metrics.etf_distances): its own grid, etf_distances.png.
ETF_CURVES = (
    ("etf_w_dist", "W to its nearest ETF", "‖W/‖W‖ − ETF_W‖_F", True),
    ("etf_h_dist", "H (the split's centred class means) to its nearest ETF",
     "‖H/‖H‖ − ETF_H‖_F", True),
    ("etf_wh_dist", "Between the two ETFs", "‖ETF_W − ETF_H‖_F", True),
    ("etf_w_moved", "ETF_W moved since the previous evaluation", "‖ETF_W − ETF_W(prev)‖_F",
     True),
    ("etf_h_moved", "ETF_H moved since the previous evaluation", "‖ETF_H − ETF_H(prev)‖_F",
     True),
)
# (metrics key, column, format) of the final-metrics table
FINAL_METRICS = (
    ("train_top1", "train top-1 (%)", ".2f"),
    ("test_top1", "test top-1 (%)", ".2f"),
    ("nc1", "NC1", ".3g"),
    ("nc3", "NC3", ".3g"),
    ("wh_equinorm", "WH-equinorm", ".3g"),
    ("avg_cos_margin", "avg cosine margin", ".4f"),
    ("vci", "VCI", ".3g"),
    ("numerical_rank", "numerical rank", ".3g"),
    ("etf_wh_dist", "‖ETF_W − ETF_H‖", ".3g"),
)
SUMMARY_STATS = ("n", "mean", "std", "median", "min", "max")  # summary.csv / .json columns
SUMMARY_SKIP = ("epoch", "step", "seed")  # row keys that are not metrics
CONFIG_KEYS = ("dataset", "dataset_options", "imbalance", "label_noise", "model", "width",
               "feature_dim", "epochs", "batch_size", "sampler", "loss", "bias", "optimizer",
               "lr", "momentum", "weight_decay", "schedule", "amp", "tau", "delta", "solver",
               "backward", "polar_method", "eval_every", "eval_stats", "precise_bn_batches")
# what each evaluation protocol measures: the report names it (DESIGN §5); (kind, value)
# with kind "train" (a run's `eval_stats`) or "measure" (`gnc measure --eval-stats`)
EVAL_STATS_WORDS = {
    ("train", "precise"): "BatchNorm statistics recomputed over augmented training batches "
                          "and the heads' μ_G over the training split before every evaluation "
                          "(`precise`, gnc's default)",
    ("train", "running"): "BatchNorm's and the heads' running averages as training left them "
                          "(`running`)",
    ("measure", "precise"): "BatchNorm statistics recomputed over the measured data, "
                            "un-augmented, first (`gnc measure --eval-stats precise`)",
    ("measure", "running"): "the BatchNorm statistics stored with the weights "
                            "(`gnc measure --eval-stats running`)",
}


@dataclass
class RunData:
    """One run: its config, its evaluated epochs and its final sorted margins."""

    method: str
    seed: int
    path: Path
    config: dict
    metrics: list[dict]  # one row per evaluated epoch, sorted by epoch
    margins: np.ndarray | None = None  # sorted per-sample train cosine margins at the end
    finished: bool = True  # False: no DONE file, included by ``unfinished``
    stopped: int | None = None  # the epoch it stopped after (``until_epoch``), to go on later

    @property
    def ended(self) -> bool:
        """Whether its last evaluation is the end of its training."""
        return self.finished and self.stopped is None

    @cached_property
    def by_epoch(self) -> dict[int, dict]:
        return {int(row["epoch"]): row for row in self.metrics}

    def row_near(self, epoch: int) -> dict:
        """The metrics row of ``epoch``, or of the nearest evaluated epoch."""
        rows = self.by_epoch
        return rows[_nearest(rows, epoch)]


@dataclass
class Table:
    """A markdown table with footnotes."""

    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"Note: {n}." for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- loading


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


def colour(method: str) -> str:
    if method in COLOURS:
        return COLOURS[method]
    return _EXTRA_COLOURS[sum(map(ord, method)) % len(_EXTRA_COLOURS)]


def order_methods(methods: Iterable[str]) -> list[str]:
    """The paper's three, then the ablations, then any other method alphabetically."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda m: (rank.get(m, len(rank)), m))


def scan_runs(exp_dir: str | Path, *, unfinished: bool = False
              ) -> tuple[dict[str, list[RunData]], list[str]]:
    """The finished runs of ``exp_dir`` by method (ordered), and a line per skipped run;
    ``unfinished``: runs without ``DONE`` too, at the epochs they evaluated (one that
    evaluated none is skipped)."""
    root = Path(exp_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"experiment directory not found: {root}")
    runs: dict[str, list[RunData]] = {}
    skipped: list[str] = []
    for method_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        seeds = [(int(m.group(1)), p) for p in method_dir.iterdir()
                 if p.is_dir() and (m := re.fullmatch(r"seed(\d+)", p.name))]
        for seed, path in sorted(seeds):
            name = f"{method_dir.name}/{path.name}"
            finished = is_done(path)
            if not finished and not unfinished:
                skipped.append(f"{name}: unfinished (no DONE file)")
                continue
            by_epoch = {row["epoch"]: row for row in read_metrics(path / "metrics.jsonl")}
            metrics = [by_epoch[e] for e in sorted(by_epoch)]  # a resumed epoch: the later row
            if not metrics:
                state = "finished" if finished else "unfinished"
                skipped.append(f"{name}: {state}, but metrics.jsonl is missing or empty")
                continue
            try:
                config = read_config(path, "report")
            except FileNotFoundError:
                config = {}
            except ValueError:
                state = "finished" if finished else "unfinished"
                skipped.append(f"{name}: {state}, but config.json is not a JSON object")
                continue
            runs.setdefault(method_dir.name, []).append(
                RunData(method_dir.name, seed, path, config, metrics, read_margins(path),
                        finished, stopped_after(path) if finished else None))
    if not runs:
        if unfinished:
            raise ValueError(f"no run with evaluated epochs under {root} (expected "
                             f"{root}/<method>/seed<k>/metrics.jsonl)")
        raise ValueError(f"no finished runs under {root} (expected {root}/<method>/seed<k>/DONE)")
    return {m: runs[m] for m in order_methods(runs)}, skipped


def load_runs(exp_dir: str | Path) -> dict[str, list[RunData]]:
    """The finished runs of ``exp_dir`` by method, in the report's method order."""
    return scan_runs(exp_dir)[0]


def _num(value: object) -> float:
    """A metric as a float: JSON null, NaN and anything that is not a number become NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an integer beyond float's range (JSON allows any size)
        return math.inf if value > 0 else -math.inf


def _values(rows: Iterable[Mapping], key: str) -> np.ndarray:
    return np.array([_num(row.get(key)) for row in rows], dtype=float)


def _finite(values: Iterable[float]) -> np.ndarray:
    values = values if isinstance(values, np.ndarray) else list(values)
    try:
        v = np.asarray(values, dtype=float).ravel()
    except OverflowError:  # a list holding an integer beyond float's range
        v = np.array([_num(x) for x in values], dtype=float)
    return v[np.isfinite(v)]  # NaN and ±Inf (a diverged statistic) are no value


def summarise(values: Iterable[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` of ``values`` leaving NaN and ±Inf out; none left gives NaNs."""
    v = _finite(values)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    return float(np.median(v)), float(v.min()), float(v.max())


def format_summary(values: Iterable[float], spec: str = ".2f") -> str:
    """``"median [min, max]"`` with the format ``spec``; ``"n/a"`` when every value is NaN."""
    med, lo, hi = summarise(values)
    return "n/a" if math.isnan(med) else f"{med:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def seed_statistics(values: Iterable[float]) -> dict[str, float]:
    """``n`` (finite values), ``mean``, ``std`` (ddof 1, as the released code's
    ``seed_statistics.py``), ``median``, ``min``, ``max`` of ``values`` leaving NaN and ±Inf
    out.

    NaN where undefined: every statistic without values, ``std`` with one.
    """
    v = _finite(values)
    med, lo, hi = summarise(v)
    with np.errstate(over="ignore", invalid="ignore"):  # values near 1e308: an inf mean
        return {"n": int(v.size), "mean": float(v.mean()) if v.size else math.nan,
                "std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
                "median": med, "min": lo, "max": hi}


def format_seed_stats(values: Iterable[float], spec: str = ".2f") -> str:
    """``"median [min, max] (mean ± std)"``: :func:`format_summary` and the mean ± std (ddof
    1; ``n/a`` for a single value) next to it; ``"n/a"`` when every value is NaN."""
    values = list(values)  # read twice: here and by format_summary
    s = seed_statistics(values)
    if s["n"] == 0:
        return "n/a"
    std = "n/a" if math.isnan(s["std"]) else f"{s['std']:{spec}}"
    return f"{format_summary(values, spec)} ({s['mean']:{spec}} ± {std})"


def _mean(values: Iterable[float]) -> float:
    v = _finite(values)
    return float(v.mean()) if v.size else math.nan


def _nearest(epochs: Iterable[int], want: int) -> int:
    return min(epochs, key=lambda e: (abs(e - want), e))  # ties: the earlier epoch


def _common_epochs(runs: Iterable[RunData]) -> list[int]:
    """Epochs every run evaluated (all evaluated epochs if the runs share none)."""
    sets = [set(run.by_epoch) for run in runs]
    common = set.intersection(*sets)
    return sorted(common or set.union(*sets))


def _all_runs(runs: Mapping[str, list[RunData]]) -> list[RunData]:
    return [run for rs in runs.values() for run in rs]


def _has_key(runs: Mapping[str, list[RunData]], key: str) -> bool:
    return any(key in row for run in _all_runs(runs) for row in run.metrics)


# --------------------------------------------------------------------------- tables


def default_table_epochs(runs: Mapping[str, list[RunData]]) -> tuple[int, int]:
    """The first evaluated epoch at or above 10% of training, and the last epoch."""
    epochs = _common_epochs(_all_runs(runs))
    total = max(_num(run.config.get("epochs")) for run in _all_runs(runs))
    total = epochs[-1] if math.isnan(total) or total <= 0 else total
    first = next((e for e in epochs if e >= 0.1 * total), epochs[-1])
    return first, epochs[-1]


def accuracy_table(runs: Mapping[str, list[RunData]], epochs: Sequence[int] | None = None,
                   *, key: str = "train_top1") -> Table:
    """Top-1 accuracy (``key``, %) at ``epochs`` as ``median [min, max] (mean ± std)`` per
    method.

    An epoch that was not evaluated is replaced by the nearest evaluated one (with a note).
    """
    epochs = tuple(epochs) if epochs else default_table_epochs(runs)
    available = _common_epochs(_all_runs(runs))
    used, notes = [], []
    for want in epochs:
        got = _nearest(available, want)
        if got != want:
            notes.append(f"epoch {want} was not evaluated; the nearest evaluated epoch, "
                         f"{got}, is shown")
        if got not in used:  # two wanted epochs with one nearest evaluation: one column
            used.append(got)
    rows = [[display_name(m)] + [format_seed_stats([_num(run.row_near(e).get(key))
                                                    for run in rs]) for e in used]
            for m, rs in runs.items()]
    return Table(["Method"] + [f"epoch {e}" for e in used], rows, notes)


def final_metrics_table(runs: Mapping[str, list[RunData]]) -> Table:
    """The metrics of each run's last evaluation, ``median [min, max] (mean ± std)`` per
    method."""
    cols = [c for c in FINAL_METRICS if _has_key(runs, c[0])]
    rows = [[display_name(m)] + [format_seed_stats([_num(run.metrics[-1].get(key))
                                                    for run in rs], spec)
                                 for key, _, spec in cols]
            for m, rs in runs.items()]
    return Table(["Method"] + [c[1] for c in cols], rows)


def timing_table(runs: Mapping[str, list[RunData]]) -> Table:
    """Time per training step (forward/backward/total, mean and median) and peak memory.

    Means average the per-epoch means ``time_*_ms`` of every evaluated epoch and seed with
    equal weights; medians are the median of the per-epoch medians ``time_*_ms_median``.
    Peak memory is each run's maximum ``peak_mem_mb``, then ``median [min, max] (mean ±
    std)`` over seeds.
    """
    header = ["Method", "forward mean (ms)", "forward median (ms)", "backward mean (ms)",
              "backward median (ms)", "total mean (ms)", "total median (ms)",
              "peak memory (MB)"]
    rows = []
    for m, rs in runs.items():
        all_rows = [row for run in rs for row in run.metrics]
        fwd, bwd = _values(all_rows, "time_forward_ms"), _values(all_rows, "time_backward_ms")
        fwd_med = _values(all_rows, "time_forward_ms_median")
        bwd_med = _values(all_rows, "time_backward_ms_median")
        stats = [_mean(fwd), summarise(fwd_med)[0], _mean(bwd), summarise(bwd_med)[0],
                 _mean(fwd + bwd), summarise(fwd_med + bwd_med)[0]]
        peaks = [summarise(_values(run.metrics, "peak_mem_mb"))[2] for run in rs]
        rows.append([display_name(m)] + ["n/a" if math.isnan(s) else f"{s:.3f}" for s in stats]
                    + [format_seed_stats(peaks, ".1f")])
    notes = ["means weight every evaluated epoch of every seed equally; the total median is the "
             "median over epochs of (forward median + backward median)",
             "peak memory: the CUDA allocator's peak above its level when training starts; "
             "on the CPU the growth of the resident set (freed memory given back first), "
             "where the first run of a process also holds the libraries' one-time set-up"]
    if any("peak_mem_mb" in row and row["peak_mem_mb"] is None
           for rs in runs.values() for run in rs for row in run.metrics):
        notes.append("peak memory n/a: runs that shared one process (gnc experiment "
                     "--jobs-mode streams) record none, their memory is not theirs alone")
    return Table(header, rows, notes)


# --------------------------------------------------------------------------- seed summary


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seed_summary(runs: Mapping[str, list[RunData]]) -> list[dict]:
    """One record per method, evaluated epoch and numeric metric: ``method``, ``epoch``,
    ``metric`` and the :func:`seed_statistics` over the seeds (``n`` counts the seeds with a
    finite value at that epoch; a seed that did not evaluate the epoch is not counted).

    Metrics are every key with a number in some row (:data:`SUMMARY_SKIP` left out), sorted;
    lists (``cos_margins``, ``missing_classes``) and strings are not metrics.
    """
    records = []
    for m, rs in runs.items():
        keys = sorted({k for run in rs for row in run.metrics for k, v in row.items()
                       if _is_number(v) and k not in SUMMARY_SKIP})
        epochs = sorted(set().union(*(run.by_epoch for run in rs)))
        for epoch in epochs:
            rows = [run.by_epoch[epoch] for run in rs if epoch in run.by_epoch]
            for key in keys:
                stats = seed_statistics(_values(rows, key))
                records.append({"method": m, "epoch": epoch, "metric": key, **stats})
    return records


def write_summary(runs: Mapping[str, list[RunData]], out_dir: Path) -> tuple[Path, Path]:
    """Write :func:`seed_summary` as ``summary.csv`` (one record a line, ``nan`` where
    undefined) and ``summary.json`` (``{method: {epoch: {metric: {n, mean, std, median, min,
    max}}}}``, ``null`` where undefined or infinite: JSON has neither); returns both
    paths."""
    records = seed_summary(runs)
    csv_path, json_path = out_dir / "summary.csv", out_dir / "summary.json"
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["method", "epoch", "metric", *SUMMARY_STATS])
    writer.writeheader()
    writer.writerows(records)
    atomic_write(csv_path, lambda tmp: tmp.write_text(table.getvalue(), newline=""))
    nested: dict = {}
    for r in records:
        stats = {k: r[k] for k in SUMMARY_STATS}
        nested.setdefault(r["method"], {}).setdefault(str(r["epoch"]), {})[r["metric"]] = stats
    atomic_write_text(json_path, strict_json(nested, indent=1) + "\n")  # NaN, ±Inf: null
    logger.info("wrote %s and %s", csv_path, json_path)
    return csv_path, json_path


# --------------------------------------------------------------------------- figures


def _band(ax: Axes, x: np.ndarray, vals: np.ndarray, method: str, n: int) -> None:
    """Median over seeds (rows of ``vals``) as a line, min–max as a band."""
    vals = np.where(np.abs(vals) <= PLOT_LIMIT, vals, np.nan)
    med, lo, hi = np.array([summarise(col) for col in vals.T]).T
    style = "-" if method in PAPER_METHODS else "--"
    ax.plot(x, med, style, color=colour(method), lw=1.6, marker="o" if len(x) <= 30 else None,
            ms=3, label=f"{display_name(method)} (n={n})")
    ax.fill_between(x, lo, hi, color=colour(method), alpha=0.2, lw=0)


def _curve(rs: list[RunData], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Epochs common to all seeds and the (seeds × epochs) values of ``key``."""
    sets = [set(run.by_epoch) for run in rs]
    common = sorted(set.intersection(*sets))
    if not common or not any(key in row for run in rs for row in run.metrics):
        return None
    vals = np.array([[_num(run.by_epoch[e].get(key)) for e in common] for run in rs])
    return np.array(common, dtype=float), vals


def _sorted_margins(run: RunData) -> np.ndarray | None:
    """The run's sorted margins on :data:`PCM_POINTS` normalised ranks (NaN left out).

    Falls back to the 101 quantiles of the last ``metrics.jsonl`` row without the ``.npy``.
    """
    m = run.margins if run.margins is not None else run.metrics[-1].get("cos_margins")
    if m is None:
        return None
    try:
        m = np.sort(_finite(m))
    except (TypeError, ValueError):  # not a list of numbers
        return None
    if m.size == 0:
        return None
    grid = np.linspace(0.0, 1.0, PCM_POINTS)
    return np.interp(grid, np.linspace(0.0, 1.0, m.size) if m.size > 1 else [0.0], m)


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str, log_if_positive: bool) -> None:
    """Title, labels and grid; a log y-axis when asked and every plotted value is positive."""
    ys = _finite(np.concatenate([line.get_ydata() for line in ax.get_lines()] or [[]]))
    log = log_if_positive and ys.size > 0 and bool((ys > 0).all())
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
    ax.grid(True, which="major", alpha=0.3)


def _plot_curve(ax: Axes, runs: Mapping[str, list[RunData]], spec: tuple) -> None:
    key, title, ylabel, log = spec
    for m, rs in runs.items():
        curve = _curve(rs, key)
        if curve is not None:
            epochs, values = curve
            if log:  # NC1 at collapse is rounding noise around 0 (sometimes −1e-17)
                values = np.where(np.isnan(values), values, np.maximum(values, LOG_FLOOR))
            _band(ax, epochs, values, m, len(rs))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 2.25
    _finish(ax, title, "epoch", ylabel, log)


def _plot_margins(ax: Axes, runs: Mapping[str, list[RunData]]) -> None:
    grid = np.linspace(0.0, 1.0, PCM_POINTS)
    lowest = math.inf
    for m, rs in runs.items():
        curves = [c for run in rs if (c := _sorted_margins(run)) is not None]
        if curves:
            _band(ax, grid, np.array(curves), m, len(curves))
            lowest = min(lowest, float(np.min(curves)))
    if lowest <= 0:  # misclassified (or tied) samples: mark the zero margin
        ax.axhline(0.0, color="black", lw=0.8, alpha=0.6)
    ended = all(run.ended for rs in runs.values() for run in rs)
    _finish(ax, "PCM at EoT: sorted train cosine margins" if ended else
            "sorted train cosine margins at the last evaluation", "sample rank (normalised)",
            "cosine margin", False)


def _save(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=path.suffix[1:]))
    logger.info("wrote %s", path)


def figure_plan(runs: Mapping[str, list[RunData]]) -> list[tuple[str, str, tuple | None]]:
    """The figures :func:`write_figures` draws, in order: ``(file name, kind, curve spec)``.

    The grid, the margins, ``etf_distances.png`` when the runs logged the ETF distances,
    then one ``curve_<key>.png`` per logged curve.
    """
    specs = [s for s in CURVES if _has_key(runs, s[0])]
    etf = [s for s in ETF_CURVES if _has_key(runs, s[0])]
    plan = [("curves.png", "grid", None), ("cos_margins.png", "margins", None)]
    if etf:
        plan.append(("etf_distances.png", "etf", None))
    singles = specs + [s for s in EXTRA_CURVES if _has_key(runs, s[0])] + etf
    return plan + [(f"curve_{spec[0]}.png", "curve", spec) for spec in singles]


def _cost(runs: Mapping[str, list[RunData]], kind: str) -> int:
    """Axes a figure draws (its drawing time is about proportional: text layout)."""
    if kind == "grid":
        return 1 + sum(_has_key(runs, s[0]) for s in CURVES)
    if kind == "etf":
        return sum(_has_key(runs, s[0]) for s in ETF_CURVES)
    return 1


def _without_margins(runs: Mapping[str, list[RunData]]) -> dict[str, list[RunData]]:
    """``runs`` without the per-sample margins (50,000 floats a CIFAR run), for the figures
    that do not draw them."""
    return {m: [replace(run, margins=None) for run in rs] for m, rs in runs.items()}


def _figure_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for the figure, from the first axes that has curves (none: no legend)."""
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if labels:
            fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
            return


def draw_figure(runs: Mapping[str, list[RunData]], title: str, kind: str,
                spec: tuple | None = None) -> Figure:
    """One figure of :func:`figure_plan`, laid out, not saved."""
    if kind == "grid":
        specs = [s for s in CURVES if _has_key(runs, s[0])]
        fig = Figure(figsize=(20, 9.5))
        axes = fig.subplots(2, 4).ravel()
        for ax, curve in zip(axes, specs, strict=False):
            _plot_curve(ax, runs, curve)
        _plot_margins(axes[len(specs)], runs)
        for ax in axes[len(specs) + 1:]:
            ax.set_visible(False)
        _figure_legend(fig, axes)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    elif kind == "etf":
        etf = [s for s in ETF_CURVES if _has_key(runs, s[0])]
        fig = Figure(figsize=(5 * len(etf), 4.5))
        axes = np.atleast_1d(fig.subplots(1, len(etf))).ravel()
        for ax, curve in zip(axes, etf, strict=True):
            _plot_curve(ax, runs, curve)
        _figure_legend(fig, axes)
        fig.suptitle(f"{title}: distance to the nearest simplex ETF (train)")
        fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    elif kind in ("margins", "curve"):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        if kind == "margins":
            _plot_margins(ax, runs)
        else:
            _plot_curve(ax, runs, spec)
        if ax.get_legend_handles_labels()[1]:
            ax.legend()
        fig.tight_layout()
    else:
        raise ValueError(f"Expected a figure kind of figure_plan, but got {kind!r}")
    return fig


def render_figures(runs: Mapping[str, list[RunData]], out_dir: Path, title: str,
                   plan: Sequence[tuple[str, str, tuple | None]]) -> list[str]:
    """Draw and save (atomically) the figures of ``plan`` into ``out_dir``; their names."""
    for name, kind, spec in plan:
        _save(draw_figure(runs, title, kind, spec), Path(out_dir) / name)
    return [name for name, _, _ in plan]


def write_figures(runs: Mapping[str, list[RunData]], out_dir: Path, title: str, *,
                  jobs: int = 1) -> list[str]:
    """Write every figure of :func:`figure_plan` into ``out_dir``; returns their names.

    ``jobs`` > 1: drawn by that many worker processes (:func:`gnc.jobs.run_many`; drawing
    is single-threaded Python, 0.1–1 s a figure), a figure a task, the costliest first, each
    to the next free worker. The files are the same either way.

    Raises:
        OSError: a figure could not be drawn or written (with ``jobs`` > 1 the others are
            written first).
    """
    plan = figure_plan(runs)
    if jobs <= 1 or len(plan) < 2:
        return render_figures(runs, out_dir, title, plan)
    from gnc.jobs import REPORT_PRELOAD, prestart, run_many

    prestart(REPORT_PRELOAD)  # where no fork server runs yet: one that imports only this
    lean = _without_margins(runs)
    order = sorted(plan, key=lambda item: -_cost(runs, item[1]))  # stable: plan order in ties
    tasks = [(name, render_figures, (runs if kind in ("grid", "margins") else lean, out_dir,
                                     title, [(name, kind, spec)]))
             for name, kind, spec in order]
    failed = [o for o in run_many(tasks, jobs=min(jobs, len(tasks)), mode="processes")
              if not o.ok]
    if failed:
        raise OSError(f"drawing the report's figure {failed[0].name} failed: "
                      f"{failed[0].error}")
    return [name for name, _, _ in plan]


# --------------------------------------------------------------------------- report


def describe_machine() -> str:
    """Platform, CPU count, Python and torch versions, and the CUDA device if there is one."""
    import torch

    parts = [platform.platform(), f"{os.cpu_count()} CPUs", f"Python {platform.python_version()}",
             f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"CUDA device: {torch.cuda.get_device_name(0)}")
    return ", ".join(parts)


IMBALANCE_NOTE = (
    "Note: the training split is imbalanced (`imbalance` < 1). The metrics centre the class "
    "means by μ_G, the mean over the samples (the released code's): on an imbalanced split "
    "`nc2_h`, `nc3`, `h_equinorm` and the cosine margins stay away from their collapsed "
    "values even at perfect collapse (see gnc/metrics.py).")
LABEL_NOISE_NOTE = (
    "Note: some training labels were re-drawn at random (`label_noise` > 0). The train "
    "split's top-1, loss and NC metrics use the labels the runs trained on, noisy ones "
    "included; the test split's labels are clean.")


def _default_title(root: Path, runs: Mapping[str, list[RunData]]) -> str:
    """The directory's name and what its first run trained (:func:`describe_config`), so a
    report written without a preset still names its data, perturbations and settings."""
    name = f"Experiment report: {root.resolve().name}"
    config = _all_runs(runs)[0].config
    if not is_train_config(config):  # e.g. `gnc measure`'s, or none: nothing to describe
        return name
    try:
        return f"{name}: {describe_config(config)}"
    except (TypeError, ValueError):  # a value TrainConfig refuses (edited by hand)
        return name


def _eval_stats(run: RunData) -> tuple[str, str] | None:
    """``(kind, protocol)`` of the run's numbers (:data:`EVAL_STATS_WORDS`): a trained run's
    from its metrics rows (rows written before ``eval_stats`` existed were evaluated with the
    running averages), a ``gnc measure`` directory's from its config; None when neither says."""
    measure = run.config.get("measure")
    if isinstance(measure, dict):
        value = measure.get("eval_stats")
        return ("measure", str(value)) if value is not None else None
    if not is_train_config(run.config):
        return None
    values = {str(row.get("eval_stats", "running")) for row in run.metrics}
    if not values:
        return None
    return ("train", values.pop()) if len(values) == 1 else ("train", "mixed")


def _config_lines(runs: Mapping[str, list[RunData]]) -> list[str]:
    config = _all_runs(runs)[0].config
    rows = [[key, f"`{json.dumps(config[key])}`"] for key in CONFIG_KEYS if key in config]
    if config.get("batch_size") == 0:
        rows = [[k, v + " (full batch)" if k == "batch_size" else v] for k, v in rows]
    lines = ["## Setup", "", "Run config shared by the methods (from the first run's "
             "`config.json`):", "", Table(["setting", "value"], rows).markdown(), ""]
    ignore = {"method", "seed", "progress"}
    keys = sorted({k for run in _all_runs(runs) for k in run.config} - ignore)
    differ = [k for k in keys
              if len({json.dumps(run.config.get(k), sort_keys=True) for run in _all_runs(runs)})
              > 1]
    protocols = sorted({p for p in map(_eval_stats, _all_runs(runs)) if p is not None})
    if protocols:
        lines += ["Evaluation protocol: " + "; ".join(EVAL_STATS_WORDS.get(p, f"`{p[1]}`")
                                                      for p in protocols)
                  + (" — the runs differ in it" if len(protocols) > 1 else "") + ".", ""]
    lines.append("Config keys that differ between runs (besides method and seed): "
                 + (", ".join(f"`{k}`" for k in differ) if differ else "none") + ".")
    if any(_num(run.config.get("imbalance", 1.0)) < 1.0 for run in _all_runs(runs)):
        lines += ["", IMBALANCE_NOTE]
    if any(_num(run.config.get("label_noise", 0.0)) > 0.0 for run in _all_runs(runs)):
        lines += ["", LABEL_NOISE_NOTE]
    mixed = [k for k in TASK_KEYS if k in differ]
    if mixed:  # e.g. a run of another experiment copied in: its numbers enter the medians
        warning = (f"these runs differ in {', '.join(mixed)}: the medians below mix "
                   "different tasks")
        logger.warning("report: %s", warning)
        lines += ["", f"**Warning: {warning}.**"]
    return lines + [""]


def overrides(runs: Mapping[str, list[RunData]], preset_config: Mapping) -> list[str]:
    """``key=value`` for every setting where the runs differ from ``preset_config``.

    Values that differ between runs are joined by ``/``; method, seed,
    :data:`gnc.config.RUNTIME_KEYS` (where and how a run ran) and
    :data:`gnc.config.OUTPUT_KEYS` (files besides the results) are ignored.
    """
    out = []
    for key in sorted(preset_config):
        if key in ("method", "seed") or key in RUNTIME_KEYS | OUTPUT_KEYS:  # not the results
            continue
        want = json.dumps(preset_config[key], sort_keys=True)
        got = sorted({json.dumps(run.config.get(key), sort_keys=True)
                      for run in _all_runs(runs) if key in run.config})
        if got and got != [want]:
            out.append(f"{key}={'/'.join(got)}")
    return out


def make_report(exp_dir: str | Path, *, title: str | None = None,
                table_epochs: tuple[int, int] | None = None, command: str | None = None,
                machine: str | None = None, out_dir: str | Path | None = None,
                notes: str | None = None, preset_config: Mapping | None = None,
                jobs: int = 1, unfinished: bool = False) -> Path:
    """Write ``report.md``, its PNG figures and ``summary.csv`` / ``summary.json`` (into
    ``out_dir``, default ``exp_dir``); returns the report's path.

    Args:
        exp_dir: experiment directory with runs at ``<method>/seed<k>/``.
        title: the report's title (default: the experiment's own report's, recorded in
            ``EXP/report.json`` by :func:`run_experiment`'s report, else from the directory
            name and the first run's config). A title given (a preset's) comes with its own
            ``table_epochs``, ``notes`` and ``preset_config``; without one, these three too
            default to the recorded ones.
        table_epochs: the two epochs of the top-1 train accuracy table (default: the first
            evaluated epoch at or above 10% of training, and the last).
        command: the command that produced the runs (default: the one the experiment's own
            report recorded, else "not recorded").
        machine: where the runs ran (default: the one the experiment's own report recorded,
            else :func:`describe_machine` of this machine).
        out_dir: where to write the report and figures (default: ``exp_dir``), e.g.
            ``docs/results/<preset>`` to keep the report without the checkpoints.
        notes: a paragraph under the header (e.g. where the preset's values come from).
        preset_config: the full config of the preset the ``title`` describes: settings where
            the runs differ from it are appended to the title (figures and report), as in
            ``"(overridden: epochs=500)"``, so the title never describes runs not made.
        jobs: worker processes that draw the figures (:func:`write_figures`).
        unfinished: include the runs without ``DONE`` at the epochs they evaluated (e.g. an
            experiment stopped at a deadline); the report lists them with their last epoch.

    Raises:
        FileNotFoundError: ``exp_dir`` does not exist.
        ValueError: it holds no finished run (``unfinished``: no run with a metrics row),
            ``out_dir`` is not a directory, or ``jobs`` < 1.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Expected `jobs` >= 1, but got {jobs}")
    root = Path(exp_dir)
    out = Path(out_dir) if out_dir is not None else root
    if out.exists() and not out.is_dir():
        raise ValueError(f"Expected the report's output {out} to be a directory, but it is a file")
    # one report of an experiment at a time (its own, a `gnc report` run beside it): the
    # later waits, then reads the runs as the earlier left them. The lock is the experiment
    # folder's: an --out such as docs/results/<preset> gets no .lock file. Reported elsewhere,
    # the experiment is only read: a read-only one (archived, shared) is reported too
    check_table_epochs(table_epochs)
    reader = out.resolve() != root.resolve()
    with run_lock(root, create=False, wait=True, reader=reader):
        runs, skipped = scan_runs(root, unfinished=unfinished)  # errors: before out is made
        # what is not given, as the experiment's own report had it (gnc report EXP redraws
        # it); a title given (a preset) brings its own notes, table epochs and config
        given = {"title": title, "table_epochs": table_epochs, "notes": notes,
                 "preset_config": preset_config, "command": command, "machine": machine}
        kept = read_report_meta(root)
        settings = {k: v if v is not None or (title is not None and k in PRESET_FIELDS)
                    else kept.get(k) for k, v in given.items()}
        out.mkdir(parents=True, exist_ok=True)
        return _write_report(root, out, runs, skipped, jobs=jobs, **settings)


REPORT_META = "report.json"  # what a report was made with (read_report_meta)
PRESET_FIELDS = ("title", "table_epochs", "notes", "preset_config")  # what a preset gives


def check_table_epochs(table_epochs: object) -> None:
    """``ValueError`` unless ``table_epochs`` is None or two epochs (ints >= 1)."""
    if table_epochs is None:
        return
    if not (isinstance(table_epochs, (tuple, list)) and len(table_epochs) == 2 and all(
            isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in table_epochs)):
        raise ValueError(f"Expected the table's epochs to be two epochs >= 1, but got "
                         f"{table_epochs!r}")


def read_report_meta(root: Path) -> dict:
    """What the experiment's own report recorded in ``REPORT_META`` (its title before the
    overrides, command, machine, notes, table epochs and preset config), so that ``gnc
    report EXP`` without them redraws the same report; {} when there is none. The file may
    come from someone else: a value of the wrong type is left out."""
    path = root / REPORT_META
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:  # a FIFO would block the read
            return {}
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    kept = {k: meta[k] for k in ("title", "command", "machine", "notes")
            if isinstance(meta.get(k), str)}
    try:
        check_table_epochs(meta.get("table_epochs"))
        if meta.get("table_epochs") is not None:
            kept["table_epochs"] = tuple(meta["table_epochs"])
    except ValueError:
        pass
    if isinstance(meta.get("preset_config"), dict):
        kept["preset_config"] = meta["preset_config"]
    return kept


def _write_report(root: Path, out: Path, runs: dict[str, list[RunData]], skipped: list[str],
                  *, title: str | None, table_epochs: tuple[int, int] | None,
                  command: str | None, machine: str | None, notes: str | None,
                  preset_config: Mapping | None, jobs: int) -> Path:
    """:func:`make_report`'s writing, with the folder locked and the runs scanned."""
    given_machine, machine = machine, machine or (
        describe_machine() + " (the machine that wrote this report)")
    changed = overrides(runs, preset_config) if preset_config is not None else []
    heading = (title or _default_title(root, runs)) + (
        f" (overridden: {', '.join(changed)})" if changed else "")
    stopped = [r for r in _all_runs(runs) if r.stopped is not None]
    if stopped:  # --until-epoch is a runtime key: no override, but the report's subject
        epochs = sorted({r.stopped for r in stopped})
        heading += f" (stopped after epoch {', '.join(map(str, epochs))})"
    figures = write_figures(runs, out, heading, jobs=jobs)
    write_summary(runs, out)
    singles = [n for n in figures[2:] if n != "etf_distances.png"]
    etf = ["## Distance to the nearest simplex ETF", "",
           "The released code's ETF-distance study, on the train split at every evaluation: "
           "the distance of W/‖W‖ and of H̄/‖H̄‖ to their nearest simplex ETFs, between the "
           "two ETFs, and how far each ETF moved since the previous evaluation (Frobenius "
           "norms; the released code reports their squares).", "",
           "![ETF distances](etf_distances.png)", ""] if "etf_distances.png" in figures else []
    seeds = ", ".join(f"{display_name(m)} {len(rs)} ({', '.join(str(r.seed) for r in rs)})"
                      for m, rs in runs.items())
    partial = [f"{r.method}/seed{r.seed}: last evaluated epoch {r.metrics[-1]['epoch']}"
               for r in _all_runs(runs) if not r.finished]
    stops: dict[str, list[str]] = {}
    for r in stopped:
        stops.setdefault(f"epoch {r.stopped} of {r.config.get('epochs', '?')}", []).append(
            f"{r.method}/seed{r.seed}")
    until = [f"{when}: " + ("every run" if len(names) == len(_all_runs(runs))
                            else ", ".join(names)) for when, names in stops.items()]
    ended = all(r.ended for r in _all_runs(runs))
    lines = [
        f"# {heading}", "",
        "Command:", "", "```", command or f"not recorded (this report: gnc report {root}; "
        "each run's settings are in its config.json)", "```", "",
        f"Machine: {machine}",
        "",
        f"{'Finished seeds' if ended else 'Seeds'} per method: {seeds}.",
        "",
        *(["**Runs stopped by `--until-epoch`**, to be continued (the same command without "
           "it, or with a later one): their last columns, final metrics and margins are at "
           "the epoch they stopped after, not at the end of their schedule.", "",
           *(f"- {line}" for line in until), ""] if until else []),
        *(["**Unfinished runs are included** (`--unfinished`), at the epochs they reached: "
           "a method's curves use the epochs all its seeds evaluated, the top-1 table the epochs "
           "every run evaluated, the final metrics each run's last evaluation.", "",
           *(f"- {line}" for line in partial), ""] if partial else []),
        *([notes, ""] if notes else []),
        *_config_lines(runs),
        "## Curves", "",
        "Median over seeds (line) and min–max range over seeds (band).", "",
        f"![curves]({figures[0]})", "",
        "Single figures: " + ", ".join(f"[{n}]({n})" for n in singles) + ".", "",
        "## Sorted cosine margins at the end of training (PCM at EoT)" if ended else
        "## Sorted cosine margins at each run's last evaluation (not the end of training)",
        "",
        "Per-sample train cosine margins, sorted, against the sample rank normalised to "
        "[0, 1]: median over seeds and min–max band.", "",
        f"![cosine margins]({figures[1]})", "",
        *etf,
        "## Top-1 train accuracy (%)", "",
        "Median [min, max] over seeds (the paper's Table 1 form), then mean ± std (ddof 1). "
        "Every metric per method and evaluated epoch: [summary.csv](summary.csv), "
        "[summary.json](summary.json).", "",
        accuracy_table(runs, table_epochs).markdown(), "",
        "## Final metrics", "",
        "At the last evaluation; median [min, max] (mean ± std) over seeds.", "",
        final_metrics_table(runs).markdown(), "",
        "## Time per training step and peak memory", "",
        timing_table(runs).markdown(), "",
    ]
    if skipped:
        lines += ["## Skipped runs", "", *(f"- {s}" for s in skipped), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_text(out / REPORT_META, strict_json(
        {"title": title, "command": command, "machine": given_machine, "notes": notes,
         "table_epochs": list(table_epochs) if table_epochs else None,
         "preset_config": dict(preset_config) if preset_config is not None else None},
        indent=1) + "\n")
    logger.info("wrote %s", path)
    return path
