"""Wall time of one ``gnc experiment`` command at ``--jobs 1`` and ``--jobs N``, alternating.

    python benchmarks/jobs_speedup.py [--jobs 1,2] [--repeats 5] [--no-report] \
        [-- EXPERIMENT ARGS]

Runs ``gnc experiment EXPERIMENT ARGS --jobs J --out TMP`` (a fresh folder each time) for
every J of ``--jobs``, one after the other, ``--repeats`` rounds, so that a change in the
machine's load falls on every J alike; prints each wall time (the whole command: start-up,
training, the report), the median per J and its ratio to the first J's. The default is
issue 18's CPU target: ``digits --seeds 2 --methods standard,implicit --epochs 8``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = ["digits", "--seeds", "2", "--methods", "standard,implicit", "--epochs", "8"]


def wall_seconds(args: list[str], jobs: int, out: Path) -> float:
    """The seconds ``gnc experiment ARGS --jobs JOBS --out OUT`` takes, start to exit."""
    command = [sys.executable, "-m", "gnc", "experiment", *args, "--jobs", str(jobs),
               "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="1,2", help="the --jobs values, the first the "
                        "baseline (default 1,2)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--no-report", action="store_true", help="pass --no-report")
    parser.add_argument("experiment", nargs="*", help="gnc experiment's arguments, after --")
    args = parser.parse_args()
    jobs = [int(j) for j in args.jobs.split(",")]
    command = (args.experiment or DEFAULT) + (["--no-report"] if args.no_report else [])
    times: dict[int, list[float]] = {j: [] for j in jobs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for j in jobs:
                times[j].append(wall_seconds(command, j, Path(tmp) / f"r{r}-j{j}"))
                print(f"round {r + 1}: --jobs {j} {times[j][-1]:.2f} s", file=sys.stderr)
    base = statistics.median(times[jobs[0]])
    print(f"gnc experiment {' '.join(command)} --jobs J")
    print(f"{'J':>3}  {'median s':>8}  {'ratio':>5}  runs (s)")
    for j in jobs:
        median = statistics.median(times[j])
        print(f"{j:>3}  {median:>8.2f}  {median / base:>5.2f}  "
              + " ".join(f"{t:.2f}" for t in times[j]))


if __name__ == "__main__":
    main()
