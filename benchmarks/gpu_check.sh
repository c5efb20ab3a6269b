#!/usr/bin/env bash
# The GPU check, for the lent device machine as it is: its own python3 (PyTorch and
# torchvision preinstalled, no network, nothing of ours installed), our package from src/.
#
#   bash benchmarks/gpu_check.sh 1    # stage 1, at most ~5 min on an H100
#   bash benchmarks/gpu_check.sh 2    # stage 2, only after stage 1 succeeded: longer runs
#
# Before the call, on the developer machine (the archive travels with `carry`):
#   mkdir -p data && cp ../shared/data/cifar10-jpg.tar.gz data/
#   run(command="bash benchmarks/gpu_check.sh 1", carry=["data/cifar10-jpg.tar.gz"])
#
# Stage 1: GPU name; layer bench (512x10, 512x100, 2048x1000 with the eigensolvers and the
# sync-free Newton-Schulz polar factor; 10240x10000 with the latter); epoch bench of
# cifar10-resnet18 per method, then of the implicit head with --polar-method newton_schulz
# and with that plus --graph-head (bench-epoch-variants.json); the profile of the three
# methods (`gnc bench --profile`: launches, host waits, operators per step); EPOCHS (5)
# epochs of cifar10-resnet18 per method at seed 1. Stage 2: the same three runs for as many
# epochs as STAGE2_SECONDS (default 300) allows at stage 1's measured speed, the implicit
# head in the fastest of stage 1's three variants, plus a resume check (the
# implicit run killed a third of the way, then resumed). Every result is written to $OUT as
# soon as it exists (a call cut by its timeout still returns it); the run directories come
# back as one archive per stage (at most 8 files return from the device machine).
#
# CPU dry run (tests): DEVICE=cpu LAYER=64x10 EPOCHS=1 EXTRA="--width 8 --subset 20
#   --batch-size 100" BENCH_SET="--set width=8 --set batch_size=100 ..." bash ... 1
set -uo pipefail
STAGE=${1:-1}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src GNC_CACHE_DIR=${GNC_CACHE_DIR:-$PWD/.gnc-cache} PYTHONUNBUFFERED=1
PY=${PY:-python3}
DATA=${DATA:-data}
RUNS=${RUNS:-runs/gpu}
EPOCHS=${EPOCHS:-5}
DEVICE=${DEVICE:-cuda}
LAYER=${LAYER:-512x10,512x100,2048x1000}
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a SET <<< "${BENCH_SET:-}"
LOG="$OUT/log-stage$STAGE.txt"
gnc() { $PY -m gnc "$@"; }
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
pack() { tar czf "$OUT/runs-stage$STAGE.tar.gz" --exclude='*.pt' "$RUNS" 2>/dev/null; }

if [ ! -d "$DATA/cifar10-jpg" ] && [ -f "$DATA/cifar10-jpg.tar.gz" ]; then
  tar xzf "$DATA/cifar10-jpg.tar.gz" -C "$DATA"
fi
TRAIN=(--preset cifar10-resnet18 --data-dir "$DATA" --no-progress --device "$DEVICE"
       "${EXTRA[@]}")
BENCH=(bench --device "$DEVICE" --sizes none --steps none --epoch cifar10-resnet18
       --data-dir "$DATA" "${SET[@]}" --json)

if [ "$STAGE" = 1 ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "cuda", torch.version.cuda)'
  } > "$OUT/gpu.txt" 2>&1
  say "gpu: $(head -1 "$OUT/gpu.txt")"
  timeout 60 $PY -m gnc bench --device "$DEVICE" --sizes "$LAYER" --steps none \
    --epoch none --repeats 5 --json > "$OUT/bench-layer.json" 2>>"$LOG"
  say "layer bench: exit $?"
  # the largest layer alone, sync-free polar factor only, capped at a minute (the eigensolver
  # path did not finish in a minute on an H200: a float64 eigh of 10000x10000 takes seconds)
  timeout 60 $PY -m gnc bench --device "$DEVICE" --sizes "${BIG_LAYER:-10240x10000}" \
    --polar newton_schulz --steps none --epoch none --repeats 3 --json \
    > "$OUT/bench-layer-big.json" 2>>"$LOG"
  say "layer bench ${BIG_LAYER:-10240x10000}: exit $?"
  timeout ${BENCH_TIMEOUT:-150} $PY -m gnc "${BENCH[@]}" > "$OUT/bench-epoch.json" 2>>"$LOG"
  say "epoch bench: exit $?"
  # the implicit head with the sync-free polar factor, then also replayed from CUDA graphs;
  # kept in RUNS for stage 2's choice, merged into one returned file
  mkdir -p "$RUNS/stage1"
  timeout 45 $PY -m gnc "${BENCH[@]}" --methods implicit --set polar_method=newton_schulz \
    > "$RUNS/stage1/bench-epoch-ns.json" 2>>"$LOG"
  say "epoch bench, implicit newton_schulz: exit $?"
  timeout 60 $PY -m gnc "${BENCH[@]}" --methods implicit --set polar_method=newton_schulz \
    --set graph_head=true > "$RUNS/stage1/bench-epoch-graph.json" 2>>"$LOG"
  say "epoch bench, implicit newton_schulz + CUDA-graphed head: exit $?"
  cp "$OUT/bench-epoch.json" "$RUNS/stage1/"
  $PY - "$RUNS/stage1" > "$OUT/bench-epoch-variants.json" <<'PYEOF'
import json, pathlib, sys
out = []
for variant in ("ns", "graph"):
    try:
        recs = json.loads((pathlib.Path(sys.argv[1]) / f"bench-epoch-{variant}.json").read_text())
    except (OSError, ValueError):
        continue
    out += [dict(r, variant=variant) for r in recs]
print(json.dumps(out, indent=1))
PYEOF
  # where the implicit head's extra time goes: kernel launches, host waits, top operators
  timeout ${PROFILE_TIMEOUT:-60} $PY -m gnc bench --device "$DEVICE" --epoch cifar10-resnet18 \
    --data-dir "$DATA" "${SET[@]}" --profile > "$OUT/profile-epoch.md" 2>>"$LOG"
  say "epoch profile: exit $?"
  for m in standard fixed implicit; do
    gnc train "${TRAIN[@]}" --method "$m" --seed 1 --epochs "$EPOCHS" --eval-every 5 \
      --overwrite --out "$RUNS/stage1/$m/seed1" >> "$LOG" 2>&1
    say "train $m ($EPOCHS epochs): exit $?"
    pack
  done
  say "stage 1 done"
  exit 0
fi

# Stage 2: epochs from stage 1's measured seconds per epoch and the budget; three runs plus
# the resume check (a third of one more run), 10 % margin. Then the resume check's kill time,
# and the implicit head's polar factor: whichever of stage 1's epoch benches was faster.
read -r E2 KILL_S POLAR GRAPH < <($PY - "$RUNS/stage1" "${STAGE2_SECONDS:-300}" <<'PYEOF'
import json, pathlib, sys
root, budget = pathlib.Path(sys.argv[1]), float(sys.argv[2])
per = []
for m in ("standard", "fixed", "implicit"):
    lines = (root / m / "seed1" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    per.append(last["elapsed_s"] / last["epoch"])
e2 = max(5, int(budget / ((sum(per) + per[2] / 3) * 1.1)) // 5 * 5)

def implicit_s(name):
    try:
        recs = json.loads((root / name).read_text())
        return next(r["epoch_s"] for r in recs if r["method"].startswith("implicit"))
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return float("inf")

flags = {"auto": "auto", "ns": "newton_schulz", "graph": "newton_schulz --graph-head"}
best = min(flags, key=lambda v: implicit_s("bench-epoch.json" if v == "auto"
                                           else f"bench-epoch-{v}.json"))
print(e2, int(15 + per[2] * e2 / 3), flags[best])
PYEOF
)
say "stage 2: ${E2:?stage 1 results missing} epochs per method; resume check killed after \
${KILL_S}s; implicit head: --polar-method $POLAR $GRAPH (the fastest in stage 1's epoch bench)"
for m in standard fixed implicit; do
  gnc train "${TRAIN[@]}" --method "$m" --seed 1 --epochs "$E2" --eval-every 5 \
    --polar-method "$POLAR" $GRAPH --checkpoint-every 5 --overwrite \
    --out "$RUNS/stage2/$m/seed1" >> "$LOG" 2>&1
  say "train $m ($E2 epochs): exit $?"
  pack
done
# Resume check: SIGKILL the implicit run a third of the way, resume it to the end; its
# metrics should match the uninterrupted stage-2 run within bf16 noise.
R="$RUNS/stage2-resume/implicit/seed1"
timeout -s KILL "$KILL_S" $PY -m gnc train "${TRAIN[@]}" --method implicit --seed 1 \
  --polar-method "$POLAR" $GRAPH --epochs "$E2" --eval-every 5 --checkpoint-every 5 \
  --overwrite --out "$R" >> "$LOG" 2>&1
say "resume check: killed after ${KILL_S}s (exit $?)"
gnc train "${TRAIN[@]}" --method implicit --seed 1 --polar-method "$POLAR" $GRAPH \
  --epochs "$E2" --eval-every 5 --checkpoint-every 5 --resume --out "$R" >> "$LOG" 2>&1
say "resume check: resumed to $E2 epochs: exit $?"
pack
say "stage 2 done"
