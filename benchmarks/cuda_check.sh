#!/usr/bin/env bash
# The CUDA checks of docs/cuda.md in one run, for a machine with one NVIDIA GPU:
#   training step images/s for BN / GN / LN / IN at 640 px batch 64 (AMP float16 + GradScaler), NCHW and
#   channels_last weights, torch's GroupNorm and models/norm_channels_last.py's, with and without --compile; the
#   same with the loader; a CUDA profile of the step; train.py / val.py / detect.py on CUDA; a 1-process torchrun
#   job with --sync-bn; the test suite on the GPU (which runs torch's CUDA SyncBatchNorm across 2 processes on GPU 0).
#
#   bash benchmarks/cuda_check.sh OUT_DIR [COCO128_DIR]      # COCO128_DIR default: ../shared/coco128
#
# Every stage runs under its own time limit and logs its exit status; a failing stage does not stop the others.
# Output: OUT_DIR/cuda_check.log (everything), OUT_DIR/summary.md (stage, status, seconds), OUT_DIR/speed.jsonl
# (benchmarks/train_speed.py rows). Settings (environment): PYTHON, DEVICE (0), IMG (640), BATCH (64),
# STEPS (20 per timed pass), E2E_IMG (320), JOBS (pytest-xdist workers, 8), TESTS (pytest paths, tests),
# SKIP (stage names to skip). JOBS=0 runs pytest without pytest-xdist (not a project requirement).
# The whole run takes well over 10 minutes on an H200 (its first ten stages took 7.5 minutes on 2026-11-27).
set -u
OUT=${1:?usage: cuda_check.sh OUT_DIR [COCO128_DIR]}
COCO=${2:-../shared/coco128}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-0}; IMG=${IMG:-640}; BATCH=${BATCH:-64}; STEPS=${STEPS:-20}; E2E_IMG=${E2E_IMG:-320}
JOBS=${JOBS:-8}; SKIP=${SKIP:-}; TESTS=${TESTS:-tests}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd); COCO=$(cd "$COCO" && pwd) || exit 2
LOG=$OUT/cuda_check.log; SUM=$OUT/summary.md; JSON=$OUT/speed.jsonl
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 NORMYOLO_COCO128=$COCO
sed "s#^path: .*#path: $COCO#" cfg/data/coco128.yaml > "$WORK/coco128.yaml"
DATA=$WORK/coco128.yaml
echo "| stage | status | seconds |" > "$SUM"; echo "|---|---|---:|" >> "$SUM"

stage() {  # stage NAME LIMIT_S COMMAND...: run, log, record the status
    local name=$1 limit=$2; shift 2
    if [[ " $SKIP " == *" $name "* ]]; then echo "| $name | skipped | 0 |" >> "$SUM"; return; fi
    local t0=$SECONDS rc
    echo -e "\n===== $name ($(date -u +%H:%M:%S)): $*" >> "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1; rc=$?
    local status=$([ $rc -eq 0 ] && echo ok || ([ $rc -eq 124 ] && echo "timed out" || echo "rc $rc"))
    echo "| $name | $status | $((SECONDS - t0)) |" >> "$SUM"
    echo "===== $name: $status in $((SECONDS - t0)) s" >> "$LOG"
}

speed() {  # speed NAME LIMIT_S ARGS...: benchmarks/train_speed.py at the check's size on coco128
    local name=$1 limit=$2; shift 2
    stage "$name" "$limit" $PY benchmarks/train_speed.py --data "$DATA" --device "$DEVICE" --img "$IMG" \
        --batch-size "$BATCH" --json "$JSON" "$@"
}

stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
    $PY -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda, \
    torch.backends.cudnn.version(), torch.cuda.is_available() and torch.cuda.get_device_name(0))'"

# 1. the training step alone (one loaded batch repeated), every norm: channels-last with torch's GroupNorm, then
# with models/norm_channels_last.py's (keeps channels-last; torch's op makes CUDA input NCHW), the pair that decides
# whether the latter becomes the CUDA default (BN, which neither touches, is each run's reference); then NCHW, the
# format engine/accel.py measured slower
speed step-cl-on 150 --fixed-batch --max-batches "$STEPS" --epochs 2 --channels-last on --norms bn gn:C/16 ln in
speed step-gn-kernel 150 --fixed-batch --max-batches "$STEPS" --epochs 2 --channels-last on --gn-kernel channels-last \
    --norms bn gn:C/16 ln in
speed step-cl-off 150 --fixed-batch --max-batches "$STEPS" --epochs 2 --channels-last off --norms bn gn:C/16 ln in
# the faster format for BN + GN decides the next stages (engine/accel.py trains channels_last on CUDA: measured)
BEST=$($PY - "$JSON" <<'EOF'
import json, os, sys
rows = [json.loads(line) for line in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
tot = {}
for r in rows:
    if r["fixed_batch"] and not r["compile"] and not r["cudnn_benchmark"] and r.get("gn_kernel", "torch") == "torch" \
            and r["norm"].split(":")[0] in ("bn", "gn"):
        tot[r["channels_last"]] = tot.get(r["channels_last"], 0) + 1 / r["images_per_s"]
print(min(tot, key=tot.get) if tot else "on")
EOF
)
echo "faster memory format (BN + GN step time): channels_last $BEST" >> "$SUM"
speed step-cudnn-benchmark 150 --fixed-batch --max-batches "$STEPS" --epochs 2 --channels-last "$BEST" \
    --cudnn-benchmark --norms bn gn:C/16

# 2. train.py, val.py, detect.py on CUDA, and a 1-process torchrun job with SyncBN
RUNS=$WORK/runs
stage train 180 $PY train.py --data "$DATA" --img "$E2E_IMG" --epochs 3 --device "$DEVICE" --project "$RUNS" \
    --name plain --no-tensorboard
stage val 90 $PY val.py --data "$DATA" --img "$E2E_IMG" --weights "$RUNS/plain/weights/best.pt" --device "$DEVICE"
stage detect 60 bash -c "mkdir -p $WORK/imgs && cp \$(ls $COCO/images/train2017/*.jpg | head -4) $WORK/imgs/ && \
    $PY detect.py --weights $RUNS/plain/weights/best.pt --source $WORK/imgs --device $DEVICE --project $RUNS \
    --name detect && ls $RUNS/detect*"
stage torchrun-syncbn 180 $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py --data "$DATA" \
    --img "$E2E_IMG" --epochs 1 --norm syncbn --sync-bn --device "$DEVICE" --project "$RUNS" --name syncbn \
    --no-tensorboard
# faulthandler_timeout prints every thread's stack when one test runs longer, so a hang names its test
stage pytest 300 $PY -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120 \
    $([ "$JOBS" -gt 0 ] && echo "-n $JOBS") $TESTS

# 3. the step with the loader, the CUDA profile, then --compile (compile time is the warm-up column; GN takes > 2 min)
speed loader 150 --epochs 4 --channels-last "$BEST" --norms bn gn:C/16
stage profile-gn-kernel 120 $PY benchmarks/profile_train.py --data "$DATA" --device "$DEVICE" --img "$IMG" \
    --batch-size "$BATCH" --norm gn:C/16 --batches 10 --warmup 3 --top 15 --gn-kernel channels-last
for norm in bn gn:C/16; do
    stage "profile-$norm" 120 $PY benchmarks/profile_train.py --data "$DATA" --device "$DEVICE" --img "$IMG" \
        --batch-size "$BATCH" --norm "$norm" --batches 10 --warmup 3 --top 15
done
for norm in bn gn:C/16; do
    speed "step-compile-$norm" 600 --fixed-batch --max-batches "$STEPS" --epochs 2 --channels-last "$BEST" --compile \
        --norms "$norm"
done
stage train-compile 600 $PY train.py --data "$DATA" --img "$E2E_IMG" --epochs 2 --device "$DEVICE" --project "$RUNS" \
    --name compiled --compile --no-tensorboard
grep -h "^| \|GN/BN\|^train speed\|mAP\|all " "$LOG" | grep -v "^| stage" > "$OUT/tables.txt"
cat "$SUM"
