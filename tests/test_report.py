import json
import math

import numpy as np
import pytest

from gnc.report import (
    accuracy_table,
    format_seed_stats,
    format_summary,
    load_runs,
    make_report,
    read_report_meta,
    scan_runs,
    seed_statistics,
    summarise,
)

EPOCHS = (1, 3, 5, 8, 10)
SEEDS = (1, 2, 3)
METHODS = ("standard", "implicit")
CURVE_KEYS = ("train_loss", "avg_cos_margin", "nc1", "nc3", "wh_equinorm", "train_top1",
              "test_top1")
METRIC_KEYS = ("train_loss", "train_top1", "top1", "top5", "nc1", "nc2", "nc2_h", "nc3",
               "nc4_bias", "ncc_mismatch", "w_equinorm", "h_equinorm", "wh_equinorm",
               "avg_cos_margin", "time_forward_ms", "time_backward_ms", "time_forward_ms_median",
               "time_backward_ms_median", "peak_mem_mb", "elapsed_s")
CONFIG = {"dataset": "mnist1d", "model": "mlp", "epochs": 10, "batch_size": 100,
          "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "tau": 5.0}


def _row(rng: np.random.Generator, epoch: int, test: bool) -> dict:
    row = {"epoch": epoch, "step": 10 * epoch}
    row.update({k: float(rng.uniform(0.01, 100.0)) for k in METRIC_KEYS})
    row["cos_margins"] = np.sort(rng.uniform(-1, 1, 101)).tolist()
    if test:
        row.update({"test_" + k: float(rng.uniform(0.01, 100.0))
                    for k in ("top1", "top5", "nc1", "nc3", "avg_cos_margin")})
    return row


def write_run(path, method, seed, rng, *, epochs=EPOCHS, done=True, test=True, nan_keys=()):
    """A fake run directory; returns its metrics rows."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, "method": method, "seed": seed}))
    rows = [_row(rng, e, test) for e in epochs]
    for key, epoch in nan_keys:
        next(r for r in rows if r["epoch"] == epoch)[key] = math.nan
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.save(path / "cos_margins.npy", np.sort(rng.uniform(-1, 1, 50)))
    if done:
        (path / "DONE").write_text("finished\n")
    return rows


@pytest.fixture
def exp(tmp_path):
    """2 methods × 3 finished seeds, plus an unfinished implicit/seed4; returns (dir, rows)."""
    rng = np.random.default_rng(0)
    rows = {m: [write_run(tmp_path / m / f"seed{s}", m, s, rng) for s in SEEDS] for m in METHODS}
    write_run(tmp_path / "implicit" / "seed4", "implicit", 4, rng, epochs=(1, 3), done=False)
    return tmp_path, rows


def expected(values, spec=".2f") -> str:
    """A table cell: median [min, max] (mean ± std with ddof 1) over the non-NaN values."""
    v = [x for x in values if not math.isnan(x)]
    std = f"{np.std(v, ddof=1):{spec}}" if len(v) > 1 else "n/a"
    return f"{np.median(v):{spec}} [{min(v):{spec}}, {max(v):{spec}}] ({np.mean(v):{spec}} ± {std})"


def at(rows, epoch, key):
    return [next(r for r in run if r["epoch"] == epoch)[key] for run in rows]


def test_summarise_and_format():
    assert summarise([3.0, 1.0, 2.0, math.nan]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(x) for x in summarise([math.nan]))
    assert all(math.isnan(x) for x in summarise([]))
    assert format_summary([1.0, 4.0, 2.0], ".1f") == "2.0 [1.0, 4.0]"
    assert format_summary([math.nan, math.nan]) == "n/a"


def test_seed_statistics_and_format():
    stats = seed_statistics([1.0, 4.0, 2.0, math.nan])
    assert stats == pytest.approx({"n": 3, "mean": 7 / 3, "std": float(np.std([1, 4, 2], ddof=1)),
                                   "median": 2.0, "min": 1.0, "max": 4.0})
    assert format_seed_stats([1.0, 4.0, 2.0], ".1f") == "2.0 [1.0, 4.0] (2.3 ± 1.5)"
    assert format_seed_stats([3.0, math.nan], ".1f") == "3.0 [3.0, 3.0] (3.0 ± n/a)"
    assert format_seed_stats((v for v in [1.0, 4.0, 2.0]), ".1f") == "2.0 [1.0, 4.0] (2.3 ± 1.5)"
    assert format_seed_stats([math.nan]) == "n/a"
    one = seed_statistics([5.0])
    assert one["n"] == 1 and one["mean"] == 5.0 and math.isnan(one["std"])
    assert seed_statistics([])["n"] == 0


def test_summary_csv_and_json_hold_every_metric_per_method_and_epoch(exp):
    import csv

    root, rows = exp
    make_report(root, machine="m")
    records = list(csv.DictReader((root / "summary.csv").open()))
    assert list(records[0]) == ["method", "epoch", "metric", "n", "mean", "std", "median",
                                "min", "max"]
    metrics = set(METRIC_KEYS) | {"test_" + k for k in ("top1", "top5", "nc1", "nc3",
                                                         "avg_cos_margin")}
    assert len(records) == len(METHODS) * len(EPOCHS) * len(metrics)
    assert {r["metric"] for r in records} == metrics  # no epoch/step/cos_margins
    summary = json.loads((root / "summary.json").read_text())
    assert list(summary) == ["standard", "implicit"]
    for m in METHODS:
        for epoch in EPOCHS:
            for key in ("nc1", "train_top1", "test_nc3"):
                v = at(rows[m], epoch, key)
                got = summary[m][str(epoch)][key]
                assert got == pytest.approx({"n": 3, "mean": np.mean(v),
                                             "std": np.std(v, ddof=1), "median": np.median(v),
                                             "min": min(v), "max": max(v)}, rel=1e-12)
                rec = next(r for r in records
                           if (r["method"], r["epoch"], r["metric"]) == (m, str(epoch), key))
                assert float(rec["std"]) == pytest.approx(np.std(v, ddof=1), rel=1e-12)
    assert "[summary.csv](summary.csv)" in (root / "report.md").read_text()


def test_summary_counts_seeds_per_epoch_and_nan(tmp_path):
    rng = np.random.default_rng(3)
    write_run(tmp_path / "fixed" / "seed1", "fixed", 1, rng, nan_keys=[("nc1", 3)])
    write_run(tmp_path / "fixed" / "seed2", "fixed", 2, rng, epochs=(1, 3))
    make_report(tmp_path, machine="m")
    summary = json.loads((tmp_path / "summary.json").read_text())["fixed"]
    assert summary["3"]["nc1"]["n"] == 1 and summary["3"]["nc1"]["std"] is None
    assert summary["10"]["top1"]["n"] == 1 and summary["1"]["top1"]["n"] == 2
    assert "NaN" not in (tmp_path / "summary.json").read_text()


def test_summary_of_infinite_and_huge_metrics_is_null_not_an_error(tmp_path):
    """An Inf metric (a diverged statistic) and two finite 1.5e308 ones whose mean overflows:
    null in summary.json (JSON has no Infinity), the report written whole."""
    rng = np.random.default_rng(5)
    for seed in (1, 2):
        path = tmp_path / "fixed" / f"seed{seed}"
        rows = write_run(path, "fixed", seed, rng)
        rows[0]["nc1"] = math.inf if seed == 1 else 1.5e308
        rows[-1]["nc1"] = 1.5e308
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_report(tmp_path, machine="m")
    assert (tmp_path / "report.md").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())["fixed"]
    last = str(max(int(e) for e in summary))
    assert summary[last]["nc1"]["mean"] is None and summary[last]["nc1"]["max"] == 1.5e308
    assert summary["1"]["nc1"]["n"] == 1  # Inf is not a finite value: one seed counted


def test_etf_distances_vci_and_numerical_rank_are_plotted(tmp_path):
    rng = np.random.default_rng(4)
    keys = ("etf_w_dist", "etf_h_dist", "etf_wh_dist", "etf_w_moved", "etf_h_moved", "vci",
            "numerical_rank")
    for m in METHODS:
        for s in (1, 2):
            path = tmp_path / m / f"seed{s}"
            rows = write_run(path, m, s, rng)
            for row in rows:
                row.update({k: float(rng.uniform(0.01, 1.0)) for k in keys})
            rows[0]["etf_w_moved"] = rows[0]["etf_h_moved"] = math.nan  # no previous ETF
            (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = make_report(tmp_path, machine="m").read_text()
    for name in ["etf_distances.png", *(f"curve_{k}.png" for k in keys)]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
    assert "## Distance to the nearest simplex ETF" in text
    assert "![ETF distances](etf_distances.png)" in text
    header = next(line for line in text.splitlines() if line.startswith("| Method | train top-1"))
    assert "VCI" in header and "numerical rank" in header and "ETF_W − ETF_H" in header


def test_load_runs_skips_unfinished(exp):
    root, _ = exp
    runs, skipped = scan_runs(root)
    assert list(runs) == ["standard", "implicit"]
    assert [r.seed for r in runs["implicit"]] == [1, 2, 3]
    assert skipped == ["implicit/seed4: unfinished (no DONE file)"]
    run = load_runs(root)["standard"][0]
    assert run.config["method"] == "standard" and [r["epoch"] for r in run.metrics] == [*EPOCHS]
    assert run.margins.shape == (50,)


def test_unfinished_runs_are_included_at_the_epochs_they_reached(exp):
    root, rows = exp  # implicit/seed4 has no DONE and evaluated epochs 1 and 3
    runs, skipped = scan_runs(root, unfinished=True)
    assert skipped == [] and [r.seed for r in runs["implicit"]] == [1, 2, 3, 4]
    assert [r.finished for r in runs["implicit"]] == [True, True, True, False]
    text = make_report(root, machine="m", unfinished=True).read_text()
    assert "Seeds per method: Standard 3 (1, 2, 3), Implicit ETF 4 (1, 2, 3, 4)." in text
    assert "- implicit/seed4: last evaluated epoch 3" in text
    assert "## Skipped runs" not in text
    # the top-1 table holds only the epochs every run evaluated: by default 1 and 3
    seed4 = [json.loads(line) for line in
             (root / "implicit" / "seed4" / "metrics.jsonl").read_text().splitlines()]
    cell = expected(at(rows["implicit"], 3, "train_top1") + at([seed4], 3, "train_top1"))
    assert f"| Implicit ETF | {expected(at(rows['implicit'] + [seed4], 1, 'train_top1'))} | " \
           f"{cell} |" in text
    assert "| Method | epoch 1 | epoch 3 |" in text
    table = accuracy_table(scan_runs(root, unfinished=True)[0], (1, 10))
    assert table.header == ["Method", "epoch 1", "epoch 3"]
    assert any("epoch 10 was not evaluated" in n for n in table.notes)
    # without the flag the same directory reports the finished runs only, as before
    text = make_report(root, machine="m").read_text()
    assert "Finished seeds per method: Standard 3 (1, 2, 3), Implicit ETF 3 (1, 2, 3)." in text
    assert "- implicit/seed4: unfinished (no DONE file)" in text


def test_unfinished_runs_without_rows_are_skipped_and_none_at_all_is_one_error(tmp_path):
    rng = np.random.default_rng(2)
    write_run(tmp_path / "standard" / "seed1", "standard", 1, rng, epochs=(), done=False)
    with pytest.raises(ValueError, match="no run with evaluated epochs under"):
        scan_runs(tmp_path, unfinished=True)
    write_run(tmp_path / "standard" / "seed2", "standard", 2, rng, epochs=(1,), done=False)
    runs, skipped = scan_runs(tmp_path, unfinished=True)
    assert [r.seed for r in runs["standard"]] == [2]
    assert skipped == ["standard/seed1: unfinished, but metrics.jsonl is missing or empty"]


def test_report_files_and_sections(exp):
    root, _ = exp
    path = make_report(root, title="Test experiment", command="gnc experiment x --out y",
                       machine="test machine")
    assert path == root / "report.md"
    names = ["curves.png", "cos_margins.png"] + [f"curve_{k}.png" for k in CURVE_KEYS]
    for name in names:
        data = (root / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    text = path.read_text()
    for part in ["# Test experiment", "```\ngnc experiment x --out y\n```", "Machine: test machine",
                 "## Setup", "## Curves", "![curves](curves.png)", "## Sorted cosine margins",
                 "![cosine margins](cos_margins.png)", "## Top-1 train accuracy (%)",
                 "## Final metrics", "## Time per training step and peak memory",
                 "## Skipped runs", "implicit/seed4: unfinished", "Standard 3 (1, 2, 3)",
                 "| dataset | `\"mnist1d\"` |", "| weight_decay | `0.0005` |",
                 "differ between runs (besides method and seed): none"]:
        assert part in text, part
    assert "Fixed ETF" not in text
    assert "imbalanced" not in text


def test_a_report_of_imbalanced_runs_says_what_the_metrics_measure(exp):
    """μ_G is the sample mean: on an imbalanced split some metrics cannot reach their
    collapsed values, and the report says so."""
    root, _ = exp
    for config in root.glob("*/seed*/config.json"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "imbalance": 0.1}))
    text = make_report(root, machine="test machine").read_text()
    assert "the training split is imbalanced (`imbalance` < 1)" in text


def test_a_report_without_a_preset_names_what_the_runs_trained(exp):
    """`gnc report` of a preset-less experiment had the title "Experiment report: NAME" and a
    setup table without the perturbations: nothing said the labels were noisy."""
    root, _ = exp
    for config in root.glob("*/seed*/config.json"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "imbalance": 0.5,
                                      "label_noise": 0.3, "loss": "dr", "bias": False}))
    text = make_report(root, machine="test machine").read_text()
    title = text.splitlines()[0]
    assert title.startswith(f"# Experiment report: {root.name}: mnist1d")
    assert "long tail R=0.5" in title and "label noise 0.3" in title
    assert "| label_noise | `0.3` |" in text and "| imbalance | `0.5` |" in text
    assert "| loss | `\"dr\"` |" in text and "| bias | `false` |" in text
    assert "dr loss" in title and "no bias" in title
    assert "labels the runs trained on, noisy ones included" in text
    for config in root.glob("*/seed*/config.json"):  # not a `gnc train` config: the name only
        config.write_text(json.dumps({**json.loads(config.read_text()), "measure": {}}))
    assert make_report(root, machine="m").read_text().splitlines()[0] == (
        f"# Experiment report: {root.name}")
    for config in root.glob("*/seed*/config.json"):  # none at all: no title made of defaults
        config.unlink()
    assert make_report(root, machine="m").read_text().splitlines()[0] == (
        f"# Experiment report: {root.name}")


def test_runs_that_differ_in_their_perturbation_are_different_tasks(exp):
    """A clean run pooled with long-tailed ones entered the medians without the warning that
    a different dataset gets."""
    root, _ = exp
    config = next(root.glob("standard/seed1/config.json"))
    config.write_text(json.dumps({**json.loads(config.read_text()), "label_noise": 0.2}))
    text = make_report(root, machine="m").read_text()
    assert "**Warning: these runs differ in label_noise: the medians below mix" in text


def test_the_report_names_the_evaluation_protocol(exp):
    """DESIGN §5: the paper's protocol (running averages) stays selectable "and the report
    says which one produced it"; no report said it. The metrics rows say it (rows from before
    `eval_stats` existed were evaluated with the running averages)."""
    root, _ = exp
    text = make_report(root, machine="m").read_text()
    assert "Evaluation protocol: BatchNorm's and the heads' running averages as" in text

    def set_rows(stats_of):
        for i, path in enumerate(sorted(root.glob("*/seed*/metrics.jsonl"))):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text("".join(json.dumps({**r, "eval_stats": stats_of(i)}) + "\n"
                                    for r in rows))

    set_rows(lambda i: "precise")
    text = make_report(root, machine="m").read_text()
    assert "Evaluation protocol: BatchNorm statistics recomputed over augmented training" in text
    set_rows(lambda i: "running" if i else "precise")
    text = make_report(root, machine="m").read_text()
    assert "as training left them (`running`) — the runs differ in it." in text
    for config in root.glob("*/seed*/config.json"):  # `gnc measure` directories
        config.write_text(json.dumps({"method": "measured", "measure": {"eval_stats": "precise"}}))
    text = make_report(root, machine="m").read_text()
    assert "BatchNorm statistics recomputed over the measured data, un-augmented, first" in text


def test_table_values(exp):
    root, rows = exp
    text = make_report(root, machine="m").read_text()
    # default epochs: the first evaluated at >= 10% of 10 epochs (1) and the last (10)
    assert "| Method | epoch 1 | epoch 10 |" in text
    for m, name in [("standard", "Standard"), ("implicit", "Implicit ETF")]:
        r = rows[m]
        first, last = expected(at(r, 1, "train_top1")), expected(at(r, 10, "train_top1"))
        assert f"| {name} | {first} | {last} |" in text
        final = [expected(at(r, 10, "train_top1")), expected(at(r, 10, "test_top1")),
                 expected(at(r, 10, "nc1"), ".3g"), expected(at(r, 10, "nc3"), ".3g"),
                 expected(at(r, 10, "wh_equinorm"), ".3g"),
                 expected(at(r, 10, "avg_cos_margin"), ".4f")]
        assert f"| {name} | " + " | ".join(final) + " |" in text
        flat = [row for run in r for row in run]
        fwd = np.mean([row["time_forward_ms"] for row in flat])
        fwd_med = np.median([row["time_forward_ms_median"] for row in flat])
        tot = np.mean([row["time_forward_ms"] + row["time_backward_ms"] for row in flat])
        peak = [max(row["peak_mem_mb"] for row in run) for run in r]
        assert f"| {name} | {fwd:.3f} | {fwd_med:.3f} | " in text
        assert f" | {tot:.3f} | " in text
        assert f" | {expected(peak, '.1f')} |" in text


def test_accuracy_table_nearest_epoch(exp):
    root, rows = exp
    table = accuracy_table(load_runs(root), (7, 10))
    assert table.header == ["Method", "epoch 8", "epoch 10"]
    assert table.rows[0] == ["Standard", expected(at(rows["standard"], 8, "train_top1")),
                             expected(at(rows["standard"], 10, "train_top1"))]
    assert any("epoch 7 was not evaluated" in n and "8" in n for n in table.notes)
    assert "Note: epoch 7 was not evaluated" in table.markdown()
    # two wanted epochs whose nearest evaluation is the same: one column, not two alike
    assert accuracy_table(load_runs(root), (7, 8)).header == ["Method", "epoch 8"]


def test_nan_values_and_no_test_split(tmp_path):
    rng = np.random.default_rng(1)
    nan = [("train_top1", 10), ("nc1", 5), ("time_forward_ms", 3), ("peak_mem_mb", 10)]
    rows = [write_run(tmp_path / "fixed" / f"seed{s}", "fixed", s, rng, test=False,
                      nan_keys=nan if s == 1 else [("avg_cos_margin", 10)] if s == 2 else [])
            for s in SEEDS]
    (tmp_path / "fixed" / "seed3" / "cos_margins.npy").unlink()  # falls back to the quantiles
    text = make_report(tmp_path, machine="m").read_text()
    assert not (tmp_path / "curve_test_top1.png").exists()
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "test top-1" not in text and "## Skipped runs" not in text
    assert f"| {expected(at(rows, 10, 'train_top1'))} |" in text  # NaN seed left out
    assert " nan" not in text and "[nan" not in text


def test_all_nan_column_is_na(tmp_path):
    rng = np.random.default_rng(2)
    for s in (1, 2):
        write_run(tmp_path / "standard" / f"seed{s}", "standard", s, rng,
                  nan_keys=[("nc3", e) for e in EPOCHS])
    text = make_report(tmp_path, machine="m").read_text()
    assert "n/a" in text and (tmp_path / "curve_nc3.png").exists()


def test_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="experiment directory not found: .*nope"):
        make_report(missing)
    write_run(tmp_path / "implicit" / "seed1", "implicit", 1, np.random.default_rng(0),
              done=False)
    with pytest.raises(ValueError, match=f"no finished runs under {tmp_path}"):
        load_runs(tmp_path)


def test_bad_metrics_lines_are_skipped_with_file_and_line(exp, caplog):
    root, rows = exp
    path = root / "standard" / "seed1" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1:1] = ['{"top1": 3.0}', "[1, 2, 3]", '{"epoch": "two"}', "{not json"]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="gnc.rundir"):
        runs = load_runs(root)
    assert [r["epoch"] for r in runs["standard"][0].metrics] == list(EPOCHS)
    messages = [r.getMessage() for r in caplog.records]
    for line_no, what in ((2, "no integer `epoch`"), (3, "not a JSON object"),
                          (4, "no integer `epoch`"), (5, "not JSON")):
        assert any(m.startswith(f"{path}:{line_no}: {what}") for m in messages), line_no


def test_unreadable_run_files_do_not_break_the_report(exp):
    root, _ = exp
    (root / "standard" / "seed2" / "config.json").write_text("[1, 2]")
    (root / "standard" / "seed3" / "cos_margins.npy").write_text("garbage")
    row = json.loads((root / "implicit" / "seed1" / "metrics.jsonl").read_text()
                     .splitlines()[-1])
    row["nc1"], row["cos_margins"] = "high", ["a"]
    (root / "implicit" / "seed1" / "cos_margins.npy").unlink()  # margins from that row
    with open(root / "implicit" / "seed1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    text = make_report(root, machine="m").read_text()
    assert "standard/seed2: finished, but config.json is not a JSON object" in text


def test_out_that_is_a_file_is_one_clear_error(exp, tmp_path_factory):
    root, _ = exp
    target = tmp_path_factory.mktemp("elsewhere") / "report.txt"
    target.write_text("x")
    with pytest.raises(ValueError, match=r"output .*report\.txt to be a directory, but it is a "
                                         "file"):
        make_report(root, out_dir=target)


def test_title_names_the_settings_that_override_the_preset(exp):
    root, _ = exp
    preset = {**CONFIG, "epochs": 2000, "device": "cuda", "method": "fixed", "seed": 9}
    text = make_report(root, machine="m", title="p: 2000 iterations",
                       preset_config=preset).read_text()
    assert text.splitlines()[0] == "# p: 2000 iterations (overridden: epochs=10)"
    same = make_report(root, machine="m", title="p", preset_config=CONFIG).read_text()
    assert same.splitlines()[0] == "# p"


def test_figures_draw_each_method_median_line_and_band(exp, monkeypatch):
    """The figures' content, not only their files: per method one line in its colour through
    the median over seeds, one min–max band, and the colours in the rendered pixels."""
    from pathlib import Path

    from matplotlib import colors
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    from gnc.report import COLOURS, display_name

    root, rows = exp
    figures, real_savefig = {}, Figure.savefig

    def capture(self, fname, *args, **kwargs):  # written as .NAME.<pid>.<hex>.tmp, renamed
        figures[Path(fname).name.split(".", 1)[1].rsplit(".", 3)[0]] = self
        return real_savefig(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    make_report(root, machine="m")
    assert set(figures) == {"curves.png", "cos_margins.png",
                            *(f"curve_{k}.png" for k in CURVE_KEYS)}
    labels = {m: f"{display_name(m)} (n={len(SEEDS)})" for m in METHODS}

    def lines_and_bands(ax):
        lines = {line.get_label(): line for line in ax.get_lines()
                 if not line.get_label().startswith("_")}
        assert set(lines) == set(labels.values()), ax.get_title()
        bands = {}
        for c in ax.collections:
            bands.setdefault(colors.to_hex(c.get_facecolor()[0], keep_alpha=False), []).append(c)
        for m in METHODS:
            assert colors.to_hex(lines[labels[m]].get_color()) == COLOURS[m]
            assert len(bands.get(COLOURS[m], [])) == 1, (ax.get_title(), m)
        return {m: lines[labels[m]] for m in METHODS}, {m: bands[COLOURS[m]][0] for m in METHODS}

    for key in CURVE_KEYS:
        (ax,) = figures[f"curve_{key}.png"].axes
        lines, bands = lines_and_bands(ax)
        for m in METHODS:
            values = np.array([at(rows[m], e, key) for e in EPOCHS])  # epochs × seeds
            np.testing.assert_array_equal(lines[m].get_xdata(), EPOCHS)
            np.testing.assert_allclose(lines[m].get_ydata(), np.median(values, axis=1),
                                       rtol=1e-12)
            y = np.concatenate([p.vertices[:, 1] for p in bands[m].get_paths()])
            assert y.min() == pytest.approx(values.min()) and y.max() == pytest.approx(values.max())

    (ax,) = figures["cos_margins.png"].axes
    lines, _ = lines_and_bands(ax)
    for m in METHODS:
        margins = [np.load(root / m / f"seed{s}" / "cos_margins.npy") for s in SEEDS]
        y = np.asarray(lines[m].get_ydata())
        assert np.all(np.diff(y) >= 0)  # sorted margins
        assert y[0] == pytest.approx(np.median([v.min() for v in margins]))
        assert y[-1] == pytest.approx(np.median([v.max() for v in margins]))

    grid = [ax for ax in figures["curves.png"].axes if ax.get_visible()]
    assert len(grid) == len(CURVE_KEYS) + 1  # every curve and the margins
    for ax in grid:
        lines_and_bands(ax)

    for name in figures:
        pixels = imread(root / name)[..., :3]
        assert (pixels < 0.9).any(axis=-1).mean() > 0.01, name  # not a blank canvas
        for m in METHODS:
            rgb = np.array(colors.to_rgb(COLOURS[m]))
            # the legend's sample alone is < 100 pixels of the colour; the lines are more
            assert (np.abs(pixels - rgb).max(axis=-1) < 0.02).sum() > 400, (name, m)


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_figures_drawn_by_worker_processes_are_the_same_files(exp, tmp_path_factory):
    """--jobs 2 shares the figures out to two processes: the same files, byte for byte,
    the same report, and nothing else in the folder (no temporary file left)."""
    root, _ = exp
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    make_report(root, machine="m", out_dir=one)
    make_report(root, machine="m", out_dir=two, jobs=2)
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    assert {"report.md", "report.json", "summary.csv", "summary.json", "curves.png",
            "cos_margins.png", *(f"curve_{k}.png" for k in CURVE_KEYS)} == set(a)
    assert all(a[name] == b[name] for name in a), [n for n in a if a[n] != b[n]]


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_figure_that_cannot_be_written_is_one_error_and_the_rest_is_kept(exp, jobs):
    """A figure whose name is taken by a folder: the error names it; every other figure is
    written (jobs > 1) and no temporary file is left behind."""
    root, _ = exp
    (root / "curve_nc1.png").mkdir()
    with pytest.raises(OSError, match="curve_nc1.png"):
        make_report(root, machine="m", jobs=jobs)
    assert not list(root.glob(".*.tmp"))
    if jobs > 1:
        assert all((root / f"curve_{k}.png").is_file() for k in CURVE_KEYS if k != "nc1")


def test_a_failed_write_keeps_the_previous_file(exp, monkeypatch):
    """Figures, tables and report.md are written atomically: a write that fails part-way
    leaves the previous file as it was."""
    from matplotlib.figure import Figure

    root, _ = exp
    make_report(root, machine="m")
    before = _files(root)

    def torn(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", torn)
    with pytest.raises(OSError):
        make_report(root, machine="m")
    assert _files(root) == before


def test_jobs_must_be_positive(exp):
    root, _ = exp
    for jobs in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="jobs"):
            make_report(root, machine="m", jobs=jobs)


# ------------------------------------------------------------- run files from someone else

BIG = 10**400  # JSON integers have no size limit; float() of this overflows


def _two_seeds(tmp_path, spoil) -> None:
    rng = np.random.default_rng(7)
    for seed in (1, 2):
        path = tmp_path / "fixed" / f"seed{seed}"
        rows = write_run(path, "fixed", seed, rng)
        spoil(path, rows, seed)


def _rewrite(path, rows, *extra_lines) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows) + "".join(ln + "\n" for ln in extra_lines)
    (path / "metrics.jsonl").write_text(text)


def _big_metric(path, rows, seed):
    rows[-1]["nc1"] = BIG if seed == 1 else -BIG
    rows[0]["cos_margins"][3] = BIG
    (path / "cos_margins.npy").unlink()  # the margins come from the row's list
    _rewrite(path, rows)


def _big_config_epochs(path, rows, seed):
    (path / "config.json").write_text(json.dumps({**CONFIG, "method": "fixed", "seed": seed,
                                                  "epochs": BIG}))


def _long_and_out_of_range_lines(path, rows, seed):
    _rewrite(path, rows, '{"epoch": 3, "nc1": ' + "9" * 4400 + "}",
             json.dumps({"epoch": BIG, "nc1": 1.0}), json.dumps({"epoch": 2**60, "nc1": 1.0}))


def _extreme_floats(path, rows, seed):
    rows[-1].update(train_top1=1.7e308, nc1=-1.7e308, train_loss=1.7e308)
    _rewrite(path, rows)


def _epochs_only(path, rows, seed):
    _rewrite(path, [{"epoch": r["epoch"]} for r in rows])
    (path / "config.json").unlink()
    (path / "cos_margins.npy").unlink()  # no curve at all: a legend of no entries failed


def _forged_margins_header(path, rows, seed):
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    with open(path / "cos_margins.npy", "wb") as f:  # 8 TB declared, a few bytes held
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)


@pytest.mark.parametrize("spoil", [_big_metric, _big_config_epochs, _long_and_out_of_range_lines,
                                   _extreme_floats, _epochs_only, _forged_margins_header])
def test_damaged_or_extreme_run_files_still_give_a_report(tmp_path, spoil):
    """Integers beyond float's range, lines over Python's 4300-digit limit, epochs beyond
    2**53, ±1.7e308 (matplotlib's ticks overflow), rows with no metric, an .npy header that
    declares 8 TB: each was a traceback or a failed report; now the value or line is left
    out (a warning names the line) and the report is written whole."""
    _two_seeds(tmp_path, spoil)
    path = make_report(tmp_path, machine="m")
    assert path.exists() and (tmp_path / "summary.json").exists()
    assert (tmp_path / "curves.png").exists()
    json.loads((tmp_path / "summary.json").read_text())  # strict JSON


def test_lines_beyond_the_limits_are_skipped_with_their_line(tmp_path, caplog):
    from gnc.rundir import read_metrics

    rng = np.random.default_rng(8)
    path = tmp_path / "run"
    rows = write_run(path, "fixed", 1, rng)
    _long_and_out_of_range_lines(path, rows, 1)
    assert [r["epoch"] for r in read_metrics(path / "metrics.jsonl")] == list(EPOCHS)
    n = len(EPOCHS)
    assert f"metrics.jsonl:{n + 1}: not JSON (Exceeds the limit" in caplog.text
    assert f"metrics.jsonl:{n + 2}: no integer `epoch` in [0, 2**53]" in caplog.text
    assert f"metrics.jsonl:{n + 3}: no integer `epoch`" in caplog.text


def test_runs_of_different_tasks_are_reported_with_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(9)
    for seed in (1, 2):
        write_run(tmp_path / "fixed" / f"seed{seed}", "fixed", seed, rng)
    other = tmp_path / "fixed" / "seed2" / "config.json"
    other.write_text(json.dumps({**CONFIG, "dataset": "digits", "method": "fixed", "seed": 2}))
    text = make_report(tmp_path, machine="m").read_text()
    assert "**Warning: these runs differ in dataset: the medians below mix" in text
    assert "these runs differ in dataset" in caplog.text
    rng = np.random.default_rng(9)
    write_run(tmp_path / "same" / "standard" / "seed1", "standard", 1, rng)
    assert "Warning" not in make_report(tmp_path / "same", machine="m").read_text()


def test_a_report_waits_for_another_writer_of_its_folder(exp, tmp_path, caplog):
    """`gnc report` beside an experiment writing its own report into the same folder: the
    last writer won, whatever it had read (a partial report left after the experiment's
    final one). One writer at a time now: the later waits, then reads the runs."""
    import subprocess
    import sys
    import textwrap
    import time

    root, _ = exp
    holder = textwrap.dedent(f"""
        import sys, time
        from gnc.rundir import run_lock
        with run_lock({str(root)!r}):
            print("held", flush=True)
            time.sleep(2.0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    make_report(root, machine="m")
    assert time.monotonic() - t0 > 1.0  # it waited for the holder
    assert proc.wait(timeout=30) == 0
    assert "in use by another gnc process" in caplog.text and "waiting for it" in caplog.text
    assert (root / "report.md").exists()


def test_runs_stopped_by_until_epoch_are_reported_as_stopped(exp):
    """`--until-epoch 8` of a 20-epoch experiment (Table 1's epoch-50 column): the report
    said "Finished seeds" and "margins at the end of training", and its title did not say
    where the runs stopped."""
    root, _ = exp
    for done in root.glob("*/seed*/DONE"):
        done.write_text("stopped after epoch 8\n")
    text = make_report(root, machine="m").read_text()
    assert text.splitlines()[0].endswith("(stopped after epoch 8)")
    assert "Seeds per method" in text and "Finished seeds" not in text
    assert "**Runs stopped by `--until-epoch`**" in text and "- epoch 8 of 10: every run" in text
    assert "## Sorted cosine margins at each run's last evaluation (not the end" in text
    for done in root.glob("*/seed*/DONE"):  # continued to the end
        done.write_text("finished\n")
    text = make_report(root, machine="m").read_text()
    assert "(stopped after" not in text.splitlines()[0] and "Finished seeds per method" in text
    assert "## Sorted cosine margins at the end of training (PCM at EoT)" in text


def test_gnc_report_redraws_the_experiments_own_report(exp, tmp_path_factory):
    """`gnc report EXP` after the experiment dropped its title (the preset and overrides),
    notes, table epochs, machine and command (it said `gnc report EXP` had made the runs).
    The report records them in report.json; a redraw without them uses them; a title given
    (another preset) brings its own notes and table epochs."""
    root, _ = exp
    preset_config = {**CONFIG, "epochs": 20}
    made = make_report(root, title="mine: my settings", table_epochs=(3, 10),
                       command="gnc experiment mine --seeds 3", machine="a GPU box",
                       notes="Preset notes: mine.", preset_config=preset_config).read_text()
    assert made.splitlines()[0] == "# mine: my settings (overridden: epochs=10)"
    assert "gnc experiment mine --seeds 3" in made and "Machine: a GPU box" in made
    assert make_report(root).read_text() == made
    elsewhere = tmp_path_factory.mktemp("docs")
    assert make_report(root, out_dir=elsewhere).read_text() == made  # read from EXP
    other = make_report(root, title="other: preset").read_text()
    assert other.splitlines()[0] == "# other: preset" and "Preset notes: mine." not in other
    assert "gnc experiment mine --seeds 3" in other  # the runs' command is still theirs
    for bad in ("[1, 2]", '{"title": 5, "table_epochs": [-3, 5], "command": ["x"]}', "{"):
        (root / "report.json").write_text(bad)  # from someone else: no title, no command
        assert read_report_meta(root) == {}
    text = make_report(root).read_text()
    assert text.splitlines()[0].startswith("# Experiment report: ")
    assert "not recorded (this report: gnc report " in text
    with pytest.raises(ValueError, match=r"two epochs >= 1, but got \(-3, 5\)"):
        make_report(root, table_epochs=(-3, 5))
    # this machine's description is not recorded as the runs' machine: another machine's
    # redraw names itself
    assert "the machine that wrote this report" in make_report(root).read_text()
    assert json.loads((root / "report.json").read_text())["machine"] is None


def test_epoch_axes_tick_whole_epochs(tmp_path):
    """A short run's curves were ticked at epochs 2.25, 2.50, ..."""
    from matplotlib.figure import Figure

    from gnc.report import CURVES, _plot_curve

    rng = np.random.default_rng(0)
    for s in (1, 2):
        write_run(tmp_path / "standard" / f"seed{s}", "standard", s, rng, epochs=(2, 3, 4))
    runs, _ = scan_runs(tmp_path)
    ax = Figure().add_subplot()
    _plot_curve(ax, runs, next(c for c in CURVES if c[0] == "nc1"))
    ticks = [t for t in ax.get_xticks() if 2 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
