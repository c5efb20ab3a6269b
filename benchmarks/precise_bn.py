"""Bounded precise BN (``--precise-bn-batches N``): how far the metrics move, and the time.

    python benchmarks/precise_bn.py measure EXP OUT.jsonl [--n 0,5,10,20,30] [--draws 3]
    python benchmarks/precise_bn.py table OUT.jsonl
    python benchmarks/precise_bn.py time RUN [--repeats 2]

``measure`` re-evaluates the last checkpoint of every finished run under ``EXP`` (a
``gnc experiment`` directory) as the trainer does at that epoch, with the precise-BN pass
bounded to N training batches (N = 0: the full pass, which must reproduce the logged numbers)
for ``--draws`` batch orders (draw 0: the order the trainer's own evaluation used); one JSON
line per (run, N, draw), appended to OUT (a rerun skips what is there). ``table`` prints, per
method, the seeds' spread of the full pass and the largest |difference| of each N from it
(docs/bench.md, "Bounded precise BN"). ``time`` times one evaluation of ``RUN``'s last
checkpoint: with the former separate μ_G pass, folded (the default), and bounded to N = 10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from gnc.build import load_data, make_train_loaders
from gnc.data import set_loader_epoch
from gnc.evaluation import evaluate, recompute_statistics
from gnc.runtime import DistInfo
from gnc.saved_runs import load_run

KEYS = ("top1", "test_top1", "nc1", "test_nc1")


def _loaders(run: Path):
    cfg, model, info = load_run(run, "cpu")
    train_loader, evals = make_train_loaders(cfg, load_data(cfg), info["bundle"],
                                             info["device"], DistInfo())
    return model, info, train_loader, evals


def _evaluate(model, info, train_loader, evals, n: int, draw: int,
              separate_mean: bool = False) -> dict:
    """One evaluation as the trainer's (precise statistics, then every split); the global
    RNG is left as it was."""
    dev, K = info["device"], info["bundle"].num_classes
    rng = torch.get_rng_state()
    set_loader_epoch(train_loader, info["epoch"] + draw)
    if separate_mean:  # before the fold: μ_G from a pass of its own
        recompute_statistics(model, train_loader, dev, mean_loader=evals["train"])
    else:
        recompute_statistics(model, train_loader, dev, bn_batches=n, global_mean=False)
    row = {}
    for split, loader in evals.items():  # train first: it sets μ_G
        metrics, _ = evaluate(model, loader, K, dev,
                              set_global_mean=split == "train" and not separate_mean)
        prefix = "" if split == "train" else "test_"
        row.update({prefix + "top1": metrics["top1"], prefix + "nc1": metrics["nc1"]})
    torch.set_rng_state(rng)
    return row


def measure(exp: Path, out: Path, ns: list[int], draws: int) -> None:
    done = set()
    if out.exists():
        rows = map(json.loads, out.read_text().splitlines())
        done = {(r["run"], r["n"], r["draw"]) for r in rows}
    for run in sorted(p for p in exp.glob("*/seed*") if (p / "DONE").exists()):
        name = str(run.relative_to(exp))
        todo = [(n, d) for n in ns for d in range(draws if n else 1) if (name, n, d) not in done]
        if not todo:
            continue
        model, info, train_loader, evals = _loaders(run)
        logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        for n, draw in todo:
            row = {"run": name, "n": n, "draw": draw, "bn_batches_total": len(train_loader),
                   **_evaluate(model, info, train_loader, evals, n, draw)}
            if n == 0:
                row["same_as_logged"] = all(row[k] == logged[k] for k in KEYS)
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def table(results: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    methods = sorted({r["run"].split("/")[0] for r in rows})
    print("| method | | " + " | ".join(KEYS) + " |\n|---|---|" + "---:|" * len(KEYS))
    for method in methods:
        full = {r["run"]: r for r in rows if r["n"] == 0 and r["run"].startswith(method + "/")}
        if not all(r.get("same_as_logged") for r in full.values()):
            print(f"| {method} | N = 0 does not reproduce the logged numbers | |")
        spread = {k: max(r[k] for r in full.values()) - min(r[k] for r in full.values())
                  for k in KEYS}
        print(f"| {method} | seeds' spread | " + " | ".join(f"{spread[k]:.2f}" for k in KEYS)
              + " |")
        for n in sorted({r["n"] for r in rows} - {0}):
            diffs = defaultdict(list)
            for r in rows:
                if r["n"] == n and r["run"] in full:
                    for k in KEYS:
                        diffs[k].append(abs(r[k] - full[r["run"]][k]))
            print(f"| {method} | N = {n} | " + " | ".join(
                f"{max(diffs[k]):.2f}" + ("" if max(diffs[k]) <= spread[k] else " ✗")
                for k in KEYS) + " |")


def time_evaluations(run: Path, repeats: int) -> None:
    model, info, train_loader, evals = _loaders(run)
    images: list[int] = []
    model.backbone.register_forward_hook(lambda m, i, o: images.append(i[0].shape[0]))
    kinds = {"separate μ_G pass (before)": (0, True), "folded (the default)": (0, False),
             "folded, N = 10": (10, False)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind, (n, separate) in kinds.items():
            images.clear()
            t0 = time.perf_counter()
            _evaluate(model, info, train_loader, evals, n, 0, separate_mean=separate)
            times[kind].append(time.perf_counter() - t0)
            print(json.dumps({"kind": kind, "s": times[kind][-1], "images": sum(images)}),
                  flush=True)
    for kind, ts in times.items():
        print(f"{kind}: median {statistics.median(ts):.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("measure")
    p.add_argument("exp", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--n", default="0,5,10,20,30")
    p.add_argument("--draws", type=int, default=3)
    p = sub.add_parser("table")
    p.add_argument("results", type=Path)
    p = sub.add_parser("time")
    p.add_argument("run", type=Path)
    p.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "measure":
        measure(args.exp, args.out, [int(v) for v in args.n.split(",")], args.draws)
    elif args.cmd == "table":
        table(args.results)
    else:
        time_evaluations(args.run, args.repeats)


if __name__ == "__main__":
    main()
