import json
import random

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def resume_fuzz():
    return load_benchmark("resume_fuzz")


def test_a_tiny_digits_config_passes_every_check(resume_fuzz, tmp_path):
    # Random.Random(25): SIGINT at once after the first checkpoint, one --resume to the end,
    # no extra --resume of the finished run: the shortest path through the three checks.
    flags = ["--preset", "digits", "--epochs", "3", "--method", "implicit"]
    outcome = resume_fuzz.check_flags(flags, tmp_path, random.Random(25))
    assert outcome.status == "passed", outcome
    assert outcome.log[0].startswith("start: SIGINT after 0.000 s")
    assert any(entry.startswith("until [2]") for entry in outcome.log), outcome.log


def test_a_run_that_differs_in_one_value_is_a_mismatch(resume_fuzz, tmp_path):
    row = {"epoch": 3, "nc1": 0.125, "time_forward_ms": 1.0, "elapsed_s": 2.0}
    for name, nc1, elapsed in (("a", 0.125, 2.0), ("b", 0.125, 9.0), ("c", 0.12500001, 2.0)):
        (tmp_path / name).mkdir()
        text = json.dumps({**row, "nc1": nc1, "elapsed_s": elapsed, "time_forward_ms": elapsed})
        (tmp_path / name / "metrics.jsonl").write_text(text + "\n")
    assert resume_fuzz.compare_runs(tmp_path / "a", tmp_path / "b") == []  # timings ignored
    problems = resume_fuzz.compare_runs(tmp_path / "a", tmp_path / "c")
    assert len(problems) == 1 and "nc1" in problems[0]
