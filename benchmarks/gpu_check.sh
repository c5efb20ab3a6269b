#!/usr/bin/env bash
# The GPU check (issue 18), for the lent device machine as it is: its own python3 (PyTorch and
# torchvision preinstalled, no network, nothing of ours installed), our package from src/.
#
#   bash benchmarks/gpu_check.sh 1    # stage 1, at most ~5 min: what the card gives
#   bash benchmarks/gpu_check.sh 2    # stage 2: Table 1's epoch-50 column (15 runs x 50 epochs)
#
# Before the call, on the developer machine (the archive travels with `carry`):
#   mkdir -p data && cp ../shared/data/cifar10-jpg.tar.gz data/
#   run(command="bash benchmarks/gpu_check.sh 1", carry=["data/cifar10-jpg.tar.gz"],
#       timeout_s=330)
#
# Stage 1 (benchmarks/gpu_throughput.py -> $OUT/throughput-stage1.json), in this order: per
# method the epoch bench eager (bf16) and with the captured step (--graph-step); one
# evaluation's seconds; 10 replayed steps per method under
# torch.cuda.set_sync_debug_mode("error"); aggregate images/s with 1, 2, 4, 8 runs in flight
# as processes, then the best N under CUDA MPS when its daemon starts; "best" (the settings
# stage 2 uses); then 1, 2, 4, 8 runs in ONE process, each replaying its captured step on a
# CUDA stream of its own ("streams", with the back-to-back replay floor "replay_floor_ms" and
# peak memory per run; "best.streams_would_win" says whether they beat the processes -- stage
# 2 cannot run them); last, grouped conv (groups=5) vs 5 dense convs on 5 streams / 1 stream
# per ResNet-18 conv shape. A part that fails is recorded as its error; no part starts after
# STAGE1_BUDGET s (recorded "skipped: budget"); STAGE1_TIMEOUT kills the rest;
# STAGE1_PARTS=streams,grouped_conv (say) runs only those (gpu_throughput.py --parts). Stage 2:
#   gnc experiment cifar10-resnet18 --seeds 5 --epochs 200 --until-epoch 50 \
#       --eval-epochs 10,25,50 --jobs BEST [--jobs-mode mps] [captured-step flags]
# its report (median [min, max] train top-1 per method at epoch 50, summary.json) into
# $OUT/table1-cifar10-resnet18/, and $OUT/throughput.json (card, jobs,
# aggregate_img_per_s, implicit_over_standard, s/epoch per method). Every result is written to
# $OUT as soon as it exists (a call cut by its timeout still returns it).
#
# CPU dry run (as tests/test_bench.py runs stage 1): DEVICE=cpu JOBS=1 BENCH_SET="--set width=4
#   --set batch_size=10 ... --rounds 2 --conv-shapes 4x8 --conv-batch 2" bash ... 1
# Stage 2 on the CPU (a throughput-stage1.json with "best" in $OUT, CIFAR-10 under $DATA):
#   OUT=o DEVICE=cpu SEEDS=1 UNTIL=1 EVAL_EPOCHS=1 REPORT_JOBS=2 PY=.venv/bin/python \
#   EXTRA="--width 4 --batch-size 10 --subset 4 --num-workers 1" bash ... 2   (~1 min)
set -uo pipefail
STAGE=${1:-1}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src GNC_CACHE_DIR=${GNC_CACHE_DIR:-$PWD/.gnc-cache} PYTHONUNBUFFERED=1
PY=${PY:-python3}
DATA=${DATA:-data}
RUNS=${RUNS:-runs/gpu}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-1,2,4,8}
read -r -a SET <<< "${BENCH_SET:-}"
read -r -a EXTRA <<< "${EXTRA:-}"
LOG="$OUT/log-stage$STAGE.txt"
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

if [ ! -d "$DATA/cifar10-jpg" ] && [ -f "$DATA/cifar10-jpg.tar.gz" ]; then
  tar xzf "$DATA/cifar10-jpg.tar.gz" -C "$DATA"
fi

if [ "$STAGE" = 1 ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "cuda", torch.version.cuda)'
  } > "$OUT/gpu.txt" 2>&1
  say "gpu: $(head -1 "$OUT/gpu.txt")"
  timeout "${STAGE1_TIMEOUT:-270}" $PY benchmarks/gpu_throughput.py \
    "$OUT/throughput-stage1.json" --device "$DEVICE" --data-dir "$DATA" --jobs "$JOBS" \
    --budget-s "${STAGE1_BUDGET:-240}" \
    ${STAGE1_PARTS:+--parts "$STAGE1_PARTS"} "${SET[@]}" >> "$LOG" 2>&1
  say "throughput (stage 1): exit $?"
  say "stage 1 done"
  exit 0
fi

# Stage 2: the settings stage 1 found best (captured step or not, N runs, MPS or not; a mode
# `gnc experiment --jobs-mode` does not know, or no stage 1 result, falls back to defaults).
read -r NJOBS MODE CAPTURED < <($PY - "$OUT/throughput-stage1.json" <<'PYEOF'
import json, sys
try:
    best = json.load(open(sys.argv[1]))["best"]
    jobs, mode, captured = int(best["jobs"]), best["jobs_mode"], bool(best["captured_step"])
    if mode not in ("auto", "processes", "mps"):
        raise ValueError(mode)
except (OSError, ValueError, KeyError, TypeError):
    jobs, mode, captured = 4, "processes", False
print(jobs, mode, "yes" if captured else "no")
PYEOF
)
FLAGS=()
if [ "$CAPTURED" = yes ]; then
  FLAGS=(--graph-step --amp none --polar-method newton_schulz --data-on-device on)
fi
EXP="$RUNS/table1"
say "stage 2: --jobs $NJOBS --jobs-mode $MODE ${FLAGS[*]}"
T0=$(date +%s)
$PY -m gnc experiment cifar10-resnet18 --seeds "${SEEDS:-5}" --epochs 200 \
  --until-epoch "${UNTIL:-50}" --eval-epochs "${EVAL_EPOCHS:-10,25,50}" --jobs "$NJOBS" \
  --jobs-mode "$MODE" --data-dir "$DATA" --device "$DEVICE" --no-progress "${FLAGS[@]}" \
  "${EXTRA[@]}" --no-report --out "$EXP" >> "$LOG" 2>&1
say "experiment: exit $? after $(( $(date +%s) - T0 )) s"
$PY -m gnc report "$EXP" --preset cifar10-resnet18 --table-epochs "${UNTIL:-50},200" \
  --jobs "${REPORT_JOBS:-8}" --out "$OUT/table1-cifar10-resnet18" --machine "$(head -1 "$OUT/gpu.txt" 2>/dev/null)" \
  >> "$LOG" 2>&1
say "report: exit $?"
$PY - "$EXP" "$OUT" "$(( $(date +%s) - T0 ))" "$NJOBS" > "$OUT/throughput.json" <<'PYEOF'
import json, pathlib, sys
exp, out, wall, jobs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
stage1 = json.loads((out / "throughput-stage1.json").read_text())
per_epoch, epochs = {}, 0
for run in sorted(exp.glob("*/seed*")):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    if rows:
        per_epoch.setdefault(run.parent.name, []).append(rows[-1]["elapsed_s"] / rows[-1]["epoch"])
        epochs += rows[-1]["epoch"]
steps = stage1.get("steps", {})
variant = "captured" if stage1.get("best", {}).get("captured_step") else "eager"
ratio = None
try:
    ratio = steps[f"implicit/{variant}"]["step_ms"] / steps[f"standard/{variant}"]["step_ms"]
except (KeyError, ZeroDivisionError):
    pass
print(json.dumps({
    "card": stage1.get("card"), "jobs": jobs, "jobs_mode": stage1.get("best", {}).get("jobs_mode"),
    "captured_step": variant == "captured",
    "aggregate_img_per_s": stage1.get("best", {}).get("img_per_s"),  # training only (stage 1)
    "experiment_img_per_s": epochs * 50000 / wall,  # stage 2, evaluations included
    "experiment_wall_s": wall, "implicit_over_standard": ratio,
    "s_per_epoch": {m: sum(v) / len(v) for m, v in per_epoch.items()},
    "eval_s": stage1.get("eval_s"),
    "eval_s_precise_bn_20": stage1.get("eval_s_precise_bn_20"),
}, indent=1))
PYEOF
say "throughput.json written"
say "stage 2 done"
