"""``gnc experiment --jobs N --jobs-mode streams`` (gnc.interleave): runs in one process, a
step of each in turn, each as if it ran alone."""

import contextlib
import contextvars
import json
import logging
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gnc.interleave as interleave
from gnc.experiments import run_dir, run_experiment
from gnc.interleave import run_interleaved
from gnc.training import drain
from tests.conftest import stop_after_first_checkpoint

TIMING = ("time_", "elapsed_s", "peak_mem_mb")


# ------------------------------------------------------------------ the runner, with stand-ins


def draws(seed: int, steps: int, *, stream=None, progress=None):
    """A task that seeds every RNG (as a trainer does), then draws from each at every step."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    out = []
    for _ in range(steps):
        out.append((torch.rand(()).item(), float(np.random.rand()), random.random()))
        yield
    return out


def test_each_run_draws_its_own_random_numbers_as_if_alone():
    alone = [drain(draws(seed, 5)) for seed in (1, 2, 3)]
    before = torch.get_rng_state()
    outcomes = run_interleaved([(f"run{s}", draws, (s, 5)) for s in (1, 2, 3)], jobs=3)
    assert [o.result for o in outcomes] == alone
    assert all(o.ok for o in outcomes)
    assert torch.equal(torch.get_rng_state(), before)  # the process's own states come back


def unseeded(steps: int, *, stream=None, progress=None):
    """Draws without seeding: from the states the process had when the runs started."""
    out = []
    for _ in range(steps):
        out.append(torch.rand(()).item())
        yield
    return out


def test_every_run_starts_from_the_process_states():
    torch.manual_seed(7)
    alone = drain(unseeded(4))
    torch.manual_seed(7)
    outcomes = run_interleaved([(str(i), unseeded, (4,)) for i in range(3)], jobs=2)
    assert [o.result for o in outcomes] == [alone] * 3


CHECKS = contextvars.ContextVar("checks", default=True)


@contextlib.contextmanager
def no_checks():
    token = CHECKS.set(False)
    try:
        yield
    finally:
        CHECKS.reset(token)


def spans_yields(steps: int, *, stream=None, progress=None):
    """Enters a context (a ContextVar set and reset, as gnc.validation.trusted_inputs) that
    stays entered across its pauses."""
    seen = []
    with no_checks():
        for _ in range(steps):
            seen.append(CHECKS.get())
            yield
    seen.append(CHECKS.get())
    return seen


def reads(steps: int, *, stream=None, progress=None):
    seen = []
    for _ in range(steps):
        seen.append(CHECKS.get())
        yield
    return seen


def test_context_variables_are_each_runs_own():
    outcomes = run_interleaved([("a", spans_yields, (3,)), ("b", reads, (5,)),
                                ("c", spans_yields, (2,))], jobs=3)
    assert [o.result for o in outcomes] == [[False] * 3 + [True], [True] * 5,
                                            [False] * 2 + [True]]
    assert CHECKS.get() is True


events: list = []


def steps_then(name: str, steps: int, fail: BaseException | None = None, *, stream=None,
               progress=None):
    events.append(("start", name))
    try:
        for i in range(steps):
            events.append((name, i))
            if progress is not None:
                progress(1)
            yield
        if fail is not None:
            raise fail
    finally:
        events.append(("end", name))
    return name


def test_a_failed_run_ends_alone_and_the_next_takes_its_slot(caplog):
    events.clear()
    tasks = [("a", steps_then, ("a", 3)), ("b", steps_then, ("b", 1, ValueError("bad lr\nmore"))),
             ("c", steps_then, ("c", 2)), ("d", steps_then, ("d", 1, KeyError("x")))]
    with caplog.at_level(logging.ERROR, logger="gnc.interleave"):
        outcomes = run_interleaved(tasks, jobs=2)
    assert [(o.name, o.ok, o.result, o.error) for o in outcomes] == [
        ("a", True, "a", None), ("b", False, None, "ValueError: bad lr"),
        ("c", True, "c", None), ("d", False, None, "KeyError: 'x'")]
    # two in flight, a step each in turn; c takes b's slot from the next round
    assert events[:9] == [("start", "a"), ("a", 0), ("start", "b"), ("b", 0), ("a", 1),
                          ("end", "b"), ("a", 2), ("start", "c"), ("c", 0)]
    assert events.index(("start", "d")) > events.index(("end", "a"))
    logged = [r.getMessage() for r in caplog.records]
    assert logged[0] == "b failed: ValueError: bad lr"  # a plain error: one line
    assert logged[1].startswith("d failed: KeyError: 'x'\nTraceback")  # a bug: traceback


def warns_in_its_turn(what: str, *, stream=None, progress=None):
    logging.getLogger("gnc.metrics").warning("NC1 undefined: %s", what)
    yield
    logging.getLogger("gnc.metrics").warning("again")
    return what


def test_a_warning_made_in_a_runs_turn_names_the_run(caplog):
    """As a --jobs worker's forwarded records do: which of the runs in flight warned."""
    with caplog.at_level(logging.WARNING, logger="gnc.metrics"):
        run_interleaved([("fixed/seed1", warns_in_its_turn, ("x",)),
                         ("implicit/seed2", warns_in_its_turn, ("y",))], jobs=2)
        logging.getLogger("gnc.metrics").warning("outside")
    assert sorted(r.getMessage() for r in caplog.records) == [
        "fixed/seed1: NC1 undefined: x", "fixed/seed1: again", "implicit/seed2: NC1 undefined: y",
        "implicit/seed2: again", "outside"]


def not_a_generator(*, stream=None, progress=None):
    raise OSError("no such file")


def test_a_task_that_fails_before_its_first_step():
    """A function that raises instead of returning its steps, and a run whose set-up (its
    first turn) fails: each ends alone and frees its slot."""
    outcomes = run_interleaved([("x", not_a_generator, ()), ("y", steps_then, ("y", 1))],
                               jobs=1)
    assert outcomes[0].error == "OSError: no such file" and outcomes[1].result == "y"


def test_a_run_whose_directory_another_process_holds_fails_alone(tmp_path):
    """The trainer's set-up in its first turn refuses a directory locked by another process
    (RunLockedError); the other run trains."""
    locked = run_dir(tmp_path, "standard", 1)
    locked.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
         str(locked / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # it holds the lock
        with pytest.raises(ValueError, match=r"1 of 2 runs failed: standard/seed1 ") as err:
            run_experiment("ufm10", tmp_path, seeds=1, methods=["standard", "implicit"],
                           report=False, jobs=2, jobs_mode="streams",
                           overrides={**UFM, "epochs": 4, "progress": False})
    finally:
        holder.kill()
        holder.wait()
    assert "RunLockedError: " in str(err.value) and "is in use by another gnc process" \
        in str(err.value)
    assert (run_dir(tmp_path, "implicit", 1) / "DONE").exists()


def test_an_interrupt_closes_every_run_and_is_raised():
    events.clear()
    before = torch.get_rng_state()
    tasks = [("a", steps_then, ("a", 5)), ("b", steps_then, ("b", 1, KeyboardInterrupt())),
             ("c", steps_then, ("c", 5))]
    with pytest.raises(KeyboardInterrupt):
        run_interleaved(tasks, jobs=2)
    assert ("end", "a") in events and ("end", "b") in events  # a's finally ran
    assert ("start", "c") not in events
    assert torch.equal(torch.get_rng_state(), before)


def closes_badly(name: str, err: BaseException, *, stream=None, progress=None):
    try:
        while True:
            yield
    finally:
        events.append(("end", name))
        raise err


def test_every_run_is_closed_even_when_closing_one_fails(caplog):
    """An interrupt; closing one run raises (logged), closing another is interrupted again:
    the rest are still closed, then the interrupt is raised."""
    events.clear()
    tasks = [("a", closes_badly, ("a", KeyboardInterrupt())),
             ("b", closes_badly, ("b", OSError("disk full"))),
             ("c", steps_then, ("c", 5)), ("d", steps_then, ("d", 1, KeyboardInterrupt()))]
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.WARNING, "gnc.interleave"):
        run_interleaved(tasks, jobs=4)
    assert {e for e in events if e[0] == "end"} == {("end", n) for n in "abcd"}
    assert [r.getMessage() for r in caplog.records] == [
        "b: closing it failed: OSError: disk full"]


def test_one_bar_for_all_runs(monkeypatch):
    import tqdm

    made = []

    class Bar:
        def __init__(self, total, initial=0, **kw):
            self.total, self.n = total, initial
            made.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    run_interleaved([(n, steps_then, (n, 3)) for n in "ab"], jobs=2, progress_total=8,
                    progress_initial=2)
    (bar,) = made
    assert (bar.total, bar.n) == (8, 8)


def test_bad_jobs_and_no_tasks():
    with pytest.raises(ValueError, match="Expected `jobs` >= 1, but got 0"):
        run_interleaved([("a", steps_then, ("a", 1))], jobs=0)
    assert run_interleaved([], jobs=2) == []


class FakeStream:
    """Stand-ins for CUDA streams and the device's generator (no GPU here)."""

    current = None
    made: list = []

    def __init__(self, device):
        self.device = device
        FakeStream.made.append(self)


@contextlib.contextmanager
def fake_stream_context(stream):
    outer, FakeStream.current = FakeStream.current, stream
    try:
        yield
    finally:
        FakeStream.current = outer


def on_stream(name: str, steps: int, *, stream=None, progress=None):
    """Records the stream it was given, the current one at every step, and draws from the
    (fake) CUDA generator."""
    seen = []
    for _ in range(steps):
        seen.append(FakeStream.current is stream)
        cuda_rng[0] += 1
        yield
    return stream, seen, cuda_rng[0]


cuda_rng = [0]


def test_on_a_gpu_every_run_has_a_stream_of_its_slot_current_at_every_turn(monkeypatch):
    FakeStream.made.clear()
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", fake_stream_context)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: torch.tensor([cuda_rng[0]]))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: cuda_rng.__setitem__(0, int(state[0])))
    cuda_rng[0] = 100
    tasks = [(n, on_stream, (n, k)) for n, k in (("a", 3), ("b", 1), ("c", 2))]
    outcomes = run_interleaved(tasks, jobs=2, device="cuda")
    (sa, seen_a, rng_a), (sb, seen_b, rng_b), (sc, seen_c, rng_c) = (o.result for o in outcomes)
    assert len(FakeStream.made) == 2 and sa is not sb and sc is sb  # c took b's slot
    assert all(s.device == torch.device("cuda", 0) for s in FakeStream.made)
    assert all(seen_a + seen_b + seen_c)
    assert (rng_a, rng_b, rng_c) == (103, 101, 102)  # each from the start, its own draws
    assert cuda_rng[0] == 100 and FakeStream.current is None


# ------------------------------------------------------------------ experiments


def untimed(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


DIGITS = {"dataset_options": {"subset": 300}, "model": "mlp", "width": 16,
          "feature_dim": 12, "epochs": 3, "eval_every": 2, "batch_size": 30, "lr": 0.05,
          "device": "cpu", "progress": False, "graph_step": True,
          "polar_method": "newton_schulz", "checkpoint_every": 1}
METHODS = ["standard", "implicit"]


def test_streams_equal_the_sequential_runs_bitwise(tmp_path, monkeypatch):
    """The capture-ready step (on the CPU, eagerly), two runs of each method in turn: every
    metric, the weights and the RNG states each run checkpoints are those of the runs one
    after the other."""
    import tqdm

    seq, streams = tmp_path / "seq", tmp_path / "streams"
    run_experiment("digits", seq, seeds=2, methods=METHODS, report=False, overrides=DIGITS)
    made = []

    class Bar:
        def __init__(self, total, initial=0, **kw):
            made.append(total)

        def update(self, n=1):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    run_experiment("digits", streams, seeds=2, methods=METHODS, report=False, jobs=3,
                   jobs_mode="streams", overrides={**DIGITS, "progress": True})
    assert made == [4 * DIGITS["epochs"]]  # one bar for all runs, in epochs; none of their own
    for m in METHODS:
        for s in (1, 2):
            a, b = run_dir(seq, m, s), run_dir(streams, m, s)
            assert (b / "DONE").exists()
            assert untimed(a) == untimed(b) and len(untimed(a)) == 2
            ca, cb = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)
                      for d in (a, b))
            for key in ("model", "rng"):
                assert identical(ca[key], cb[key]), (m, s, key)
            assert json.loads((b / "metrics.jsonl").read_text().splitlines()[-1])[
                "peak_mem_mb"] is None  # the process's memory is not the run's alone
    from gnc.report import scan_runs, timing_table

    table = timing_table(scan_runs(streams)[0])  # the report says why
    assert [row[-1] for row in table.rows] == ["n/a", "n/a"]
    assert any("peak memory n/a: runs that shared one process" in n for n in table.notes)
    assert not any("peak memory n/a" in n for n in timing_table(scan_runs(seq)[0]).notes)


def test_streams_equal_the_sequential_runs_with_augmented_device_images(tmp_path,
                                                                        monkeypatch):
    """Device-resident images, cropped and flipped on the device by draws of each run's own
    (seed, epoch) generator, BN, the capture-ready step: bitwise the sequential runs."""
    from PIL import Image

    monkeypatch.setenv("GNC_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 2)):
        for c in range(3):
            folder = tmp_path / "imgs" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")
    config = {"dataset": f"imagefolder:{tmp_path / 'imgs'}", "model": "resnet18", "width": 4,
              "feature_dim": 6, "epochs": 3, "eval_every": 2, "batch_size": 3, "lr": 0.05,
              "tau": 5.0, "data_on_device": "on", "device": "cpu", "progress": False,
              "schedule": "cosine", "polar_method": "newton_schulz", "graph_step": True,
              "augment": True}
    seq, streams = tmp_path / "seq", tmp_path / "streams"
    run_experiment(None, seq, seeds=2, methods=METHODS, report=False, overrides=config)
    run_experiment(None, streams, seeds=2, methods=METHODS, report=False, jobs=4,
                   jobs_mode="streams", overrides=config)
    for m in METHODS:
        for s in (1, 2):
            a, b = run_dir(seq, m, s), run_dir(streams, m, s)
            assert untimed(a) == untimed(b) and len(untimed(a)) == 2
            ca, cb = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)
                      for d in (a, b))
            assert identical(ca["model"], cb["model"]), (m, s)
    # the seeds differ (a check that the comparison can tell runs apart)
    assert untimed(run_dir(seq, "standard", 1)) != untimed(run_dir(seq, "standard", 2))


def identical(a, b) -> bool:
    """Equal to the bit: tensors by ``torch.equal`` (dtype and shape too), containers item by
    item, the rest by ``==``."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(identical, a, b))
    return a == b


def test_identical_tells_one_bit():
    state = {"w": torch.linspace(0, 1, 5000), "rng": [torch.get_rng_state(), 3]}
    other = {"w": state["w"].clone(), "rng": [state["rng"][0].clone(), 3]}
    assert identical(state, other)
    other["w"][4321] = torch.nextafter(other["w"][4321], torch.tensor(2.0))
    assert not identical(state, other)  # str() of both prints the same
    other["w"] = state["w"]
    other["rng"][0][4000] ^= 1
    assert not identical(state, other)


def test_a_failed_run_does_not_stop_the_others_in_streams(tmp_path):
    out = tmp_path / "exp"
    with pytest.raises(ValueError, match=r"^1 of 2 runs failed: standard-unnormalized/seed1 "):
        run_experiment("ufm10", out, seeds=1, methods=["standard-unnormalized", "standard"],
                       jobs=2, jobs_mode="streams",
                       overrides={"epochs": 4, "eval_every": 2, "lr": 1e6, "progress": False,
                                  "feature_dim": 8,
                                  "dataset_options": {"num_classes": 3, "per_class": 4}})
    assert (run_dir(out, "standard", 1) / "DONE").exists()
    assert not (run_dir(out, "standard-unnormalized", 1) / "DONE").exists()
    # every run's directory is released (a lock of another open file description conflicts
    # with a held one even in this process): the same command retries the failed one
    import fcntl

    for method in ("standard-unnormalized", "standard"):
        with open(run_dir(out, method, 1) / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


UFM = {"epochs": 150, "eval_every": 50, "checkpoint_every": 10, "feature_dim": 8,
       "dataset_options": {"num_classes": 3, "per_class": 4}}
FLAGS = ["ufm10", "--seeds", "2", "--methods", ",".join(METHODS), "--epochs", "150",
         "--eval-every", "50", "--checkpoint-every", "10", "--feature-dim", "8",
         "--dataset-options", json.dumps(UFM["dataset_options"]), "--no-progress",
         "--no-report", "--jobs", "2", "--jobs-mode", "streams"]


@pytest.fixture(scope="module")
def sequential_ufm(tmp_path_factory) -> Path:
    seq = tmp_path_factory.mktemp("seq")
    run_experiment("ufm10", seq, seeds=2, methods=METHODS, report=False,
                   overrides={**UFM, "progress": False})
    return seq


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_streams_experiment_resumes_every_run(tmp_path, sig, sequential_ufm):
    """Killed (a crash) or interrupted (Ctrl-C, the GPU check's deadline) after the first
    checkpoint: the same command again finishes every run as the sequential runs."""
    seq = sequential_ufm
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "gnc", "experiment", *FLAGS, "--out", str(out)]
    proc = stop_after_first_checkpoint(cmd, out, tmp_path / "stderr", sig)
    if sig == signal.SIGINT:  # every run closed: one line, the interrupt's exit status
        assert proc.returncode == 130
        assert (tmp_path / "stderr").read_text().strip().splitlines()[-1] == (
            "gnc: interrupted (the same command again resumes the unfinished runs)")
    assert len([d for d in out.glob("*/seed*") if (d / "DONE").exists()]) < 4
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "worker" not in rerun.stderr  # no processes of its own
    for m in METHODS:
        for s in (1, 2):
            assert untimed(run_dir(out, m, s)) == untimed(run_dir(seq, m, s)), (m, s)
    if sig == signal.SIGKILL:  # and once more, all done: nothing to train (it failed on
        before = {p: p.read_bytes() for p in out.glob("*/seed*/metrics.jsonl")}  # no device)
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert {p: p.read_bytes() for p in out.glob("*/seed*/metrics.jsonl")} == before


def test_the_cli_offers_streams_and_starts_no_fork_server_without_a_report(monkeypatch):
    from gnc import cli

    started = []
    monkeypatch.setattr("gnc.jobs.prestart", lambda *a: started.append(a))
    cli._prestart_workers(["experiment", "digits", "--jobs", "2", "--jobs-mode", "streams",
                           "--no-report"])
    assert started == []
    cli._prestart_workers(["experiment", "digits", "--jobs", "2", "--jobs-mode", "streams"])
    assert len(started) == 1  # the report draws its figures in worker processes
    args = cli.build_parser().parse_args(["experiment", "digits", "--out", "x", "--jobs-mode",
                                         "streams"])
    assert args.jobs_mode == "streams"


def test_the_process_pool_refuses_streams():
    from gnc.jobs import run_many

    with pytest.raises(ValueError, match="streams: one process"):
        run_many([("a", print, ())], jobs=1, mode="streams")


def test_module_names_its_public_parts():
    assert set(interleave.__all__) == {"RunStates", "run_interleaved"}


def test_streams_refuse_the_head_graph_before_any_training(tmp_path):
    """--graph-head captures on torch's one default capture stream: graphs of several runs
    replayed at once would share its cuBLAS workspace."""
    with pytest.raises(ValueError, match="--graph-head captures every run's head on one"):
        run_experiment("ufm10", tmp_path / "x", seeds=2, methods=["implicit"], report=False,
                       jobs=2, jobs_mode="streams",
                       overrides={"graph_head": True, "polar_method": "newton_schulz",
                                  "device": "cpu", "progress": False})
    assert not any((tmp_path / "x").rglob("metrics.jsonl"))


def test_runs_that_fail_alike_are_one_error(tmp_path):
    """Every run failing with one error (a data setting) said "each one's error is above"
    after N identical lines; the final line now names the error once."""
    with pytest.raises(ValueError, match=r"^2 of 2 runs failed: .* \(all with ValueError: "
                                         r"imbalance 0.1 leaves class\(es\)"):
        run_experiment("ufm10", tmp_path / "exp", seeds=1, methods=["standard", "fixed"],
                       jobs=2, jobs_mode="streams",
                       overrides={"epochs": 1, "imbalance": 0.1, "progress": False,
                                  "dataset_options": {"num_classes": 3, "per_class": 4}})
