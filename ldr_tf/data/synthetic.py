"""Embedded synthetic datasets, so that the demo runs with no download: ``demo`` (abdominal CT) and ``demo-brain``.

How a subject is made
---------------------
1. A fixed **procedural anatomy** is defined in normalised template coordinates ``X = (z, y, x)`` in ``[-1, 1]^3``
   (axis 0 = D = superior -> inferior, axis 1 = H = anterior -> posterior, axis 2 = W = patient right -> left) by
   implicit shapes: smooth unions of rotated ellipsoids, tubes along polylines with varying radius, shells,
   superellipses, angular bands and direction-based parcellations. Painting them in order gives a label map.

   * ``demo`` (CT, 14 labels): body outline with subcutaneous fat and an abdominal-wall muscle ring, a lobed liver
     (right/left/caudate lobes and an inferior tip, wavy surface) with portal and hepatic vessel trees, gallbladder,
     kidneys with hilum notches, a crescent spleen, aorta, IVC, vertebrae with discs, arches and spinal canal,
     paraspinal and psoas muscles, ribs sloping around the chest wall, and lung bases shaping the liver dome.
   * ``demo-brain`` (T1 MRI, 49 labels): head and neck, skull, CSF, a folded cerebral cortex split into 11
     parcels per hemisphere, white matter, corpus callosum, lateral/third/fourth ventricles, thalamus, caudate,
     putamen, pallidum, hippocampus, amygdala, cerebellar cortex and white matter, brainstem and eyes.

2. Each subject has a smooth random **deformation** ``phi(X) = A X + t + sum_k a_k sin(f_k . X + p_k)`` (a global
   affine part: rotations, anisotropic scaling, translation; plus a few low-frequency sine modes whose total
   derivative is bounded so ``phi`` stays invertible). The subject's label at voxel ``X`` is the template label at
   ``phi(X)``, evaluated analytically (no interpolation). The brain atlas uses the identity.

3. **Intensities**: a per-label mean (CT Hounsfield units windowed to 0..255 with level 40 / width 400; T1-like
   grey levels for MRI), a texture defined in template space (it moves with the anatomy), per-subject gain and
   per-label jitter, a smooth multiplicative bias field, Gaussian blur (point spread) and noise (Gaussian for CT,
   Rician for MRI), rounded to uint8.

4. **Landmarks**: 6 points defined on the template anatomy (vessel bifurcation, kidney poles, ventricle horns,
   commissures, ...) are mapped into each subject by inverting ``phi`` at them (fixed-point iteration); a landmark
   that falls outside the grid is stored as -1.

Everything is seeded with ``numpy.random.default_rng([seed, stream, index])``: the same seed gives identical arrays.
Generation at the defaults (64^3, atlas + 24 subjects) takes seconds and a few tens of MB of memory (volumes are
rendered in slabs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldr_tf.data.dataset import DatasetError, Descriptor, H5Writer, default_data_dir, load_descriptor, write_descriptor

__all__ = [
    "GENERATOR_VERSION",
    "DEMOS",
    "DemoSpec",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "render_subject",
    "subject_deformation",
    "label_names",
]

GENERATOR_VERSION = 2  # 2: affine with the anatomical axis directions (was RAS-diagonal)


@dataclass(frozen=True)
class DemoSpec:
    """Fixed facts of one synthetic dataset."""

    modality: str  # "ct" or "mri"
    image_type: str  # descriptor image_type
    fov_mm: float  # physical field of view along every axis
    subjects: int  # default number of (non-atlas) subjects
    atlas: bool  # atlas-based descriptor


DEMOS = {
    "demo": DemoSpec(modality="ct", image_type="liver", fov_mm=320.0, subjects=24, atlas=False),
    "demo-brain": DemoSpec(modality="mri", image_type="brain", fov_mm=220.0, subjects=24, atlas=True),
}

# ------------------------------------------------------------------------------------------ geometry


def _rot(az=0.0, ay=0.0, ax=0.0) -> np.ndarray:
    """Rotation matrix: rotations (radians) about the z, y and x axes of (z, y, x) coordinates, applied x, y, z."""
    cz, sz, cy, sy, cx, sx = math.cos(az), math.sin(az), math.cos(ay), math.sin(ay), math.cos(ax), math.sin(ax)
    rz = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])  # about z: mixes y, x
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])  # about y: mixes z, x
    rx = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])  # about x: mixes z, y
    return rz @ ry @ rx


def _ell(X, c, r, R=None):
    """Normalised radius of ellipsoid (centre `c`, radii `r`, axes = columns of `R`): < 1 inside."""
    Y = X - np.asarray(c, np.float64)
    if R is not None:
        Y = Y @ R
    return np.sqrt(np.sum((Y / np.asarray(r, np.float64)) ** 2, axis=1))


def _smooth_min(fs, k=10.0):
    """Smooth union of implicit functions (inside < 0)."""
    fs = np.stack(fs)
    m = fs.min(0)
    return m - np.log(np.sum(np.exp(-k * (fs - m)), axis=0)) / k


def _tube(X, pts, radii, scale=(1.0, 1.0, 1.0)):
    """Signed distance-like value to a tube along polyline `pts`, radius interpolated from `radii` (< 0 inside)."""
    Xs = X * np.asarray(scale)
    pts = np.asarray(pts, np.float64) * np.asarray(scale)
    best = np.full(len(X), np.inf)
    for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
        ab = b - a
        t = np.clip(((Xs - a) @ ab) / float(ab @ ab), 0.0, 1.0)
        d = np.linalg.norm(Xs - (a + t[:, None] * ab), axis=1) - (ra + (rb - ra) * t)
        best = np.minimum(best, d)
    return best


def _box(pts, pad):
    pts = np.asarray(pts, np.float64).reshape(-1, 3)
    return pts.min(0) - pad, pts.max(0) + pad


def _paint(labels, X, value, box, inside, where=None):
    """labels[i] = value for points in `box` where `inside(X_sub, labels_sub)` (and labels in `where`)."""
    lo, hi = box
    idx = np.nonzero(np.all((X >= lo) & (X <= hi), axis=1))[0]
    if where is not None:
        idx = idx[np.isin(labels[idx], where)]
    if len(idx) == 0:
        return
    m = inside(X[idx], labels[idx])
    labels[idx[m]] = value


def _ell_box(c, r, R=None):
    ext = np.abs(R) @ np.asarray(r) if R is not None else np.asarray(r, np.float64)
    return np.asarray(c) - ext, np.asarray(c) + ext


ALL = (np.full(3, -np.inf), np.full(3, np.inf))

# ------------------------------------------------------------------------------------------ CT anatomy

CT_LABELS = {
    "soft_tissue": 1, "fat": 2, "muscle": 3, "liver": 4, "hepatic_vessels": 5, "gallbladder": 6,
    "kidney_right": 7, "kidney_left": 8, "spleen": 9, "aorta": 10, "ivc": 11, "spine": 12, "ribs": 13, "lung": 14,
}
# label -> (Hounsfield mean, texture amplitude in HU)
CT_HU = {0: (-1000, 0), 1: (35, 40), 2: (-100, 10), 3: (55, 8), 4: (105, 7), 5: (185, 5), 6: (10, 3), 7: (165, 14),
         8: (165, 14), 9: (115, 6), 10: (210, 4), 11: (150, 4), 12: (420, 110), 13: (600, 60), 14: (-850, 30)}
CT_WINDOW = (40.0, 400.0)  # level, width

_KID_R = dict(c=(0.35, 0.36, -0.36), r=(0.26, 0.13, 0.15), R=_rot(ay=-0.3, az=0.25))
_KID_L = dict(c=(0.22, 0.36, 0.38), r=(0.26, 0.13, 0.15), R=_rot(ay=0.3, az=-0.25))
_GB = dict(c=(0.02, -0.22, -0.22), r=(0.17, 0.08, 0.08), R=_rot(ax=0.5))
_PORTAL = [  # (polyline, radii)
    ([(0.10, 0.12, 0.00), (-0.22, 0.06, -0.14)], [0.055, 0.05]),
    ([(-0.22, 0.06, -0.14), (-0.28, 0.02, -0.38), (-0.52, 0.12, -0.55)], [0.045, 0.04, 0.028]),
    ([(-0.28, 0.02, -0.38), (-0.08, -0.05, -0.60)], [0.035, 0.026]),
    ([(-0.28, 0.02, -0.38), (-0.36, -0.22, -0.50)], [0.033, 0.025]),
    ([(-0.22, 0.06, -0.14), (-0.42, -0.12, 0.02), (-0.50, -0.30, 0.28)], [0.042, 0.035, 0.025]),
    ([(-0.42, -0.12, 0.02), (-0.36, -0.32, -0.05)], [0.03, 0.024]),
    ([(-0.62, 0.12, -0.08), (-0.42, -0.15, -0.52)], [0.04, 0.026]),  # hepatic veins into the IVC
    ([(-0.62, 0.12, -0.08), (-0.45, -0.30, -0.15)], [0.038, 0.025]),
    ([(-0.62, 0.12, -0.08), (-0.52, -0.25, 0.20)], [0.036, 0.024]),
]
CT_LANDMARKS = {
    "portal_bifurcation": (-0.22, 0.06, -0.14),
    "gallbladder_fundus": tuple(np.asarray(_GB["c"]) + _GB["R"] @ np.array([0.8 * _GB["r"][0], 0, 0])),
    "right_kidney_upper_pole": tuple(np.asarray(_KID_R["c"]) + _KID_R["R"] @ np.array([-0.8 * _KID_R["r"][0], 0, 0])),
    "left_kidney_lower_pole": tuple(np.asarray(_KID_L["c"]) + _KID_L["R"] @ np.array([0.8 * _KID_L["r"][0], 0, 0])),
    "hepatic_vein_confluence": (-0.62, 0.12, -0.08),
    "liver_inferior_tip": (0.27, -0.05, -0.58),
}


def _body_rho(X):
    z, y, x = X[:, 0], X[:, 1] - 0.04, X[:, 2]
    by = np.where(y > 0, 0.62, 0.70) * (1 + 0.04 * z)
    bx = 0.90 * (1 + 0.03 * z)
    p = 2.4
    return (np.abs(y / by) ** p + np.abs(x / bx) ** p) ** (1 / p)


def _liver_f(X):
    parts = [
        _ell(X, (-0.30, -0.02, -0.42), (0.44, 0.46, 0.36), _rot(ay=0.15)),
        _ell(X, (-0.38, -0.28, -0.12), (0.26, 0.26, 0.30)),
        _ell(X, (-0.48, -0.30, 0.22), (0.16, 0.22, 0.34), _rot(ay=0.25, az=0.2)),
        _ell(X, (-0.36, 0.16, -0.08), (0.16, 0.12, 0.10)),
        _ell(X, (0.10, -0.05, -0.58), (0.22, 0.22, 0.16)),
    ]
    f = _smooth_min([p - 1 for p in parts], k=12.0)
    return f + 0.05 * np.sin(7 * X[:, 2] + 2) * np.sin(5 * X[:, 0] + 1) * np.cos(6 * X[:, 1])


def _paint_ct(X) -> np.ndarray:
    labels = np.zeros(len(X), np.uint8)
    rho = _body_rho(X)
    labels[rho < 1.0] = CT_LABELS["fat"]
    labels[rho < 0.91 - 0.03 * np.clip(-X[:, 1], 0, 1)] = CT_LABELS["muscle"]
    labels[rho < 0.85 - 0.03 * np.clip(-X[:, 1], 0, 1)] = CT_LABELS["soft_tissue"]
    z, y, x = X[:, 0], X[:, 1], X[:, 2]
    mus = CT_LABELS["muscle"]
    # paraspinal muscles and (lower) psoas
    _paint(labels, X, mus, ((-1, 0.45, -0.4), (1, 0.75, 0.4)),
           lambda P, L: ((P[:, 1] - 0.60) / 0.11) ** 2 + ((np.abs(P[:, 2]) - 0.22) / 0.13) ** 2 < 1)
    _paint(labels, X, mus, ((0.0, 0.25, -0.35), (1, 0.5, 0.35)),
           lambda P, L: ((P[:, 1] - 0.36) / 0.07) ** 2 + ((np.abs(P[:, 2]) - 0.2) / (0.03 + 0.07 * P[:, 0])) ** 2 < 1)
    _paint(labels, X, CT_LABELS["liver"], ((-0.85, -0.6, -0.85), (0.4, 0.4, 0.6)), lambda P, L: _liver_f(P) < 0,
           where=[CT_LABELS["soft_tissue"]])
    _paint(labels, X, CT_LABELS["gallbladder"], _ell_box(**_GB), lambda P, L: _ell(P, **_GB) < 1)
    for pts, radii in _PORTAL:
        lo, hi = _box(pts, max(radii))
        _paint(labels, X, CT_LABELS["hepatic_vessels"], (lo, hi), lambda P, L, p=pts, r=radii: _tube(P, p, r) < 0)
    ivc = [(1.0, 0.15, -0.1), (0.2, 0.16, -0.12), (-0.62, 0.12, -0.08)]
    _paint(labels, X, CT_LABELS["ivc"], _box(ivc, 0.1),
           lambda P, L: _tube(P, ivc, [0.065, 0.065, 0.06], scale=(1.0, 1.3, 0.9)) < 0)
    aorta = [(-1.1, 0.28, 0.06), (0.0, 0.25, 0.07), (1.1, 0.22, 0.08)]
    _paint(labels, X, CT_LABELS["aorta"], _box(aorta, 0.08), lambda P, L: _tube(P, aorta, [0.07, 0.068, 0.062]) < 0)
    for kid, value, side in ((_KID_R, CT_LABELS["kidney_right"], 1.0), (_KID_L, CT_LABELS["kidney_left"], -1.0)):
        hilum = np.asarray(kid["c"]) + np.array([0.0, -0.02, 0.12 * side])

        def inside(P, L, kid=kid, hilum=hilum):
            return (_ell(P, **kid) < 1) & (_ell(P, hilum, (0.1, 0.07, 0.07)) > 1)

        _paint(labels, X, value, _ell_box(**kid), inside)
    spleen = dict(c=(-0.38, 0.28, 0.58), r=(0.26, 0.22, 0.13), R=_rot(az=0.6))
    _paint(labels, X, CT_LABELS["spleen"], _ell_box(**spleen),
           lambda P, L: (_ell(P, **spleen) < 1) & (_ell(P, (-0.38, 0.22, 0.48), (0.24, 0.18, 0.1), _rot(az=0.6)) > 1))
    for side in (-1.0, 1.0):
        lung = dict(c=(-1.15, 0.12, 0.45 * side), r=(0.85, 0.42, 0.36))
        _paint(labels, X, CT_LABELS["lung"], _ell_box(**lung), lambda P, L, lung=lung: _ell(P, **lung) < 1,
               where=[CT_LABELS[k] for k in ("soft_tissue", "liver", "spleen", "hepatic_vessels")])
    # spine: vertebral bodies with discs, arch around the canal, spinous and transverse processes
    bone = CT_LABELS["spine"]
    level = np.mod((z + 1.0) / 0.26, 1.0)
    body = (((y - 0.42) / 0.13) ** 2 + (x / 0.15) ** 2 < 1) & (level >= 0.16)
    canal_d = np.sqrt((y - 0.60) ** 2 + x**2)
    arch = (canal_d < 0.115) & (canal_d >= 0.065) & (y > 0.53) & (level >= 0.16)
    spinous = (y > 0.66) & (y < 0.78) & (np.abs(x) < 0.035) & (level >= 0.3)
    transverse = (np.abs(y - 0.57) < 0.03) & (np.abs(x) < 0.24) & (level >= 0.4) & (level < 0.8)
    labels[body | arch | spinous | transverse] = bone
    labels[canal_d < 0.065] = CT_LABELS["soft_tissue"]
    # ribs: bands in the chest wall, sloping down anteriorly
    theta = np.arctan2(np.abs(x), y - 0.04)  # 0 = posterior, pi = anterior
    ring = (rho > 0.80) & (rho < 0.87)
    for z0 in (-0.98, -0.72, -0.46, -0.20, 0.06):
        zr = z0 + 0.28 * theta / np.pi
        labels[ring & (np.abs(z - zr) < 0.035) & (theta > 0.35) & (theta < 2.3)] = CT_LABELS["ribs"]
    return labels


# ------------------------------------------------------------------------------------------ MRI anatomy

_BRAIN_BASE = {
    "extracranial": 1, "skull": 2, "csf": 3, "lateral_ventricle_left": 4, "lateral_ventricle_right": 5,
    "third_ventricle": 6, "fourth_ventricle": 7, "white_matter_left": 8, "white_matter_right": 9,
    "corpus_callosum": 10, "thalamus_left": 11, "thalamus_right": 12, "caudate_left": 13, "caudate_right": 14,
    "putamen_left": 15, "putamen_right": 16, "pallidum_left": 17, "pallidum_right": 18, "hippocampus_left": 19,
    "hippocampus_right": 20, "amygdala_left": 21, "amygdala_right": 22, "cerebellum_cortex_left": 23,
    "cerebellum_cortex_right": 24, "cerebellum_white_matter": 25, "brainstem": 26, "eyes": 27,
}
# cortical parcels: seed directions (z, y, x) seen from each hemisphere's centre, x pointing laterally
_PARCELS = {
    "frontal_pole": (0.0, -1.0, 0.15), "superior_frontal": (-0.85, -0.55, 0.15), "middle_frontal": (-0.35, -0.7, 0.6),
    "orbitofrontal": (0.55, -0.8, 0.3), "precentral": (-0.85, -0.1, 0.5), "postcentral": (-0.8, 0.25, 0.55),
    "superior_parietal": (-0.6, 0.65, 0.35), "occipital": (0.05, 1.0, 0.2), "superior_temporal": (0.15, -0.1, 1.0),
    "inferior_temporal": (0.65, 0.05, 0.75), "inferior_parietal": (-0.3, 0.55, 0.75),
}
BRAIN_LABELS = dict(_BRAIN_BASE)
for _i, _p in enumerate(_PARCELS):
    BRAIN_LABELS[f"{_p}_left"] = 31 + _i
    BRAIN_LABELS[f"{_p}_right"] = 51 + _i
_GM_TMP = 250  # cortex before parcellation
# label -> (T1 grey level, texture amplitude)
_MRI_BASE = {0: (0, 0), 1: (150, 28), 2: (40, 18), 3: (30, 3), 4: (26, 2), 5: (26, 2), 6: (28, 2), 7: (28, 2),
             8: (190, 4), 9: (190, 4), 10: (200, 3), 11: (152, 4), 12: (152, 4), 13: (128, 4), 14: (128, 4),
             15: (136, 4), 16: (136, 4), 17: (160, 4), 18: (160, 4), 19: (114, 4), 20: (114, 4), 21: (118, 4),
             22: (118, 4), 23: (122, 5), 24: (122, 5), 25: (178, 4), 26: (166, 4), 27: (24, 2)}
MRI_LEVELS = dict(_MRI_BASE)
for _v in BRAIN_LABELS.values():
    MRI_LEVELS.setdefault(_v, (120, 5))

_LV = {  # lateral ventricle polyline (x > 0 side) and radii
    "pts": [(-0.02, -0.34, 0.08), (-0.14, -0.10, 0.09), (-0.13, 0.15, 0.11), (0.0, 0.32, 0.18), (0.15, 0.2, 0.3),
            (0.25, -0.05, 0.33)],
    "r": [0.04, 0.06, 0.055, 0.05, 0.035, 0.025],
}
_HIPPO = {"pts": [(0.32, -0.05, 0.30), (0.27, 0.12, 0.28), (0.18, 0.26, 0.22)], "r": [0.055, 0.045, 0.03]}
BRAIN_LANDMARKS = {
    "anterior_commissure": (0.06, -0.13, 0.0),
    "posterior_commissure": (0.04, 0.17, 0.0),
    "frontal_horn_left": _LV["pts"][0],
    "frontal_horn_right": (_LV["pts"][0][0], _LV["pts"][0][1], -_LV["pts"][0][2]),
    "hippocampus_head_left": _HIPPO["pts"][0],
    "hippocampus_head_right": (_HIPPO["pts"][0][0], _HIPPO["pts"][0][1], -_HIPPO["pts"][0][2]),
}
_FOLD_DIRS = np.array([(0.48, -0.6, 0.64), (-0.8, 0.2, 0.57), (0.1, 0.9, -0.42), (0.6, 0.6, 0.53)])
_FOLD_DIRS /= np.linalg.norm(_FOLD_DIRS, axis=1, keepdims=True)


def _mirror(pts):
    return [(p[0], p[1], -p[2]) for p in pts]


def _cerebrum_f(X):
    parts = [_ell(X, (-0.15, 0.0, 0.0), (0.62, 0.80, 0.62))]
    for side in (-1, 1):
        parts.append(_ell(X, (0.18, -0.08, 0.42 * side), (0.24, 0.42, 0.2)))
    return _smooth_min([p - 1 for p in parts], k=10.0)


def _fold(X):
    u = X - np.array([-0.1, 0.0, 0.0])
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-6)
    f = sum(np.sin(k * (u @ d) + ph) for k, d, ph in zip((9.0, 11.0, 13.0, 10.0), _FOLD_DIRS, (0.3, 1.1, 2.0, 2.7)))
    return np.clip(f / 2.0, -1.0, 1.0)


def _paint_mri(X) -> np.ndarray:
    B = BRAIN_LABELS
    labels = np.zeros(len(X), np.uint8)
    z, y, x = X[:, 0], X[:, 1], X[:, 2]
    f_cer = _cerebrum_f(X)
    fossa = _ell(X, (0.40, 0.42, 0.0), (0.29, 0.40, 0.55)) - 1
    f_ic = _smooth_min([f_cer - 0.08, fossa], k=12.0)
    face = _ell(X, (0.38, -0.42, 0.0), (0.42, 0.5, 0.62)) - 1
    neck = (z > 0.3) & (((y - 0.15) / 0.45) ** 2 + (x / 0.42) ** 2 < 1)
    head = (_smooth_min([f_ic - 0.24, face], k=8.0) < 0) | neck
    labels[head] = B["extracranial"]
    labels[(f_ic < 0.12) & head] = B["skull"]
    labels[f_ic < 0] = B["csf"]
    # cerebrum: white matter, cortex with gyral folding, sulcal CSF, interhemispheric fissure
    depth = -f_cer * 0.62
    fold = _fold(X)
    cer = f_cer < 0
    sulcus = np.clip(-fold, 0.0, 1.0)  # 1 at the fundus of a sulcus
    wm = cer & (depth >= 0.06 + 0.14 * sulcus**2)
    labels[cer] = _GM_TMP
    labels[wm & (x >= 0)] = B["white_matter_left"]
    labels[wm & (x < 0)] = B["white_matter_right"]
    labels[cer & (depth < 0.17 * sulcus**4)] = B["csf"]
    cc_zone = (np.abs(y) < 0.33) & (z > -0.22)
    labels[cer & (np.abs(x) < 0.022) & ~cc_zone] = B["csf"]
    cc = [(0.0, -0.30, 0.0), (-0.2, -0.2, 0.0), (-0.24, 0.05, 0.0), (-0.18, 0.28, 0.0), (-0.02, 0.34, 0.0)]
    _paint(labels, X, B["corpus_callosum"], _box(cc, 0.12),
           lambda P, L: _tube(P, cc, [0.04, 0.035, 0.03, 0.035, 0.045], scale=(1, 1, 1 / 3)) < 0)
    for side, suffix in ((1, "left"), (-1, "right")):
        lv = _LV["pts"] if side > 0 else _mirror(_LV["pts"])
        _paint(labels, X, B[f"lateral_ventricle_{suffix}"], _box(lv, 0.07),
               lambda P, L, p=lv: _tube(P, p, _LV["r"], scale=(1, 1, 1.4)) < 0)
        caud = [(0.0, -0.28, 0.15 * side), (-0.08, -0.1, 0.16 * side), (-0.08, 0.12, 0.17 * side)]
        _paint(labels, X, B[f"caudate_{suffix}"], _box(caud, 0.07),
               lambda P, L, p=caud: _tube(P, p, [0.065, 0.04, 0.025]) < 0, where=[B[f"white_matter_{suffix}"]])
        for name, c, r, R in (
            ("thalamus", (0.02, 0.06, 0.09), (0.10, 0.15, 0.075), None),
            ("putamen", (0.03, -0.08, 0.27), (0.12, 0.17, 0.055), _rot(az=0.2 * side)),
            ("pallidum", (0.05, -0.04, 0.205), (0.07, 0.09, 0.03), _rot(az=0.2 * side)),
            ("amygdala", (0.32, -0.15, 0.30), (0.06, 0.06, 0.055), None),
        ):
            c = (c[0], c[1], c[2] * side)
            _paint(labels, X, B[f"{name}_{suffix}"], _ell_box(c, r, R),
                   lambda P, L, c=c, r=r, R=R: _ell(P, c, r, R) < 1)
        hip = _HIPPO["pts"] if side > 0 else _mirror(_HIPPO["pts"])
        _paint(labels, X, B[f"hippocampus_{suffix}"], _box(hip, 0.06),
               lambda P, L, p=hip: _tube(P, p, _HIPPO["r"]) < 0)
    _paint(labels, X, B["third_ventricle"], _ell_box((0.05, 0.0, 0.0), (0.12, 0.18, 0.022)),
           lambda P, L: _ell(P, (0.05, 0.0, 0.0), (0.12, 0.18, 0.022)) < 1)
    # cerebellum with folia, separated from the cerebrum by a CSF gap (tentorium)
    cb = dict(c=(0.42, 0.46, 0.0), r=(0.24, 0.34, 0.5))

    def cb_f(P):
        notch = 0.25 * np.exp(-((P[:, 2] / 0.08) ** 2)) * (P[:, 1] > 0.6)
        return _ell(P, **cb) - 1 + notch

    _paint(labels, X, B["csf"], _ell_box(cb["c"], np.asarray(cb["r"]) + 0.05), lambda P, L: cb_f(P) < 0.12)

    def cb_paint(P, L):
        f = cb_f(P)
        d = -f * 0.3
        out = np.where(P[:, 2] >= 0, B["cerebellum_cortex_left"], B["cerebellum_cortex_right"]).astype(np.uint8)
        out[d > 0.045 + 0.02 * np.sin(30 * P[:, 0] + 12 * P[:, 1])] = B["cerebellum_white_matter"]
        out[f >= 0] = L[f >= 0]
        return out

    lo, hi = _ell_box(cb["c"], cb["r"])
    idx = np.nonzero(np.all((X >= lo) & (X <= hi), axis=1))[0]
    labels[idx] = cb_paint(X[idx], labels[idx])
    stem = [(0.05, 0.12, 0.0), (0.35, 0.2, 0.0), (0.7, 0.26, 0.0), (1.2, 0.3, 0.0)]
    _paint(labels, X, B["brainstem"], _box(stem, 0.12), lambda P, L: _tube(P, stem, [0.11, 0.1, 0.075, 0.07]) < 0)
    _paint(labels, X, B["fourth_ventricle"], _ell_box((0.45, 0.31, 0.0), (0.06, 0.05, 0.06)),
           lambda P, L: _ell(P, (0.45, 0.31, 0.0), (0.06, 0.05, 0.06)) < 1)
    for side in (-1, 1):
        c = (0.3, -0.78, 0.28 * side)
        _paint(labels, X, B["eyes"], _ell_box(c, (0.11,) * 3), lambda P, L, c=c: _ell(P, c, (0.11,) * 3) < 1)
    # cortical parcellation: nearest seed direction from the hemisphere centre
    gm = np.nonzero(labels == _GM_TMP)[0]
    if len(gm):
        P = X[gm]
        side = np.where(P[:, 2] >= 0, 1.0, -1.0)
        v = P - np.stack([np.full(len(P), -0.1), np.zeros(len(P)), 0.25 * side], 1)
        v[:, 2] *= side  # lateral = +x in both hemispheres
        seeds = np.array(list(_PARCELS.values()), np.float64)
        seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
        best = np.argmax(v @ seeds.T, axis=1)
        labels[gm] = np.where(side > 0, 31 + best, 51 + best).astype(np.uint8)
    return labels


# ------------------------------------------------------------------------------------------ subjects


@dataclass
class _Deformation:
    """``phi(X) = A X + t + sum_k a_k sin(f_k . X + p_k)`` on normalised coordinates."""

    A: np.ndarray
    t: np.ndarray
    freqs: np.ndarray  # [K, 3]
    phases: np.ndarray  # [K]
    amps: np.ndarray  # [K, 3]

    def __call__(self, X):
        out = X @ self.A.T + self.t
        if len(self.phases):
            out = out + np.sin(X @ self.freqs.T + self.phases) @ self.amps
        return out

    def inverse(self, q, iterations=200):
        """Points ``p`` with ``phi(p) = q`` by ``p <- A^-1 (q - t - local(p))``."""
        q = np.asarray(q, np.float64)
        Ai = np.linalg.inv(self.A)
        p = (q - self.t) @ Ai.T
        for _ in range(iterations):
            local = np.sin(p @ self.freqs.T + self.phases) @ self.amps if len(self.phases) else 0.0
            p = (q - self.t - local) @ Ai.T
        err = np.abs(self(p) - q).max()
        if err > 1e-6:
            raise RuntimeError(f"deformation inverse did not converge (residual {err:.2e})")
        return p


def _identity():
    return _Deformation(np.eye(3), np.zeros(3), np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)))


def _random_deformation(rng, modality):
    big = modality == "ct"
    angles = rng.uniform(-1, 1, 3) * np.deg2rad([4.0, 4.0, 7.0] if big else [6.0, 5.0, 5.0])
    scale = np.exp(rng.normal(0, 0.03) + rng.normal(0, 0.035, 3))
    shear = np.eye(3) + np.triu(rng.normal(0, 0.02, (3, 3)), 1)
    A = _rot(*angles) @ shear @ np.diag(scale)
    t = rng.uniform(-0.05, 0.05, 3)
    k = 4
    dirs = rng.normal(size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freqs = dirs * rng.uniform(1.8, 4.2, (k, 1))
    phases = rng.uniform(0, 2 * np.pi, k)
    amps = rng.normal(0, 1, (k, 3))
    amps *= rng.uniform(0.03, 0.05, (k, 1)) / np.linalg.norm(amps, axis=1, keepdims=True)
    lip = float(np.sum(np.linalg.norm(amps, axis=1) * np.linalg.norm(freqs, axis=1)))
    if lip > 0.45:  # keep phi invertible and its inverse iteration contracting
        amps *= 0.45 / lip
    return _Deformation(A, t, freqs, phases, amps)


def _texture(X, rng_tex):
    """Smooth texture in template coordinates, roughly in [-1, 1] (same for every subject of a dataset)."""
    freqs, phases = rng_tex
    return np.sin(X @ freqs.T + phases).sum(1) / math.sqrt(len(phases) / 2)


def _blur(vol, sigma):
    if sigma <= 0:
        return vol
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in range(3):
        pad = [(r, r) if a == axis else (0, 0) for a in range(3)]
        padded = np.pad(vol, pad, mode="edge")
        out = np.zeros_like(vol)
        n = vol.shape[axis]
        for j, w in enumerate(k):
            out += w * np.take(padded, np.arange(j, j + n), axis=axis)
        vol = out
    return vol


def _size3(size):
    s = (int(size),) * 3 if np.isscalar(size) else tuple(int(v) for v in size)
    if len(s) != 3 or min(s) < 8:
        raise ValueError(f"size: expected an int or three ints >= 8, got {size!r}")
    return s


def label_names(name: str) -> dict:
    """``{structure name: label value}`` of a synthetic dataset."""
    _spec(name)
    table = CT_LABELS if DEMOS[name].modality == "ct" else BRAIN_LABELS
    return dict(sorted(table.items(), key=lambda kv: kv[1]))


def _spec(name) -> DemoSpec:
    if name not in DEMOS:
        raise ValueError(f"name: expected one of {sorted(DEMOS)}, got {name!r}")
    return DEMOS[name]


def subject_deformation(name: str, index: int, seed: int = 0) -> _Deformation:
    """The map ``phi`` from a subject's normalised coordinates to the template's (identity for the atlas, -1)."""
    spec = _spec(name)
    if index < 0:
        return _identity()
    return _random_deformation(np.random.default_rng([seed, 1, index + 1]), spec.modality)


def render_subject(name: str, index: int, size=64, seed: int = 0, slab: int = 16) -> dict:
    """Renders one subject of a synthetic dataset.

    Args:
      name: ``"demo"`` or ``"demo-brain"``.
      index: subject number (``-1`` = the undeformed atlas).
      size: grid ``(D, H, W)`` or one int.
      seed: dataset seed.
      slab: slices rendered at a time (bounds memory).

    Returns:
      ``{"volume": uint8 [D,H,W], "segmentation": uint8 [D,H,W], "points": float32 [6, 3] (voxels, -1 = outside),
      "attrs": {"spacing", "affine"}}``.
    """
    spec = _spec(name)
    shape = _size3(size)
    ct = spec.modality == "ct"
    tex_rng = np.random.default_rng([seed, 7, 0])
    tex = (tex_rng.normal(0, 1, (8, 3)) * 9.0, tex_rng.uniform(0, 2 * np.pi, 8))
    phi = subject_deformation(name, index, seed)
    rng = np.random.default_rng([seed, 2, index + 1])
    table = CT_HU if ct else MRI_LEVELS
    lut_mean = np.zeros(256)
    lut_tex = np.zeros(256)
    for v, (mean, amp) in table.items():
        lut_mean[v], lut_tex[v] = mean, amp
    # per-subject intensity variation: global gain and a small per-label jitter
    jitter = 1.0 + rng.normal(0, 0.025, 256)
    gain = 1.0 if ct else float(np.exp(rng.normal(0, 0.04)))
    axes = [(2 * np.arange(n) + 1) / n - 1.0 for n in shape]
    labels = np.zeros(shape, np.uint8)
    value = np.zeros(shape, np.float64)
    for z0 in range(0, shape[0], slab):
        zs = axes[0][z0:z0 + slab]
        X = np.stack(np.meshgrid(zs, axes[1], axes[2], indexing="ij"), -1).reshape(-1, 3)
        Xt = phi(X)
        lab = _paint_ct(Xt) if ct else _paint_mri(Xt)
        val = lut_mean[lab] * jitter[lab] + lut_tex[lab] * _texture(Xt, tex)
        labels[z0:z0 + slab] = lab.reshape(len(zs), shape[1], shape[2])
        value[z0:z0 + slab] = val.reshape(len(zs), shape[1], shape[2])
    # scanner effects in subject space: bias field, blur, noise
    grid = np.meshgrid(*axes, indexing="ij")
    coef = rng.normal(0, 0.03 if ct else 0.09, 9)
    terms = [grid[0], grid[1], grid[2], grid[0] * grid[1], grid[1] * grid[2], grid[0] * grid[2],
             grid[0] ** 2 - 0.33, grid[1] ** 2 - 0.33, grid[2] ** 2 - 0.33]
    bias = np.exp(sum(c * t for c, t in zip(coef, terms)))
    if ct:
        level, width = CT_WINDOW
        img = np.clip((value - (level - width / 2)) / width * 255.0, 0, 255) * bias
        img = _blur(img, 0.6) + rng.normal(0, 4.0, shape)
    else:
        img = _blur(value * gain * bias, 0.6)
        img = np.sqrt((img + rng.normal(0, 3.5, shape)) ** 2 + rng.normal(0, 3.5, shape) ** 2)  # Rician
    volume = np.clip(np.round(img), 0, 255).astype(np.uint8)
    targets = CT_LANDMARKS if ct else BRAIN_LANDMARKS
    p = phi.inverse(np.array(list(targets.values()), np.float64))
    n = np.asarray(shape, np.float64)
    points = ((p + 1.0) * n - 1.0) / 2.0
    outside = np.any((points < 0) | (points > n - 1), axis=1)
    points[outside] = -1.0
    spacing = np.array([spec.fov_mm / s for s in shape])
    # Voxel axes run superior->inferior (D), anterior->posterior (H), right->left (W): in RAS+ world coordinates
    # that is -z, -y and -x; the centre of the grid sits at the world origin.
    affine = np.eye(4)
    affine[:3, :3] = [[0.0, 0.0, -spacing[2]], [0.0, -spacing[1], 0.0], [-spacing[0], 0.0, 0.0]]
    affine[:3, 3] = -affine[:3, :3] @ ((n - 1) / 2)
    return {"volume": volume, "segmentation": labels, "points": points.astype(np.float32),
            "attrs": {"spacing": spacing, "affine": affine}}


# ------------------------------------------------------------------------------------------ datasets


def _params(name, shape, subjects, seed):
    return {"name": name, "size": list(shape), "subjects": int(subjects), "seed": int(seed),
            "version": GENERATOR_VERSION}


def generate_demo_dataset(name: str, json_path, size=64, subjects: int | None = None, seed: int = 0,
                          progress: bool = True) -> Path:
    """Writes ``<json_path>`` and the HDF5 next to it (same stem), atomically, regardless of what is there.

    Subjects are ``s000``, ``s001``, ...; ``demo-brain`` adds the undeformed ``atlas``. The last
    ``max(2, subjects // 6)`` subjects form subset ``val`` (scheme ``"2"``), the others ``train`` (scheme ``"1"``).
    """
    spec = _spec(name)
    shape = _size3(size)
    subjects = spec.subjects if subjects is None else int(subjects)
    n_val = max(2, subjects // 6)
    if subjects < n_val + 2:
        raise ValueError(f"subjects: expected at least {n_val + 2}, got {subjects}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed}")
    json_path = Path(json_path)
    h5_path = json_path.with_suffix(".h5")
    params = _params(name, shape, subjects, seed)
    keys = [f"s{i:03d}" for i in range(subjects)]
    jobs = ([("atlas", -1)] if spec.atlas else []) + [(k, i) for i, k in enumerate(keys)]
    bar = None
    if progress:
        from ldr_tf.progress import Progress

        bar = Progress(len(jobs), label=f"generate {name}", unit="subject")
    with H5Writer(h5_path) as writer:
        writer.set_attrs({"synthetic": json.dumps(params, sort_keys=True)})
        for n, (key, index) in enumerate(jobs):
            s = render_subject(name, index, shape, seed)
            writer.add(key, s["volume"], segmentation=s["segmentation"], points=s["points"], attrs=s["attrs"])
            if bar is not None:
                bar.update(n + 1)
    ct = spec.modality == "ct"
    extra = {
        "preprocessing": {
            "kind": "synthetic",
            "modality": spec.modality,
            "intensity": "0..255 stored, /255 at read",
            **({"window": {"level": CT_WINDOW[0], "width": CT_WINDOW[1]}} if ct else {"contrast": "T1"}),
            "spacing_mm": [spec.fov_mm / s for s in shape],
        },
        "synthetic": params,
        "landmarks": list((CT_LANDMARKS if ct else BRAIN_LANDMARKS).keys()),
    }
    subsets = {"train": keys[:-n_val], "val": keys[-n_val:]}
    if spec.atlas:
        subsets["atlas"] = ["atlas"]
    desc = Descriptor(
        path=json_path,
        files={"/": h5_path},
        image_size=shape,
        image_type=spec.image_type,
        subsets=subsets,
        schemes={"1": {"train": 1.0}, "2": {"val": 1.0}},
        atlas="atlas" if spec.atlas else None,
        segmentation_class_value=label_names(name),
        extra=extra,
    )
    write_descriptor(desc)
    return json_path


def _up_to_date(json_path: Path, params: dict) -> bool:
    import h5py

    try:
        desc = load_descriptor(json_path)
    except DatasetError:
        return False
    if desc.extra.get("synthetic") != params:
        return False
    try:
        with h5py.File(desc.files["/"], "r") as h5:
            return json.loads(h5.attrs.get("synthetic", "{}")) == params
    except (OSError, KeyError, ValueError):
        return False


def ensure_demo_dataset(name: str = "demo", data_dir=None, size=64, subjects: int | None = None, seed: int = 0,
                        progress: bool = True) -> Path:
    """Returns ``<data_dir>/<name>.json``, generating the dataset first unless an identical one is there.

    Args:
      name: ``"demo"`` (CT, all ordered pairs) or ``"demo-brain"`` (MRI, atlas-based).
      data_dir: default `ldr_tf.data.dataset.default_data_dir()`.
      size: grid (int or ``(D, H, W)``); subjects: default 24; seed: generation seed.
      progress: show a progress bar while generating.

    The stored parameters (name, size, subjects, seed, generator version) are compared with the request, in the
    JSON and in the HDF5; on any difference both files are regenerated (atomically).
    """
    spec = _spec(name)
    shape = _size3(size)
    subjects = spec.subjects if subjects is None else int(subjects)
    base = Path(data_dir).expanduser() if data_dir else default_data_dir()
    json_path = base / f"{name}.json"
    if json_path.is_file() and _up_to_date(json_path, _params(name, shape, subjects, seed)):
        return json_path
    return generate_demo_dataset(name, json_path, shape, subjects, seed, progress)
