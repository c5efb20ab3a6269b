"""Resume and determinism fuzzer for ``gnc train`` on the CPU.

    python benchmarks/resume_fuzz.py --count N [--seed S] [--start I] [--out DIR] [--gnc CMD]

This is the fuzzer behind docs/reliability.md's promise for resume on the CPU ("exactly the
uninterrupted result"). Config I is drawn from ``random.Random(S * 100000 + I)`` over the
digits (MLP) and ufm10 presets: methods, optimisers, schedules, samplers, label noise and
imbalance, evaluation and checkpoint cadence, eval statistics, the captured step, autocast
(none/bf16/fp16), polar methods and head options. Each config is trained on the CPU and then:

- **same seed**: trained again, its ``metrics.jsonl`` and ``cos_margins.npy`` must be
  identical (keys starting with ``time_``, ``elapsed_s`` and ``peak_mem_mb`` are left out);
- **interrupted**: killed (SIGKILL or SIGINT, at random) at a random moment after its first
  ``checkpoints/last.pt``, sometimes with ``last.pt`` then damaged (when an ``epoch_*.pt`` is
  there to fall back to), and continued with ``--resume`` (itself sometimes interrupted again),
  sometimes with one more ``--resume`` of the finished run: it must equal the first run;
- **until**: trained with ``--until-epoch k`` (sometimes a second, later ``--until-epoch``)
  and then ``--resume``: it must equal the first run.

A config that gnc refuses (exit status 2 with one ``gnc: error:`` line) counts as refused,
not failed; any other non-zero status, a traceback, a mismatch or a run past
``RUN_TIMEOUT_S`` is a failure. The children run with ``OMP_NUM_THREADS=1`` and
``MKL_NUM_THREADS=1``: bit-identical results need one thread count. One line is printed per
config, then a table; the exit status is 1 when any config failed. The run directories of
failed configs are kept under ``--out`` (default: a new temporary directory), with every
config's record in ``results.jsonl`` there.
"""

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RUN_TIMEOUT_S = 600
COMMON_FLAGS = ["--no-progress", "--device", "cpu"]
IGNORED_KEYS = {"elapsed_s", "peak_mem_mb"}
IGNORED_PREFIX = "time_"
MAX_INTERRUPTS = 4  # after this many kills of one run, the next --resume runs to the end
PROBLEMS_SHOWN = 5


class RunFailed(Exception):
    """A gnc command that should have succeeded did not (status, traceback, timeout)."""


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str


@dataclass
class Outcome:
    status: str  # "passed" | "failed" | "refused"
    problems: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- drawing a config -------------------------------------------------------------------
# The draws are made in one fixed order, so a (seed, index) names the same config every time.


def draw_config(rng: random.Random) -> list[str]:
    """The `gnc train` flags of one random config."""
    flags, epochs = _draw_data(rng)
    method = rng.choice(["standard", "fixed", "implicit", "implicit-nograd",
                         "standard-unnormalized"])
    graph_step = rng.random() < 0.3
    flags += ["--method", method]
    flags += _draw_optimiser(rng)
    flags += _draw_schedule(rng, epochs, graph_step)
    flags += _draw_sampling(rng)
    flags += _draw_evaluation(rng, epochs)
    flags += _draw_head(rng, method, graph_step)
    flags += _draw_runtime(rng, graph_step)
    return flags + ["--seed", str(rng.randint(0, 1000))]


def _draw_data(rng: random.Random) -> tuple[list[str], int]:
    ufm = rng.random() < 0.35
    epochs = rng.randint(3, 6)
    if not ufm:
        flags = ["--preset", "digits", "--epochs", str(epochs),
                 "--batch-size", str(rng.choice([100, 64, 137, 0, 250]))]
        if rng.random() < 0.3:
            flags += ["--width", str(rng.choice([32, 64]))]
        if rng.random() < 0.3:
            flags += ["--feature-dim", rng.choice(["32", "none", "16"])]
        return flags, epochs
    if rng.random() < 0.6:
        epochs = rng.choice([20, 40, 80])  # ufm is one step an epoch: long enough to interrupt
    flags = ["--preset", "ufm10", "--per-class", str(rng.choice([10, 20, 30])),
             "--num-classes", str(rng.choice([5, 10])), "--epochs", str(epochs)]
    if rng.random() < 0.5:
        flags += ["--feature-dim", str(rng.choice([16, 32]))]
    if rng.random() < 0.4:
        flags += ["--batch-size", str(rng.choice([0, 32, 47, 64]))]
    return flags, epochs


def _draw_optimiser(rng: random.Random) -> list[str]:
    optimiser = rng.choice(["sgd", "adam", "adamw", "agd"])
    flags = ["--optimizer", optimiser]
    if optimiser in ("adam", "adamw"):
        flags += ["--lr", str(rng.choice([1e-3, 3e-3, 1e-2]))]
    elif optimiser == "agd":
        flags += ["--lr", str(rng.choice([1.0, 3.0, 10.0]))]
    else:
        flags += ["--lr", str(rng.choice([0.05, 0.1, 0.2]))]
        if rng.random() < 0.3:
            flags += ["--momentum", str(rng.choice([0.0, 0.5, 0.9]))]
    if rng.random() < 0.3:
        flags += ["--weight-decay", str(rng.choice([0.0, 5e-4, 1e-2]))]
    return flags


def _draw_schedule(rng: random.Random, epochs: int, graph_step: bool) -> list[str]:
    # The captured step cannot capture onecycle's per-step schedule: drawing it would only
    # give refusals.
    schedules = ["none", "step", "multistep", "cosine"] + ([] if graph_step else ["onecycle"])
    schedule = rng.choice(schedules)
    flags = ["--schedule", schedule]
    if schedule == "multistep":
        milestones = sorted(rng.sample(range(1, epochs + 1), rng.randint(1, 2)))
        flags += ["--milestones", json.dumps(milestones)]
    if schedule == "step" and rng.random() < 0.5:
        flags += ["--step-every", str(rng.randint(1, 3))]
    if schedule in ("step", "multistep") and rng.random() < 0.5:
        flags += ["--gamma", str(rng.choice([0.5, 0.1]))]
    return flags


def _draw_sampling(rng: random.Random) -> list[str]:
    flags = ["--sampler", rng.choice(["stratified", "shuffle"])]
    if rng.random() < 0.35:
        flags += ["--label-noise", str(rng.choice([0.1, 0.3]))]
    if rng.random() < 0.35:
        flags += ["--imbalance", str(rng.choice([0.5, 0.2]))]
    return flags


def _draw_evaluation(rng: random.Random, epochs: int) -> list[str]:
    every = rng.choice([0, 1, 1, 2, 3] if epochs <= 6 else [0, 5, 10, 20])
    flags = ["--eval-every", str(every)]
    if rng.random() < 0.4 or every == 0:  # with every 0, evaluations only at --eval-epochs
        chosen = sorted(rng.sample(range(1, epochs), rng.randint(1, 2)))
        flags += ["--eval-epochs", ",".join(map(str, chosen))]
    flags += ["--checkpoint-every", str(rng.choice([0, 0, 1, 2]))]
    stats = rng.choice(["precise", "running"])
    flags += ["--eval-stats", stats]
    if stats == "precise" and rng.random() < 0.25:
        flags += ["--precise-bn-batches", str(rng.choice([1, 2]))]
    return flags


def _draw_head(rng: random.Random, method: str, graph_step: bool) -> list[str]:
    # The captured step needs the Newton-Schulz polar factor, the exact solver and the solve
    # on the same device (the others synchronise): other choices would only be refused.
    polar = "newton_schulz" if graph_step else rng.choice(["auto", "svd", "gram",
                                                           "newton_schulz"])
    flags = _draw_implicit(rng, polar, graph_step) if method.startswith("implicit") else []
    if method == "fixed" and rng.random() < 0.5:
        flags += ["--rotation", rng.choice(["canonical", "random"])]
    if rng.random() < 0.4:
        flags += ["--tau", str(rng.choice([1.0, 5.0, 10.0]))]
    if rng.random() < 0.25:
        flags += ["--no-bias"]
    if rng.random() < 0.2:
        flags += ["--loss", "dr"]
    return flags


def _draw_implicit(rng: random.Random, polar: str, graph_step: bool) -> list[str]:
    flags = ["--polar-method", polar]
    if rng.random() < 0.4:
        flags += ["--delta", str(rng.choice([0.0, 1e-3, 0.1]))]
    if rng.random() < 0.3:
        flags += ["--update", rng.choice(["ema", "cma"])]
    riemannian = rng.random() < 0.15 and polar == "auto" and not graph_step
    if riemannian:
        flags += ["--solver", "riemannian", "--backward", rng.choice(["ddn", "none",
                                                                      "closed_form"])]
    elif rng.random() < 0.2:
        flags += ["--backward", rng.choice(["none", "closed_form"])]
    if rng.random() < 0.2 and polar != "newton_schulz" and not graph_step:
        flags += ["--solve-device", rng.choice(["same", "cpu"])]
    return flags


def _draw_runtime(rng: random.Random, graph_step: bool) -> list[str]:
    flags = ["--graph-step"] if graph_step else []
    if rng.random() < 0.3:
        flags += ["--data-on-device", rng.choice(["auto", "off"])]
    if rng.random() < 0.3:
        # fp16's GradScaler reads back whether a gradient overflowed, which the captured
        # step cannot hold: fp16 with it would only be refused.
        flags += ["--amp", rng.choice(["none", "bf16"] + ([] if graph_step else ["fp16"]))]
    if rng.random() < 0.2:
        flags += ["--eval-batch-size", str(rng.choice([100, 333]))]
    if rng.random() < 0.2:
        flags += ["--no-eval-test"]
    if rng.random() < 0.2:
        flags += ["--save-classifier"]
    return flags


# --- running gnc ------------------------------------------------------------------------


@dataclass
class Gnc:
    """How to start `gnc train`: the command and the children's environment."""

    command: list[str]
    env: dict[str, str]

    def argv(self, flags: list[str], out: Path, extra: Sequence[str]) -> list[str]:
        return [*self.command, "train", *flags, *COMMON_FLAGS, "--out", str(out), *extra]


def default_gnc(command: list[str] | None = None) -> Gnc:
    # One intra-op thread in every child: a different thread count may sum in another order.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return Gnc(command or [sys.executable, "-m", "gnc"], env)


def _default_sigint() -> None:
    # A fuzzer started as a background job has SIGINT ignored, which a child inherits and gnc
    # leaves alone: the SIGINT it is sent would then do nothing.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_gnc(gnc: Gnc, flags: list[str], out: Path, extra: Sequence[str] = ()) -> Run:
    """Run `gnc train` to its end (or RUN_TIMEOUT_S)."""
    try:
        proc = subprocess.run(gnc.argv(flags, out, extra), capture_output=True,
                              text=True, env=gnc.env, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RunFailed(f"{shlex.join(extra) or 'run'}: over {RUN_TIMEOUT_S} s") from exc
    return Run(proc.returncode, proc.stdout, proc.stderr)


def is_refusal(run: Run) -> bool:
    lines = run.stderr.strip().splitlines()
    return run.rc == 2 and len(lines) == 1 and lines[0].startswith("gnc: error:")


def has_traceback(run: Run) -> bool:
    return "Traceback (most recent call last)" in run.stdout + run.stderr


def expect_success(run: Run, what: str) -> None:
    if run.rc != 0 or has_traceback(run):
        tail = (run.stderr.strip() or run.stdout.strip())[-400:]
        raise RunFailed(f"{what}: exit status {run.rc}: {tail}")


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _wait_for_new_checkpoint(proc: subprocess.Popen, last: Path, before: int | None) -> None:
    """Until the run writes last.pt anew (its first checkpoint of this start) or ends."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and _mtime(last) in (None, before):
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RunFailed(f"no checkpoint within {RUN_TIMEOUT_S} s")
        time.sleep(0.005)


def run_interrupted(gnc: Gnc, flags: list[str], out: Path, extra: list[str],
                    rng: random.Random, log: list[str]) -> bool:
    """Start a run, kill it at a random moment after its first checkpoint; True when it had
    finished by then. A kill that ends it otherwise than documented is a RunFailed."""
    last = out / "checkpoints" / "last.pt"
    before = _mtime(last)
    # Files, not pipes: a pipe nobody reads while we wait could fill and stall the run.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(gnc.argv(flags, out, extra), stdout=stdout, stderr=stderr,
                                text=True, env=gnc.env, preexec_fn=_default_sigint)
        _wait_for_new_checkpoint(proc, last, before)
        fast = "ufm10" in flags  # ufm epochs take milliseconds, digits epochs a second
        delay = rng.choice([0.0, 0.01, 0.05, 0.1, rng.uniform(0, 0.3)] if fast else
                           [0.0, 0.05, 0.2, 0.5, 1.0, rng.uniform(0, 2)])
        time.sleep(delay)
        sig = rng.choice([signal.SIGINT, signal.SIGKILL])
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(sig)
        proc.wait(timeout=RUN_TIMEOUT_S)
        stdout.seek(0)
        stderr.seek(0)
        run = Run(proc.returncode, stdout.read(), stderr.read())
    log.append(f"{shlex.join(extra) or 'start'}: {sig.name} after {delay:.3f} s -> {run.rc}")
    _check_interrupted_exit(run, sig, f"{sig.name} to {shlex.join(extra) or 'the run'}")
    return run.rc == 0


def _check_interrupted_exit(run: Run, sig: signal.Signals, what: str) -> None:
    # docs/reliability.md "Ctrl-C": SIGINT is "gnc: interrupted" and 130, no traceback, or 0
    # once the command has finished; SIGKILL is death by SIGKILL unless it had finished.
    expected = {signal.SIGINT: 130, signal.SIGKILL: -signal.SIGKILL}[sig]
    if has_traceback(run) or run.rc not in (0, expected):
        raise RunFailed(f"{what}: exit status {run.rc}: {run.stderr.strip()[-400:]}")
    if run.rc == 130 and "gnc: interrupted" not in run.stderr:
        raise RunFailed(f"{what}: status 130 without 'gnc: interrupted'")


# --- comparing two runs -----------------------------------------------------------------


def load_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl without the keys that differ from run to run (timings,
    memory); [] when there is no file."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunFailed(f"{path}: line {number} is not JSON") from exc
        rows.append({k: v for k, v in row.items()
                     if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIX)})
    return rows


def _canonical(value: object) -> str:
    # JSON text compares floats bit for bit (repr round-trips) and NaN equal to NaN.
    return json.dumps(value, sort_keys=True)


def compare_metrics(ref: Path, other: Path) -> list[str]:
    """The differences between two metrics.jsonl files; [] when identical."""
    rows, others = load_metrics(ref), load_metrics(other)
    problems = []
    epochs, other_epochs = [r.get("epoch") for r in rows], [r.get("epoch") for r in others]
    if epochs != other_epochs:
        problems.append(f"epochs {epochs} vs {other_epochs}")
    by_epoch = {r.get("epoch"): r for r in others}
    for row in rows:
        twin = by_epoch.get(row.get("epoch"))
        if twin is None:
            continue
        for key in sorted(row.keys() | twin.keys()):
            a, b = _canonical(row.get(key)), _canonical(twin.get(key))
            if key not in row or key not in twin or a != b:
                problems.append(f"epoch {row['epoch']} {key}: {a[:60]} vs {b[:60]}")
    return problems


def compare_margins(ref: Path, other: Path) -> list[str]:
    if not ref.exists() and not other.exists():
        return []
    if not ref.exists() or not other.exists():
        return [f"{ref.name} in only one run"]
    a, b = np.load(ref, allow_pickle=False), np.load(other, allow_pickle=False)
    if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
        return [f"{ref.name} differs (shapes {a.shape} and {b.shape})"]
    return []


def compare_runs(ref: Path, other: Path) -> list[str]:
    """The differences between two run directories' results; [] when identical."""
    return (compare_metrics(ref / "metrics.jsonl", other / "metrics.jsonl")
            + compare_margins(ref / "cos_margins.npy", other / "cos_margins.npy"))


# --- the three checks -------------------------------------------------------------------


def check_same_seed(gnc: Gnc, flags: list[str], ref: Path, out: Path) -> list[str]:
    expect_success(run_gnc(gnc, flags, out), "same seed again")
    return compare_runs(ref, out)


def check_interrupted(gnc: Gnc, flags: list[str], ref: Path, out: Path,
                      rng: random.Random, log: list[str]) -> list[str]:
    finished = run_interrupted(gnc, flags, out, [], rng, log)
    starts = 1
    while not finished:
        _maybe_damage_last(out, rng, log)
        if starts < MAX_INTERRUPTS and rng.random() < 0.5:
            finished = run_interrupted(gnc, flags, out, ["--resume"], rng, log)
            starts += 1
        else:
            expect_success(run_gnc(gnc, flags, out, ["--resume"]), "--resume")
            log.append("--resume to the end")
            finished = True
    if rng.random() < 0.3:  # a resume of a finished run must change nothing
        expect_success(run_gnc(gnc, flags, out, ["--resume"]), "--resume when finished")
        log.append("--resume of the finished run")
    return compare_runs(ref, out)


def _maybe_damage_last(out: Path, rng: random.Random, log: list[str]) -> None:
    # An unreadable last.pt makes --resume fall back to the newest epoch_*.pt, which must
    # give the same result; only tried when there is one to fall back to.
    epoch_files = sorted((out / "checkpoints").glob("epoch_*.pt"))
    if epoch_files and rng.random() < 0.3:
        (out / "checkpoints" / "last.pt").write_bytes(b"damaged")
        log.append(f"last.pt damaged (newest {epoch_files[-1].name})")


def check_until(gnc: Gnc, flags: list[str], ref: Path, out: Path, rng: random.Random,
                log: list[str]) -> list[str]:
    epochs = json.loads((ref / "config.json").read_text())["epochs"]
    evaluated = [row["epoch"] for row in load_metrics(ref / "metrics.jsonl")]
    first = max(1, min(evaluated, default=epochs))
    if first >= epochs:  # gnc refuses to stop a run before its first evaluation
        log.append("until: skipped, no evaluation before the last epoch")
        return []
    stops = [rng.randint(first, epochs - 1)]
    if stops[0] + 1 < epochs and rng.random() < 0.4:
        stops.append(rng.randint(stops[0] + 1, epochs - 1))
    for n, stop in enumerate(stops):
        extra = ["--resume"] * (n > 0) + ["--until-epoch", str(stop)]
        expect_success(run_gnc(gnc, flags, out, extra), shlex.join(extra))
    expect_success(run_gnc(gnc, flags, out, ["--resume"]), "--resume after --until-epoch")
    log.append(f"until {stops} then --resume")
    return compare_runs(ref, out)


def check_flags(flags: list[str], workdir: Path, rng: random.Random,
                gnc: Gnc | None = None) -> Outcome:
    """Train one config and run the three checks on it, its run directories in workdir."""
    gnc = gnc or default_gnc()
    started = time.monotonic()
    outcome = _check(flags, workdir, rng, gnc)
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def _check(flags: list[str], workdir: Path, rng: random.Random, gnc: Gnc) -> Outcome:
    ref = workdir / "reference"
    first = run_gnc(gnc, flags, ref)
    if is_refusal(first):
        return Outcome("refused", [first.stderr.strip()])
    log: list[str] = []
    try:
        expect_success(first, "the run")
        problems = [f"same seed: {p}"
                    for p in check_same_seed(gnc, flags, ref, workdir / "same_seed")]
        problems += [f"interrupted: {p}" for p in
                     check_interrupted(gnc, flags, ref, workdir / "interrupted", rng, log)]
        problems += [f"until: {p}"
                     for p in check_until(gnc, flags, ref, workdir / "until", rng, log)]
    except RunFailed as exc:
        return Outcome("failed", [str(exc)], log)
    return Outcome("failed" if problems else "passed", problems, log)


# --- the command line -------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, required=True, help="configs to draw and check")
    parser.add_argument("--seed", type=int, default=1, help="config I is drawn from "
                        "random.Random(SEED * 100000 + I)")
    parser.add_argument("--start", type=int, default=0, help="index of the first config")
    parser.add_argument("--out", type=Path, help="where the run directories go "
                        "(default: a new temporary directory)")
    parser.add_argument("--gnc", help="the gnc command (default: this Python's -m gnc)")
    return parser.parse_args(argv)


def print_table(counts: Counter, total: int) -> None:
    rows = [("configs run", total), ("refused", counts["refused"]),
            ("passed", counts["passed"]), ("failed", counts["failed"])]
    for name, value in rows:
        print(f"{name:<12}{value:>6}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="resume_fuzz_"))
    out.mkdir(parents=True, exist_ok=True)
    gnc = default_gnc(shlex.split(args.gnc) if args.gnc else None)
    counts: Counter = Counter()
    for index in range(args.start, args.start + args.count):
        rng = random.Random(args.seed * 100000 + index)
        flags = draw_config(rng)
        workdir = out / f"config_{args.seed}_{index:04d}"
        shutil.rmtree(workdir, ignore_errors=True)  # a rerun into the same --out starts clean
        outcome = check_flags(flags, workdir, rng, gnc)
        counts[outcome.status] += 1
        print(f"{index:5d} {outcome.status:<8}{outcome.seconds:7.1f}s  {shlex.join(flags)}",
              flush=True)
        for problem in outcome.problems[:PROBLEMS_SHOWN]:
            print(f"      {problem}", flush=True)
        with open(out / "results.jsonl", "a") as results:
            results.write(json.dumps({"index": index, "seed": args.seed, "flags": flags,
                                      **asdict(outcome)}) + "\n")
        if outcome.status != "failed":  # keep only what someone will want to look at
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(counts, args.count)
    kept = " and the failed configs' run directories" if counts["failed"] else ""
    print(f"results.jsonl{kept}: {out}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
