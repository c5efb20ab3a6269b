"""Stage 2 of the GPU check: the plan that fits Table 1's column into a loan
(benchmarks/table1_stage2.py) and the script's stage 2 on the CPU with tiny sizes."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_benchmark

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def stage2():
    return load_benchmark("table1_stage2")


def stage1(jobs: int = 4, captured: bool = True, mode: str = "processes") -> dict:
    """A stage-1 result shaped as benchmarks/gpu_throughput.py writes it."""
    steps = {}
    for m, epoch_s in (("standard", 1.0), ("fixed", 1.0), ("implicit", 1.5)):
        steps[f"{m}/captured"] = {"step_ms": 5.0 * epoch_s, "epoch_s": epoch_s}
        steps[f"{m}/eager"] = {"step_ms": 8.0 * epoch_s, "epoch_s": 1.6 * epoch_s}
    return {"card": "card X", "steps": steps, "eval_s": 0.5,
            "jobs": [{"runs": 1, "img_per_s": 50_000.0, "wall_s": 22.0},
                     {"runs": jobs, "img_per_s": 80_000.0, "wall_s": 30.0}],
            "best": {"captured_step": captured, "jobs": jobs, "jobs_mode": mode,
                     "img_per_s": 80_000.0}}


def test_eval_epochs_keep_table1s_epochs_below_the_last(stage2):
    assert stage2.eval_epochs(50) == [10, 25, 50]
    assert stage2.eval_epochs(31) == [10, 25, 31]
    assert stage2.eval_epochs(10) == [10]
    assert stage2.eval_epochs(3) == [3]
    assert stage2.eval_epochs(27, every=5) == [5, 10, 15, 20, 25, 27]
    assert stage2.eval_epochs(50, every=5) == list(range(5, 55, 5))


def test_makespan_of_one_slot_is_the_sum_and_of_enough_slots_the_longest_run(stage2):
    costs = stage2.run_seconds(stage1(jobs=1))  # one in flight: no slowdown
    assert costs == {"standard": (1.0, 0.5), "fixed": (1.0, 0.5), "implicit": (1.5, 0.5)}
    one = {m: 20.0 + 30 * e + 3 * v for m, (e, v) in costs.items()}  # 30 epochs, 3 evals
    assert stage2.makespan(costs, 30, 1, seeds=5) == pytest.approx(5 * sum(one.values()))
    assert stage2.makespan(costs, 30, 15, seeds=5) == pytest.approx(max(one.values()))
    # 4 slots, 15 runs queued seed-major with the implicit head first: by hand
    ends = [0.0] * 4
    for m in ["implicit", "standard", "fixed"] * 5:
        i = ends.index(min(ends))
        ends[i] += one[m]
    assert stage2.makespan(costs, 30, 4, seeds=5) == pytest.approx(max(ends))


def test_n_in_flight_slows_each_run_by_the_measured_ratio(stage2):
    costs = stage2.run_seconds(stage1(jobs=4))
    slowdown = 4 * 50_000 / 80_000  # 2.5: four runs give 1.6x the images/s of one
    assert costs["implicit"] == pytest.approx((1.5 * slowdown, 0.5 * slowdown))
    eager = stage2.run_seconds(stage1(jobs=4, captured=False))
    assert eager["standard"] == pytest.approx((1.6 * slowdown, 0.5 * slowdown))


def test_streams_add_up_starts_and_evaluations_on_the_one_host_thread(stage2):
    """--jobs-mode streams runs every run on one host thread: a start or an evaluation stalls
    them all. The plan adds those up (each evaluation at one run's eval_s, each start at the
    streams part's build_s) after the slots' training; the slot model alone, which spreads
    them over the slots, promised epoch 10 where the runs would end ~30 s past the deadline."""
    s1 = stage1(jobs=8, mode="streams")
    s1["eval_s"] = 5.0
    s1["streams"] = [{"runs": 1, "img_per_s": 50_000.0, "build_s": 3.0},
                     {"runs": 8, "img_per_s": 90_000.0, "build_s": 20.0}]
    s1["best"]["img_per_s"] = 90_000.0
    assert stage2.start_seconds(s1) == 3.0
    costs = stage2.run_seconds(s1)
    got = stage2.plan(s1, 285.0, seeds=5, until=50)
    until, n_evals = got["until"], len(got["eval_epochs"])
    training = stage2.makespan({m: (e, 0.0) for m, (e, _) in costs.items()}, until, 8, 5, 0.0)
    assert got["estimate_s"] == pytest.approx(training + 15 * (3.0 + n_evals * 5.0), abs=0.1)
    assert got["estimate_s"] <= 285.0
    slots = stage2.plan({**s1, "best": {**s1["best"], "jobs_mode": "processes"},
                         "jobs": s1["streams"]}, 285.0, seeds=5, until=50, start_s=3.0)
    assert slots["until"] > until  # what the slot model would have promised


def test_streams_slow_each_run_by_the_streams_ratio(stage2):
    """With --jobs-mode streams the slowdown of N in flight is the streams part's (N runs
    against one, both replaying in one process), not the processes'."""
    s1 = stage1(jobs=4, mode="streams")
    s1["streams"] = [{"runs": 1, "img_per_s": 64_000.0}, {"runs": 4, "img_per_s": 80_000.0}]
    costs = stage2.run_seconds(s1)
    assert costs["standard"] == pytest.approx((1.0 * 4 * 64_000 / 80_000, 0.5 * 3.2))
    del s1["streams"]  # no one-run measurement of streams: no estimate
    assert stage2.run_seconds(s1) is None


@pytest.mark.parametrize("seconds", [120.0, 300.0, 420.0, 540.0])
def test_plan_takes_the_last_epoch_that_fits(stage2, seconds):
    s1 = stage1()
    got = stage2.plan(s1, seconds)
    costs = stage2.run_seconds(s1)
    until, start = got["until"], 22.0 - 2 * 1.0  # the one-run bench less its two epochs
    assert got["jobs"] == 4 and got["jobs_mode"] == "processes" and got["captured_step"]
    assert got["start_s"] == start == stage2.start_seconds(s1)

    def last_fit(every):
        return max(e for e in range(1, 51)
                   if stage2.makespan(costs, e, 4, 5, start, every) <= seconds)

    sparse, dense = last_fit(0), last_fit(5)
    # evaluations every 5 epochs too when they keep at least 90% of the epochs: here always
    assert dense >= 0.9 * sparse and (until, got["eval_every"]) == (dense, 5)
    assert got["eval_epochs"] == stage2.eval_epochs(until, 5)
    assert got["estimate_s"] == round(stage2.makespan(costs, until, 4, 5, start, 5), 1)


def test_plan_keeps_table1s_evaluations_only_when_more_would_cost_epochs(stage2):
    s1 = stage1()
    s1["eval_s"] = 20.0  # an evaluation as dear as 20 epochs: curves would cost the column
    got = stage2.plan(s1, 420.0)
    costs, start = stage2.run_seconds(s1), got["start_s"]
    assert got["eval_every"] == 0 and got["eval_epochs"] == stage2.eval_epochs(got["until"])
    assert stage2.makespan(costs, got["until"], 4, 5, start) <= 420.0
    assert stage2.makespan(costs, got["until"] + 1, 4, 5, start) > 420.0


def test_plan_without_measurements_keeps_the_asked_epoch_and_the_defaults(stage2):
    for s1 in ({}, {"best": {"jobs": 0, "jobs_mode": "x", "captured_step": 1}},
               {"best": {"jobs": 2, "jobs_mode": "mps", "captured_step": True}}):
        got = stage2.plan(s1, 100.0, until=50)
        assert got["until"] == 50 and got["estimate_s"] is None
    assert stage2.settings({"best": {"jobs": 2, "jobs_mode": "mps", "captured_step": True}}) \
        == (2, "mps", True)
    assert stage2.settings({"best": {"jobs": 2, "jobs_mode": "streams",
                                     "captured_step": True}}) == (2, "streams", True)
    assert stage2.settings({"best": {"jobs": 2, "jobs_mode": "threads",
                                     "captured_step": True}}) == (4, "processes", False)
    assert stage2.start_seconds({}) == stage2.START_S
    fast = stage1()
    fast["jobs"][0]["wall_s"] = 2.5  # less than its two epochs would take: the floor
    assert stage2.start_seconds(fast) == stage2.MIN_START_S
    # nothing fits: epoch 1, said by its estimate
    got = stage2.plan(stage1(), 1.0)
    assert got["until"] == 1 and got["estimate_s"] > 1.0


def test_summary_reads_what_the_runs_reached_also_a_torn_line(stage2, tmp_path):
    for m, rows in (("standard", [(10, 20.0), (25, 50.0)]), ("implicit", [(10, 30.0)])):
        run = tmp_path / m / "seed1"
        run.mkdir(parents=True)
        text = "".join(json.dumps({"epoch": e, "elapsed_s": t}) + "\n" for e, t in rows)
        (run / "metrics.jsonl").write_text(text + '{"epoch": 3')  # killed mid-write
    planned = stage2.plan(stage1(), 300.0)
    out = stage2.summary(stage1(), tmp_path, 70.0, planned, card="ignored")
    assert out["card"] == "card X" and out["jobs"] == 4 and out["captured_step"]
    assert out["epoch_reached"] == {"implicit/seed1": 10, "standard/seed1": 25}
    assert out["s_per_epoch"] == {"implicit": 3.0, "standard": 2.0}
    assert out["experiment_img_per_s"] == pytest.approx(35 * 50_000 / 70.0)
    assert out["implicit_over_standard"] == pytest.approx(1.5)
    assert out["aggregate_img_per_s"] == 80_000.0 and out["plan"] == planned
    assert stage2.summary({}, tmp_path, 70.0, {}, card="gpu")["card"] == "gpu"


def _jpeg_tree(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")


def _stage2_env(tmp_path: Path, **extra: str) -> dict:
    _jpeg_tree(tmp_path / "data" / "cifar10-jpg", per_class=4)
    return {**os.environ, "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
            "DATA": str(tmp_path / "data"), "DEVICE": "cpu", "SEEDS": "1", "REPORT_JOBS": "1",
            "PY": sys.executable, "OMP_NUM_THREADS": "1",
            "EXTRA": "--width 4 --batch-size 10 --num-workers 0",
            "GNC_CACHE_DIR": str(tmp_path / "cache"), **extra}


def test_gpu_check_stage2_on_the_cpu(tmp_path):
    """Stage 2 of benchmarks/gpu_check.sh, a width-4 ResNet-18 on a 40-image CIFAR stand-in:
    the plan from a stage-1 result (the captured step, three runs in turn in one process:
    --jobs-mode streams), the experiment, the report of the runs and what comes back: at
    most 8 files, one archive with the report and the runs but no checkpoint."""
    s1 = tmp_path / "carried" / "throughput-stage1.json"
    s1.parent.mkdir()
    s1.write_text(json.dumps({"card": "cpu", "best": {"captured_step": True, "jobs": 3,
                                                      "jobs_mode": "streams"}}))
    out = tmp_path / "out"
    env = _stage2_env(tmp_path, UNTIL="2", STAGE1_JSON=str(s1))
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "2"], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=600)
    log = (out / "log-stage2.txt").read_text()
    assert f"stage 1 result: {s1}" in log
    assert "--until-epoch 2 --eval-epochs 2 --jobs 3 --jobs-mode streams --graph-step" in log
    assert "experiment: exit 0" in log and "report: exit 0" in log
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["gpu.txt", "log-stage2.txt", "table1.tar.gz", "throughput.json"]
    result = json.loads((out / "throughput.json").read_text())
    assert result["jobs"] == 3 and result["plan"]["until"] == 2
    assert result["epoch_reached"] == {f"{m}/seed1": 2 for m in ("fixed", "implicit",
                                                                   "standard")}
    with tarfile.open(out / "table1.tar.gz") as tar:
        names = tar.getnames()
        report = tar.extractfile("table1-report/report.md").read().decode()
    assert "table1-report/summary.json" in names and "table1/implicit/seed1/DONE" in names
    assert not [n for n in names if n.endswith(".pt") or "checkpoints" in n]
    assert "Seeds per method: Standard 1 (1), Fixed ETF 1 (1), Implicit ETF 1 (1)." in report
    assert report.splitlines()[0].endswith("(stopped after epoch 2)")  # of --epochs 200
    assert "- epoch 2 of 200: every run" in report


def test_gpu_check_stage2_stopped_at_its_deadline_still_returns_everything(tmp_path):
    """200 epochs cannot end in 6 s: the experiment gets SIGINT, and the report of what the
    runs reached (or its error, if none evaluated yet), throughput.json and the archive still
    come back."""
    env = _stage2_env(tmp_path, UNTIL="200", STAGE2_SECONDS="6")
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "2"], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=600)
    out = tmp_path / "out"
    log = (out / "log-stage2.txt").read_text()
    assert "stage 1 result: none (defaults)" in log
    assert "--until-epoch 200 --eval-epochs 10,25,50,200 --jobs 4" in log
    assert "experiment: exit 124 after" in log and "(deadline)" in log
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu.txt", "log-stage2.txt", "table1.tar.gz", "throughput.json"]
    reached = json.loads((out / "throughput.json").read_text())["epoch_reached"]
    assert all(e in (10, 25, 50) for e in reached.values())
    with tarfile.open(out / "table1.tar.gz") as tar:
        names = tar.getnames()
    assert not [n for n in names if "DONE" in n or n.endswith(".pt")]
    if reached:  # the runs that evaluated an epoch are in the report, as unfinished
        assert "table1-report/report.md" in names
