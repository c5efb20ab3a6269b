"""Every script under examples/ runs on tiny data, as a user would run it."""

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_example_is_tested():
    tested = {"implicit_etf_plain_loop.py", "measure_checkpoints.py", "compare_methods_npz.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_implicit_etf_in_a_plain_loop():
    out = run_example("implicit_etf_plain_loop.py", "--epochs", 10)
    assert "epoch  10" in out and "(head)" in out


def test_measure_the_checkpoints_of_a_run_trained_without_gnc(tmp_path):
    run_example("measure_checkpoints.py", "--out", tmp_path, "--epochs", 2)
    run = tmp_path / "exp" / "resnet18" / "seed1"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["classifier_layer"] == "fc" and r["eval_stats"] == "precise" for r in rows)
    assert (tmp_path / "exp" / "report.md").exists()


def test_three_methods_on_an_npz_file(tmp_path):
    out = run_example("compare_methods_npz.py", "--out", tmp_path, "--epochs", 2,
                      "--seeds", 1)
    assert "Implicit ETF" in out and "Fixed ETF" in out and "Standard" in out
    assert (tmp_path / "exp" / "report.md").exists()


def test_every_docstring_example_runs():
    """The docstrings' ``>>>`` examples, as a reader pastes them (``simplex_etf``'s compared
    float32 with float64 and raised)."""
    import doctest
    import importlib
    import pkgutil

    import gnc

    ran, failed = 0, []
    for info in pkgutil.walk_packages(gnc.__path__, "gnc."):
        module = importlib.import_module(info.name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
        ran += result.attempted
        if result.failed:
            failed.append(info.name)
    assert not failed and ran >= 10, (failed, ran)
