"""Stage 1's glue in benchmarks/gpu_throughput.py (the GPU check): what a kill, a hang or a
short budget leaves behind, on the CPU with stand-ins for the parts."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import load_benchmark

BENCH = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def g():
    """benchmarks/gpu_throughput.py as a module of its own (not test_bench's)."""
    return load_benchmark("gpu_throughput", "gpu_throughput_glue")


CAPTURED_FASTER = {f"{m}/{v}": {"epoch_s": t} for m in ("standard", "fixed", "implicit")
                   for v, t in (("eager", 3.0), ("captured", 2.0))}


def _stand_ins(g, monkeypatch, in_flight):
    """Every part of stage 1 replaced: the captured step faster, one streams N at 5 img/s,
    ``in_flight`` for the process part."""
    monkeypatch.setattr(g, "step_variants", lambda *a: CAPTURED_FASTER)
    monkeypatch.setattr(g, "eval_seconds", lambda *a: {"full": 1.0, "precise_bn_20": 0.5})
    monkeypatch.setattr(g, "sync_free", lambda *a: {"standard": "ok"})

    def streams_sweep(ns, *a, done, **kw):
        for n in ns:
            done({"runs": n, "img_per_s": 5.0, "ms_per_step": 2.0, "not_captured": []})

    monkeypatch.setattr(g, "streams_sweep", streams_sweep)
    monkeypatch.setattr(g, "in_flight", in_flight)
    monkeypatch.setattr(g, "grouped_conv", lambda *a, **kw: {"4x8": {}})


def test_best_is_chosen_before_every_save_and_a_sigterm_mid_jobs_keeps_it(g, tmp_path,
                                                                         monkeypatch):
    """N = 1 processes beat the streams; SIGTERM (stage 1's time limit) arrives during
    N = 2: the file's last version has the processes' choice, not the streams-only one of
    before the jobs part, and says how stage 1 ended; every version written has the
    ``best`` of what it holds. The handler is the caller's again afterwards."""
    def in_flight(n, *a, **kw):
        assert kw["timeout_s"] > 0  # the deadline passed down
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` sends it
            time.sleep(5)  # the handler raises before this ends
            raise AssertionError("SIGTERM did not end stage 1")
        return {"runs": n, "img_per_s": 8.0, "wall_s": 1.0, "errors": []}

    _stand_ins(g, monkeypatch, in_flight)
    saved, write = [], g.write_atomic

    def recording(path, text):
        saved.append(json.loads(text))
        write(path, text)

    monkeypatch.setattr(g, "write_atomic", recording)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "t.json"
    with pytest.raises(SystemExit) as stop:
        g.main([str(out), "--device", "cpu", "--jobs", "1,2", "--budget-s", "1e9"])
    assert stop.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert len(saved) >= 7  # after each part, each streams N and each jobs N, and the end
    for version in saved:
        assert version["best"] == g.choose(version)
    streams_only = [v for v in saved if "jobs" not in v and v.get("streams")]
    assert streams_only[-1]["best"]["jobs_mode"] == "streams"
    result = json.loads(out.read_text())
    assert result == saved[-1] and result["stopped"] == "SIGTERM (stage 1's time limit)"
    assert result["jobs"] == [{"runs": 1, "img_per_s": 8.0, "wall_s": 1.0, "errors": []}]
    assert result["best"]["jobs_mode"] == "processes" and result["best"]["jobs"] == 1
    assert result["best"]["streams_win"] is False and "elapsed_s" in result


def test_a_sigterm_whose_exit_was_swallowed_ends_stage1_at_the_next_check(g, tmp_path,
                                                                          monkeypatch):
    """The handler can run where Python only prints the exception (an at-fork hook: seen
    when the signal lands as a DataLoader forks): the next part does not start, and the file
    says why stage 1 ended."""
    def steps(*a):
        with contextlib.suppress(SystemExit):  # as an at-fork hook swallows it
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return CAPTURED_FASTER

    def never(*a, **kw):
        raise AssertionError("a part started after SIGTERM")

    _stand_ins(g, monkeypatch, never)
    monkeypatch.setattr(g, "step_variants", steps)
    monkeypatch.setattr(g, "eval_seconds", never)
    out = tmp_path / "t.json"
    with pytest.raises(SystemExit) as stop:
        g.main([str(out), "--device", "cpu", "--jobs", "1,2", "--budget-s", "1e9"])
    assert stop.value.code == 143 and g._terminated == []  # cleared for the next caller
    result = json.loads(out.read_text())
    assert result["steps"] == CAPTURED_FASTER and "eval_s" not in result
    assert result["stopped"] == "SIGTERM (stage 1's time limit)"
    assert result["best"] == g.choose(result) and result["best"]["captured_step"] is True


def test_only_the_first_sigterm_exits(g):
    """``timeout`` signals its child, then the child's group (the child again): the second
    must not interrupt the clean-up the first one started."""
    with g.sigterm_as_exit():
        with pytest.raises(SystemExit):
            g._exit_on_sigterm(signal.SIGTERM, None)
        g._exit_on_sigterm(signal.SIGTERM, None)  # in a finally block: returns
        with pytest.raises(SystemExit):  # but the next check between measurements exits
            g.exit_if_terminated()
    g.exit_if_terminated()  # cleared for the next caller


def test_a_stage1_that_ends_by_itself_says_nothing_stopped(g, tmp_path, monkeypatch):
    _stand_ins(g, monkeypatch, lambda n, *a, **kw: {"runs": n, "img_per_s": 4.0 * n,
                                                    "wall_s": 1.0, "errors": []})
    out = tmp_path / "t.json"
    g.main([str(out), "--device", "cpu", "--jobs", "1,2", "--budget-s", "1e9"])
    result = json.loads(out.read_text())
    assert "stopped" not in result and result["grouped_conv"] == {"4x8": {}}
    assert result["mps"] == "unavailable"  # a CPU
    assert result["best"] == g.choose(result)
    assert (result["best"]["jobs"], result["best"]["jobs_mode"]) == (2, "processes")
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary file left


def test_the_deadline_defaults_to_the_budget_plus_20_s(g, tmp_path, monkeypatch):
    """The process parts get what is left until the deadline (gpu_check.sh passes its kill
    time less 10 s); by default the budget + 20 s."""
    clock, asked = [100.0], []

    def in_flight(n, *a, timeout_s, **kw):
        asked.append(timeout_s)
        clock[0] += 30.0
        return {"runs": n, "img_per_s": 1.0, "wall_s": 30.0, "errors": []}

    _stand_ins(g, monkeypatch, in_flight)
    monkeypatch.setattr(g, "_now", lambda: clock[0])
    out = str(tmp_path / "t.json")
    g.main([out, "--device", "cpu", "--jobs", "1,2", "--budget-s", "50"])
    assert asked == [70.0, 40.0]
    asked.clear()
    clock[0] = 100.0
    g.main([out, "--device", "cpu", "--jobs", "1,2", "--budget-s", "50", "--deadline-s", "45"])
    assert asked == [45.0, 15.0]


def test_in_flight_kills_benches_past_its_deadline_and_says_timeout(g, monkeypatch):
    """Two benches that never end (stuck starting CUDA, say): after ``timeout_s`` both are
    killed and the N is recorded as a timeout, instead of waiting for stage 1's kill."""
    real_popen, started = subprocess.Popen, []

    def sleeping(cmd, **kw):
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                  **kw))
        return started[-1]

    monkeypatch.setattr(g.subprocess, "Popen", sleeping)
    t0 = time.monotonic()
    got = g.in_flight(2, "cpu", "none", [], timeout_s=0.5)
    assert 0.5 <= time.monotonic() - t0 < 20
    assert isinstance(got, str) and got.startswith(f"{g.TIMEOUT}: 2 processes killed after")
    assert len(started) == 2 and all(p.poll() == -signal.SIGKILL for p in started)
    assert g.in_flight(2, "cpu", "none", [], timeout_s=0) == f"{g.TIMEOUT}: the deadline had passed"
    assert len(started) == 2  # none started


def test_in_flight_interrupted_kills_its_benches(g, monkeypatch):
    """SIGTERM turned into SystemExit (or Ctrl-C) while the benches run: none outlives it."""
    real_popen, started = subprocess.Popen, []

    def sleeping(cmd, **kw):
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                  **kw))
        return started[-1]

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(g.subprocess, "Popen", sleeping)
    monkeypatch.setattr(g, "wait_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        g.in_flight(2, "cpu", "none", [])
    assert len(started) == 2 and all(p.poll() is not None for p in started)


def test_write_atomic_leaves_the_old_file_when_the_write_fails(g, tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    g.write_atomic(path, '{"old": 1}')
    assert json.loads(path.read_text()) == {"old": 1}
    assert path.stat().st_mode & 0o777 == 0o644

    def fails(fd):
        raise OSError("disk full")

    monkeypatch.setattr(g.os, "fsync", fails)
    with pytest.raises(OSError, match="disk full"):
        g.write_atomic(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # the temporary file removed
    monkeypatch.undo()
    g.write_atomic(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2}


def test_mps_runs_only_on_cuda_after_the_jobs_and_with_a_minute_of_budget_left(g):
    result = {"jobs": [{"runs": 2, "img_per_s": 5.0}, {"runs": 4, "img_per_s": 9.0},
                       "timeout: 8 processes killed after 100 s"]}
    ran = []

    def run(n):
        ran.append(n)
        return {"runs": n, "img_per_s": 12.0}

    cuda = torch.device("cuda")  # only compared with, never used
    assert g.mps_part(result, cuda, 61.0, run) == {"runs": 4, "img_per_s": 12.0}
    assert ran == [4]  # the best N of the processes
    short = g.mps_part(result, cuda, 59.0, run)
    assert short == "skipped: budget (59 s left, the part needs 60 s)" and ran == [4]
    assert g.mps_part(result, torch.device("cpu"), 1e9, run) == "unavailable"
    assert g.mps_part({"jobs": ["skipped: budget"]}, cuda, 1e9, run) == "unavailable"
    assert ran == [4]


class _Daemon:
    env = {"CUDA_MPS_PIPE_DIRECTORY": "/nonexistent"}
    stopped = 0

    def stop(self):
        _Daemon.stopped += 1


def test_mps_in_flight_probes_briefly_and_always_stops_its_daemon(g, monkeypatch):
    import gnc.jobs

    asked = []

    def start_mps(*, probe, timeout_s):
        asked.append((probe, timeout_s))
        return _Daemon()

    def in_flight(n, device, data_dir, sets, env, *, timeout_s):
        assert env == _Daemon.env and 0 < timeout_s <= 100
        raise KeyboardInterrupt  # as SIGTERM's exit would

    monkeypatch.setattr(gnc.jobs, "start_mps", start_mps)
    monkeypatch.setattr(g, "in_flight", in_flight)
    with pytest.raises(KeyboardInterrupt):
        g.mps_in_flight(4, "cuda", "data", [], timeout_s=100)
    assert asked == [(True, g.MPS_PROBE_S)] and _Daemon.stopped == 1
    monkeypatch.setattr(gnc.jobs, "start_mps", lambda **kw: None)
    assert g.mps_in_flight(4, "cuda", "data", []) == "unavailable"


def _fake_trainer(graph):
    @contextlib.contextmanager
    def epoch_trainer(*a, **kw):
        trainer = SimpleNamespace(train_loader=None, step=5, step_graph=None)

        def train_epoch(bar):
            trainer.step_graph = graph

        trainer.train_epoch = train_epoch
        yield trainer, "note"

    return epoch_trainer


def test_sync_free_says_why_a_step_was_not_captured_and_replays_as_training_does(
        g, monkeypatch):
    """A failed capture: its reason, not the error of the eager step's first sync. A
    captured one: the replays run with the value checks off, as in the training loop."""
    import gnc.bench
    from gnc.validation import value_checks_enabled

    checks = []
    graph = SimpleNamespace(failed="RuntimeError: operation not permitted when stream is "
                            "capturing", capture=True, captures=0,
                            static=SimpleNamespace(begin_epoch=lambda loader, step: 12),
                            run=lambda mark: checks.append(value_checks_enabled()))
    monkeypatch.setattr(gnc.bench, "_epoch_trainer", _fake_trainer(graph))
    cpu = torch.device("cpu")
    assert g.sync_free(cpu, "data", {}) == {
        m: "not captured: RuntimeError: operation not permitted when stream is capturing"
        for m in g.METHODS}
    assert checks == []  # nothing replayed
    graph.failed = None
    assert set(g.sync_free(cpu, "data", {}).values()) == {
        "not captured: never captured (an epoch shorter than the warm-up)"}
    graph.captures = 1
    assert set(g.sync_free(cpu, "data", {}).values()) == {"ok"}
    assert checks == [False] * 30  # 10 replays per method, all trusted


FAKE_PY = """#!/bin/bash
# stands in for python3: records the stage-1 call, then sleeps (SIGTERM: recorded, exit 143)
[ "$1" = -c ] && exit 0  # gpu.txt's version line
echo "$*" >> "$REC"
trap 'echo TERM >> "$REC"; exit 143' TERM
sleep "${SLEEP:-0}" & wait
"""


def _stage1_sh(tmp_path: Path, **env: str) -> tuple[list[str], str]:
    """gpu_check.sh 1 with :data:`FAKE_PY`: (its records, the stage-1 log)."""
    tmp_path.mkdir(exist_ok=True)
    py = tmp_path / "py"
    py.write_text(FAKE_PY)
    py.chmod(0o755)
    rec, out = tmp_path / "rec", tmp_path / "out"
    (tmp_path / "data" / "cifar10-jpg" / "train").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PY": str(py), "REC": str(rec), "OUT": str(out),
           "RUNS": str(tmp_path / "runs"), "DATA": str(tmp_path / "data"), **env}
    subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "1"], cwd=BENCH.parent, env=env,
                   check=True, capture_output=True, timeout=60)
    return rec.read_text().splitlines(), (out / "log-stage1.txt").read_text()


def test_gpu_check_stops_at_once_without_the_images(tmp_path):
    """On a GPU without CIFAR-10 under DATA stage 1 would time random images and stage 2
    fail after its plan, the loan spent: the script stops before either, naming the file to
    carry."""
    py = tmp_path / "py"
    py.write_text(FAKE_PY)
    py.chmod(0o755)
    env = {**os.environ, "PY": str(py), "REC": str(tmp_path / "rec"), "OUT": str(tmp_path),
           "RUNS": str(tmp_path / "runs"), "DATA": str(tmp_path / "data")}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "all"], cwd=BENCH.parent,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and not (tmp_path / "rec").exists()
    assert "no CIFAR-10 under" in done.stderr and "cifar10-jpg.tar.gz" in done.stderr


def test_gpu_check_ties_stage1s_kill_to_its_budget(tmp_path):
    """The script's own deadline is 10 s before the kill, which is STAGE1_BUDGET + 30 s
    unless STAGE1_TIMEOUT says otherwise; the kill is SIGTERM first (the script then writes
    its file), and the log says so."""
    (call,), _ = _stage1_sh(tmp_path, STAGE1_BUDGET="150")
    assert "--budget-s 150 --deadline-s 170" in call
    (call,), _ = _stage1_sh(tmp_path / "default")
    assert "--budget-s 240 --deadline-s 260" in call


def test_gpu_check_stage1_gets_sigterm_at_its_time_limit(tmp_path):
    rec, log = _stage1_sh(tmp_path, STAGE1_TIMEOUT="1", SLEEP="30")
    assert "--deadline-s -9" in rec[0] and rec[1:] == ["TERM"]
    assert "throughput (stage 1): exit 124 (stopped at its time limit)" in log
