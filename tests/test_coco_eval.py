"""utils.coco_eval against hand-computed COCO numbers and against pycocotools run directly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.coco_eval import confusion_matrix, detections_to_coco, evaluate, gt_counts, run_cocoeval
from utils.general import ConfigError

CAT_IDS = [1, 3]  # two classes with non-contiguous COCO ids, as in COCO


def make_gt(anns: list[tuple[int, int, list[float]]], crowd: tuple[int, ...] = ()) -> dict:
    """COCO dict: 3 images 200x100; anns = [(image_id, category_id, [x, y, w, h]), ...]."""
    return {
        "images": [{"id": i, "width": 200, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
        "annotations": [{"id": k + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3],
                         "iscrowd": int(k in crowd)} for k, (im, c, b) in enumerate(anns)],
    }


def res(image_id: int, cat: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


def test_detections_to_coco_maps_classes_and_boxes():
    dets = torch.tensor([[10.0, 20.0, 50.0, 80.0, 0.9, 1.0], [0.0, 0.0, 5.5, 5.25, 0.123456, 0.0]])
    out = detections_to_coco(dets, 7, CAT_IDS)
    assert out == [res(7, 3, [10.0, 20.0, 40.0, 60.0], 0.9), res(7, 1, [0.0, 0.0, 5.5, 5.25], 0.12346)]
    assert detections_to_coco(torch.zeros(0, 6), 7, CAT_IDS) == []


def test_perfect_detections_score_one():
    gt = make_gt([(1, 1, [10, 10, 40, 30]), (2, 3, [50, 20, 60, 50]), (3, 1, [0, 0, 100, 100])])
    results = [res(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    m = evaluate(gt, results, CAT_IDS)
    assert m.map50_95 == pytest.approx(1.0) and m.map50 == pytest.approx(1.0)
    assert m.precision == pytest.approx(1.0) and m.recall == pytest.approx(1.0)
    np.testing.assert_allclose(m.ap50_95, [1.0, 1.0])
    assert m.summary.count("\n") == 11 and "Average Precision" in m.summary


def test_hand_computed_ap_and_best_f1_point():
    # class a: 2 GT in image 1; detections ranked TP (0.9), FP (0.8), TP (0.7).
    # 101-point interpolated precision: 1 for recall <= 0.5 (51 points), 2/3 above (50 points).
    gt = make_gt([(1, 1, [10, 10, 40, 30]), (1, 1, [100, 50, 50, 40])])
    results = [res(1, 1, [10, 10, 40, 30], 0.9), res(1, 1, [60, 0, 20, 20], 0.8), res(1, 1, [100, 50, 50, 40], 0.7)]
    m = evaluate(gt, results, CAT_IDS)
    expected = (51 + 50 * 2 / 3) / 101
    assert m.map50 == pytest.approx(expected) and m.map50_95 == pytest.approx(expected)
    assert m.class_ids == [0]  # class b has no ground truth: not scored
    # F1 is 0.8 at conf <= 0.7 (P 2/3, R 1), 2/3 at (0.8, 0.9], 0.5 at (0.7, 0.8]
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(1.0)
    assert 0.69 < m.best_conf <= 0.7
    assert m.f1_curve.max() == pytest.approx(0.8)


def test_crowd_matches_are_ignored_not_false_positives():
    gt = make_gt([(1, 1, [10, 10, 40, 30]), (2, 1, [0, 0, 150, 90])], crowd=(1,))
    results = [res(1, 1, [10, 10, 40, 30], 0.9), res(2, 1, [20, 20, 30, 30], 0.95)]  # 2nd lies in the crowd box
    m = evaluate(gt, results, CAT_IDS)
    assert m.map50_95 == pytest.approx(1.0)
    assert m.precision == pytest.approx(1.0) and m.recall == pytest.approx(1.0)
    inst, imgs = gt_counts(gt, CAT_IDS)
    assert inst.tolist() == [1, 0] and imgs.tolist() == [1, 0]


def test_per_class_ap_from_precision_array():
    gt = make_gt([(1, 1, [10, 10, 40, 30]), (2, 3, [50, 20, 60, 50])])
    results = [res(1, 1, [10, 10, 40, 30], 0.9), res(3, 3, [50, 20, 60, 50], 0.9)]  # class b on the wrong image
    m = evaluate(gt, results, CAT_IDS)
    assert m.class_ids == [0, 1]
    np.testing.assert_allclose(m.ap50_95, [1.0, 0.0])
    assert m.map50_95 == pytest.approx(0.5)
    np.testing.assert_allclose(m.class_p, [1.0, 0.0])
    np.testing.assert_allclose(m.class_r, [1.0, 0.0])


def test_inputs_are_left_untouched_and_a_second_evaluation_agrees():
    # pycocotools adds keys to the result dicts (loadRes) and ground-truth annotations (COCOeval's 'ignore'); the
    # evaluation works on copies, so the caller's objects are unchanged and can be scored again (as training does)
    gt = make_gt([(1, 1, [10, 10, 40, 30]), (1, 1, [100, 50, 50, 40]), (2, 1, [0, 0, 150, 90])], crowd=(2,))
    results = [res(1, 1, [10, 10, 40, 30], 0.9), res(1, 1, [60, 0, 20, 20], 0.8), res(2, 1, [20, 20, 30, 30], 0.7)]
    gt_before, results_before = json.dumps(gt, sort_keys=True), json.dumps(results, sort_keys=True)
    first = evaluate(gt, results, CAT_IDS)
    assert json.dumps(gt, sort_keys=True) == gt_before
    assert json.dumps(results, sort_keys=True) == results_before
    second = evaluate(gt, results, CAT_IDS)
    np.testing.assert_array_equal(first.stats, second.stats)
    assert first.map50 == pytest.approx(51 / 101)  # TP, FP; the third lies in the crowd box: recall stops at 1/2


def test_agrees_with_pycocotools_on_files(tmp_path):
    rng = np.random.default_rng(0)
    anns = [(int(rng.integers(1, 4)), int(rng.choice(CAT_IDS)), [float(v) for v in rng.uniform(0, 60, 2)]
             + [float(v) for v in rng.uniform(8, 80, 2)]) for _ in range(30)]
    gt = make_gt(anns)
    results = [res(im, c, [b[0] + rng.normal(0, 3), b[1] + rng.normal(0, 3), b[2], b[3]], float(rng.uniform()))
               for im, c, b in anns] + [res(2, 1, [5, 5, 30, 30], 0.99)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    m = evaluate(tmp_path / "gt.json", results, CAT_IDS)
    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    np.testing.assert_allclose(m.stats, ev.stats, atol=1e-12)
    assert 0.1 < m.map50_95 < 0.95


def test_without_area_breakdown_the_area_all_numbers_are_identical():
    rng = np.random.default_rng(1)
    anns = [(int(rng.integers(1, 4)), int(rng.choice(CAT_IDS)), [float(v) for v in rng.uniform(0, 60, 2)]
             + [float(v) for v in rng.uniform(4, 140, 2)]) for _ in range(40)]  # small, medium and large boxes
    gt = make_gt(anns)
    results = [res(im, c, [b[0] + rng.normal(0, 4), b[1] + rng.normal(0, 4), b[2], b[3]], float(rng.uniform()))
               for im, c, b in anns]
    full = evaluate(gt, results, CAT_IDS)
    fast = evaluate(gt, results, CAT_IDS, area_breakdown=False)
    all_area = [0, 1, 2, 6, 7, 8]  # AP, AP50, AP75, AR@1, AR@10, AR@100 over area 'all'
    np.testing.assert_array_equal(np.asarray(fast.stats)[all_area], np.asarray(full.stats)[all_area])
    assert [fast.stats[i] for i in (3, 4, 5, 9, 10, 11)] == [-1.0] * 6
    assert min(full.stats[i] for i in (3, 4, 5)) > -1  # the data has boxes of every area range
    assert (fast.map50, fast.map50_95, fast.precision, fast.recall, fast.best_conf) == \
        (full.map50, full.map50_95, full.precision, full.recall, full.best_conf)
    np.testing.assert_array_equal(fast.f1_curve, full.f1_curve)
    np.testing.assert_array_equal(fast.pr_curve, full.pr_curve)
    assert 0.05 < full.map50_95 < 0.95


def test_empty_results_score_zero_and_bad_ids_are_errors():
    gt = make_gt([(1, 1, [10, 10, 40, 30])])
    m = evaluate(gt, [], CAT_IDS)
    assert m.map50_95 == 0.0 and m.precision == 0.0 and m.recall == 0.0
    with pytest.raises(ConfigError, match="image ids"):
        run_cocoeval(gt, [res(99, 1, [0, 0, 5, 5], 0.5)])
    with pytest.raises(ConfigError, match="not found"):
        evaluate("/nonexistent/gt.json", [], CAT_IDS)


def test_confusion_matrix_counts():
    gt = make_gt([(1, 1, [10, 10, 40, 30]), (1, 3, [100, 10, 40, 40]), (2, 1, [0, 0, 50, 50])])
    results = [res(1, 1, [10, 10, 40, 30], 0.9),     # a as a: correct
               res(1, 1, [101, 10, 40, 40], 0.8),    # b predicted as a
               res(2, 3, [150, 50, 20, 20], 0.7),    # b on background; the a in image 2 is missed
               res(3, 1, [0, 0, 10, 10], 0.1)]       # below conf 0.25: not counted
    cm = confusion_matrix(gt, results, CAT_IDS, conf_thres=0.25)
    expected = np.array([[1, 1, 0],   # predicted a: true a, true b, background
                         [0, 0, 1],   # predicted b
                         [1, 0, 0]])  # background: the missed a
    np.testing.assert_array_equal(cm, expected)


def test_results_object_matches_loadres_without_the_polygons():
    # run_cocoeval builds the detections' COCO object itself (no copies for loadRes to edit, no segmentation
    # polygons, which bbox evaluation never reads): every other field must be what loadRes writes
    from utils.coco_eval import _load_results, load_coco_gt

    gt = make_gt([(1, 1, [10, 10, 40, 30]), (2, 3, [50, 20, 60, 50])])
    results = [res(1, 1, [10.5, 10, 40, 30.25], 0.9), res(2, 3, [50, 20, 60, 50], 0.4), res(3, 1, [1, 2, 3, 4], 0.1)]
    ours = _load_results(load_coco_gt(gt), results)
    theirs = load_coco_gt(gt).loadRes([dict(r) for r in results])
    assert sorted(ours.anns) == sorted(theirs.anns) == [1, 2, 3]
    for i, ann in theirs.anns.items():
        assert ours.anns[i] == {k: v for k, v in ann.items() if k != "segmentation"}
    assert ours.anns[1]["area"] == 40 * 30.25 and ours.anns[3]["iscrowd"] == 0
    assert ours.getImgIds() == theirs.getImgIds() and ours.getCatIds() == theirs.getCatIds()
    assert "area" not in results[0]  # the caller's dicts are not edited
