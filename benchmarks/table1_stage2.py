"""Stage 2 of the GPU check (issue 18): Table 1's epoch-50 column, planned to fit the loan.

    python3 benchmarks/table1_stage2.py plan STAGE1.json SECONDS [--seeds 5] [--until 50]
    python3 benchmarks/table1_stage2.py summary STAGE1.json EXP_DIR WALL_S PLAN.json [--card C]

``plan`` prints one line for ``gpu_check.sh``, ``JOBS MODE CAPTURED UNTIL EVAL_EPOCHS
TABLE_EPOCHS`` (and with ``--json F`` the plan to F): stage 1's best settings (``best`` of
benchmarks/gpu_throughput.py: captured step or not, N runs in flight, streams, MPS or
plain processes), the last epoch E the 15 runs can all reach in ``SECONDS`` (at most ``--until``),
the evaluations, and the report's two table epochs (Table 1's last below E, and E). A device
loan is 15 minutes in all, so stage 2 rarely has the ten minutes 15 × 50 epochs need at the
issue's target rate; a column that every run reaches (epoch 20, say) is worth more than 50
epochs for some runs and none for others. The estimate, from stage 1's numbers:

- one run of method m alone trains an epoch in ``e_m`` s (the epoch bench, ``steps``) and
  evaluates in ``eval_s`` s (precise statistics, train and test split);
- with N runs in flight each is slower by ``slowdown = N * img_1 / img_N`` (images/s of one
  run alone and of N at once, the ``jobs`` part; the MPS one when stage 2 uses MPS; with
  ``--jobs-mode streams`` both from the ``streams`` part);
- a run to epoch E takes ``start_s + slowdown * (E * e_m + n_evals(E) * eval_s)``, with
  ``start_s`` the start of one bench process alone (its wall time less its two epochs:
  process, imports, data to the device, model; :func:`start_seconds`), at least 5 s;
- the runs start in ``gnc experiment``'s queue order (seed-major, the implicit head first in
  each seed), each on the first free slot of N: the last to end is the experiment's time;
- with ``--jobs-mode streams`` the runs share one host thread: a run's start and every
  evaluation stall all the others, so their seconds add up (an evaluation at its one-run
  ``eval_s``, a start at the ``streams`` part's ``build_s`` of one run) on top of the slots'
  training time;
- evaluations every 5 epochs as well (the figures' curves) when E with them is at least 90%
  of E without them.

Without stage 1's numbers (no file, or no measurement) the plan keeps ``--until`` and the
default N (:data:`DEFAULT_JOBS`); the deadline in gpu_check.sh still bounds the experiment.

``summary`` prints throughput.json: the card, the settings, stage 1's training-only
aggregate images/s, stage 2's own images/s and s/epoch per method (evaluations included), the
captured step's implicit/standard ratio and the plan beside what the runs reached.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from pathlib import Path

METHODS = ("standard", "fixed", "implicit")
QUEUE = ("implicit", "standard", "fixed")  # gnc experiment's order within a seed
TRAIN_IMAGES = 50_000  # CIFAR-10's train split
EVAL_EPOCHS = (10, 25, 50)  # the evaluations Table 1 needs
DENSE_EVERY = 5  # and for the figures' curves, when they cost at most 10% of the epochs
DENSE_KEEPS = 0.9
DEFAULT_JOBS = 4
START_S = 20.0  # a run's start when stage 1 did not time one
MIN_START_S = 5.0


def read_stage1(path: str | Path) -> dict:
    """Stage 1's JSON object, or {} when the file is missing or not a JSON object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def settings(stage1: dict) -> tuple[int, str, bool]:
    """``(jobs, jobs_mode, captured_step)`` of stage 1's ``best``, or the defaults."""
    best = stage1.get("best")
    try:
        jobs, mode, captured = int(best["jobs"]), best["jobs_mode"], bool(best["captured_step"])
        if jobs < 1 or mode not in ("auto", "processes", "mps", "streams"):
            raise ValueError(mode)
    except (ValueError, KeyError, TypeError):
        return DEFAULT_JOBS, "processes", False
    return jobs, mode, captured


def eval_epochs(until: int, every: int = 0) -> list[int]:
    """The evaluations of a run to ``until``: Table 1's epochs below it, every ``every``-th
    epoch (0: none), and ``until``."""
    dense = range(every, until, every) if every else ()
    return sorted({e for e in EVAL_EPOCHS if e < until} | set(dense) | {until})


def _number(value: object) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) and value > 0 else None


def _one_run(stage1: dict, part: str = "jobs") -> dict:
    """Stage 1's record of one run alone in ``part`` (``jobs``, ``streams``; ``{}`` when
    missing)."""
    records = [r for r in stage1.get(part) or [] if isinstance(r, dict)]
    return next((r for r in records if r.get("runs") == 1), {})


def _epoch_seconds(stage1: dict, method: str) -> float | None:
    """Stage 1's epoch-bench seconds of ``method`` in the variant stage 2 uses."""
    steps = stage1.get("steps") if isinstance(stage1.get("steps"), dict) else {}
    variant = "captured" if settings(stage1)[2] else "eager"
    return _number((steps.get(f"{method}/{variant}") or {}).get("epoch_s"))


def run_seconds(stage1: dict) -> dict[str, tuple[float, float]] | None:
    """Per method, ``(seconds per epoch, seconds per evaluation)`` of one run while N run at
    once (stage 1's single-run times × the slowdown of N in flight), or None when stage 1
    did not measure what the estimate needs."""
    jobs, mode, _ = settings(stage1)
    agg = _number((stage1.get("best") or {}).get("img_per_s"))
    # the slowdown within the part that measured `agg`: streams' N against streams' one run
    img_1 = _number(_one_run(stage1, "streams" if mode == "streams" else "jobs")
                    .get("img_per_s"))
    eval_s = _number(stage1.get("eval_s"))
    epoch_s = {m: _epoch_seconds(stage1, m) for m in METHODS}
    if agg is None or img_1 is None or eval_s is None or None in epoch_s.values():
        return None
    slowdown = max(1.0, jobs * img_1 / agg)
    return {m: (slowdown * e, slowdown * eval_s) for m, e in epoch_s.items()}


def start_seconds(stage1: dict) -> float:
    """Seconds a run takes to start: the one-run bench process's wall time less its two
    epochs (warm-up and timed; the standard head, the variant stage 2 uses), at least
    :data:`MIN_START_S`; with ``--jobs-mode streams`` (no process of its own) the
    ``streams`` part's ``build_s`` of one run, at least 1 s; :data:`START_S` when stage 1
    did not measure it."""
    if settings(stage1)[1] == "streams":
        build = _number(_one_run(stage1, "streams").get("build_s"))
        return START_S if build is None else max(1.0, build)
    wall = _number(_one_run(stage1).get("wall_s"))
    epoch = _epoch_seconds(stage1, "standard")
    if wall is None or epoch is None:
        return START_S
    return max(MIN_START_S, wall - 2 * epoch)


def makespan(costs: dict[str, tuple[float, float]], until: int, jobs: int, seeds: int,
             start_s: float = START_S, every: int = 0, serial_eval_s: float | None = None
             ) -> float:
    """Seconds until the last of ``seeds`` × methods runs reaches ``until`` (evaluating at
    :func:`eval_epochs`): the queue (seed-major, :data:`QUEUE` order) on ``jobs`` slots, each
    run to the first free one. ``serial_eval_s`` (``--jobs-mode streams``): starts and
    evaluations stall every run, so they add up, each evaluation taking this long, after the
    slots' training time."""
    n_evals = len(eval_epochs(until, every))
    queue = [m for _ in range(seeds) for m in QUEUE if m in costs]
    free = [0.0] * min(jobs, len(queue))
    serial = serial_eval_s is not None
    for m in queue:
        epoch_s, eval_s = costs[m]
        own = until * epoch_s + (0.0 if serial else start_s + n_evals * eval_s)
        heapq.heappush(free, heapq.heappop(free) + own)
    if serial:
        return max(free) + len(queue) * (start_s + n_evals * serial_eval_s)
    return max(free)


def plan(stage1: dict, seconds: float, *, seeds: int = 5, until: int = 50,
         start_s: float | None = None) -> dict:
    """Stage 2's settings: stage 1's best, the last epoch (≤ ``until``, ≥ 1) that every run
    reaches within ``seconds`` by the estimate (``until`` when it cannot be estimated), and
    the evaluations: every :data:`DENSE_EVERY` epochs too (curves for the figures) when the
    epoch reached with them is at least :data:`DENSE_KEEPS` of the one without, else Table
    1's only. ``start_s`` None: :func:`start_seconds`."""
    jobs, mode, captured = settings(stage1)
    costs = run_seconds(stage1)
    start_s = start_seconds(stage1) if start_s is None else start_s
    serial = _number(stage1.get("eval_s")) if mode == "streams" else None
    out = {"jobs": jobs, "jobs_mode": mode, "captured_step": captured, "seconds": seconds,
           "asked_until": until, "until": until, "eval_every": 0,
           "eval_epochs": eval_epochs(until), "estimate_s": None, "start_s": round(start_s, 1)}
    if costs is None:
        return out
    def last_fit(every: int) -> int:
        fits = [e for e in range(1, until + 1)
                if makespan(costs, e, jobs, seeds, start_s, every, serial) <= seconds]
        return fits[-1] if fits else 0

    end, every = last_fit(0), 0
    if last_fit(DENSE_EVERY) >= DENSE_KEEPS * end > 0:  # curves for at most 10% of the epochs
        end, every = last_fit(DENSE_EVERY), DENSE_EVERY
    end = max(end, 1)
    out.update(until=end, eval_every=every, eval_epochs=eval_epochs(end, every),
               estimate_s=round(makespan(costs, end, jobs, seeds, start_s, every, serial), 1))
    return out


def summary(stage1: dict, exp: Path, wall_s: float, planned: dict, card: str | None = None
            ) -> dict:
    """throughput.json (see the module's docstring); ``card`` when stage 1 names none.
    ``experiment_img_per_s`` counts each run's epochs up to its last evaluation."""
    from gnc.rundir import read_metrics  # drops a line torn by the deadline's kill

    per_epoch: dict[str, list[float]] = {}
    epochs, reached = 0, {}
    for run in sorted(exp.glob("*/seed*")):
        rows = read_metrics(run / "metrics.jsonl")
        if rows:
            last = rows[-1]
            if _number(last.get("elapsed_s")):
                per_epoch.setdefault(run.parent.name, []).append(
                    last["elapsed_s"] / last["epoch"])
            epochs += last["epoch"]
            reached[f"{run.parent.name}/{run.name}"] = last["epoch"]
    steps = stage1.get("steps") if isinstance(stage1.get("steps"), dict) else {}
    variant = "captured" if planned.get("captured_step") else "eager"
    try:
        ratio = steps[f"implicit/{variant}"]["step_ms"] / steps[f"standard/{variant}"]["step_ms"]
    except (KeyError, TypeError, ZeroDivisionError):
        ratio = None
    best = stage1.get("best") or {}
    return {
        "card": stage1.get("card") or card, "jobs": planned.get("jobs"),
        "jobs_mode": planned.get("jobs_mode"), "captured_step": variant == "captured",
        "aggregate_img_per_s": best.get("img_per_s"),  # training only, stage 1
        "experiment_img_per_s": epochs * TRAIN_IMAGES / wall_s if wall_s > 0 else None,
        "experiment_wall_s": wall_s, "implicit_over_standard": ratio,
        "s_per_epoch": {m: sum(v) / len(v) for m, v in per_epoch.items()},
        "eval_s": stage1.get("eval_s"),
        "eval_s_precise_bn_20": stage1.get("eval_s_precise_bn_20"),
        "plan": planned, "epoch_reached": reached,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan")
    p.add_argument("stage1")
    p.add_argument("seconds", type=float)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--until", type=int, default=50)
    p.add_argument("--start-s", type=float, help="a run's start (default: from stage 1)")
    p.add_argument("--json", help="also write the plan here")
    p = sub.add_parser("summary")
    p.add_argument("stage1")
    p.add_argument("exp", type=Path)
    p.add_argument("wall_s", type=float)
    p.add_argument("plan", help="the plan's JSON (plan --json)")
    p.add_argument("--card", help="the card, when stage 1's result names none")
    args = ap.parse_args(argv)
    stage1 = read_stage1(args.stage1)
    if args.cmd == "plan":
        out = plan(stage1, args.seconds, seeds=args.seeds, until=args.until,
                   start_s=args.start_s)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        end = out["until"]
        first = max([e for e in EVAL_EPOCHS if e < end], default=end)
        print(out["jobs"], out["jobs_mode"], "yes" if out["captured_step"] else "no", end,
              ",".join(map(str, out["eval_epochs"])), f"{first},{end}")
    else:
        planned = read_stage1(args.plan)  # any JSON object
        json.dump(summary(stage1, args.exp, args.wall_s, planned, args.card), sys.stdout,
                  indent=1)
        print()


if __name__ == "__main__":
    main()
