"""Score another program's COCO-format predictions with this project's pycocotools glue (one evaluator for both).

    python benchmarks/score_coco_json.py --gt ../shared/coco128/annotations/instances_train2017.json \
        --pred runs/val/exp/last_predictions.json --contiguous-classes

``--pred`` is a COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``), e.g. YOLOv5's
``val.py --save-json`` output. YOLOv5 writes its contiguous class index as ``category_id`` for datasets it does not
recognise as COCO itself (coco128 among them): ``--contiguous-classes`` maps index i to the i-th category id of the
ground truth sorted by id. Image ids must be the ground truth's (YOLOv5 uses the numeric file stem: COCO's id).
Prints AP (mAP50-95) and AP50 and the 12-line COCOeval summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def score(gt: str | Path, pred: str | Path, contiguous: bool = False) -> dict[str, Any]:
    """mAP50-95 / mAP50 of the predictions in ``pred`` against the instances JSON ``gt``, with the summary text."""
    from utils.coco_eval import load_coco_gt, run_cocoeval

    coco_gt = load_coco_gt(gt)
    results = json.loads(Path(pred).read_text(encoding="utf-8"))
    if contiguous:
        cats = sorted(coco_gt.getCatIds())
        results = [dict(r, category_id=cats[int(r["category_id"])]) for r in results]
    ev, summary = run_cocoeval(coco_gt, results)
    return {"mAP50_95": float(ev.stats[0]), "mAP50": float(ev.stats[1]), "detections": len(results),
            "summary": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gt", required=True, help="COCO instances JSON (ground truth)")
    ap.add_argument("--pred", required=True, help="COCO results JSON (list of detections)")
    ap.add_argument("--contiguous-classes", action="store_true",
                    help="category_id holds a contiguous class index (YOLOv5 on non-COCO-named data)")
    ap.add_argument("--save", default="", help="also write mAP50, mAP50_95 and the detection count to this JSON file")
    opt = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    r = score(opt.gt, opt.pred, opt.contiguous_classes)
    print(r["summary"])
    print(f"{Path(opt.pred).name}: {r['detections']} detections, mAP50-95 {r['mAP50_95']:.4f}, mAP50 {r['mAP50']:.4f}")
    if opt.save:
        keep = {k: r[k] for k in ("mAP50", "mAP50_95", "detections")}
        Path(opt.save).write_text(json.dumps(keep, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
