#!/usr/bin/env bash
# The GPU check (issue 18), for the lent device machine as it is: its own python3 (PyTorch and
# torchvision preinstalled, no network, nothing of ours installed), our package from src/.
#
#   bash benchmarks/gpu_check.sh 1    # stage 1, at most ~5 min: what the card gives
#   bash benchmarks/gpu_check.sh 2    # stage 2: Table 1's first column (15 runs to epoch
#                                     # 50, or to the last epoch all reach by the deadline)
#   TOTAL_SECONDS=T bash benchmarks/gpu_check.sh all   # both in one call of T s at most
#                                     # (the machine goes back 30 s after a call: one call
#                                     # cannot lose it in between)
#
# Before the call, on the developer machine (the archive travels with `carry`):
#   mkdir -p data && cp ../shared/data/cifar10-jpg.tar.gz data/
#   run(command="bash benchmarks/gpu_check.sh 1", carry=["data/cifar10-jpg.tar.gz"],
#       timeout_s=330)
#   run(command="STAGE2_SECONDS=S bash benchmarks/gpu_check.sh 2",
#       carry=["data/cifar10-jpg.tar.gz"], timeout_s=S + 100)  # S: what the loan has left
#   or run(command="TOTAL_SECONDS=560 STAGE1_BUDGET=150 bash benchmarks/gpu_check.sh all",
#          carry=["data/cifar10-jpg.tar.gz"], timeout_s=600)
# After it, here: commit throughput-stage1.json, throughput.json, gpu.txt and the logs under
# docs/results/gpu/, and unpack the archive (report and runs, no checkpoints):
#   t=$(mktemp -d) && tar xzf FILES_AT/table1.tar.gz -C "$t" && cp "$t"/table1-report/* \
#     docs/results/gpu/table1-cifar10-resnet18/ && cp -r "$t"/table1 docs/results/gpu/raw/
# (the committed throughput-stage1.json is what a later loan's stage 2 alone starts from).
#
# Stage 1 (benchmarks/gpu_throughput.py -> $OUT/throughput-stage1.json), in this order: per
# method the epoch bench eager (bf16) and with the captured step (--graph-step); one
# evaluation's seconds; 10 replayed steps per method under
# torch.cuda.set_sync_debug_mode("error"); 1, 2, 4, 8 runs in ONE process, each replaying its
# captured step on a CUDA stream of its own as --jobs-mode streams runs them ("streams", with
# the one-run floor "replay_floor_ms" and peak memory per run); aggregate images/s with 1, 2,
# 4, 8 runs in flight as processes, then the best N under CUDA MPS when its daemon starts
# (probed for 30 s at most; only with 60 s of the budget left); "best" (the settings stage 2
# uses: streams with the captured step when they beat the processes or these were not
# measured, "best.streams_win"; rewritten with every save); last, grouped conv (groups=5) vs
# 5 dense convs on 5 streams / 1 stream per ResNet-18 conv shape. A part that fails is
# recorded as its error; no part starts after STAGE1_BUDGET s (default 240; recorded
# "skipped: budget"); STAGE1_TIMEOUT s (default STAGE1_BUDGET + 30) ends the rest with
# SIGTERM (SIGKILL 15 s later), which the script turns into an exit that kills its bench
# processes, stops the MPS daemon and writes its file (whole: a temporary file renamed) with
# "stopped"; it cuts its process parts itself 10 s before (recorded "timeout: ...").
# STAGE1_PARTS=streams,grouped_conv (say) runs only those (gpu_throughput.py --parts).
# With TOTAL_SECONDS=T, stage 2 gets what stage 1 really left (T less its wall time less 75 s):
# T=560 with STAGE1_BUDGET=150 ends stage 1 within 195 s (SIGTERM at 180, SIGKILL at 195; plus
# unpacking the data and gpu.txt), which leaves stage 2 at least ~270 s.
#
# Stage 2 (STAGE2_SECONDS=S, default 420, or with TOTAL_SECONDS what stage 1 left less 75 s;
# the call takes S + ~1 min for the report):
#   gnc experiment cifar10-resnet18 --seeds 5 --epochs 200 --until-epoch E \
#       --eval-epochs 10,25,E --eval-every 0 --jobs BEST --jobs-mode MODE [captured step]
# (also every 5th epoch when that costs at most 10% of E: the figures' curves)
# with stage 1's best settings and E the last epoch <= UNTIL (50) that all 15 runs reach in
# 0.9 S by stage 1's numbers (benchmarks/table1_stage2.py plan: Table 1's column at epoch E
# rather than epoch 50 for some runs and none for others). Stage 1's result is read from this
# call's $OUT, else $RUNS/stage1 (a warm machine keeps it), else STAGE1_JSON (copy the one
# that came back into a git-ignored folder and carry it), else
# docs/results/gpu/throughput-stage1.json (committed after an earlier loan). The experiment
# gets SIGINT at S s; the report includes unfinished runs at the epochs they evaluated
# (gnc report --unfinished). $OUT then holds log-stage2.txt, gpu.txt, throughput.json (card,
# jobs, aggregate_img_per_s, implicit_over_standard, s/epoch per method, the plan and the
# epoch each run reached) and table1.tar.gz: the report (median [min, max] train top-1 per
# method, summary.json, figures) and the runs without checkpoints -- one file, since a call
# returns at most 8. Every result is written to $OUT as soon as it exists.
#
# CPU dry run (as tests/test_bench.py runs stage 1): DEVICE=cpu JOBS=1 BENCH_SET="--set width=4
#   --set batch_size=10 ... --rounds 2 --conv-shapes 4x8 --conv-batch 2" bash ... 1
# Stage 2 on the CPU (CIFAR-10 under $DATA; tests/test_bench.py runs it):
#   OUT=o RUNS=r DEVICE=cpu SEEDS=1 UNTIL=2 REPORT_JOBS=2 PY=.venv/bin/python \
#   EXTRA="--width 4 --batch-size 10 --subset 4 --num-workers 0" bash ... 2
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
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

T_START=$(date +%s)
if [ ! -d "$DATA/cifar10-jpg" ] && [ -f "$DATA/cifar10-jpg.tar.gz" ]; then
  tar xzf "$DATA/cifar10-jpg.tar.gz" -C "$DATA"
fi
# without the images stage 1 would time random ones and stage 2 fail after the plan: stop
# now, before the loan is spent (carry data/cifar10-jpg.tar.gz)
if [ "$DEVICE" = cuda ] && [ ! -d "$DATA/cifar10-jpg/train" ]; then
  echo "gpu_check: no CIFAR-10 under $DATA/cifar10-jpg (carry $DATA/cifar10-jpg.tar.gz)" >&2
  exit 2
fi

stage1() {
  LOG="$OUT/log-stage1.txt"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "cuda", torch.version.cuda)'
  } > "$OUT/gpu.txt" 2>&1
  say "gpu: $(head -1 "$OUT/gpu.txt")"
  # the kill follows the budget (a part may start just before it ends); the script cuts
  # its process parts 10 s before the kill, and SIGTERM lets it stop the MPS daemon and
  # write its file; SIGKILL 15 s later if it has not ended
  local budget limit
  budget=$(printf '%.0f' "${STAGE1_BUDGET:-240}")  # whole seconds (150.5, 1e9 too)
  limit=$(printf '%.0f' "${STAGE1_TIMEOUT:-$(( budget + 30 ))}")
  timeout -s TERM -k 15 "$limit" $PY benchmarks/gpu_throughput.py \
    "$OUT/throughput-stage1.json" --device "$DEVICE" --data-dir "$DATA" --jobs "$JOBS" \
    --budget-s "$budget" --deadline-s "$(( limit - 10 ))" \
    ${STAGE1_PARTS:+--parts "$STAGE1_PARTS"} "${SET[@]}" >> "$LOG" 2>&1
  local rc=$?
  say "throughput (stage 1): exit $rc$([ $rc = 124 ] && echo ' (stopped at its time limit)')"
  mkdir -p "$RUNS/stage1"  # for stage 2 on this machine while it is warm ($OUT is per call)
  cp "$OUT/throughput-stage1.json" "$RUNS/stage1/" 2>/dev/null
  say "stage 1 done"
}

stage2() {
  LOG="$OUT/log-stage2.txt"
  # Stage 2: stage 1's best settings and the last epoch all runs reach by the deadline
  # (benchmarks/table1_stage2.py plan). Stage 1's result: this call's $OUT, else the copy a
  # warm machine kept ($RUNS/stage1), else $STAGE1_JSON (carried from an earlier call), else
  # the one committed from an earlier loan; none: the defaults.
  STAGE1=""
  for f in "$OUT/throughput-stage1.json" "$RUNS/stage1/throughput-stage1.json" \
           "${STAGE1_JSON:-}" docs/results/gpu/throughput-stage1.json; do
    if [ -n "$f" ] && [ -f "$f" ]; then STAGE1=$f; break; fi
  done
  say "stage 1 result: ${STAGE1:-none (defaults)}"
  [ -s "$OUT/gpu.txt" ] || nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || echo "$DEVICE" > "$OUT/gpu.txt"
  # the deadline: STAGE2_SECONDS, or what TOTAL_SECONDS leaves after stage 1 and ~75 s for
  # the report and the archive
  SECONDS2=${STAGE2_SECONDS:-420}
  if [ -n "${TOTAL_SECONDS:-}" ] && [ -z "${STAGE2_SECONDS:-}" ]; then
    SECONDS2=$(( TOTAL_SECONDS - ($(date +%s) - T_START) - 75 ))
    [ "$SECONDS2" -ge 30 ] || SECONDS2=30
  fi
  mkdir -p "$RUNS"
  read -r NJOBS MODE CAPTURED UNTIL EVALS TABLE < <($PY benchmarks/table1_stage2.py plan \
    "${STAGE1:-/nonexistent}" "$(( SECONDS2 * 9 / 10 ))" --seeds "${SEEDS:-5}" \
    --until "${UNTIL:-50}" --json "$RUNS/plan.json")
  FLAGS=()
  if [ "$CAPTURED" = yes ]; then
    FLAGS=(--graph-step --polar-method newton_schulz --data-on-device on)
  fi
  EXP="$RUNS/table1"
  say "stage 2: --until-epoch $UNTIL --eval-epochs $EVALS --jobs $NJOBS --jobs-mode $MODE" \
      "${FLAGS[*]}, stopped after $SECONDS2 s: $(tr -d '\n ' < "$RUNS/plan.json")"
  T0=$(date +%s)
  # SIGINT to the experiment and its workers at the deadline: the evaluated epochs are kept
  timeout -s INT -k 30 "$SECONDS2" $PY -m gnc experiment cifar10-resnet18 \
    --seeds "${SEEDS:-5}" --epochs 200 --until-epoch "$UNTIL" --eval-epochs "$EVALS" \
    --eval-every 0 --jobs "$NJOBS" --jobs-mode "$MODE" --data-dir "$DATA" --device "$DEVICE" \
    --no-progress "${FLAGS[@]}" "${EXTRA[@]}" --no-report --out "$EXP" >> "$LOG" 2>&1
  RC=$?
  WALL=$(( $(date +%s) - T0 ))
  say "experiment: exit $RC after $WALL s$([ $RC = 124 ] && echo ' (deadline)')"
  $PY -m gnc report "$EXP" --preset cifar10-resnet18 --table-epochs "$TABLE" \
    --unfinished --jobs "${REPORT_JOBS:-8}" --out "$RUNS/table1-report" \
    --command "bash benchmarks/gpu_check.sh 2 (gnc experiment cifar10-resnet18 --seeds ${SEEDS:-5} --epochs 200 --until-epoch $UNTIL --eval-epochs $EVALS --eval-every 0 --jobs $NJOBS --jobs-mode $MODE ${FLAGS[*]})" \
    --machine "$(head -1 "$OUT/gpu.txt")" >> "$LOG" 2>&1
  say "report: exit $?"
  $PY benchmarks/table1_stage2.py summary "${STAGE1:-/nonexistent}" "$EXP" "$WALL" \
    "$RUNS/plan.json" --card "$(head -1 "$OUT/gpu.txt")" > "$OUT/throughput.json" 2>> "$LOG"
  say "throughput.json: exit $?"
  # one file for the report and the runs' metrics (a call returns at most 8 files)
  tar czf "$OUT/table1.tar.gz" -C "$RUNS" --exclude='*.pt' --exclude=checkpoints table1 \
    table1-report 2>> "$LOG"
  say "table1.tar.gz: exit $? ($(du -k "$OUT/table1.tar.gz" 2>/dev/null | cut -f1) KiB)"
  say "stage 2 done"
}

case "$STAGE" in
  1) stage1 ;;
  2) stage2 ;;
  all) stage1; stage2 ;;
  *) echo "usage: bash benchmarks/gpu_check.sh 1|2|all" >&2; exit 2 ;;
esac
