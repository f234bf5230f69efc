"""models/loss.py: target assignment, gains and the loss values on hand-made predictions."""
from __future__ import annotations

import math

import pytest
import torch

from models.loss import ComputeLoss, _HeadReads
from models.yolo import Model
from utils.general import ROOT, load_yaml

HYP = load_yaml(ROOT / "cfg" / "hyp" / "scratch.yaml")
IMG = 64


@pytest.fixture(scope="module")
def model() -> Model:
    torch.manual_seed(0)
    return Model(ROOT / "cfg" / "models" / "yolo-n-bn.yaml", nc=3).train()


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _ideal_preds(model: Model, loss: ComputeLoss, targets: torch.Tensor, bs: int, shift: float = 0.0):
    """Head outputs that reproduce every assigned target exactly (xy optionally shifted by ``shift`` cells)."""
    det = model.model[-1]
    shapes = [(bs, IMG // int(s), IMG // int(s), det.na, det.no) for s in det.stride]  # Detect's train layout
    preds = [torch.full(s, -12.0) for s in shapes]  # objectness ~0 everywhere, class logits ~0
    tcls, tbox, indices, anch = loss.build_targets(preds, targets)
    for i, p in enumerate(preds):
        b, a, gj, gi = indices[i]
        xy = tbox[i][:, :2] + shift
        wh = tbox[i][:, 2:]
        p[b, gj, gi, a, 0:2] = _logit((xy + 0.5) / 2)  # inverse of 2*sigmoid - 0.5
        p[b, gj, gi, a, 2:4] = _logit(torch.sqrt(wh / anch[i]) / 2)  # inverse of (2*sigmoid)^2 * anchor
        p[b, gj, gi, a, 4] = 12.0
        p[b, gj, gi, a, 5 + tcls[i]] = 12.0
    return preds


def test_no_targets_gives_finite_loss_with_zero_box_and_cls(model: Model) -> None:
    loss = ComputeLoss(model, HYP, IMG)
    preds = model(torch.rand(2, 3, IMG, IMG))
    total, items = loss(preds, torch.zeros((0, 6)))
    assert torch.isfinite(total).all() and total.item() > 0
    assert items[0].item() == 0.0 and items[2].item() == 0.0
    assert items[1].item() > 0  # objectness still pushes every cell towards background
    total.backward()  # and gradients flow


def test_perfect_prediction_beats_shifted_one(model: Model) -> None:
    loss = ComputeLoss(model, HYP, IMG)
    targets = torch.tensor([[0, 1, 0.30, 0.30, 0.25, 0.30], [1, 2, 0.70, 0.55, 0.50, 0.40]])
    total_ok, items_ok = loss(_ideal_preds(model, loss, targets, 2), targets)
    total_bad, items_bad = loss(_ideal_preds(model, loss, targets, 2, shift=0.4), targets)
    assert items_ok[0].item() < 1e-4  # CIoU loss of an exact box is 0
    assert items_bad[0].item() > 10 * max(items_ok[0].item(), 1e-4)
    assert total_ok.item() < total_bad.item()


def test_assignment_uses_two_neighbour_cells(model: Model) -> None:
    loss = ComputeLoss(model, HYP, IMG)
    det = model.model[-1]
    # one box exactly the size of the first P3 anchor, centred at grid (2.4, 2.4) of the 8x8 P3 map:
    # its own cell (2, 2) plus the left (1, 2) and upper (2, 1) neighbours
    a0 = det.anchors[0, 0] / 8  # grid units -> image fraction of an 8x8 grid
    targets = torch.tensor([[0, 0, 2.4 / 8, 2.4 / 8, float(a0[0]), float(a0[1])]])
    preds = [torch.zeros(1, IMG // int(s), IMG // int(s), det.na, det.no) for s in det.stride]
    _, _, indices, _ = loss.build_targets(preds, targets)
    b, a, gj, gi = indices[0]
    r = det.anchors[0] / det.anchors[0, 0]
    n_anchors = int((torch.max(r, 1 / r).max(1).values < HYP["anchor_t"]).sum())
    assert len(b) == 3 * n_anchors
    cells = {(int(y), int(x)) for y, x in zip(gj, gi)}
    assert cells == {(2, 2), (2, 1), (1, 2)}


def test_gains_are_scaled_for_classes_levels_and_image_size(model: Model) -> None:
    small, big = ComputeLoss(model, HYP, 320), ComputeLoss(model, HYP, 640)
    assert big.obj_gain == pytest.approx(HYP["obj"])  # nl = 3, 640 px: unchanged
    assert small.obj_gain == pytest.approx(HYP["obj"] / 4)
    assert big.cls_gain == pytest.approx(HYP["cls"] * 3 / 80)  # nc = 3
    assert big.box_gain == pytest.approx(HYP["box"])
    assert big.balance == [4.0, 1.0, 0.4]


def test_loss_scales_with_batch_size_and_label_smoothing(model: Model) -> None:
    loss = ComputeLoss(model, HYP, IMG)
    torch.manual_seed(1)
    x = torch.rand(1, 3, IMG, IMG)
    model.eval()  # fixed BN statistics so both batches see the same features
    try:
        with torch.no_grad():
            model.model[-1].train()  # raw maps from the head
            one = model(x)
            two = model(torch.cat((x, x)))
    finally:
        model.train()
    t1 = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]])
    t2 = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 1, 0.5, 0.5, 0.3, 0.3]])
    l1, _ = loss(one, t1)
    l2, _ = loss(two, t2)
    assert l2.item() == pytest.approx(2 * l1.item(), rel=1e-4)  # loss is per-image mean times batch size
    smooth = ComputeLoss(model, {**HYP, "label_smoothing": 0.1}, IMG)
    assert (smooth.cp, smooth.cn) == (pytest.approx(0.95), pytest.approx(0.05))
    assert math.isfinite(smooth(one, t1)[0].item())


def test_head_reads_gradient_is_the_float32_copy_gradient_bit_for_bit() -> None:
    """The loss reads a bfloat16 head map through _HeadReads (float32 rows at the assigned cells, float32
    objectness) instead of a float32 copy of the whole map; with cells assigned more than once, its gradient equals
    the copy's bit for bit (sums in float32, one rounding)."""
    g = torch.Generator().manual_seed(0)
    pi = torch.randn(2, 4, 5, 3, 7, generator=g).to(torch.bfloat16)  # (N, ny, nx, na, no)
    b, gj, gi, a = (torch.tensor(v) for v in ([0, 0, 1, 0, 1, 0], [1, 1, 2, 3, 2, 1], [2, 2, 0, 4, 0, 2],
                                               [0, 0, 1, 2, 1, 0]))  # cell (0, 1, 2, 0) three times
    w_rows, w_obj = torch.randn(6, 7, generator=g), torch.randn(2, 4, 5, 3, generator=g)
    x1 = pi.clone().requires_grad_(True)
    rows, obj = _HeadReads.apply(x1, b, gj, gi, a)
    ((rows * w_rows).sum() + (obj * w_obj).sum()).backward()
    x2 = pi.clone().requires_grad_(True)
    full = x2.float()
    ((full[b, gj, gi, a] * w_rows).sum() + (full[..., 4] * w_obj).sum()).backward()
    assert rows.dtype == obj.dtype == torch.float32
    assert torch.equal(rows, full[b, gj, gi, a].detach()) and torch.equal(obj, full[..., 4].detach())
    assert x1.grad.dtype == torch.bfloat16 and torch.equal(x1.grad, x2.grad)
