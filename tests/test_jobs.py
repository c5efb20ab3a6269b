"""``gnc experiment --jobs N`` (gnc.jobs): runs in worker processes, each as if alone."""

import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import gnc.jobs as jobs
from gnc.experiments import run_dir, run_experiment
from gnc.jobs import launch, run_many, threads_per_job
from tests.conftest import stop_after_first_checkpoint

METHODS = ["standard", "implicit"]
# tiny UFM runs of ~0.5 s, long enough to be killed half-way
SETTINGS = {"epochs": 150, "eval_every": 50, "checkpoint_every": 10, "feature_dim": 8,
            "dataset_options": {"num_classes": 3, "per_class": 4}}
FLAGS = ["ufm10", "--seeds", "2", "--methods", ",".join(METHODS), "--epochs", "150",
         "--eval-every", "50", "--checkpoint-every", "10", "--feature-dim", "8",
         "--dataset-options", json.dumps(SETTINGS["dataset_options"]), "--no-progress",
         "--no-report", "--jobs", "2"]
TIMING = ("time_", "elapsed_s", "peak_mem_mb")


def untimed(path: Path) -> list[dict]:
    """A run's metrics rows without the fields that measure time or memory."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def results(out: Path) -> dict:
    return {(m, s): untimed(run_dir(out, m, s)) for m in METHODS for s in (1, 2)}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> dict:
    """The experiment one run after the other in this process, with the thread count each
    run of ``--jobs 2`` gets."""
    out = tmp_path_factory.mktemp("sequential")
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_job(2))
    try:
        run_experiment("ufm10", out, seeds=2, methods=METHODS, report=False,
                       overrides={**SETTINGS, "progress": False})
    finally:
        torch.set_num_threads(threads)
    return results(out)


class CountingBar:
    """A stand-in for tqdm: records the total and the updates."""

    made: list = []

    def __init__(self, total, initial=0, **kw):
        self.total, self.n = total, initial
        CountingBar.made.append(self)

    def update(self, n=1):
        self.n += n

    def close(self):
        pass


def test_jobs_equal_the_sequential_runs(tmp_path, sequential, monkeypatch):
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", CountingBar)
    out = tmp_path / "exp"
    dirs = run_experiment("ufm10", out, seeds=2, methods=METHODS, report=False, jobs=2,
                          overrides={**SETTINGS, "progress": True})
    assert all((d / "DONE").exists() for d in dirs)
    got = results(out)
    assert got == sequential  # bitwise: every metric but the timing fields
    assert all(len(rows) == 3 for rows in got.values())
    # one bar for all the runs, in epochs, fed by the workers
    (bar,) = CountingBar.made
    assert bar.total == bar.n == 4 * SETTINGS["epochs"]


def test_runs_are_queued_seed_major_with_the_implicit_head_first(tmp_path, monkeypatch):
    """A queue cut short (a deadline, a kill) lacks whole seeds rather than a whole method,
    and the slowest runs start first in each seed."""
    import gnc.experiments as experiments

    queued = []

    def fake_run_many(tasks, **_):
        queued.extend(name for name, _, _ in tasks)
        return [jobs.Outcome(name) for name, _, _ in tasks]

    monkeypatch.setattr(experiments, "run_many", fake_run_many)
    monkeypatch.setattr(experiments, "prestart", lambda *_: None)
    done = run_dir(tmp_path, "fixed", 1)
    done.mkdir(parents=True)
    (done / "DONE").write_text("finished\n")
    (done / "config.json").write_text(json.dumps(experiments.resolved_config(
        experiments.get_preset("ufm10"), **SETTINGS, method="fixed", seed=1,
        progress=False, graph_head=False)))
    run_experiment("ufm10", tmp_path, seeds=2, methods=["standard", "fixed", "implicit"],
                   report=False, jobs=2, overrides={**SETTINGS, "progress": False})
    assert queued == ["implicit/seed1", "standard/seed1",
                      "implicit/seed2", "standard/seed2", "fixed/seed2"]


def test_killed_experiment_resumes_every_run(tmp_path, sequential):
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "gnc", "experiment", *FLAGS, "--out", str(out)]
    stop_after_first_checkpoint(cmd, out, tmp_path / "stderr")  # the parent and its workers
    done = [d for d in out.glob("*/seed*") if (d / "DONE").exists()]
    assert len(done) < 4  # killed half-way
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert results(out) == sequential


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_does_not_stop_the_others(tmp_path, caplog, jobs):
    """lr 1e6: the unnormalised features blow up, the normalised ones do not. ``jobs=1``
    (the default) stopped at the first failure: the runs after it never trained."""
    out = tmp_path / "exp"
    with pytest.raises(ValueError, match=r"^1 of 2 runs failed: standard-unnormalized/seed1 "
                       ) as err:
        run_experiment("ufm10", out, seeds=1, methods=["standard-unnormalized", "standard"],
                       jobs=jobs, overrides={"epochs": 4, "eval_every": 2, "lr": 1e6,
                                          "progress": False, "feature_dim": 8,
                                          "dataset_options": {"num_classes": 3,
                                                              "per_class": 4}})
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[1].startswith(
        "  standard-unnormalized/seed1: FloatingPointError: training diverged")
    # the CLI shows the first line alone: whole, and true
    assert lines[0].endswith("the others finished); the same command again retries them")
    assert (run_dir(out, "standard", 1) / "DONE").exists()
    assert not (run_dir(out, "standard-unnormalized", 1) / "DONE").exists()
    assert not (out / "report.md").exists()
    # reported as it happened, in one line
    assert any("standard-unnormalized/seed1 failed: FloatingPointError" in r.getMessage()
               for r in caplog.records)


def test_runs_whose_data_loader_has_worker_processes(tmp_path):
    """A run's DataLoader starts processes of its own (--num-workers; the CIFAR presets use
    8): allowed in a worker of --jobs, and the results equal the sequential runs' with the
    same thread count."""
    settings = {"epochs": 2, "eval_every": 1, "progress": False, "num_workers": 1,
                "batch_size": 100}
    parallel, alone = tmp_path / "parallel", tmp_path / "alone"
    run_experiment("digits", parallel, seeds=1, methods=["implicit"], jobs=2,
                   overrides=settings, report=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_job(2))
    try:
        run_experiment("digits", alone, seeds=1, methods=["implicit"], overrides=settings,
                       report=False)
    finally:
        torch.set_num_threads(threads)
    rows = untimed(run_dir(parallel, "implicit", 1))
    assert len(rows) == 2 and rows == untimed(run_dir(alone, "implicit", 1))


def test_run_many_a_dead_worker_fails_its_task_only_and_logs_reach_the_parent(caplog):
    tasks = [("dies", os._exit, (3,)), ("pid", os.getpid, ()), ("bad", int, ("x",)),
             ("log", logging.getLogger("gnc.test_jobs").warning, ("careful: %s", "x")),
             ("warn", warnings.warn, ("a warning of a worker",)),
             ("threads", torch.get_num_threads, ())]
    dead, alive, bad, log, warn, threads = run_many(tasks, jobs=1, mode="processes")
    assert dead.error == "its worker process died (exit status 3)"
    assert alive.ok and alive.result != os.getpid()
    assert bad.error.startswith("ValueError: invalid literal")
    assert log.ok and warn.ok and threads.result == threads_per_job(1)
    messages = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    # each names the run it came from
    assert ("gnc.test_jobs", "WARNING", "log: careful: x") in messages
    assert any(name == "py.warnings" and text.startswith("warn: ")
               and "a warning of a worker" in text for name, _, text in messages)
    assert ("gnc.jobs", "ERROR", "dies failed: its worker process died (exit status 3)"
            ) in messages


# ------------------------------------------------------------------------------ MPS


def fake_mps(tmp_path: Path, monkeypatch, rc: int = 0) -> Path:
    """A stand-in ``nvidia-cuda-mps-control`` on PATH that records its calls."""
    record = tmp_path / "mps_calls"
    exe = tmp_path / "bin" / "nvidia-cuda-mps-control"
    exe.parent.mkdir()
    exe.write_text(f"""#!/bin/sh
{{ echo "args=$*"; echo "pipe=$CUDA_MPS_PIPE_DIRECTORY"; echo "log=$CUDA_MPS_LOG_DIRECTORY"
  [ $# -eq 0 ] && echo "stdin=$(cat)"; }} >> {record}
exit {rc}
""")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    return record


def calls(record: Path) -> list[dict]:
    """The stand-in's calls: [{"args": ..., "pipe": ..., "log": ..., "stdin": ...}]."""
    out = []
    for line in record.read_text().splitlines() if record.exists() else []:
        key, _, value = line.partition("=")
        if key == "args":
            out.append({})
        out[-1][key] = value
    return out


def test_mps_daemon_started_for_the_workers_and_stopped(tmp_path, monkeypatch, caplog):
    record = fake_mps(tmp_path, monkeypatch)
    tasks = [("pipe", os.getenv, ("CUDA_MPS_PIPE_DIRECTORY",)),
             ("log", os.getenv, ("CUDA_MPS_LOG_DIRECTORY",))]
    pipe, log = (o.result for o in run_many(tasks, jobs=1, mode="mps"))
    start, stop = calls(record)
    assert start == {"args": "-d", "pipe": pipe, "log": log}
    assert stop == {"args": "", "pipe": pipe, "log": log, "stdin": "quit"}
    assert Path(pipe).parent.name.startswith("gnc-mps-")
    assert not Path(pipe).parent.exists()  # removed at the end
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_mps_missing_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control
    with launch("mps", cuda=True) as env:
        assert env == {}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "nvidia-cuda-mps-control not found" in warning and "plain processes" in warning


def test_mps_that_does_not_start_falls_back(tmp_path, monkeypatch, caplog):
    record = fake_mps(tmp_path, monkeypatch, rc=1)
    with launch("mps", cuda=False) as env:
        assert env == {}
    assert [c["args"] for c in calls(record)] == ["-d"]  # nothing to stop
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "did not start" in warning


def test_mps_whose_clients_fail_is_stopped(tmp_path, monkeypatch, caplog):
    record = fake_mps(tmp_path, monkeypatch)
    monkeypatch.setattr(jobs, "MPS_PROBE", ("-c", "raise SystemExit('no CUDA device here')"))
    with launch("auto", cuda=True) as env:  # auto: MPS for CUDA runs, probed
        assert env == {}
    assert [c["args"] for c in calls(record)] == ["-d", ""]  # started, then stopped
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "no CUDA device here" in warning


def test_an_experiment_of_cpu_runs_starts_no_mps_daemon(tmp_path, monkeypatch, caplog):
    """--jobs-mode mps for runs on the CPU: nothing to share, no daemon and no warning about
    a GPU; plain processes."""
    record = fake_mps(tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO):
        run_experiment("ufm10", tmp_path / "exp", seeds=1, methods=["standard"],
                       report=False, jobs=2, jobs_mode="mps",
                       overrides={**SETTINGS, "epochs": 4, "device": "cpu",
                                  "progress": False})
    assert calls(record) == []
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "--jobs-mode mps: the runs use no GPU; plain processes" in caplog.text


def test_auto_on_the_cpu_and_processes_start_no_daemon(tmp_path, monkeypatch):
    record = fake_mps(tmp_path, monkeypatch)
    for mode in ("auto", "processes"):
        with launch(mode, cuda=mode == "processes") as env:
            assert env == {}
    assert calls(record) == []
    with pytest.raises(ValueError, match="jobs_mode"):
        run_experiment("ufm10", tmp_path / "x", jobs=2, jobs_mode="threads")
    with pytest.raises(ValueError, match="jobs_mode"):  # also with nothing to run
        run_many([], jobs=1, mode="threads")
    with pytest.raises(ValueError, match="jobs"):
        run_experiment("ufm10", tmp_path / "x", jobs=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="torchrun"):
        run_experiment("ufm10", tmp_path / "x", jobs=2)


# ------------------------------------------------------------------------------ start-up


def test_the_fork_servers_imports_leave_cuda_alone():
    """The workers are forked from the fork server: had its imports initialised the CUDA
    driver (``torch.cuda.is_available()`` does, through ``cudaGetDeviceCount``), CUDA would
    fail in every worker on a GPU. Counted with spies on the calls that would."""
    code = """
import torch, torch.cuda
calls = []
for name in ("_cuda_getDeviceCount", "_cuda_init"):
    real = getattr(torch._C, name)
    def spy(*a, real=real, name=name):
        calls.append(name)
        return real(*a)
    setattr(torch._C, name, spy)
real_lazy = torch.cuda._lazy_init
torch.cuda._lazy_init = lambda: (calls.append("_lazy_init"), real_lazy())[1]
import gnc.jobs as jobs
for module in jobs.experiment_preload(True) + jobs.REPORT_PRELOAD:
    __import__(module)
print(calls)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    assert out.strip() == "[]"


def parent_command() -> bytes:
    return Path(f"/proc/{os.getppid()}/cmdline").read_bytes()


def start_method() -> str:
    import multiprocessing

    return multiprocessing.get_start_method()


def test_a_workers_own_processes_start_as_in_a_process_of_its_own():
    """A child of the fork server inherits "forkserver" as its start method: a run's
    DataLoader then started its workers through a fork server of its own, re-importing torch
    and unpickling the dataset every epoch (20x slower). The worker restores the default."""
    fresh = subprocess.run([sys.executable, "-c", "import multiprocessing as m; "
                            "print(m.get_start_method())"], capture_output=True, text=True,
                           check=True).stdout.strip()
    (outcome,) = run_many([("start method", start_method, ())], jobs=2)
    assert outcome.result == fresh


def test_workers_come_from_the_fork_server_with_the_parents_environment(monkeypatch,
                                                                       tmp_path):
    from multiprocessing import forkserver

    assert jobs.start_method() == "forkserver"  # Linux
    # one server a process, with the preload of whoever started it (here maybe a test of
    # the report's): start ours
    forkserver._forkserver._stop()  # CPython's own test hook
    jobs.prestart()
    monkeypatch.setenv("GNC_TEST_JOBS_ENV", "set after the server started")
    monkeypatch.chdir(tmp_path)  # and the working directory changed after it started
    tasks = [("parent", parent_command, ()), ("env", os.getenv, ("GNC_TEST_JOBS_ENV",)),
             ("cwd", os.getcwd, ())]
    parent, env, cwd = run_many(tasks, jobs=2, mode="processes")
    # forked by the server (not by us), which imported the training code once
    assert parent.ok and b"multiprocessing.forkserver" in parent.result, parent
    assert b"gnc.experiments" in parent.result
    assert env.result == "set after the server started"
    assert cwd.result == str(tmp_path)


@pytest.mark.parametrize(("argv", "preload"), [
    (["experiment", "ufm10", "--jobs", "2", "--out", "x"], jobs.PRELOAD + jobs.REPORT_PRELOAD),
    (["experiment", "--jobs=3", "--lr", "0.1", "--no-report"], jobs.PRELOAD),
    (["report", "exp", "--jobs", "2"], jobs.REPORT_PRELOAD),
    (["experiment", "ufm10", "--jobs", "1"], None),
    (["experiment", "ufm10"], None),
    (["experiment", "--jobs", "two"], None),  # the real parse reports it
    (["report", "exp"], None),
    (["train", "--jobs", "2"], None),
    ([], None),
])
def test_the_cli_starts_the_fork_server_before_importing_torch(argv, preload, monkeypatch):
    from gnc import cli

    calls = []
    monkeypatch.setattr(jobs, "prestart", lambda modules=jobs.PRELOAD: calls.append(modules))
    cli._prestart_workers(argv)
    assert calls == ([preload] if preload else [])


def test_killing_the_parent_alone_ends_its_workers(tmp_path):
    """SIGKILL of the parent only (not its process group): the fork server sees its end and
    exits, and the workers end (killed by the kernel, PR_SET_PDEATHSIG, or at their next
    message to the dead parent): no orphan trains on."""
    out = tmp_path / "exp"
    flags = [*FLAGS]
    flags[flags.index("--epochs") + 1] = "100000"  # runs until killed
    proc = subprocess.Popen([sys.executable, "-m", "gnc", "experiment", *flags, "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*/seed*/checkpoints/epoch_*.pt"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while True:  # the session's other processes: the fork server and the workers
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "workers outlived their parent"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_mps_probe_that_hangs_is_cut_at_its_timeout_and_the_daemon_stopped(
        tmp_path, monkeypatch, caplog):
    """A CUDA client that hangs under MPS (a sandbox without its ioctls): the probe gives up
    after ``timeout_s``, not the default 300 s, and the daemon it started is stopped."""
    record = fake_mps(tmp_path, monkeypatch)
    monkeypatch.setattr(jobs, "MPS_PROBE", ("-c", "import time; time.sleep(60)"))
    t0 = time.monotonic()
    assert jobs.start_mps(probe=True, timeout_s=0.5) is None
    assert time.monotonic() - t0 < 20
    assert [c["args"] for c in calls(record)] == ["-d", ""]  # started, then stopped
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "timed out after 0.5 seconds" in warning


def test_mps_start_interrupted_during_the_probe_stops_the_daemon(tmp_path, monkeypatch):
    """Ctrl-C, or SIGTERM turned into SystemExit, during the probe: ``-d`` detached the
    daemon, so start_mps stops it before the interrupt goes on."""
    record = fake_mps(tmp_path, monkeypatch)
    real_run = subprocess.run

    def run(cmd, **kw):
        if cmd[0] == sys.executable:  # the probe
            raise SystemExit(143)
        return real_run(cmd, **kw)

    monkeypatch.setattr(jobs.subprocess, "run", run)
    with pytest.raises(SystemExit):
        jobs.start_mps(probe=True)
    start, stop = calls(record)
    assert start["args"] == "-d" and stop["stdin"] == "quit"
    assert not Path(start["pipe"]).parent.exists()  # its folder removed


def test_workers_keep_sigint_as_the_parent_has_it():
    """Started with SIGINT ignored (a script's background job), the workers ignored it no
    more: a Ctrl-C to the group ended their runs while the experiment went on."""
    import signal

    ask = [("handler", signal.getsignal, (signal.SIGINT,))]
    (default,) = run_many(ask, jobs=1, mode="processes")
    assert default.result is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        (ignored,) = run_many(ask, jobs=1, mode="processes")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ignored.result is signal.SIG_IGN


def test_the_fork_server_can_be_stopped_and_comes_back():
    """After a Ctrl-C gnc ends the fork server (it went on importing torch, orphaned); a
    later run_many in the same process starts another."""
    import time
    from multiprocessing import forkserver

    from gnc.jobs import start_method, stop_fork_server

    if start_method() != "forkserver":
        pytest.skip("no fork server on this platform")
    run_many([("pid", os.getpid, ())], jobs=1, mode="processes")
    pid = forkserver._forkserver._forkserver_pid
    stop_fork_server()

    def running() -> bool:  # not ended (a zombie has ended: multiprocessing reaps it)
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and running():
        time.sleep(0.05)
    assert not running()
    (again,) = run_many([("pid", os.getpid, ())], jobs=1, mode="processes")
    assert again.ok and forkserver._forkserver._forkserver_pid != pid



def test_a_method_named_twice_is_one_run_and_the_bar_ends_at_until_epoch(tmp_path,
                                                                         monkeypatch):
    """`--methods fixed,fixed --jobs 2` gave the one run directory to two workers (one failed
    on the other's lock); the one bar counted to --epochs under --until-epoch."""
    bars = []
    real_bar = jobs.epoch_bar

    def record_bar(total, initial, desc):
        bars.append((total, initial))
        return real_bar(0, 0, desc)

    monkeypatch.setattr(jobs, "epoch_bar", record_bar)
    out = tmp_path / "exp"
    run_experiment("ufm10", out, seeds=1, methods=["fixed", "fixed", "standard"], jobs=2,
                   report=False, overrides={"epochs": 6, "until_epoch": 2, "eval_every": 2,
                                            "feature_dim": 8, "dataset_options": {
                                                "num_classes": 3, "per_class": 4}})
    assert sorted(p.parent.name for p in out.glob("*/seed1")) == ["fixed", "standard"]
    assert bars == [(2 * 2, 0)]  # two runs to epoch 2
