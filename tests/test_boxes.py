"""non_max_suppression on hand-made model outputs: thresholds, classes, agnostic, multi-label, max_det."""
from __future__ import annotations

import pytest
import torch

from utils.boxes import label_lines, non_max_suppression, xyxy_to_xywh, xyxy_to_xywhn
from utils.general import ConfigError


def pred(rows: list[list[float]]) -> torch.Tensor:
    """(1, A, 5 + nc) from rows [cx, cy, w, h, obj, cls0, cls1, ...]."""
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


def test_overlapping_same_class_keeps_best_and_conf_is_obj_times_cls():
    p = pred([[50, 50, 20, 20, 0.9, 0.8, 0.1],   # conf 0.72
              [52, 50, 20, 20, 0.8, 0.8, 0.1],   # conf 0.64, IoU 0.82 with the first: suppressed
              [150, 150, 40, 20, 0.5, 0.2, 0.9]])  # conf 0.45, class 1, far away
    (out,) = non_max_suppression(p, conf_thres=0.25, iou_thres=0.5)
    assert out.shape == (2, 6)
    torch.testing.assert_close(out[0], torch.tensor([40.0, 40.0, 60.0, 60.0, 0.72, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([130.0, 140.0, 170.0, 160.0, 0.45, 1.0]))


def test_iou_threshold_decides_suppression():
    p = pred([[50, 50, 20, 20, 0.9, 1.0], [60, 50, 20, 20, 0.8, 1.0]])  # IoU = 10*20 / (2*400 - 200) = 1/3
    assert len(non_max_suppression(p, 0.1, iou_thres=0.3)[0]) == 1
    assert len(non_max_suppression(p, 0.1, iou_thres=0.34)[0]) == 2


def test_different_classes_survive_unless_agnostic():
    p = pred([[50, 50, 20, 20, 0.9, 0.9, 0.0], [50, 50, 20, 20, 0.9, 0.0, 0.8]])
    out = non_max_suppression(p, 0.25, 0.45)[0]
    assert sorted(out[:, 5].tolist()) == [0.0, 1.0]
    out = non_max_suppression(p, 0.25, 0.45, agnostic=True)[0]
    assert out.shape[0] == 1 and out[0, 5] == 0 and out[0, 4] == pytest.approx(0.81)


def test_multi_label_gives_one_row_per_passing_class():
    p = pred([[50, 50, 20, 20, 0.5, 0.6, 0.4, 0.001]])  # conf 0.3, 0.2, 0.0005
    single = non_max_suppression(p, 0.1, 0.5)[0]
    multi = non_max_suppression(p, 0.1, 0.5, multi_label=True)[0]
    assert single.shape[0] == 1 and single[0, 5] == 0
    assert multi.shape[0] == 2
    torch.testing.assert_close(multi[:, 4], torch.tensor([0.3, 0.2]))
    assert multi[:, 5].tolist() == [0.0, 1.0]


def test_classes_filter_and_conf_threshold():
    p = pred([[50, 50, 20, 20, 0.9, 0.9, 0.0], [150, 50, 20, 20, 0.9, 0.0, 0.9],
              [250, 50, 20, 20, 0.2, 0.0, 1.0]])  # conf 0.2: below 0.25
    out = non_max_suppression(p, 0.25, 0.45, classes=[1])[0]
    assert out.shape[0] == 1 and out[0, 5] == 1 and out[0, 0] == 140
    assert non_max_suppression(p, 0.25, 0.45)[0].shape[0] == 2
    assert non_max_suppression(p, 0.1, 0.45)[0].shape[0] == 3


def test_max_det_keeps_highest_confidence_first():
    rows = [[20 + 30 * i, 20, 10, 10, 0.5 + 0.01 * i, 1.0] for i in range(40)]  # disjoint boxes
    out = non_max_suppression(pred(rows), 0.1, 0.5, max_det=10)[0]
    assert out.shape == (10, 6)
    assert torch.all(out[:-1, 4] >= out[1:, 4])
    assert out[0, 4] == pytest.approx(0.89) and out[-1, 4] == pytest.approx(0.80)


def test_batch_images_are_independent_and_empty_gives_zero_rows():
    p = torch.zeros(3, 5, 7)
    p[1, 0] = torch.tensor([10, 10, 4, 4, 0.9, 0.9, 0.1])
    out = non_max_suppression(p, 0.25, 0.45)
    assert [o.shape for o in out] == [(0, 6), (1, 6), (0, 6)]
    assert non_max_suppression((p, None), 0.25, 0.45)[1].shape == (1, 6)  # (decoded, raw) tuples are accepted


def test_bad_thresholds_are_config_errors():
    p = pred([[50, 50, 20, 20, 0.9, 1.0]])
    with pytest.raises(ConfigError, match="conf_thres"):
        non_max_suppression(p, 1.5)
    with pytest.raises(ConfigError, match="iou_thres"):
        non_max_suppression(p, 0.2, -0.1)
    with pytest.raises(ConfigError, match="max_det"):
        non_max_suppression(p, 0.2, 0.5, max_det=0)


def test_box_helpers():
    b = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    torch.testing.assert_close(xyxy_to_xywh(b), torch.tensor([[10.0, 20.0, 40.0, 40.0]]))
    torch.testing.assert_close(xyxy_to_xywhn(b, 100, 200), torch.tensor([[0.3, 0.2, 0.4, 0.2]]))


def test_label_lines_are_yolo_txt_in_original_pixels():
    det = torch.tensor([[10.0, 20.0, 50.0, 60.0, 0.87654321, 3.0], [0.0, 0.0, 100.0, 200.0, 0.5, 0.0]])
    assert label_lines(det, (200, 100)) == ("3 0.300000 0.200000 0.400000 0.200000 0.87654\n"
                                            "0 0.500000 0.500000 1.000000 1.000000 0.50000\n")
    assert label_lines(det[:1], (200, 100), conf=False) == "3 0.300000 0.200000 0.400000 0.200000\n"
    assert label_lines(det[:0], (200, 100)) == ""


def reference_nms(p: torch.Tensor, conf_thres: float, iou_thres: float, multi_label: bool, max_det: int):
    """The plain definition: every (box, class) candidate above conf_thres through one batched_nms call."""
    from torchvision.ops import batched_nms, box_convert

    x = p[0]
    scores = x[:, 5:] * x[:, 4:5]
    if multi_label:
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
    else:
        s, j = scores.max(1)
        i = (s > conf_thres).nonzero().squeeze(1)
        j = j[i]
    boxes, conf = box_convert(x[i, :4], "cxcywh", "xyxy"), scores[i, j]
    keep = batched_nms(boxes, conf, j, iou_thres)[:max_det]
    return torch.cat((boxes[keep], conf[keep, None], j[keep, None].float()), 1)


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("max_det, spread", [(10, 300), (300, 300), (4000, 300), (300, 3)])
def test_top_k_shortcut_equals_full_nms(multi_label, max_det, spread):
    # (10|300, 300): the top-k shortcut suffices; (4000, 300): full NMS from the start;
    # (300, 3): boxes piled up, the top-k leave < max_det survivors, so the fallback to full NMS runs
    g = torch.Generator().manual_seed(0)
    p = torch.rand(1, 3000, 5 + 4, generator=g)
    p[..., :2] *= spread
    p[..., 2:4] = p[..., 2:4] * 60 + 5
    out = non_max_suppression(p, 0.001, 0.5, multi_label=multi_label, max_det=max_det)[0]
    torch.testing.assert_close(out, reference_nms(p, 0.001, 0.5, multi_label, max_det))
