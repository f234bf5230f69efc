#!/usr/bin/env bash
# Side by side on coco128 (train = val), n model from scratch, 320 px, batch 16, 100 epochs: NormYOLO and YOLOv5,
# both scored by this project's pycocotools glue on coco128's official instances JSON. Results: benchmarks/peer_coco128.md;
# `python benchmarks/peer_summary.py --out DIR` prints the tables from the output folder.
#
#   bash benchmarks/peer_coco128.sh --yolov5 DIR --python PY [--seeds "0 1"] [--epochs 100] [--out DIR]
#                                   [--coco128 DIR] [--only normyolo|yolov5] [--normyolo-args "--amp off"]
#
# DIR is a YOLOv5 checkout (ultralytics/yolov5) and PY the interpreter of a virtual environment that has its
# requirements: YOLOv5 is AGPL and never a dependency of this project, so this script installs nothing and contains
# none of its code; it only calls its train.py and val.py. Nothing downloads: YOLOv5 starts from --weights '', its
# online checks and pip auto-installs are switched off by environment variables, and a local TTF (matplotlib's
# DejaVuSans) stands in for the Arial.ttf it would fetch. Run one training at a time on a small machine: concurrent
# torch processes spin-wait each other (4-6x slower on 2 cores), and YOLOv5's NMS has a wall-clock time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
YOLOV5="" PY="" SEEDS="0 1" EPOCHS=100 OUT="$REPO/runs/peer_coco128" COCO128="$REPO/../shared/coco128" ONLY="" NY_ARGS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --yolov5) YOLOV5=$(realpath "$2"); shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --out) OUT=$(realpath -m "$2"); shift 2 ;;
    --coco128) COCO128=$(realpath "$2"); shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --normyolo-args) NY_ARGS="$2"; shift 2 ;;  # extra train.py flags, e.g. "--amp off" (float32)
    *) echo "error: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
GT="$COCO128/annotations/instances_train2017.json"
[[ -f "$GT" ]] || { echo "error: --coco128 $COCO128: annotations/instances_train2017.json not found" >&2; exit 2; }
mkdir -p "$OUT"

if [[ "$ONLY" != "yolov5" ]]; then
  for S in $SEEDS; do  # NormYOLO: the command from the issue, one seed at a time
    /usr/bin/time -f "normyolo seed $S: %e s wall" python train.py --data cfg/data/coco128.yaml --hyp cfg/hyp/scratch.yaml \
      --img 320 --batch-size 16 --epochs "$EPOCHS" --seed "$S" --project "$OUT" --name "normyolo_s$S" --exist-ok $NY_ARGS \
      > "$OUT/normyolo_s$S.log" 2>&1
    tail -n 1 "$OUT/normyolo_s$S.log"
    # the final weights scored against the official instances JSON (crowd regions included), as YOLOv5's below
    python val.py --data cfg/data/coco128-json.yaml --weights "$OUT/normyolo_s$S/weights/last.pt" --img 320 \
      --project "$OUT" --name "normyolo_s${S}_val_last" --exist-ok > "$OUT/normyolo_s${S}_val_last.log" 2>&1
    cp "$OUT/normyolo_s${S}_val_last/metrics.json" "$OUT/normyolo_s${S}_last_pycocotools.json"
  done
fi

if [[ "$ONLY" != "normyolo" ]]; then
  [[ -f "$YOLOV5/train.py" && -x "$PY" ]] || { echo "error: --yolov5 DIR (a YOLOv5 checkout) and --python PY (its venv) are needed" >&2; exit 2; }
  mkdir -p "$OUT/config"
  export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLOv5_AUTOINSTALL=false YOLOV5_CONFIG_DIR="$OUT/config" \
    YOLO_CONFIG_DIR="$OUT/config"
  FONT=$("$PY" -c "import matplotlib, pathlib; print(pathlib.Path(matplotlib.__file__).parent / 'mpl-data/fonts/ttf/DejaVuSans.ttf')")
  [[ -f "$OUT/config/Arial.ttf" ]] || cp "$FONT" "$OUT/config/Arial.ttf"
  # YOLOv5 wants images/ and labels/ side by side and a data YAML of its own: a copy, never the shared folder
  DATA="$OUT/coco128"
  [[ -d "$DATA" ]] || cp -r "$COCO128" "$DATA"
  python - "$DATA" "$OUT/coco128_yolov5.yaml" <<'EOF'
import sys, yaml
names = yaml.safe_load(open("cfg/data/coco128.yaml"))["names"]
yaml.safe_dump({"path": sys.argv[1], "train": "images/train2017", "val": "images/train2017", "nc": len(names),
                "names": dict(enumerate(names))}, open(sys.argv[2], "w"), sort_keys=False)
EOF
  for S in $SEEDS; do
    (cd "$YOLOV5" && /usr/bin/time -f "yolov5 seed $S: %e s wall" "$PY" train.py --img 320 --batch-size 16 --epochs "$EPOCHS" \
      --data "$OUT/coco128_yolov5.yaml" --cfg models/yolov5n.yaml --weights '' --hyp data/hyps/hyp.scratch-low.yaml \
      --noplots --seed "$S" --project "$OUT" --name "yolov5_s$S" --exist-ok) > "$OUT/yolov5_s$S.log" 2>&1
    tail -n 1 "$OUT/yolov5_s$S.log"
    for W in last best; do  # YOLOv5's own evaluator prints its mAP; --save-json keeps the detections for ours
      (cd "$YOLOV5" && "$PY" val.py --weights "$OUT/yolov5_s$S/weights/$W.pt" --data "$OUT/coco128_yolov5.yaml" \
        --img 320 --batch-size 32 --task val --save-json --project "$OUT" --name "yolov5_s${S}_val_$W" --exist-ok) \
        > "$OUT/yolov5_s${S}_val_$W.log" 2>&1 || true  # its own pycocotools step fails (no instances_val2017.json)
      PRED="$OUT/yolov5_s${S}_val_$W/${W}_predictions.json"  # val.py writes none when nothing is detected
      if [[ -f "$PRED" ]]; then
        python benchmarks/score_coco_json.py --gt "$GT" --contiguous-classes --pred "$PRED" \
          --save "$OUT/yolov5_s${S}_${W}_pycocotools.json" | tail -n 1
      else
        echo "yolov5 seed $S $W.pt: no detections (no predictions JSON): mAP50-95 0, mAP50 0"
        echo '{"mAP50": 0.0, "mAP50_95": 0.0, "detections": 0}' > "$OUT/yolov5_s${S}_${W}_pycocotools.json"
      fi
    done
  done
fi
