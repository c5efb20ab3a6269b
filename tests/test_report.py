import json
import math

import numpy as np
import pytest

from gnc.report import (
    accuracy_table,
    format_summary,
    load_runs,
    make_report,
    scan_runs,
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
    v = [x for x in values if not math.isnan(x)]
    return f"{np.median(v):{spec}} [{min(v):{spec}}, {max(v):{spec}}]"


def at(rows, epoch, key):
    return [next(r for r in run if r["epoch"] == epoch)[key] for run in rows]


def test_summarise_and_format():
    assert summarise([3.0, 1.0, 2.0, math.nan]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(x) for x in summarise([math.nan]))
    assert all(math.isnan(x) for x in summarise([]))
    assert format_summary([1.0, 4.0, 2.0], ".1f") == "2.0 [1.0, 4.0]"
    assert format_summary([math.nan, math.nan]) == "n/a"


def test_load_runs_skips_unfinished(exp):
    root, _ = exp
    runs, skipped = scan_runs(root)
    assert list(runs) == ["standard", "implicit"]
    assert [r.seed for r in runs["implicit"]] == [1, 2, 3]
    assert skipped == ["implicit/seed4: unfinished (no DONE file)"]
    run = load_runs(root)["standard"][0]
    assert run.config["method"] == "standard" and [r["epoch"] for r in run.metrics] == [*EPOCHS]
    assert run.margins.shape == (50,)


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
