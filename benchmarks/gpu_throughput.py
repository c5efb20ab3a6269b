"""Stage 1 of the GPU check (issue 18): what one card gives for many small runs.

    PYTHONPATH=src python3 benchmarks/gpu_throughput.py OUT.json [--device cuda] \
        [--data-dir data] [--jobs 1,2,4,8] [--set KEY=VALUE ...]

Writes one JSON object to OUT.json, rewritten after every measurement (a call cut by its
time limit still returns what it had):

- ``steps``: per method, the epoch bench (`gnc.bench.time_epoch`) eager (the preset as it is,
  bf16 autocast) and with the captured step (``graph_step``: float32, the implicit head with
  the Newton–Schulz polar factor): ms per step, s per epoch, peak MiB;
- ``eval_s``: one evaluation (precise statistics + train + test split), median of 3;
- ``sync_free``: whether (up to) 10 replayed steps of each method run under
  ``torch.cuda.set_sync_debug_mode("error")`` (CUDA only);
- ``jobs``: aggregate training images/s with N runs of the epoch bench in flight as plain
  processes, and with the best N under CUDA MPS when its daemon starts;
- ``best``: the settings stage 2 should use (the faster step variant, the best N, MPS or not).

On a CPU with ``--set width=4 --set batch_size=20 --set 'dataset_options={"subset": 4}'``
every part runs in seconds (tests/test_bench.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PRESET = "cifar10-resnet18"
METHODS = ("standard", "fixed", "implicit")
CAPTURED = {"graph_step": True, "amp": "none", "polar_method": "newton_schulz",
            "data_on_device": "on"}


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def step_variants(device: torch.device, data_dir: str, overrides: dict) -> dict:
    from gnc.bench import time_epoch

    out = {}
    for method in METHODS:
        for name, extra in (("eager", {}), ("captured", CAPTURED)):
            settings = {**overrides, **extra}
            if method != "implicit":
                settings.pop("polar_method", None)
            try:
                r = time_epoch(PRESET, method, device, data_dir=data_dir, **settings)
                out[f"{method}/{name}"] = {
                    "step_ms": r.forward_ms + r.backward_ms, "epoch_s": r.epoch_s,
                    "peak_mem_mb": r.peak_mem_mb, "note": r.note}
            except Exception as err:  # noqa: BLE001 -- a variant that fails is a result
                out[f"{method}/{name}"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return out


def eval_seconds(device: torch.device, data_dir: str, overrides: dict) -> float:
    from gnc.bench import _epoch_trainer

    with _epoch_trainer(PRESET, "implicit", device, 1, data_dir, overrides) as (trainer, _):
        trainer.train_epoch(None)
        times = []
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.evaluate_epoch({})
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync_free(device: torch.device, data_dir: str, overrides: dict) -> dict:
    """Per method: "ok" when 10 replays raise nothing under set_sync_debug_mode("error")."""
    from gnc.bench import _epoch_trainer

    out = {}
    for method in METHODS:
        settings = {**overrides, **CAPTURED}
        if method != "implicit":
            settings.pop("polar_method")
        try:
            with _epoch_trainer(PRESET, method, device, 1, data_dir, settings) as (trainer, _):
                trainer.train_epoch(None)  # first step eager, warm-up, capture
                graph = trainer.step_graph
                n = graph.static.begin_epoch(trainer.train_loader, trainer.step)
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    for _ in range(min(10, n)):  # replays of the next epoch's steps
                        graph.run(lambda: None)
                finally:
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode(0)
                out[method] = "ok" if graph.failed is None else f"not captured: {graph.failed}"
        except Exception as err:  # noqa: BLE001
            out[method] = f"{type(err).__name__}: {err}"[:300]
    return out


def in_flight(n: int, device: str, data_dir: str, sets: list[str], env: dict | None = None
              ) -> dict:
    """N epoch benches of the standard method at once; images/s summed over them."""
    cmd = [sys.executable, "-m", "gnc", "bench", "--device", device, "--sizes", "none",
           "--steps", "none", "--epoch", PRESET, "--methods", "standard", "--data-dir",
           data_dir, "--json", *[a for s in sets for a in ("--set", s)]]

    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})}) for _ in range(n)]
    results = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    rates, errors = [], []
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        if p.returncode:
            errors.append((stderr.strip().splitlines() or ["?"])[-1][:200])
            continue
        (rec,) = json.loads(stdout)
        steps = int(rec["note"].split(" steps")[0].rsplit(" ", 1)[-1])
        batch = parse_set(sets).get("batch_size", 250)
        rates.append(steps * batch / rec["epoch_s"])
    return {"runs": n, "img_per_s": sum(rates), "wall_s": wall, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--jobs", default="1,2,4,8")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    device, overrides = torch.device(args.device), parse_set(args.set)
    result: dict = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    path = Path(args.out)

    def save() -> None:
        path.write_text(json.dumps(result, indent=1))

    result["steps"] = step_variants(device, args.data_dir, overrides)
    save()
    result["eval_s"] = eval_seconds(device, args.data_dir, overrides)
    save()
    result["sync_free"] = sync_free(device, args.data_dir, overrides)
    save()
    steps = result["steps"]
    captured = all(steps.get(f"{m}/captured", {}).get("epoch_s", float("inf"))
                   < steps.get(f"{m}/eager", {}).get("epoch_s", float("inf"))
                   for m in METHODS)
    sets = args.set + ([f"{k}={json.dumps(v)}" for k, v in CAPTURED.items()
                        if k != "polar_method"] if captured else [])
    result["jobs"] = []
    for n in (int(j) for j in args.jobs.split(",")):
        result["jobs"].append(in_flight(n, args.device, args.data_dir, sets))
        save()
    best = max(result["jobs"], key=lambda r: r["img_per_s"])
    mps = None
    if device.type == "cuda":
        from gnc.jobs import start_mps

        daemon = start_mps(probe=True)
        if daemon is not None:
            try:
                mps = in_flight(best["runs"], args.device, args.data_dir, sets, daemon.env)
            finally:
                daemon.stop()
    result["mps"] = mps if mps is not None else "unavailable"
    use_mps = mps is not None and mps["img_per_s"] > best["img_per_s"]
    result["best"] = {"captured_step": captured, "jobs": best["runs"],
                      "jobs_mode": "mps" if use_mps else "processes",
                      "img_per_s": mps["img_per_s"] if use_mps else best["img_per_s"]}
    save()


if __name__ == "__main__":
    main()
