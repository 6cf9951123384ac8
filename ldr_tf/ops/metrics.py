"""Evaluation metrics in NumPy (float64 where it matters).

Label maps are integer arrays on one grid; the score of a pair is the unweighted mean over the labels present
in the **fixed** segmentation (background 0 excluded unless asked for). Flows follow `ldr_tf.ops.warp`'s convention
(``[D, H, W, 3]`` in voxels, channel c along axis c).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "dice",
    "jaccard",
    "label_overlap",
    "landmark_distance",
    "jacobian_determinant",
    "jacobian_stats",
]


def _check_same_shape(a_name, a, b_name, b):
    if a.shape != b.shape:
        raise ValueError(f"{b_name}: shape {b.shape} must equal {a_name}'s shape {a.shape}")


def dice(a, b) -> float:
    """Dice ``2|A∩B| / (|A|+|B|)`` of two boolean masks; NaN when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    _check_same_shape("a", a, "b", b)
    denom = a.sum(dtype=np.int64) + b.sum(dtype=np.int64)
    return float(2.0 * np.logical_and(a, b).sum(dtype=np.int64) / denom) if denom else float("nan")


def jaccard(a, b) -> float:
    """Jaccard ``|A∩B| / |A∪B|`` of two boolean masks; NaN when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    _check_same_shape("a", a, "b", b)
    union = np.logical_or(a, b).sum(dtype=np.int64)
    return float(np.logical_and(a, b).sum(dtype=np.int64) / union) if union else float("nan")


def _overlap_counts(fixed_seg, warped_seg):
    """``(inter, fixed, warped)`` voxel counts per label value (arrays indexed by label), from one joint histogram
    over the values both maps use; None when the label values are negative or too large for a histogram."""
    f = fixed_seg.reshape(-1)
    w = warped_seg.reshape(-1)
    if f.size == 0 or f.dtype.kind not in "iub" or w.dtype.kind not in "iub":
        return None
    lo, hi = min(int(f.min()), int(w.min())), max(int(f.max()), int(w.max()))
    if lo < 0 or hi >= 1 << 20:
        return None
    n = hi + 1
    if n * n <= 1 << 24:  # one pass: a joint histogram of (fixed, warped) pairs
        joint = np.bincount(f.astype(np.int64) * n + w, minlength=n * n).reshape(n, n)
        return np.diagonal(joint).copy(), joint.sum(1), joint.sum(0)
    return (np.bincount(f[f == w], minlength=n), np.bincount(f, minlength=n), np.bincount(w, minlength=n))


def label_overlap(fixed_seg, warped_seg, labels=None, include_background: bool = False) -> dict:
    """Dice and Jaccard per label, and their means over the labels present in `fixed_seg`.

    Args:
      fixed_seg: integer label map of the fixed image.
      warped_seg: integer label map of the moving image after warping, same shape.
      labels: labels to score; default: every label present in `fixed_seg` (0 excluded unless
        `include_background`). A label requested but absent from both maps is skipped.

    Returns:
      ``{"dice": mean, "jaccard": mean, "per_label": {label: (dice, jaccard)}, "labels": n}``;
      means are NaN when there is no label to score. Integer maps are counted in one pass (a joint histogram:
      ~0.2 s for 45 labels at 160x192x224 instead of ~3 s label by label).
    """
    fixed_seg = np.asarray(fixed_seg)
    warped_seg = np.asarray(warped_seg)
    _check_same_shape("fixed_seg", fixed_seg, "warped_seg", warped_seg)
    counts = _overlap_counts(fixed_seg, warped_seg)
    if labels is None:
        labels = np.nonzero(counts[1])[0] if counts is not None else np.unique(fixed_seg)
        if not include_background:
            labels = labels[labels != 0]
    per_label = {}
    for v in labels:
        if counts is not None:
            inside = 0 <= int(v) < counts[0].size
            inter, a, b = (float(c[int(v)]) if inside else 0.0 for c in counts)
        else:
            f, w = fixed_seg == v, warped_seg == v
            inter, a, b = float(np.logical_and(f, w).sum()), float(f.sum()), float(w.sum())
        if a + b == 0:
            continue
        per_label[int(v)] = (2.0 * inter / (a + b), inter / (a + b - inter))
    if per_label:
        d = float(np.mean([p[0] for p in per_label.values()]))
        j = float(np.mean([p[1] for p in per_label.values()]))
    else:
        d = j = float("nan")
    return {"dice": d, "jaccard": j, "per_label": per_label, "labels": len(per_label)}


def landmark_distance(fixed_points, moving_points, displacement, spacing=None) -> dict:
    """Distance between moved fixed landmarks and the moving landmarks.

    A fixed landmark ``p`` is mapped to ``p + u(p)`` (`displacement`, the flow sampled at the fixed
    landmarks, e.g. by `ldr_tf.ops.warp.sample_points`), and compared with its moving counterpart.
    Landmarks with any coordinate equal to -1 on either side are missing and skipped.

    Args:
      fixed_points, moving_points, displacement: ``[P, 3]`` arrays in voxels.
      spacing: optional voxel size ``(sD, sH, sW)`` in mm for the distance in millimetres.

    Returns:
      ``{"voxels": mean distance, "mm": mean distance in mm or None, "count": n}``; NaN without landmarks.
    """
    fp = np.asarray(fixed_points, np.float64)
    mp = np.asarray(moving_points, np.float64)
    du = np.asarray(displacement, np.float64)
    for name, x in (("fixed_points", fp), ("moving_points", mp), ("displacement", du)):
        if x.ndim != 2 or x.shape[1] != 3:
            raise ValueError(f"{name}: expected shape [P, 3], got {x.shape}")
    _check_same_shape("fixed_points", fp, "moving_points", mp)
    _check_same_shape("fixed_points", fp, "displacement", du)
    valid = ~(np.any(fp == -1, axis=1) | np.any(mp == -1, axis=1))
    if not valid.any():
        return {"voxels": float("nan"), "mm": None if spacing is None else float("nan"), "count": 0}
    diff = (fp + du - mp)[valid]
    out = {"voxels": float(np.linalg.norm(diff, axis=1).mean()), "mm": None, "count": int(valid.sum())}
    if spacing is not None:
        sp = np.asarray(spacing, np.float64).reshape(1, 3)
        out["mm"] = float(np.linalg.norm(diff * sp, axis=1).mean())
    return out


def jacobian_determinant(flow) -> np.ndarray:
    """Determinant of the Jacobian of ``x + u(x)`` at every voxel, with central differences.

    Args:
      flow: ``[D, H, W, 3]`` displacement in voxels (a leading batch axis of 1 is accepted).

    Returns:
      ``[D, H, W]`` float64 determinants (one-sided differences on the border, as `numpy.gradient`).
    """
    u = np.asarray(flow, np.float64)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.ndim != 4 or u.shape[-1] != 3:
        raise ValueError(f"flow: expected shape [D, H, W, 3], got {u.shape}")
    if min(u.shape[:3]) < 2:
        raise ValueError(f"flow: every spatial size must be at least 2, got {u.shape}")
    # J[c][a] = d(x_c + u_c) / d x_a; the 3x3 determinant written out (no [..., 3, 3] array, no LAPACK per voxel)
    J = [list(np.gradient(u[..., c], axis=(0, 1, 2))) for c in range(3)]
    for c in range(3):
        J[c][c] += 1.0
    return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
            - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))


def jacobian_stats(flow) -> dict:
    """``{"jac_std": std of det J, "folding_pct": % of voxels with det J <= 0, "jac_min": min det J}``."""
    det = jacobian_determinant(flow)
    return {
        "jac_std": float(det.std()),
        "folding_pct": float(100.0 * np.mean(det <= 0)),
        "jac_min": float(det.min()),
    }
