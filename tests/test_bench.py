import json
import subprocess
import sys

import pytest
import torch

from gnc.bench import bench_layer, format_table, parse_sizes, speedups
from tests.conftest import load_benchmark


def test_bench_layer_small_sizes_table_and_speedups():
    records = bench_layer([(32, 4), (64, 8)], repeats=2)
    methods = {(r.case, r.method) for r in records}
    assert ("layer 32x4", "exact/closed_form") in methods
    assert ("layer 64x8", "riemannian/ddn") in methods
    assert all(r.forward_ms > 0 for r in records if r.forward_ms is not None)
    table = format_table(records)
    assert "exact/closed_form" in table and "svd 64x8" in table and "head 64x8" in table
    assert ("layer 64x8", "exact/closed_form newton_schulz") in methods
    assert ("head 64x8", "ImplicitETFHead newton_schulz") in methods
    lines = speedups(records)
    assert any("faster than riemannian/ddn" in line for line in lines)
    assert any("newton_schulz forward+backward" in line for line in lines)
    with pytest.raises(ValueError, match="unknown polar method"):
        bench_layer([(32, 4)], polar_methods=("qr",))


def test_bench_layer_above_the_big_size_times_the_layer_only(monkeypatch):
    monkeypatch.setattr("gnc.bench.BIG_LAYER_FLOPS", 100)
    records = bench_layer([(32, 4)], repeats=1, polar_methods=("newton_schulz",))
    assert {r.case for r in records} == {"layer 32x4"}
    assert {r.method for r in records} == {"exact/closed_form newton_schulz", "riemannian/ddn"}


def test_bench_skips_paper_method_at_large_K():
    records = bench_layer([(1000, 500)], repeats=1, polar_methods=("auto",))
    paper = [r for r in records if r.method == "riemannian/ddn"][0]
    assert paper.forward_ms is None and paper.note.startswith("skipped")


def test_parse_sizes():
    assert parse_sizes("512x10,2048X1000") == [(512, 10), (2048, 1000)]
    with pytest.raises(ValueError, match="expected DxK"):
        parse_sizes("512by10")
    with pytest.raises(ValueError, match="d >= K"):
        parse_sizes("5x10")


def test_cli_bench_json_and_bad_size():
    cmd = [sys.executable, "-m", "gnc", "bench", "--steps", "none"]
    out = subprocess.run([*cmd, "--sizes", "32x4", "--repeats", "1", "--json"],
                         capture_output=True, text=True, check=True)
    recs = json.loads(out.stdout)
    keys = {"case", "method", "device", "forward_ms", "backward_ms", "peak_mem_mb"}
    assert keys <= recs[0].keys()
    bad = subprocess.run([*cmd, "--sizes", "3x4"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "d >= K" in bad.stderr


def test_bench_steps_records_and_overheads():
    from gnc.bench import StepCase, bench_steps, step_overheads

    cases = [StepCase("tiny-ufm", "ufm", 4, 16, (), 8, 16)]
    records = bench_steps(cases, repeats=1)
    assert [r.method for r in records] == ["standard", "fixed", "implicit"]
    for r in records:
        assert r.case == "step tiny-ufm" and r.forward_ms > 0 and r.backward_ms > 0
        assert r.peak_mem_mb is not None and r.peak_mem_mb >= 0
    lines = step_overheads(records)
    assert any(line.startswith("step tiny-ufm: implicit =") for line in lines)


def test_unknown_step_case():
    from gnc.bench import step_cases_by_name

    with pytest.raises(ValueError, match="unknown step case"):
        step_cases_by_name("resnet9", "cpu")
    assert [c.name for c in step_cases_by_name("ufm100,resnet18", "cpu")] == ["ufm100",
                                                                              "resnet18"]


def test_the_paper_layer_row_says_it_is_one_timed_run():
    """The riemannian/ddn row is timed once: "7x faster" compared a median of 7 with it."""
    records = bench_layer([(16, 3)], repeats=3, polar_methods=("auto",))
    paper = next(r for r in records if r.method == "riemannian/ddn")
    assert paper.note == "1 timed run"
    ours = next(r for r in records if r.method == "exact/closed_form")
    assert ours.note == ""
    again = bench_layer([(16, 3)], repeats=2, paper_repeats=2, polar_methods=("auto",))
    assert next(r for r in again if r.method == "riemannian/ddn").note == ""


def test_a_step_of_standard_renormalises_its_rows(monkeypatch):
    """The step rows are the methods' training steps: `standard` renormalises its rows
    after the optimiser (DESIGN §1), which the bench left out."""
    from gnc import heads
    from gnc.bench import StepCase, time_step

    calls = []
    monkeypatch.setattr(heads.StandardHead, "after_optimizer_step",
                        lambda self: calls.append(type(self).__name__))
    time_step(StepCase("tiny-ufm", "ufm", 4, 16, (), 8, 16), "standard", torch.device("cpu"), 2)
    assert len(calls) == 3  # the warm-up and the two timed steps


def test_the_cpu_resnet50_case_has_the_gpu_case_stem():
    """At 64 px the stem defaulted to the CIFAR one: not the network of the 224 px GPU row."""
    from gnc.bench import CPU_STEPS, GPU_STEPS
    from gnc.models import build_backbone

    stems = []
    for table in (CPU_STEPS, GPU_STEPS):
        case = next(c for c in table if c.name == "resnet50-k1000")
        backbone, _ = build_backbone(case.model, in_shape=case.in_shape,
                                     small_input=case.small_input)
        stems.append(tuple(backbone.conv1.kernel_size))
    assert stems == [(7, 7), (7, 7)]


@pytest.mark.parametrize("flags", [["--sizes", ""], ["--sizes", "none", "--steps", ""],
                                   ["--steps", "none", "--polar", ""],
                                   ["--sizes", "none", "--steps", "none", "--epoch", ""],
                                   ["--sizes", "none", "--steps", "none", "--epoch", "digits",
                                    "--methods", ""]])
def test_an_empty_bench_flag_is_an_error_not_the_defaults(flags, capsys):
    """`--sizes ''` ran every default size up to 2048x1000 (minutes on a CPU)."""
    from gnc.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", *flags])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gnc:")]
    assert exit_.value.code == 2 and len(err) == 1, err


@pytest.mark.parametrize("late", [["--epoch", ""], ["--epoch", "nope"],
                                  ["--epoch", "digits", "--methods", "learned"],
                                  ["--steps", "resnet9"], ["--polar", "qr"],
                                  ["--methods", "standard"], ["--set", "width=8"]])
def test_a_bad_bench_flag_is_refused_before_any_timing(late, capsys, monkeypatch):
    """A bad --epoch or --methods was found after the layer and step cases had been timed
    (minutes), whose table is printed only at the end; --methods without an epoch case
    printed an empty table."""
    from gnc import bench
    from gnc.cli import main

    timed = []
    for name in ("bench_layer", "bench_steps", "bench_epochs"):
        monkeypatch.setattr(bench, name, lambda *a, _n=name, **k: timed.append(_n) or [])
    flags = {"--sizes": "16x3", "--steps": "none", "--repeats": "1"}
    flags.update(dict(zip(late[::2], late[1::2], strict=True)))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *[v for kv in flags.items() for v in kv]])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gnc:")]
    assert exit_.value.code == 2 and len(err) == 1 and timed == [], (err, timed)


def test_polar_conditioning_script_runs():
    """benchmarks/polar_conditioning.py (the evidence for the Newton–Schulz schedule in
    docs/bench.md) failed once `polar_newton_schulz` took a keyword it did not pass on."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "polar_conditioning.py"), "ufm10",
         "--epochs", "3", "--set", "dataset_options={\"num_classes\": 3, \"per_class\": 4}",
         "--set", "feature_dim=8", "--set", "eval_every=1"],  # a key it also sets: --set wins
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sigma_min(C)/delta min" in done.stdout and "largest residual" in done.stdout


def test_compile_head_check_compiles_the_update_and_the_guarded_module(monkeypatch, capsys):
    """The script compiled the module, whose forward now runs the update eagerly when
    compiled: it compared eager with eager and printed 0 ("could be offered"). It now also
    compiles the update itself; the guarded module must equal the eager tracker exactly."""
    module = load_benchmark("compile_head_check")
    monkeypatch.setattr(sys, "argv", ["compile_head_check.py", "--steps", "2"])
    module.main()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2
    for line in lines:
        assert "update compiled " in line and "module compiled 0.000e+00" in line, line


def _peak_mb_in_a_fresh_process(allocate: str, before: str = "") -> float:
    """PeakMemory's MiB around ``x = allocate`` (a Python expression), in a fresh process:
    in this one, memory that earlier tests freed but the allocator kept resident can hold the
    allocation without the resident set growing (seen once in CI order)."""
    code = f"""
import time, torch
from gnc.memory import PeakMemory
{before}
with PeakMemory(torch.device("cpu"), interval=0.001) as mem:
    x = {allocate}
    time.sleep(0.05)
    del x
print(mem.mb)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    return float(done.stdout.split()[-1])


def test_peak_memory_sees_a_transient_allocation_on_cpu():
    assert 48 <= _peak_mb_in_a_fresh_process("torch.ones(64 * 2**20 // 4)") <= 200  # touched


def test_peak_memory_counts_memory_an_earlier_run_freed():
    """Runs that share a process (``gnc experiment``): the heap an earlier run freed stayed
    resident and served the next one, whose peak then read ~0 MiB (every run after the first
    of an experiment). 64 MiB in heap blocks (below glibc's mmap threshold), freed, then
    allocated again under PeakMemory."""
    blocks = "[torch.ones(16 * 1024 - 64) for _ in range(1024)]"  # 1024 blocks of ~64 KiB
    assert 48 <= _peak_mb_in_a_fresh_process(blocks, before=f"x = {blocks}\ndel x") <= 200


def test_epoch_bench_on_random_images_of_cifar_shape(tmp_path):
    from gnc.bench import bench_epochs, format_table, step_overheads

    records = bench_epochs(
        "cifar10-resnet18", device="cpu", methods=("standard", "implicit"),
        data_dir=str(tmp_path / "absent"), width=4, batch_size=20, data_on_device="on",
        dataset_options={"subset": 4}, amp="none", channels_last=False,
    )
    assert [r.method for r in records] == ["standard", "implicit"]
    for r in records:
        assert r.case == "epoch cifar10-resnet18" and r.epoch_s > 0
        assert 0 <= r.data_wait_pct < 100
        assert "random images of CIFAR's shape, 2 steps, data on device: yes" in r.note
    assert "s/epoch" in format_table(records)
    assert any(line.startswith("epoch cifar10-resnet18: implicit =")
               for line in step_overheads(records))


def test_gpu_check_script_parses_and_names_its_stages():
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "PYTHONPATH=src" in text and "make install" not in text  # the bare device machine
    for entry in ("gpu_throughput.py", "table1_stage2.py", "--until-epoch", "--eval-epochs",
                  "--jobs", "--unfinished", "throughput.json", "table1.tar.gz"):
        assert entry in text


def test_gpu_check_stage1_python_runs_on_the_cpu_with_tiny_sizes(tmp_path):
    """Stage 1's measurements (benchmarks/gpu_throughput.py), a width-4 ResNet-18 on random
    CIFAR-shaped images: every part produces its entry and stage 2's choice."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    out = tmp_path / "t.json"
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_throughput.py"), str(out),
         "--device", "cpu", "--data-dir", str(tmp_path / "none"), "--jobs", "1",
         "--rounds", "2", "--conv-shapes", "4x8", "--conv-batch", "2", "--budget-s", "1e9",
         *TINY_SETS],
        check=True, capture_output=True, timeout=600,
        # one intra-op thread: tiny steps on a shared 2-core machine run many times faster
        env={**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"})
    result = json.loads(out.read_text())
    for method in ("standard", "fixed", "implicit"):
        for variant in ("eager", "captured"):
            assert result["steps"][f"{method}/{variant}"]["step_ms"] > 0
        assert result["sync_free"][method] == "ok"
    assert result["eval_s"] > 0 and result["jobs"][0]["img_per_s"] > 0
    assert result["mps"] == "unavailable" and result["best"]["jobs"] == 1
    (streams,) = result["streams"]
    assert streams["runs"] == 1 and streams["img_per_s"] > 0 and streams["not_captured"] == []
    assert result["replay_floor_ms"] == streams["ms_per_step"] > 0
    assert result["best"]["streams_runs"] == 1
    assert isinstance(result["best"]["streams_win"], bool)
    assert result["grouped_conv"]["4x8"]["grouped_ms"] > 0


# a width-4 ResNet-18 on 40 random CIFAR-shaped images, 4 steps an epoch (the warm-up before
# a capture reads batches 1 to 3)
TINY_SETS = ("--set", "width=4", "--set", "batch_size=10", "--set",
             'dataset_options={"subset": 4}')
TINY = {"width": 4, "batch_size": 10, "dataset_options": {"subset": 4}}


@pytest.fixture(scope="module")
def gpu_throughput():
    return load_benchmark("gpu_throughput")


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny steps on a shared 2-core machine are many times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_in_flight_rate_is_all_images_over_the_span_of_the_timed_epochs(gpu_throughput):
    together = [{"images": 100, "epoch_s": 2.0, "started_at": 10.0},
                {"images": 100, "epoch_s": 2.0, "started_at": 10.0}]
    got = gpu_throughput.aggregate(together)
    assert got == {"img_per_s": 100.0, "img_per_s_sum": 100.0, "span_s": 2.0,
                   "start_spread_s": 0.0}
    # one after the other: the per-process rates would count them as concurrent
    apart = [{"images": 100, "epoch_s": 2.0, "started_at": 10.0},
             {"images": 100, "epoch_s": 2.0, "started_at": 12.0}]
    got = gpu_throughput.aggregate(apart)
    assert got["img_per_s"] == 50.0 and got["img_per_s_sum"] == 100.0
    assert got["span_s"] == 4.0 and got["start_spread_s"] == 2.0


def test_barrier_releases_when_all_have_arrived_and_after_its_timeout(gpu_throughput,
                                                                    tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    code = ("import sys, time, pathlib; sys.path.insert(0, sys.argv[1]); "
            "import gpu_throughput as g; g.barrier(pathlib.Path(sys.argv[2]), 3); "
            "print(time.time())")
    bench = str(Path(__file__).parents[1] / "benchmarks")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen([sys.executable, "-c", code, bench, str(tmp_path)],
                                      stdout=subprocess.PIPE, text=True, env=env))
    deadline = time.monotonic() + 120
    while sum(1 for _ in tmp_path.iterdir()) < 2:  # both wait at the barrier
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    time.sleep(0.2)
    assert all(p.poll() is None for p in procs)
    before = time.time()
    gpu_throughput.barrier(tmp_path, 3)  # the third arrives: all go
    released = [float(p.communicate(timeout=60)[0]) for p in procs]
    assert all(t >= before - 0.05 for t in released)
    t0 = time.monotonic()
    gpu_throughput.barrier(tmp_path, 5, timeout_s=0.3)  # 3 processes came: never 5
    assert 0.3 <= time.monotonic() - t0 < 5


def test_in_flight_a_bench_that_fails_releases_the_others(gpu_throughput, monkeypatch):
    """One of two benches dies before the barrier: the other is not kept waiting for it
    (the barrier's 120 s), and the result has its rate and the other's error."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    real_popen, started = subprocess.Popen, []
    ok = ("import json, sys, time, pathlib; sys.path.insert(0, sys.argv[1]); "
          "import gpu_throughput as g; g.barrier(pathlib.Path(sys.argv[2]), 2, 60); "
          "print(json.dumps({'images': 10, 'epoch_s': 0.5, 'started_at': time.time()}))")
    bad = "import sys; sys.exit('RuntimeError: no device')"

    def fake_popen(cmd, **kw):
        folder = cmd[cmd.index("child") + 1]
        code = ok if not started else bad
        started.append(code)
        bench = str(Path(gpu_throughput.__file__).parent)
        return real_popen([sys.executable, "-c", code, bench, folder], **kw)

    monkeypatch.setattr(gpu_throughput.subprocess, "Popen", fake_popen)
    t0 = time.monotonic()
    got = gpu_throughput.in_flight(2, "cpu", "none", [])
    assert time.monotonic() - t0 < 30
    assert got["runs"] == 2 and got["img_per_s"] == pytest.approx(20.0)
    assert got["errors"] == ["RuntimeError: no device"]


def test_streams_two_runs_in_one_process_on_the_cpu(gpu_throughput, tmp_path, monkeypatch,
                                                    one_thread):
    """Option (a) on the CPU: two trainers advanced as --jobs-mode streams advances them
    (their epoch_steps a step per turn), the stand-in capture, round-robin "replays" (the
    capture-ready step run eagerly) that advance both runs across an epoch's end, each from
    its own seed and with its own RNG states."""
    import torch

    monkeypatch.setenv("GNC_CACHE_DIR", str(tmp_path / "cache"))
    cpu, data = torch.device("cpu"), str(tmp_path / "none")
    with gpu_throughput.StreamRuns(cpu, data, {**TINY, "seed": 3}) as pool:
        runs = pool.grow(2)
        assert [r.trainer.cfg.seed for r in runs] == [3, 4] and pool.grow(1) == runs[:1]
        assert all(r.graph.captures == 1 and r.graph.replays == 1 for r in runs)
        before = [[p.detach().clone() for p in r.trainer.model.parameters()] for r in runs]
        assert gpu_throughput.round_robin(runs, 3, cpu) > 0  # crosses an epoch's end
        for run, params in zip(runs, before, strict=True):
            assert run.graph.replays == 4 and run.graph.failed is None and run.trainer.step == 5
            assert run.trainer.epoch == 1 and run.graph.captures == 1  # the plan kept its shape
            assert all(not torch.equal(p, q)
                       for p, q in zip(run.trainer.model.parameters(), params, strict=True))
        a, b = (list(r.trainer.model.parameters()) for r in runs)
        assert not any(torch.equal(p, q) for p, q in zip(a, b, strict=True))
        assert not torch.equal(runs[0].states.rng[0], runs[1].states.rng[0])
        # 4 steps an epoch: the steps to time are cleared of the epoch's end, untimed
        assert [r.epoch_ends for r in runs] == [1, 1] and runs[0].steps_left() == 3
        runs[0].clear_of_epoch_end(3)
        assert runs[0].trainer.step == 5 and runs[0].epoch_ends == 1  # room enough: left
        runs[1].clear_of_epoch_end(4)
        assert runs[1].trainer.step == 5  # an epoch cannot hold 4 more steps and a start
        runs[0].clear_of_epoch_end(2)  # nothing to do
        gpu_throughput.round_robin(runs[:1], 3, cpu)
        assert runs[0].epoch_ends == 1 and runs[0].steps_left() == 0
        runs[0].clear_of_epoch_end(3)
        assert runs[0].epoch_ends == 2 and runs[0].steps_left() == 3
        assert runs[0].trainer.step == 9 and runs[0].trainer.epoch == 2
    record = gpu_throughput.streams(2, cpu, data, TINY, rounds=3, warmup=0)
    assert record["epoch_ends"] == 0  # each run was moved past its epoch's end first
    assert record["replays"] == 2 * (1 + 3 + 3)  # the capture's replay, clearing, rounds
    record = gpu_throughput.streams(2, cpu, data, TINY, rounds=1, warmup=0)
    assert record["epoch_ends"] == 0
    assert record["runs"] == 2 and record["rounds"] == 1 and record["img_per_s"] > 0
    assert record["ms_per_step"] > 0 and record["replays"] == 4 and record["build_s"] > 0
    assert len(record["peak_mem_mb"]) == 2 and record["not_captured"] == []
    assert all(0 < loss < 10 for loss in record["train_loss"])  # ln 10 at the start
    # an epoch of one step leaves no room for the warm-up: never captured, and said so
    short = gpu_throughput.streams(1, cpu, data, {**TINY, "batch_size": 40}, rounds=1,
                                   warmup=0)
    assert short["epoch_ends"] == 1  # an epoch of one step: its end is in every round
    assert short["not_captured"] == ["never captured (an epoch shorter than the warm-up)"]


def test_grouped_conv_on_the_cpu(gpu_throughput, one_thread):
    import torch

    out = gpu_throughput.grouped_conv(torch.device("cpu"), gpu_throughput.parse_shapes(
        "4x8,8x4"), batch=2, repeats=1)
    assert out["dtype"] == "float32" and out["streams"] is False and out["models"] == 5
    for shape in ("4x8", "8x4"):
        row = out[shape]
        assert min(row["grouped_ms"], row["streams_ms"], row["one_stream_ms"]) > 0
        assert row["grouped_over_streams"] == row["grouped_ms"] / row["streams_ms"]


def test_stage1_records_errors_and_skips_parts_past_the_budget(gpu_throughput, tmp_path,
                                                                monkeypatch):
    """Each part runs through one guard: an error becomes its string and the rest goes on;
    no part starts once the budget is spent; "best" falls back to stage 2's defaults."""
    import json

    clock = [0.0]
    calls = []

    def steps(*a):
        calls.append("steps")
        return {"standard/eager": {"epoch_s": 2.0}}

    def broken(*a):
        calls.append("eval")
        raise RuntimeError("CUDA out of memory")

    def slow(*a):
        calls.append("sync_free")
        clock[0] = 100.0  # this part takes the budget
        return {"standard": "ok"}

    def never(*a, **kw):
        raise AssertionError("a part started after the budget")

    monkeypatch.setattr(gpu_throughput, "_now", lambda: clock[0])
    for name, fn in (("step_variants", steps), ("eval_seconds", broken), ("sync_free", slow),
                     ("in_flight", never), ("StreamRun", never), ("grouped_conv", never)):
        monkeypatch.setattr(gpu_throughput, name, fn)
    out = tmp_path / "t.json"
    gpu_throughput.main([str(out), "--device", "cpu", "--jobs", "1,2", "--budget-s", "50"])
    result = json.loads(out.read_text())
    assert calls == ["steps", "eval", "sync_free"]
    assert result["eval_s"] == "RuntimeError: CUDA out of memory"
    assert result["sync_free"] == {"standard": "ok"}
    skipped = gpu_throughput.SKIPPED
    assert result["jobs"] == result["streams"] == [skipped, skipped]
    assert result["grouped_conv"] == skipped and result["mps"] == "unavailable"
    assert result["best"] == {"captured_step": False, "jobs": 4, "jobs_mode": "processes",
                              "img_per_s": None, "measured": False}
    assert result["elapsed_s"] == 100.0

    clock[0] = 0.0  # --parts: only those asked run
    monkeypatch.setattr(gpu_throughput, "grouped_conv", lambda *a, **kw: {"4x8": {}})
    gpu_throughput.main([str(out), "--device", "cpu", "--jobs", "1", "--parts", "grouped_conv"])
    result = json.loads(out.read_text())
    not_asked = gpu_throughput.NOT_ASKED
    assert result["grouped_conv"] == {"4x8": {}} and result["steps"] == not_asked
    assert result["jobs"] == result["streams"] == [not_asked]
    with pytest.raises(SystemExit):
        gpu_throughput.main([str(out), "--parts", "steps,evals"])


def test_best_prefers_mps_and_streams_when_they_win_with_the_captured_step(gpu_throughput):
    steps = {f"{m}/{v}": {"epoch_s": t} for m in ("standard", "fixed", "implicit")
             for v, t in (("eager", 3.0), ("captured", 2.0))}
    result = {"steps": steps, "jobs": [{"runs": 1, "img_per_s": 10.0},
                                       {"runs": 4, "img_per_s": 30.0}, "skipped: budget"],
              "mps": {"runs": 4, "img_per_s": 40.0},
              "streams": [{"runs": 2, "img_per_s": 35.0, "not_captured": []},
                          {"runs": 8, "img_per_s": 90.0, "not_captured": ["RuntimeError: x"]},
                          "ValueError: y"]}
    best = gpu_throughput.choose(result)
    assert best == {"captured_step": True, "jobs": 4, "jobs_mode": "mps", "img_per_s": 40.0,
                    "measured": True, "streams_runs": 2, "streams_img_per_s": 35.0,
                    "streams_win": False}
    result["streams"][0]["img_per_s"] = 45.0  # streams beat MPS: chosen
    assert gpu_throughput.choose(result) == {**best, "jobs": 2, "jobs_mode": "streams",
                                             "img_per_s": 45.0, "streams_img_per_s": 45.0,
                                             "streams_win": True}
    steps["fixed/captured"]["epoch_s"] = 4.0  # but not without the captured step
    best = gpu_throughput.choose(result)
    assert (best["jobs_mode"], best["jobs"], best["streams_win"]) == ("mps", 4, True)
    del result["jobs"], result["mps"]  # no process measured (the budget ended stage 1)
    best = gpu_throughput.choose(result)
    assert best["jobs_mode"] == "processes" and best["streams_win"] is None  # not captured
    steps["fixed/captured"]["epoch_s"] = 2.0  # captured: the measured streams, not a default
    best = gpu_throughput.choose(result)
    assert (best["jobs_mode"], best["jobs"], best["img_per_s"], best["streams_win"]) == (
        "streams", 2, 45.0, None)


def test_cli_bench_epoch_case(tmp_path, capsys):
    import json

    from gnc.cli import main

    main(["bench", "--sizes", "none", "--steps", "none", "--epoch", "cifar10-resnet18",
          "--methods", "implicit", "--data-dir", str(tmp_path), "--set", "width=4",
          "--set", "batch_size=20", "--set", 'dataset_options={"subset": 4}',
          "--set", "amp=none", "--set", "solve_device=cpu", "--set", "data_on_device=on",
          "--json"])
    (record,) = json.loads(capsys.readouterr().out)
    assert record["method"] == "implicit (solve_device=cpu)" and record["epoch_s"] > 0


def test_cli_bench_profile_counts_the_operators_of_each_head(tmp_path, capsys):
    import re

    import pytest

    from gnc.cli import main

    main(["bench", "--epoch", "cifar10-resnet18", "--profile", "--methods",
          "standard,implicit", "--data-dir", str(tmp_path), "--set", "width=4",
          "--set", "batch_size=20", "--set", 'dataset_options={"subset": 4}',
          "--set", "amp=none", "--set", "channels_last=false", "--set", "data_on_device=on"])
    out = capsys.readouterr().out
    sections = out.split("## cifar10-resnet18 / ")[1:]
    assert [s.split()[0] for s in sections] == ["standard", "implicit"]
    ops = {}
    for s in sections:
        head = re.search(r"gnc\.head: host [\d.]+ ms/step, ([\d.]+) operators/step", s)
        assert head and "gnc.backbone: host" in s and "Self CPU" in s  # the operator table
        ops[s.split()[0]] = float(head.group(1))
    assert 0 < ops["standard"] < ops["implicit"]  # the solve is in the head's range
    with pytest.raises(SystemExit):
        main(["bench", "--profile", "--epoch", "none"])
    assert "--profile profiles the epoch case" in capsys.readouterr().err


def test_jobs_speedup_times_every_jobs_value_and_prints_the_ratio():
    """benchmarks/jobs_speedup.py on a tiny experiment: a row per --jobs value, the first
    the baseline (ratio 1.00), the wall time of every round (here one)."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    options = json.dumps({"num_classes": 3, "per_class": 4})
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "jobs_speedup.py"), "--repeats", "1",
         "--no-report", "--", "ufm10", "--seeds", "1", "--methods", "standard,fixed",
         "--epochs", "3", "--feature-dim", "8", "--dataset-options", options],
        check=True, capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gnc experiment ufm10 --seeds 1") and "--no-report" in lines[0]
    rows = {int(line.split()[0]): line.split()[1:] for line in lines[2:]}
    assert sorted(rows) == [1, 2]
    assert rows[1][1] == "1.00" and float(rows[2][0]) > 0 and len(rows[2][2:]) == 1


def test_step_kernels_counts_two_kernels_a_newton_schulz_step_in_a_capture(monkeypatch,
                                                                           tmp_path):
    """benchmarks/step_kernels.py on a tiny ResNet-18: the implicit head's polar factor and
    its backward's sign iteration run two kernels a step of their schedule when captured (a
    launch-bound graph pays per kernel, not per flop)."""
    from gnc.etf import newton_schulz_schedule, proximal_lower_bound
    from gnc.experiments import get_preset

    monkeypatch.setenv("GNC_CACHE_DIR", str(tmp_path / "cache"))
    module = load_benchmark("step_kernels")
    overrides = {"width": 4, "batch_size": 10, "graph_step": True, "data_on_device": "on",
                 "amp": "none", "channels_last": False, "dataset_options": {"subset": 3}}
    standard = module.count("cifar10-resnet18", "standard", overrides)
    implicit = module.count("cifar10-resnet18", "implicit",
                            {**overrides, "polar_method": "newton_schulz"})
    delta = get_preset("cifar10-resnet18").train_config().delta
    steps = len(newton_schulz_schedule(proximal_lower_bound(10, delta)))
    forward, backward = module.PARTS.values()
    assert 2 * steps <= implicit[forward] <= 2 * steps + 20
    assert 2 * steps <= implicit[backward] <= 2 * steps + 10
    assert sum(implicit.values()) > sum(standard.values()) > 100 and standard[forward] == 0


def test_cli_bench_epoch_of_a_named_file_that_is_missing_is_one_line(tmp_path, capsys):
    """The random stand-in is for the preset's CIFAR-10 without its files, not for a file
    the user named: that timed random images and exited 0."""
    from gnc.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--sizes", "none", "--steps", "none", "--epoch", "digits",
              "--methods", "standard", "--set", f"dataset=npz:{tmp_path / 'missing.npz'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gnc:")]
    assert exit_.value.code == 2 and len(err) == 1 and "missing.npz" in err[0], err
