"""val.py: its mAP equals pycocotools run by hand on the JSON it wrote; exact box mapping; model left untouched."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import val
from data.loader import create_dataloader, load_data_config
from engine.checkpoint import model_state, save_checkpoint
from engine.evaluate import evaluate
from models.yolo import Model
from logcapture import call_logged

NAMES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow", "crescent", "heart"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = Model("cfg/models/yolo-n-bn.yaml", nc=10)
    path = tmp_path_factory.mktemp("ckpt") / "rand.pt"
    save_checkpoint({"model": model_state(m), "ema": None, "model_yaml": m.yaml, "epoch": -1, "names": NAMES}, path)
    return path


def cocoeval_by_hand(gt_json: str | Path, dt_json: str | Path) -> list[float]:
    gt = COCO(str(gt_json))
    ev = COCOeval(gt, gt.loadRes(str(dt_json)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(s) for s in ev.stats]


def run_main(args: list[str]) -> tuple[dict, list[str]]:
    return call_logged(lambda a: val.main(val.parse_opt(a)), args)


def test_printed_map_equals_pycocotools_on_written_json(syn_yaml, ckpt, tmp_path):
    # a random-weights model and a very low threshold: hundreds of (mostly wrong) detections, a small nonzero mAP
    metrics, lines = run_main(["--data", str(syn_yaml), "--weights", str(ckpt), "--img", "160", "--batch-size", "8",
                               "--conf-thres", "0.00005", "--save-json", "--verbose", "--device", "cpu",
                               "--workers", "0", "--project", str(tmp_path / "runs")])
    save = Path(metrics["save_dir"])
    gt_json = load_data_config(syn_yaml)["val"]  # COCO-format data: the JSON itself is the reference
    stats = cocoeval_by_hand(gt_json, save / "predictions.json")
    assert metrics["detections"] > 1000
    assert metrics["mAP50_95"] == pytest.approx(stats[0], abs=1e-12)
    assert metrics["mAP50"] == pytest.approx(stats[1], abs=1e-12)
    assert metrics["coco_stats"] == pytest.approx(stats, abs=1e-12)
    assert json.loads((save / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    # what was printed: pycocotools' own summary line and the table's 'all' row (3 significant digits)
    summary = [ln for ln in lines if "IoU=0.50:0.95 | area=   all | maxDets=100" in ln and "Precision" in ln]
    assert len(summary) == 1 and float(summary[0].split("=")[-1]) == pytest.approx(round(stats[0], 3), abs=1e-9)
    all_row = [ln.split() for ln in lines if ln.split()[:1] == ["all"]]
    assert len(all_row) == 1 and float(all_row[0][-1]) == pytest.approx(stats[0], rel=5e-3, abs=1e-9)
    assert all_row[0][1:3] == ["12", str(metrics["instances"])]
    assert sum(1 for ln in lines if ln.split()[:1] and ln.split()[0] in NAMES) == len(metrics["per_class"])
    assert any(re.match(r"Speed: [\d.]+ms pre-process, [\d.]+ms inference, [\d.]+ms NMS", ln) for ln in lines)
    assert any(str(save / "metrics.json") in ln for ln in lines)
    # per-class AP comes from the same precision array as the overall mAP
    ap = [c["ap50_95"] for c in metrics["per_class"].values()]
    assert sum(ap) / len(ap) == pytest.approx(stats[0], abs=1e-12)
    assert sum(c["instances"] for c in metrics["per_class"].values()) == metrics["instances"]
    assert set(metrics["speed_ms"]) == {"preprocess", "inference", "nms"} and metrics["images"] == 12
    for f in ("PR_curve.png", "F1_curve.png", "confusion_matrix.png", "val_batch0_labels.jpg", "val_batch0_pred.jpg"):
        assert (save / f).stat().st_size > 1000, f


class OracleModel(nn.Module):
    """Answers each batch with its own ground truth (letterboxed pixels): a perfect detector."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))  # gives run() a device
        self.outputs = outputs
        self.names = NAMES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs.pop(0)


def oracle_outputs(loader) -> list[torch.Tensor]:
    outs = []
    for imgs, targets, _, _ in loader:
        n, _, h, w = imgs.shape
        out = torch.zeros(n, 50, 5 + len(NAMES))
        for k in range(n):
            t = targets[targets[:, 0] == k]
            out[k, :len(t), :4] = t[:, 2:6] * torch.tensor([w, h, w, h])
            out[k, :len(t), 4] = 1.0
            out[k, torch.arange(len(t)), 5 + t[:, 1].long()] = 0.9
        outs.append(out)
    return outs


def test_perfect_predictions_map_back_exactly_and_score_one(syn_yaml, tmp_path):
    cfg = load_data_config(syn_yaml)
    loader, dataset = create_dataloader(cfg, "val", 160, 5, augment=False)  # 160 px: a ratio far from 1
    model = OracleModel(oracle_outputs(loader)).train()
    m = evaluate(model, loader, dataset, gt=cfg["val"], save_dir=tmp_path, save_json=True, log_summary=False)
    assert model.training  # the caller's mode is restored
    assert m["mAP50_95"] == pytest.approx(1.0) and m["mAP50"] == pytest.approx(1.0)  # IoU > 0.95 on every box
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(1.0)
    # boxes went back to original pixels: they equal the JSON ground truth to the 1e-3 px the results keep
    gt = json.loads(Path(cfg["val"]).read_text())
    gt_boxes = sorted((a["image_id"], *a["bbox"]) for a in gt["annotations"])
    dt_boxes = sorted((d["image_id"], *d["bbox"]) for d in json.loads((tmp_path / "predictions.json").read_text()))
    assert len(dt_boxes) == len(gt_boxes)
    for g, d in zip(gt_boxes, dt_boxes):
        assert g[0] == d[0] and max(abs(a - b) for a, b in zip(g[1:], d[1:])) < 0.02


def test_run_leaves_the_model_untouched_and_fusion_keeps_map(syn_yaml, ckpt):
    from engine.checkpoint import model_from_checkpoint

    cfg = load_data_config(syn_yaml)
    loader, dataset = create_dataloader(cfg, "val", 128, 12, augment=False)
    model = model_from_checkpoint(ckpt).train()
    before = copy.deepcopy(model.state_dict())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    m1 = evaluate(model, loader, dataset, conf_thres=0.0001, log_summary=False)
    assert model.training and n_bn > 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn  # not fused
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched too
    fused = copy.deepcopy(model).eval().fuse()
    m2 = evaluate(fused, loader, dataset, conf_thres=0.0001, log_summary=False)
    assert m1["detections"] > 0
    assert m2["mAP50_95"] == pytest.approx(m1["mAP50_95"], abs=1e-4)
    assert m2["mAP50"] == pytest.approx(m1["mAP50"], abs=1e-4)


def test_yolo_labels_write_ground_truth_json_that_reproduces_map(coco128_dir, tmp_path):
    data = tmp_path / "coco128.yaml"
    data.write_text(f"path: {coco128_dir}\nformat: yolo\ntrain: images/train2017\nval: images/train2017\n"
                    f"names: {[str(i) for i in range(80)]}\n")
    torch.manual_seed(1)
    m = Model("cfg/models/yolo-n-bn.yaml", nc=80)
    w = tmp_path / "rand80.pt"
    save_checkpoint({"model": model_state(m), "ema": None, "model_yaml": m.yaml}, w)
    metrics, _ = run_main(["--data", str(data), "--weights", str(w), "--img", "64", "--batch-size", "64",
                           "--conf-thres", "0.0001", "--save-json", "--task", "val", "--device", "cpu",
                           "--workers", "0", "--project", str(tmp_path / "runs")])
    save = Path(metrics["save_dir"])
    stats = cocoeval_by_hand(save / "ground_truth.json", save / "predictions.json")
    assert metrics["images"] == 128 and metrics["detections"] > 0
    assert metrics["mAP50_95"] == pytest.approx(stats[0], abs=1e-12)
    gt = json.loads((save / "ground_truth.json").read_text())
    assert metrics["instances"] == sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0))


def test_unreadable_checkpoint_and_half_on_cpu_exit_2(syn_yaml, tmp_path, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00garbage")
    assert val.cli(["--data", str(syn_yaml), "--weights", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "broken.pt" in err and "\n" not in err
    assert val.cli(["--data", str(syn_yaml), "--weights", str(bad), "--device", "cpu", "--half"]) == 2
    assert "--half" in capsys.readouterr().err
