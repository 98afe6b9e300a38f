"""A literal, loop-by-loop transcription of the VOC devkit's VOCevaldet.m / VOCap.m, used as the test oracle.

It is deliberately slow and plain: one Python loop per detection and per ground-truth box,
as MATLAB does, so the vectorised evaluator can be checked against it.
"""

from __future__ import annotations

import math


def _matlab_max(values):
    """MATLAB's max: ignores NaN; NaN only when every value is NaN; [] when empty."""
    finite = [v for v in values if not math.isnan(v)]
    if not values:
        return None
    return max(finite) if finite else float("nan")


def devkit_ap(gt: dict, dets: list, use_07: bool, minoverlap: float = 0.5) -> float:
    """gt: {image_id: [(xmin, ymin, xmax, ymax, difficult), ...]} of ONE class (VOC pixels);
    dets: [(image_id, confidence, xmin, ymin, xmax, ymax), ...] in results-file order."""
    npos = sum(1 for objs in gt.values() for o in objs if not o[4])
    detected = {k: [False] * len(v) for k, v in gt.items()}
    order = sorted(range(len(dets)), key=lambda d: -dets[d][1])   # Python's sort is stable, like MATLAB's
    tp, fp = [0.0] * len(dets), [0.0] * len(dets)
    for rank, d in enumerate(order):
        image_id, _, *bb = dets[d]
        objs = gt[image_id]
        ovmax, jmax = -math.inf, -1
        for j, (gx1, gy1, gx2, gy2, _) in enumerate(objs):
            bi = [max(bb[0], gx1), max(bb[1], gy1), min(bb[2], gx2), min(bb[3], gy2)]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (gx2 - gx1 + 1) * (gy2 - gy1 + 1) - iw * ih
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= minoverlap:
            if not objs[jmax][4]:
                if not detected[image_id][jmax]:
                    tp[rank] = 1.0
                    detected[image_id][jmax] = True
                else:
                    fp[rank] = 1.0
        else:
            fp[rank] = 1.0
    ctp = cfp = 0.0
    rec, prec = [], []
    for t, f in zip(tp, fp):
        ctp += t
        cfp += f
        rec.append(ctp / npos if npos else float("nan"))
        prec.append(ctp / (ctp + cfp) if (ctp + cfp) > 0 else float("nan"))
    if use_07:
        # MATLAB 0:0.1:1: first half a + k*d, second half b - (n-k)*d
        thresholds = [k * 0.1 if k < 5 else 1.0 - (10 - k) * 0.1 for k in range(11)]
        ap = 0.0
        for t in thresholds:
            p = _matlab_max([pr for r, pr in zip(rec, prec) if r >= t])
            ap += (0.0 if p is None else p) / 11
        return ap
    mrec = [0.0] + rec + [1.0]
    mpre = [0.0] + prec + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = _matlab_max([mpre[i], mpre[i + 1]])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])
