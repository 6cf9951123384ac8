"""How a NIfTI scan becomes a network-grid volume, and how grid results go back to the scan.

The whole spatial pipeline is ONE affine map from grid voxels to source voxels, applied with a single
interpolation (no intermediate reoriented or cropped copies)::

    source voxel p = M @ g,   M = R @ S

* ``R`` (reorientation) maps voxels of the canonically oriented array to source voxels. The canonical orientation is
  the closest one to `Preprocessing.orientation` (``"RAS"`` by default: grid axis D runs towards patient Right,
  H towards Anterior, W towards Superior), found from the NIfTI affine like ``nibabel.as_closest_canonical`` does:
  only axis permutations and flips, never an oblique rotation, so reorientation itself never interpolates.
* ``S`` (field of view) maps grid voxels into the canonical array. The field of view is the whole array, or the
  bounding box of some labels padded by ``max(crop_margin_fraction * extent, crop_margin_voxels)`` on each side
  (the liver recipe of the original: 10 %, at least 5 voxels) and clipped to the array. ``"stretch"`` fits the box
  to the grid along every axis independently (anisotropic voxels, like the original ``zoom`` to 128^3);
  ``"keep_aspect"`` uses one isotropic spacing (the largest needed) and centres the box, so the grid also shows
  some scan beyond the box, and zero padding only where the grid leaves the scan. Voxel edges are aligned: an extent
  of ``E`` source voxels fills ``G`` grid voxels exactly, grid voxel ``g`` sits at ``lo - 0.5 + (g + 0.5) E / G``.

Images are sampled trilinearly (`ldr_tf.ops.warp.resample`), labels by nearest neighbour (or label-aware linear,
`ldr_tf.ops.warp.warp_labels`), then intensities are normalised to 0..255 (uint8): CT window/level, MRI percentiles or
none. `Geometry` keeps ``M``, the source shape and affine, so predictions can be mapped back to the scan.

Displacement fields in millimetres (`Geometry.flow_to_original`)
----------------------------------------------------------------
A grid flow ``u`` (voxels of the fixed grid, `ldr_tf.ops.warp` convention: ``warped(x) = moving(x + u(x))``) becomes,
at every voxel ``p`` of the fixed scan, the displacement to the corresponding point of the moving scan:

* ``mm``: ``world_moving(g + u(g)) - world_fixed(p)`` with ``g = M^-1 p``, in the NIfTI world frame (RAS+, mm);
* ``voxels``: ``M_moving (g + u(g)) - p``, i.e. a pull field on the native grid:
  ``warped_native(p) = moving_native(p + d(p))`` (native voxels of the moving scan).

ITK/ANTs use LPS+ physical coordinates: ``d_lps = d_ras * (-1, -1, 1)`` (see `ras_to_lps`). An ANTs/ITK
displacement-field NIfTI stores those LPS vectors as a ``[X, Y, Z, 1, 3]`` array on the fixed scan's grid
(intent ``vector``), with the same meaning: fixed point + d = moving point.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np

__all__ = [
    "Preprocessing",
    "Geometry",
    "apply",
    "reorientation_matrix",
    "ras_to_lps",
    "recipe",
    "remap_labels",
    "RECIPES",
    "RESAMPLE_MODES",
    "INTENSITY_MODES",
]

RESAMPLE_MODES = ("stretch", "keep_aspect")
INTENSITY_MODES = ("ct_window", "percentile", "none")
CROP_MODES = ("none", "labels", "foreground")
LABEL_ORDERS = ("nearest", "linear")
_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})
_VERSION = 1


def _check_orientation(code: str) -> str:
    if code == "native":
        return code
    code = str(code).upper()
    ok = len(code) == 3 and all(any(c in p for p in _AXIS_PAIRS) for c in code)
    ok = ok and all(sum(c in p for c in code) == 1 for p in _AXIS_PAIRS)
    if not ok:
        raise ValueError(
            f"orientation: expected 'native' or three letters naming each world axis once (one of L/R, A/P, "
            f"S/I each, e.g. 'RAS', 'LPS'), got {code!r}"
        )
    return code


@dataclass
class Preprocessing:
    """Everything that turns a NIfTI (image + optional labels + landmarks) into a network-grid volume.

    Attributes:
      grid_size: output grid ``(D, H, W)``.
      orientation: ``"RAS"`` (default), any other 3-letter code (``"LPS"``, ...): the world direction each grid
        axis points to; or ``"native"``: keep the scan's array axes.
      resample: ``"stretch"`` (fit the field of view to the grid per axis, anisotropic) or ``"keep_aspect"``
        (isotropic grid spacing, field of view centred, zero padding outside the scan).
      crop: ``"none"`` (field of view = whole scan), ``"labels"`` (bounding box of `crop_labels` in the label
        map, or of the separate crop mask given to `apply`, plus the margin) or ``"foreground"`` (label-free: the
        bounding box of the largest connected component above an Otsu threshold of the intensities, i.e. the head
        or the body, plus the margin; `foreground_box`). Only ``"foreground"`` and ``"none"`` can be repeated on a
        new scan without its label map.
      crop_labels: label values (of the source label map, before `label_map`) that define the crop box and the
        mask; empty = every non-zero label.
      crop_margin_fraction, crop_margin_voxels: margin on each side of the box: ``max(ceil(fraction * extent),
        voxels)`` source voxels per axis.
      intensity: ``"ct_window"`` (``level - window/2 .. level + window/2`` -> 0..255), ``"percentile"``
        (``percentiles`` of the source voxels inside the field of view -> 0..255) or ``"none"`` (values taken as
        they are, clipped to 0..255).
      window, level: CT window width and centre in HU (default W=290, L=120: -25..265 HU).
      percentiles: ``(low, high)`` percentiles for MRI normalisation.
      label_map: ``{source label: new label}`` applied on the grid; labels not listed keep their value, unless
        `label_default` is set, in which case they become `label_default` (background 0 stays 0 unless listed).
      label_default: see `label_map` (``None``: keep unlisted labels).
      label_order: ``"nearest"`` (default) or ``"linear"`` (label-aware trilinear: per-label argmax).
      mask_dilation_mm: if set, intensities outside the selected labels (or crop mask) dilated by this many mm
        (box-shaped) become 0, e.g. to hide the skull. ``None``: no masking.
      spacing_mm: if set, the grid has isotropic voxels of this many mm, centred on the field of view (which then
        only places the grid: anything of the box beyond ``grid_size * spacing_mm`` is left out, and the grid
        shows the scan around a smaller box). Every subject then has the same physical scale on the grid.
        ``None``: the field of view is fitted to the grid (`resample`).
    """

    grid_size: tuple = (128, 128, 128)
    orientation: str = "RAS"
    resample: str = "stretch"
    crop: str = "none"
    crop_labels: tuple = ()
    crop_margin_fraction: float = 0.10
    crop_margin_voxels: int = 5
    intensity: str = "none"
    window: float = 290.0
    level: float = 120.0
    percentiles: tuple = (1.0, 99.0)
    label_map: dict = field(default_factory=dict)
    label_default: int | None = None
    label_order: str = "nearest"
    mask_dilation_mm: float | None = None
    spacing_mm: float | None = None

    def __post_init__(self):
        size = self.grid_size
        if isinstance(size, (int, np.integer)):
            size = (int(size),) * 3
        size = tuple(size)
        if len(size) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
            raise ValueError(f"grid_size: expected three positive integers (D, H, W), got {self.grid_size!r}")
        self.grid_size = tuple(int(s) for s in size)
        self.orientation = _check_orientation(self.orientation)
        for name, allowed in (("resample", RESAMPLE_MODES), ("crop", CROP_MODES), ("intensity", INTENSITY_MODES),
                              ("label_order", LABEL_ORDERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self.crop_labels = tuple(int(v) for v in self.crop_labels)
        if not (0.0 <= float(self.crop_margin_fraction) < 10.0) or int(self.crop_margin_voxels) < 0:
            raise ValueError(
                f"crop_margin_fraction/crop_margin_voxels: expected >= 0, got {self.crop_margin_fraction}, "
                f"{self.crop_margin_voxels}"
            )
        self.crop_margin_fraction = float(self.crop_margin_fraction)
        self.crop_margin_voxels = int(self.crop_margin_voxels)
        if not float(self.window) > 0:
            raise ValueError(f"window: expected a positive CT window width in HU, got {self.window}")
        self.window, self.level = float(self.window), float(self.level)
        p = tuple(float(v) for v in self.percentiles)
        if len(p) != 2 or not 0.0 <= p[0] < p[1] <= 100.0:
            raise ValueError(f"percentiles: expected (low, high) with 0 <= low < high <= 100, got {self.percentiles}")
        self.percentiles = p
        try:
            self.label_map = {int(k): int(v) for k, v in dict(self.label_map or {}).items()}
        except (TypeError, ValueError):
            raise ValueError(f"label_map: expected {{int: int}}, got {self.label_map!r}") from None
        if self.label_default is not None:
            self.label_default = int(self.label_default)
        if self.spacing_mm is not None:
            if not float(self.spacing_mm) > 0:
                raise ValueError(f"spacing_mm: expected a positive voxel size in mm or None, got {self.spacing_mm}")
            self.spacing_mm = float(self.spacing_mm)
        if self.mask_dilation_mm is not None:
            if float(self.mask_dilation_mm) < 0:
                raise ValueError(f"mask_dilation_mm: expected >= 0 or None, got {self.mask_dilation_mm}")
            self.mask_dilation_mm = float(self.mask_dilation_mm)

    @property
    def needs_labels(self) -> bool:
        """True when the field of view or the mask comes from a label map (not repeatable on a new scan alone)."""
        return self.crop == "labels" or self.mask_dilation_mm is not None

    def to_dict(self) -> dict:
        """JSON-able dict (label_map keys become strings); `from_dict` inverts it."""
        d = asdict(self)
        if d["spacing_mm"] is None:
            del d["spacing_mm"]  # specs without it stay readable by earlier versions
        d["grid_size"] = list(self.grid_size)
        d["crop_labels"] = list(self.crop_labels)
        d["percentiles"] = list(self.percentiles)
        d["label_map"] = {str(k): v for k, v in sorted(self.label_map.items())}
        d["version"] = _VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """Builds a spec from `to_dict` output (e.g. a dataset JSON's ``preprocessing``); unknown keys are errors."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing: expected a dict, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", _VERSION)
        if version != _VERSION:
            raise ValueError(f"preprocessing: unsupported version {version} (this code reads {_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"preprocessing: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


RECIPES = {
    # The original liver pipeline: crop to the liver box + max(10 %, 5 voxels), stretch to 128^3, W=290/L=120,
    # liver mask stored as 0/255 (every non-zero label becomes 255; pick one organ with crop_labels/label_map).
    "liver": dict(grid_size=(128, 128, 128), resample="stretch", crop="labels", intensity="ct_window",
                  label_default=255),
    # Brain MRI: isotropic grid around the labelled brain, 1st..99th percentile -> 0..255, labels kept.
    "brain": dict(grid_size=(128, 128, 128), resample="keep_aspect", crop="labels", intensity="percentile"),
    # Brain MRI from raw scans, label-free: the head found from intensities, 2 mm isotropic voxels on a 128^3 grid
    # (256 mm: any adult head) centred on it, percentiles -> 0..255. What predict repeats on any T1 scan.
    "brain-head": dict(grid_size=(128, 128, 128), crop="foreground", spacing_mm=2.0, intensity="percentile"),
    # Nothing but reorientation and fitting the whole scan to the grid; intensities must already be 0..255.
    "none": dict(),
}


def recipe(name: str, **overrides) -> Preprocessing:
    """The `Preprocessing` of a named recipe (``liver``, ``brain``, ``none``), with field `overrides`."""
    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {name!r}")
    return Preprocessing(**{**RECIPES[name], **overrides})


# ------------------------------------------------------------------------------------------- geometry


def _as4x4(m, name) -> np.ndarray:
    m = np.asarray(m, np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"{name}: expected a finite 4x4 matrix, got shape {m.shape}")
    return m


def _apply_h(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Applies a 4x4 affine to points ``[..., 3]``."""
    return pts @ m[:3, :3].T + m[:3, 3]


def ras_to_lps(vectors):
    """RAS+ world vectors/points ``[..., 3]`` -> LPS+ (ITK, ANTs, DICOM): x and y change sign."""
    return np.asarray(vectors) * np.array([-1.0, -1.0, 1.0], dtype=np.asarray(vectors).dtype)


@dataclass
class Geometry:
    """Where a network grid sits in its source scan.

    Attributes:
      grid_to_source: 4x4, grid voxel (D, H, W indices) -> source voxel (NIfTI array indices).
      grid_shape: ``(D, H, W)``.
      source_shape: shape of the source NIfTI array (3-D).
      source_affine: 4x4 source voxel -> world (RAS+, mm), the NIfTI affine.
    """

    grid_to_source: np.ndarray
    grid_shape: tuple
    source_shape: tuple
    source_affine: np.ndarray

    def __post_init__(self):
        self.grid_to_source = _as4x4(self.grid_to_source, "grid_to_source")
        self.source_affine = _as4x4(self.source_affine, "source_affine")
        self.grid_shape = tuple(int(s) for s in self.grid_shape)
        self.source_shape = tuple(int(s) for s in self.source_shape)
        if len(self.grid_shape) != 3 or len(self.source_shape) != 3:
            raise ValueError(
                f"grid_shape/source_shape: expected 3 sizes each, got {self.grid_shape}, {self.source_shape}"
            )

    @property
    def source_to_grid(self) -> np.ndarray:
        return np.linalg.inv(self.grid_to_source)

    @property
    def grid_affine(self) -> np.ndarray:
        """4x4 grid voxel -> world (RAS+, mm)."""
        return self.source_affine @ self.grid_to_source

    @property
    def spacing(self) -> np.ndarray:
        """mm per grid voxel along D, H, W."""
        return np.linalg.norm(self.grid_affine[:3, :3], axis=0)

    # -- serialisation

    def to_dict(self) -> dict:
        return {
            "grid_to_source": self.grid_to_source.tolist(),
            "grid_shape": list(self.grid_shape),
            "source_shape": list(self.source_shape),
            "source_affine": self.source_affine.tolist(),
            "affine": self.grid_affine.tolist(),
            "spacing": self.spacing.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        try:
            return cls(d["grid_to_source"], d["grid_shape"], d["source_shape"], d["source_affine"])
        except KeyError as e:
            raise ValueError(f"geometry: missing key {e}") from None

    def to_attrs(self) -> dict:
        """HDF5 attributes (the `ldr_tf.data.dataset` names ``affine``, ``spacing``, ``source_shape``,
        ``source_affine`` plus ``grid_to_source`` and ``grid_shape``)."""
        d = self.to_dict()
        return {k: np.asarray(v, np.int64 if k.endswith("shape") else np.float64) for k, v in d.items()}

    @classmethod
    def from_attrs(cls, attrs) -> "Geometry":
        return cls.from_dict({k: np.asarray(attrs[k]) for k in
                              ("grid_to_source", "grid_shape", "source_shape", "source_affine") if k in attrs})

    # -- coordinates

    def grid_coords(self) -> np.ndarray:
        """Source voxel position of every grid voxel, ``[D, H, W, 3]`` float64."""
        g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in self.grid_shape], indexing="ij"), -1)
        return _apply_h(self.grid_to_source, g)

    def points_to_grid(self, points) -> np.ndarray:
        """Source voxel coordinates ``[P, 3]`` -> grid voxel coordinates; rows of -1 (missing) stay -1."""
        return _map_points(self.source_to_grid, points)

    def points_to_source(self, points) -> np.ndarray:
        """Grid voxel coordinates ``[P, 3]`` -> source voxel coordinates; rows of -1 (missing) stay -1."""
        return _map_points(self.grid_to_source, points)

    def to_original(self, volume, order: str = "linear", fill=0):
        """Maps a grid volume back onto the source scan's own voxel grid.

        Args:
          volume: ``[D, H, W]`` or ``[D, H, W, C]`` on the grid (a leading batch axis of 1 is accepted).
          order: ``"linear"`` (trilinear, float32 output) or ``"nearest"`` (integer label maps only; output int32).
          fill: value of source voxels outside the grid's field of view (e.g. the part removed by a crop).

        Returns:
          ``source_shape`` (+ ``[C]``) array.
        """
        vol = np.asarray(volume)
        if vol.ndim >= 4 and vol.shape[0] == 1 and vol.shape[1:4] == self.grid_shape:
            vol = vol[0]
        if vol.shape[:3] != self.grid_shape or vol.ndim not in (3, 4):
            raise ValueError(f"volume: expected shape {self.grid_shape} (+ channels), got {vol.shape}")
        if order not in ("linear", "nearest"):
            raise ValueError(f"order: expected 'linear' or 'nearest', got {order!r}")
        if order == "nearest" and vol.dtype.kind not in "iub":
            raise ValueError(f"volume: order='nearest' is for integer label maps, got dtype {vol.dtype}")
        from ldr_tf.ops.sampling import sample_affine  # noqa: PLC0415  (TensorFlow only when needed)

        mode = "linear" if order == "linear" else "nearest"
        return sample_affine(vol, self.source_to_grid, self.source_shape, mode=mode, fill=fill)

    def flow_to_original(self, flow, moving: "Geometry | None" = None):
        """Maps a grid displacement field to the source scan: native voxels and world millimetres.

        Args:
          flow: ``[D, H, W, 3]`` (or ``[1, D, H, W, 3]``) displacement in voxels of THIS (fixed) grid, channel c
            along grid axis c, pull convention ``warped(x) = moving(x + u(x))``.
          moving: geometry of the moving image's grid. ``None`` means the moving image shares this geometry
            (e.g. both were cropped/resampled identically, as with an atlas-space dataset).

        Returns:
          ``(voxels, mm)``, each ``source_shape + [3]`` float32, at every voxel ``p`` of the fixed scan:
          ``voxels = M_moving (g + u(g)) - p`` (native voxels; ``p + voxels`` is where to sample the moving scan)
          and ``mm = world_moving(g + u(g)) - world_fixed(p)`` in RAS+ mm (`ras_to_lps` for ITK/ANTs). Outside the
          grid's field of view the flow is extended from its border (the sampler clamps).
        """
        from ldr_tf.ops.sampling import pull_back  # noqa: PLC0415  (TensorFlow only when needed)

        out = pull_back(self, moving, flow, mm=True)
        return out["vox"], out["mm"]


def _map_points(m: np.ndarray, points) -> np.ndarray:
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points: expected shape [P, 3], got {pts.shape}")
    missing = np.all(pts == -1, axis=1)
    out = _apply_h(m, pts)
    out[missing] = -1
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------- apply


def reorientation_matrix(affine, shape, orientation: str = "RAS"):
    """``(R, canonical_shape)``: R maps voxels of the reoriented array to source voxels (4x4, permutation/flip).

    Like ``nibabel.as_closest_canonical`` generalised to any target axis codes; ``"native"`` gives the identity.
    """
    import nibabel.orientations as nio  # noqa: PLC0415

    orientation = _check_orientation(orientation)
    shape = tuple(int(s) for s in shape[:3])
    if orientation == "native":
        return np.eye(4), shape
    ornt = nio.ornt_transform(nio.io_orientation(np.asarray(affine, np.float64)), nio.axcodes2ornt(orientation))
    r = nio.inv_ornt_aff(ornt, shape)
    canon = [0, 0, 0]
    for src_axis, (dst_axis, _) in enumerate(ornt):
        canon[int(dst_axis)] = shape[src_axis]
    return r, tuple(canon)


def _select(labels: np.ndarray, values: tuple) -> np.ndarray:
    return np.isin(labels, values) if values else labels != 0


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of `values` (the one that best splits them into two classes: between-class variance)."""
    v = np.asarray(values, np.float64).ravel()
    lo, hi = float(v.min()), float(np.percentile(v, 99.9))
    if not hi > lo:
        return lo
    hist, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = (w0 * w1 * (m0 - m1) ** 2)[:-1]
    # the middle of the best plateau (an empty gap between the classes scores the same all along)
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[1:][int(round(best.mean()))])


def foreground_box(data: np.ndarray, name: str = "image"):
    """``(smin, smax)`` source voxel box (inclusive) of the largest connected region above the Otsu threshold.

    Label-free: the head of an MRI, the body of a CT. Computed on every second voxel (4M voxels for a 1 mm head),
    6-connectivity. Raises ValueError naming `name` when nothing stands out from the background.
    """
    from scipy import ndimage  # noqa: PLC0415

    sub = np.asarray(data)[::2, ::2, ::2]
    thr = otsu_threshold(sub[::2, ::2, ::2])
    mask = sub > thr
    if not mask.any():
        raise ValueError(f"{name}: no foreground (nothing above the background intensity {thr:g}); is the image "
                         "empty or constant?")
    comp, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        mask = comp == int(np.argmax(sizes))
    idx = np.nonzero(mask)
    smin = np.array([i.min() for i in idx], np.float64) * 2
    smax = np.minimum(np.array([i.max() for i in idx], np.float64) * 2 + 1, np.asarray(data.shape) - 1)
    return smin, smax


def _field_of_view(spec: Preprocessing, r: np.ndarray, canon_shape, sel: np.ndarray | None, data=None,
                   name: str = "image"):
    """(lo, hi) canonical voxel box (hi exclusive)."""
    n = np.asarray(canon_shape, np.float64)
    if spec.crop == "none":
        return np.zeros(3), n
    if spec.crop == "foreground":
        smin, smax = foreground_box(data, name)
    else:
        idx = np.nonzero(sel)
        if not idx[0].size:
            what = f"labels {list(spec.crop_labels)}" if spec.crop_labels else "non-zero labels"
            raise ValueError(f"crop: the label map has no {what} to crop to")
        smin = np.array([i.min() for i in idx], np.float64)
        smax = np.array([i.max() for i in idx], np.float64)
    corners = np.array([[a[0], b[1], c[2]] for a in (smin, smax) for b in (smin, smax) for c in (smin, smax)])
    canon = np.round(_apply_h(np.linalg.inv(r), corners))
    lo, hi = canon.min(0), canon.max(0) + 1
    extent = hi - lo
    margin = np.maximum(np.ceil(spec.crop_margin_fraction * extent - 1e-9), spec.crop_margin_voxels)
    return np.maximum(lo - margin, 0), np.minimum(hi + margin, n)


def _grid_matrix(spec: Preprocessing, lo, hi, spacing) -> np.ndarray:
    """S: grid voxel -> canonical voxel."""
    g = np.asarray(spec.grid_size, np.float64)
    extent = hi - lo
    if spec.spacing_mm is not None:
        step = spec.spacing_mm / spacing
    elif spec.resample == "stretch":
        step = extent / g
    else:
        step = np.max(extent * spacing / g) / spacing
    centre = lo - 0.5 + extent / 2.0
    s = np.eye(4)
    s[:3, :3] = np.diag(step)
    s[:3, 3] = centre + (0.5 - g / 2.0) * step
    return s


def _dilate_box(mask: np.ndarray, radius) -> np.ndarray:
    out = mask.copy()
    for axis, r in enumerate(radius):
        r = int(r)
        if r <= 0:
            continue
        src = out.copy()
        n = src.shape[axis]
        for k in range(1, min(r, n - 1) + 1):
            lead = [slice(None)] * 3
            trail = [slice(None)] * 3
            lead[axis], trail[axis] = slice(k, None), slice(None, n - k)
            out[tuple(lead)] |= src[tuple(trail)]
            out[tuple(trail)] |= src[tuple(lead)]
    return out


def remap_labels(labels, spec: Preprocessing) -> np.ndarray:
    """Applies ``spec.label_map``/``spec.label_default`` to an integer array (0 stays 0 unless mapped)."""
    labels = np.asarray(labels)
    if not spec.label_map and spec.label_default is None:
        return labels
    values, inverse = np.unique(labels, return_inverse=True)
    new = np.array([spec.label_map.get(int(v), int(v) if spec.label_default is None or v == 0
                                       else spec.label_default) for v in values], np.int64)
    return new[inverse].reshape(labels.shape).astype(np.int32)


def _normalise(raw: np.ndarray, spec: Preprocessing, source: np.ndarray, fov, name: str = "image") -> np.ndarray:
    if spec.intensity == "ct_window":
        lo = spec.level - spec.window / 2.0
        scaled = (raw - lo) * (255.0 / spec.window)
    elif spec.intensity == "percentile":
        region = source[fov]
        p_lo, p_hi = np.percentile(region, spec.percentiles)
        if not p_hi - p_lo > 1e-6 * max(1.0, abs(p_hi)):
            raise ValueError(
                f"{name}: intensity percentiles {spec.percentiles} are equal ({p_lo:g}) inside the field of view; "
                f"the image is (nearly) constant there"
            )
        scaled = (raw - p_lo) * (255.0 / (p_hi - p_lo))
    else:
        scaled = raw
    return np.clip(scaled, 0.0, 255.0)


def _data3d(img, name: str, integer: bool = False) -> np.ndarray:
    if hasattr(img, "dataobj"):
        data = np.asarray(img.dataobj) if integer else np.asarray(img.get_fdata(dtype=np.float32))
    else:
        data = np.asarray(img)
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D volume, got shape {data.shape}")
    return data


ENGINES = ("xla", "eager", "scipy")  # resamplers of `apply`


def _sampler(engine: str, mode: str):
    """The `sample_affine` of `engine` for `mode` (``xla``/``eager``: `ldr_tf.ops.sampling`; ``scipy``:
    `ldr_tf.data.scipy_sampling`, which has no label vote: that mode runs TensorFlow's eager ops)."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "scipy" and mode != "labels":
        from ldr_tf.data.scipy_sampling import sample_affine  # noqa: PLC0415 (no TensorFlow)

        return sample_affine
    from ldr_tf.ops.sampling import sample_affine  # noqa: PLC0415

    return lambda *a, **k: sample_affine(*a, **k, compiled=engine == "xla")


def apply(spec: Preprocessing, image, labels=None, points=None, crop_mask=None, want_labels: bool = True,
          engine: str = "xla"):
    """Preprocesses one scan onto the network grid.

    Args:
      spec: the `Preprocessing`.
      image: nibabel image (3-D; use `ldr_tf.data.nifti.load` for checked input).
      labels: optional nibabel label map on the image's grid (integer-valued).
      points: optional ``[P, 3]`` landmarks in source voxel coordinates (NIfTI array indices); rows of -1 are
        missing and stay -1.
      crop_mask: optional nibabel image or array on the image's grid; when given, its non-zero voxels (instead of
        the labels) define the crop box and the mask (e.g. a brain mask for a template without labels).
      want_labels: resample `labels` onto the grid (False: use them only for the crop box and the mask).
      engine: the resampler: ``"xla"`` (`ldr_tf.ops.sampling.sample_affine` compiled: fastest once compiled, for
        training data and batches), ``"eager"`` (the same ops uncompiled) or ``"scipy"``
        (`ldr_tf.data.scipy_sampling`: no TensorFlow, the fastest for a one-off scan; it can run while TensorFlow
        is imported). The results agree to float32 round-off (tested).

    Returns:
      ``(volume, labels, points, geometry)``: uint8 ``[D, H, W]``; int32 ``[D, H, W]`` or None; float32
      ``[P, 3]`` grid voxel coordinates or None; `Geometry`.

    Raises:
      ValueError: one line, e.g. labels on another grid, nothing to crop to, a constant image.
    """
    from ldr_tf.data.nifti import check_same_grid, source_name  # noqa: PLC0415

    data = _data3d(image, "image").astype(np.float32, copy=False)
    affine = np.asarray(image.affine, np.float64)
    shape = data.shape
    lab = None
    if labels is not None:
        check_same_grid(image, labels)
        lab = _data3d(labels, "labels", integer=True)
        if lab.dtype.kind == "f":
            if not np.all(lab == np.round(lab)):
                raise ValueError("labels: label map is not integer-valued")
        lab = lab.astype(np.int32)
    sel = None
    if crop_mask is not None:
        if hasattr(crop_mask, "affine"):
            check_same_grid(image, crop_mask, label_name="crop_mask")
        cm = _data3d(crop_mask, "crop_mask", integer=True)
        if cm.shape != shape:
            raise ValueError(f"crop_mask: shape {cm.shape} differs from the image shape {shape}")
        sel = cm != 0
    elif lab is not None:
        sel = _select(lab, spec.crop_labels)
    if sel is None and spec.needs_labels:
        raise ValueError("labels: this preprocessing crops or masks to labels, but no label map (or crop mask) "
                         "was given")

    r, canon_shape = reorientation_matrix(affine, shape, spec.orientation)
    canon_spacing = np.linalg.norm((affine @ r)[:3, :3], axis=0)
    lo, hi = _field_of_view(spec, r, canon_shape, sel, data, source_name(image, "image"))
    m = r @ _grid_matrix(spec, lo, hi, canon_spacing)
    geom = Geometry(m, spec.grid_size, shape, affine)

    # The grid's positions in the source are an affine function of the grid index: their box comes from the 8
    # corners, and the samplers compute them in their compiled loop (ldr_tf.ops.sampling).
    corners = np.array([[a, b, c] for a in (0, spec.grid_size[0] - 1) for b in (0, spec.grid_size[1] - 1)
                        for c in (0, spec.grid_size[2] - 1)], np.float64)
    pos = _apply_h(m, corners)
    cmin = np.clip(np.floor(pos.min(0)), 0, None).astype(int)
    cmax = np.minimum(np.ceil(pos.max(0)).astype(int) + 1, shape)
    fov = tuple(slice(a, b) for a, b in zip(cmin, cmax))
    raw = _sampler(engine, "linear")(data, m, spec.grid_size, mode="linear", fill=np.nan)
    inside = ~np.isnan(raw)
    raw[~inside] = 0.0
    vol = _normalise(raw, spec, data, fov, source_name(image, "image"))
    vol[~inside] = 0.0

    out_labels = None
    if lab is not None and want_labels:
        mode = "labels" if spec.label_order == "linear" else "nearest"
        out_labels = remap_labels(_sampler(engine, mode)(lab, m, spec.grid_size, mode=mode), spec)
    if spec.mask_dilation_mm is not None:
        grid_sel = _sampler(engine, "nearest")(sel.astype(np.int32), m, spec.grid_size, mode="nearest") != 0
        radius = np.ceil(spec.mask_dilation_mm / geom.spacing - 1e-9)
        vol[~_dilate_box(grid_sel & inside, radius)] = 0.0
    volume = np.round(vol).astype(np.uint8)

    out_points = None
    if points is not None:
        out_points = geom.points_to_grid(points)
    return volume, out_labels, out_points, geom
