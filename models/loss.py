"""YOLOv5-style detection loss: CIoU box loss, IoU-targeted BCE objectness, BCE classification.

Target assignment follows YOLOv5: a target is matched to every anchor whose width and height ratio to the target
is within ``anchor_t`` (on every level), and besides the cell holding its centre it is also assigned to the two
neighbouring cells nearest to that centre (the ``2σ − 0.5`` xy parameterisation reaches into them). This triples the
positives, which is what makes small from-scratch runs converge.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torchvision.ops import complete_box_iou_loss

from utils.dist import de_parallel

# Objectness weight per detection level (P3 sees many small cells, so its miss-rate matters most).
OBJ_BALANCE = {3: [4.0, 1.0, 0.4]}
OBJ_BALANCE_DEFAULT = [4.0, 1.0, 0.25, 0.06, 0.02]


def smooth_bce(eps: float = 0.0) -> tuple[float, float]:
    """Positive / negative BCE targets for label smoothing ``eps`` (https://arxiv.org/abs/1902.04103)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


class FocalBCE(nn.Module):
    """Focal-loss wrapper around ``BCEWithLogitsLoss`` (gamma > 0 down-weights easy examples); mean reduction."""

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25) -> None:
        super().__init__()
        self.bce, self.gamma, self.alpha = bce, gamma, alpha

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        loss = self.bce(pred, true)  # bce has reduction='none'
        p = torch.sigmoid(pred)
        p_t = true * p + (1 - true) * (1 - p)
        alpha = true * self.alpha + (1 - true) * (1 - self.alpha)
        return (loss * alpha * (1.0 - p_t) ** self.gamma).mean()


class ComputeLoss:
    """YOLO loss for a model with a YOLOv5 ``Detect`` head.

    Args:
        model: the (possibly DDP-wrapped) model; its last module is ``Detect`` with ``nl``, ``na``, ``nc``,
            ``anchors`` (nl, na, 2) in grid units.
        hyp: hyper-parameters (keys of cfg/hyp/scratch.yaml), **unscaled**: the gains are scaled here for the
            level count (``3/nl``), the class count (``nc/80``) and the image size (``(img_size/640)^2``).
        img_size: training image size in pixels (for the objectness gain).
    """

    def __init__(self, model: nn.Module, hyp: dict[str, Any], img_size: int = 640) -> None:
        det = de_parallel(model).model[-1]
        self.det = det
        self.nl, self.na, self.nc = int(det.nl), int(det.na), int(det.nc)
        dev = det.anchors.device
        scale = 3.0 / self.nl
        self.box_gain = float(hyp["box"]) * scale
        self.cls_gain = float(hyp["cls"]) * self.nc / 80.0 * scale
        self.obj_gain = float(hyp["obj"]) * (img_size / 640.0) ** 2 * scale
        self.anchor_t = float(hyp["anchor_t"])
        self.cp, self.cn = smooth_bce(float(hyp.get("label_smoothing", 0.0)))
        self.balance = OBJ_BALANCE.get(self.nl, OBJ_BALANCE_DEFAULT[: self.nl])
        bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(hyp.get("cls_pw", 1.0))], device=dev))
        bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(hyp.get("obj_pw", 1.0))], device=dev))
        gamma = float(hyp.get("fl_gamma", 0.0))
        if gamma > 0:
            bce_cls.reduction = bce_obj.reduction = "none"
            self.bce_cls, self.bce_obj = FocalBCE(bce_cls, gamma), FocalBCE(bce_obj, gamma)
        else:
            self.bce_cls, self.bce_obj = bce_cls, bce_obj
        # neighbour offsets: self, left, up, right, down (in units of g = 0.5 cell)
        self.offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=dev).float() * 0.5

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the loss.

        Args:
            preds: ``nl`` raw head outputs, each (N, ny, nx, na, nc + 5) logits (``Detect``'s train mode).
            targets: (M, 6) = image index, class, cx, cy, w, h normalised to the image.
        Returns:
            ``(loss * N, items)``: the scalar loss times the batch size (so the gradient scale does not depend
            on how the batch was split) and the detached ``(3,)`` tensor ``[box, obj, cls]``.
        """
        dev = preds[0].device
        lbox = torch.zeros(1, device=dev)
        lobj = torch.zeros(1, device=dev)
        lcls = torch.zeros(1, device=dev)
        tcls, tbox, indices, anch = self.build_targets(preds, targets.to(dev))

        for i, pi in enumerate(preds):
            b, a, gj, gi = indices[i]
            ps, pobj = _HeadReads.apply(pi, b, gj, gi, a)  # float32, even under autocast
            tobj = torch.zeros_like(pobj)  # (N, ny, nx, na)
            if b.shape[0]:
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anch[i]
                ciou_loss = complete_box_iou_loss(_xywh2xyxy(pxy, pwh), _xywh2xyxy(tbox[i][:, :2], tbox[i][:, 2:]),
                                                  reduction="none")
                lbox = lbox + ciou_loss.mean()
                # objectness target = the (CIoU) quality of the box at that cell, so confidence ranks boxes by IoU
                tobj[b, gj, gi, a] = (1.0 - ciou_loss).detach().clamp(0)
                if self.nc > 1:
                    t = torch.full_like(ps[:, 5:], self.cn)
                    t[torch.arange(b.shape[0], device=dev), tcls[i]] = self.cp
                    lcls = lcls + self.bce_cls(ps[:, 5:], t)
            lobj = lobj + self.bce_obj(pobj, tobj) * self.balance[i]

        lbox = lbox * self.box_gain
        lobj = lobj * self.obj_gain
        lcls = lcls * self.cls_gain
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    @torch.no_grad()
    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor):
        """Assign targets to (image, anchor, cell) triples on every level.

        Returns per level: class ids (n,), boxes (n, 4) as ``cx - cell_x, cy - cell_y, w, h`` in grid units,
        indices ``(b, a, gj, gi)`` and the matched anchors (n, 2) in grid units.
        """
        na, nt = self.na, targets.shape[0]
        dev = targets.device
        tcls, tbox, indices, anch = [], [], [], []
        gain = torch.ones(7, device=dev)
        ai = torch.arange(na, device=dev, dtype=torch.float32).view(na, 1).repeat(1, nt)
        t_all = torch.cat((targets.float().repeat(na, 1, 1), ai[..., None]), 2)  # (na, nt, 7) + anchor index
        g = 0.5
        anchors_all = self.det.anchors.to(dev).float()
        for i in range(self.nl):
            anchors = anchors_all[i]
            ny, nx = preds[i].shape[1:3]
            gain[2:6] = torch.tensor([nx, ny, nx, ny], device=dev, dtype=torch.float32)
            t = t_all * gain
            if nt:
                r = t[..., 4:6] / anchors[:, None]  # (na, nt, 2) wh ratios
                keep = torch.max(r, 1.0 / r).max(2)[0] < self.anchor_t
                t = t[keep]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy  # distance from the far edge
                j, k = ((gxy % 1 < g) & (gxy > 1)).T  # centre in the left / top half of its cell
                l, m = ((gxi % 1 < g) & (gxi > 1)).T  # right / bottom half
                sel = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[sel]
                offsets = (torch.zeros_like(gxy)[None] + self.offsets[:, None])[sel]
            else:
                t = t_all[0] * 0  # (0, 7)
                offsets = torch.zeros((0, 2), device=dev)
            b, c = t[:, 0].long(), t[:, 1].long()
            gxy, gwh, a = t[:, 2:4], t[:, 4:6], t[:, 6].long()
            gij = (gxy - offsets).long()
            gi = gij[:, 0].clamp_(0, nx - 1)
            gj = gij[:, 1].clamp_(0, ny - 1)
            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)
        return tcls, tbox, indices, anch


class _HeadReads(torch.autograd.Function):
    """What the loss reads of a head map pi (N, ny, nx, na, no): float32 copies of the rows at the assigned cells
    (n, no) and of the objectness (N, ny, nx, na). Converting only these, not the whole map, saves a full-size copy
    each way; the backward fills one gradient map in pi's dtype and sums rows of a cell assigned more than once in
    float32 before rounding, so a bfloat16 map gets the gradient of its float32 copy, bit for bit."""

    @staticmethod
    def forward(ctx, pi, b, gj, gi, a):  # noqa: D401
        ctx.save_for_backward(b, gj, gi, a)
        ctx.shape, ctx.dtype = pi.shape, pi.dtype
        return pi[b, gj, gi, a].float(), pi[..., 4].float()

    @staticmethod
    def backward(ctx, g_rows, g_obj):
        b, gj, gi, a = ctx.saved_tensors
        _, ny, nx, na, no = ctx.shape
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=g_obj.device)
        grad[..., 4] = g_obj
        if b.numel():
            cells, inverse = torch.unique(((b * ny + gj) * nx + gi) * na + a, return_inverse=True)
            rows = torch.zeros(cells.numel(), no, dtype=g_rows.dtype, device=g_rows.device)
            rows.index_add_(0, inverse, g_rows)
            rows[:, 4] += g_obj.reshape(-1)[cells]  # (N, ny, nx, na) flattens in the order of the cell index
            grad.view(-1, no)[cells] = rows.to(ctx.dtype)
        return grad, None, None, None, None


def _xywh2xyxy(xy: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
    """(n, 2) centres and (n, 2) sizes -> (n, 4) xyxy."""
    half = wh / 2
    return torch.cat((xy - half, xy + half), 1)
