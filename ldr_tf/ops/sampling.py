"""Affine resampling between voxel grids, and results pulled back onto a scan's own grid: XLA-compiled, chunked.

Everything that moves data between a NIfTI scan's voxel grid and the network grid goes through two functions:

* `sample_affine` samples a volume at ``matrix @ (i, j, k, 1)`` for every voxel ``(i, j, k)`` of an output grid
  (trilinear for images, label vote or nearest for label maps; outside the volume: `fill`). Preprocessing
  (scan -> network grid) and `ldr_tf.data.preprocess.Geometry.to_original` (network grid -> scan) use it.
* `pull_back` takes a network-grid flow of a registered pair back to the fixed scan's own voxels: at every fixed
  voxel ``p`` the moving voxel it corresponds to, ``q = M_moving (g + u(g))`` with ``g = M_fixed^-1 p``, and, in
  the same pass, the moving scan and its labels sampled at ``q`` (the warped outputs of ``ldr_tf.predict``) and the
  displacement in world millimetres. The conventions are those of `ldr_tf.data.preprocess` (``M`` = grid voxel ->
  source voxel) and `ldr_tf.ops.warp` (pull: ``warped(p) = moving(p + d(p))``).

Coordinates are generated inside the compiled function from the matrices (no coordinate arrays in NumPy), in
float32: positions up to a few hundred voxels are exact to about 1e-4 voxel. The output grid is processed in slabs
along its first axis of at most `CHUNK_VOXELS` voxels, all of one shape, so memory stays bounded for large scans and
each function is compiled once per (volume shape, slab shape). Positions more than half a voxel outside the sampled
volume get `fill` (0: background) instead of the border value the network-grid sampler clamps to.

The compiled functions (here and in `ldr_tf.ops.warp`) are traced with ``autograph=False``: their control flow is
Python's, and AutoGraph's source conversion made the pull-back's first trace take 0.97 s instead of 0.17 s, GIL-bound
work that slowed the model load running beside it in ``ldr_tf.predict``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ldr_tf.ops import warp

__all__ = ["sample_affine", "pull_back", "compile_pull_back", "sample_points", "CHUNK_VOXELS"]

CHUNK_VOXELS = 1 << 20  # voxels per slab (1M: ~12 MB per float32 [slab, 3] coordinate tensor; 4M was slower)
_MODES = ("linear", "labels", "nearest")


def _slab_positions(start, rows: int, ny: int, nz: int):
    """Voxel indices ``[rows, ny, nz, 3]`` float32 of rows ``start .. start + rows`` of an output grid."""
    i = tf.cast(tf.range(rows), tf.float32) + tf.cast(start, tf.float32)
    j = tf.range(ny, dtype=tf.float32)
    k = tf.range(nz, dtype=tf.float32)
    return tf.stack(tf.meshgrid(i, j, k, indexing="ij"), -1)


def _apply(matrix, pts):
    """4x4 affine applied to points ``[..., 3]`` (float32)."""
    return tf.tensordot(pts, tf.transpose(matrix[:3, :3]), 1) + matrix[:3, 3]


def _inside(pos, shape):
    """True where `pos` ``[..., 3]`` lies within half a voxel of a volume of spatial `shape`."""
    hi = tf.cast(shape, tf.float32) - 0.5
    return tf.reduce_all((pos >= -0.5 - 1e-4) & (pos <= hi + 1e-4), axis=-1)


def _sample(volume, pos, mode: str):
    """`volume` ``[X, Y, Z]`` (labels int32) or ``[X, Y, Z, C]`` (float32) at positions ``[..., 3]``."""
    if mode == "linear":
        return warp._sample_linear(volume[None], pos[None])[0]
    return warp._sample_labels(volume[None], pos[None], "nearest" if mode == "nearest" else "linear")[0]


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _affine_slab(volume, matrix, start, rows: int, ny: int, nz: int, mode: str, fill):
    pos = _apply(matrix, _slab_positions(start, rows, ny, nz))
    out = _sample(volume, pos, mode)
    inside = _inside(pos, tf.shape(volume)[:3])
    if mode == "linear" and volume.shape.rank == 4:
        inside = inside[..., None]
    return tf.where(inside, out, tf.cast(fill, out.dtype))


def _slabs(shape, max_voxels: int):
    nx, ny, nz = (int(s) for s in shape)
    rows = max(1, min(nx, max_voxels // max(1, ny * nz)))
    for start in range(0, nx, rows):
        yield start, rows, min(rows, nx - start)


def sample_affine(volume, matrix, out_shape, mode: str = "linear", fill=0, max_voxels: int = CHUNK_VOXELS,
                  compiled: bool = True):
    """Samples `volume` at ``matrix @ (i, j, k, 1)`` for every voxel of an output grid of `out_shape`.

    Args:
      volume: ``[X, Y, Z]`` or ``[X, Y, Z, C]`` array (an image), or ``[X, Y, Z]`` integer labels.
      matrix: 4x4, output voxel -> voxel of `volume`.
      out_shape: output grid ``(D, H, W)``.
      mode: ``"linear"`` (trilinear, float32 out), ``"labels"`` (label vote: the label with the largest trilinear
        weight, `ldr_tf.ops.warp.warp_labels`; int32 out) or ``"nearest"`` (int32 out).
      fill: value where the position is more than half a voxel outside `volume`.
      max_voxels: slab size (output voxels per compiled call).
      compiled: run the XLA-compiled sampler (fast once compiled; each new volume/slab shape and mode compiles once,
        0.6-1.8 s on 2 cores). False runs the same ops eagerly, with no compilation: slower per call (0.2-0.4 s
        for a 128^3 output instead of 0.03) but faster for a one-off call, e.g. one pair in ``ldr_tf.predict``.

    Returns:
      ``out_shape`` (+ ``[C]``) float32 (linear) or int32 array.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {', '.join(_MODES)}, got {mode!r}")
    vol = np.asarray(volume)
    if vol.ndim not in (3, 4) or (vol.ndim == 4 and mode != "linear"):
        raise ValueError(f"volume: expected [X, Y, Z] (or [X, Y, Z, C] for mode linear), got shape {vol.shape}")
    if mode != "linear" and vol.dtype.kind not in "iub":
        raise ValueError(f"volume: mode {mode!r} is for integer label maps, got dtype {vol.dtype}")
    squeeze = mode == "linear" and vol.ndim == 3
    vol = tf.constant(vol[..., None].astype(np.float32, copy=False) if squeeze else
                      vol.astype(np.float32 if mode == "linear" else np.int32, copy=False))
    m = tf.constant(np.asarray(matrix, np.float32))
    out_shape = tuple(int(s) for s in out_shape)
    chan = () if squeeze else tuple(vol.shape[3:])
    out = np.empty(out_shape + chan, np.float32 if mode == "linear" else np.int32)
    ny, nz = out_shape[1], out_shape[2]
    slab = _affine_slab if compiled else _affine_slab.python_function
    for start, rows, n in _slabs(out_shape, max_voxels):
        val = slab(vol, m, tf.constant(start, tf.int32), rows, ny, nz, mode, tf.constant(fill, tf.float32)).numpy()
        out[start:start + n] = val[:n, ..., 0] if squeeze else val[:n]
    return out


def _last_axis_slab_positions(start, rows: int, nx: int, ny: int):
    """Voxel indices ``(i, j, k)`` ``[rows, ny, nx, 3]`` float32 of the slices ``k = start .. start + rows`` of an
    output grid, in the memory order of its Fortran layout (``k`` slowest, ``i`` fastest): `_slab_positions` of the
    transposed grid, components back in ``(i, j, k)`` order."""
    return tf.reverse(_slab_positions(start, rows, ny, nx), [-1])


def _fortran(x):
    """A slab result ``[rows, ny, nx(, 3)]`` as the Fortran-order block of ``[nx, ny, rows(, 3)]``."""
    return tf.transpose(x, [3, 0, 1, 2]) if x.shape.rank == 4 else x


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _pull_slab(flow, to_grid, moving_to_source, fixed_affine, moving_affine, start, rows: int, nx: int, ny: int,
               image, labels, want_mm: bool, label_mode: str):
    p = _last_axis_slab_positions(start, rows, nx, ny)
    g = _apply(to_grid, p)  # fixed grid position of every fixed voxel
    # The flow comes transposed too ([W, H, D, 3], channels unchanged): a scan's first axis is usually the grid's
    # first (left-right), the one this slab order walks fastest. Clamped: the flow is extended from its border.
    d = warp._sample_linear(flow[None], tf.reverse(g, [-1])[None])[0]
    gq = g + d  # moving grid position
    q = _apply(moving_to_source, gq)  # moving voxel
    out = {"vox": q - p}
    if want_mm:
        out["mm"] = _apply(moving_affine, q) - _apply(fixed_affine, p)
    # image and labels come transposed ([Z', Y', X']: the Fortran-order scan as it was read, with no copy), so the
    # gathers of neighbouring output voxels (i fastest) read neighbouring memory
    q_t = tf.reverse(q, [-1])
    if image is not None:
        inside = _inside(q_t, tf.shape(image)[:3])
        out["warped"] = tf.where(inside, _sample(image, q_t, "linear")[..., 0], 0.0)
    if labels is not None:
        inside = _inside(q_t, tf.shape(labels))
        out["warped_labels"] = tf.where(inside, _sample(labels, q_t, label_mode), 0)
    return {k: _fortran(v) for k, v in out.items()}


def compile_pull_back(fixed_shape, grid_shape, moving_shape, image: bool = True, labels: bool = False,
                      mm: bool = False, label_mode: str = "labels", max_voxels: int = CHUNK_VOXELS) -> None:
    """Compiles `pull_back` for these shapes (one slab on zeros), e.g. in a thread while a model loads.

    Only the shapes matter (the fixed scan's, the network grid's, the moving scan's): the geometries' matrices are
    arguments of the compiled function, so this can run as soon as the NIfTI headers are read.
    """
    shape = tuple(int(s) for s in fixed_shape)
    start, rows, _ = next(_slabs(shape[::-1], max_voxels))  # slabs along the last axis
    zeros = lambda s, dt: tf.zeros(s, dt)  # noqa: E731
    mov = tuple(int(s) for s in moving_shape)[::-1]  # transposed, as pull_back passes them
    img = zeros(mov + (1,), tf.float32) if image else None
    lab = zeros(mov, tf.int32) if labels else None
    eye = tf.eye(4)
    _pull_slab(zeros(tuple(int(s) for s in grid_shape)[::-1] + (3,), tf.float32), eye, eye, eye, eye,
               tf.constant(start, tf.int32), rows, shape[0], shape[1], img, lab, mm, label_mode)


def pull_back(fixed, moving, flow, image=None, labels=None, mm: bool = False, label_mode: str = "labels",
              max_voxels: int = CHUNK_VOXELS) -> dict:
    """A network-grid registration result on the fixed scan's own voxel grid.

    Args:
      fixed, moving: `ldr_tf.data.preprocess.Geometry` of the fixed and the moving scan (``moving`` None: the same
        geometry as ``fixed``, e.g. an atlas-space dataset).
      flow: ``[D, H, W, 3]`` (or ``[1, D, H, W, 3]``) displacement in voxels of the fixed network grid, pull.
      image: optional moving scan ``[X', Y', Z']`` (any float data) to warp onto the fixed grid.
      labels: optional moving label map ``[X', Y', Z']`` (integers) to warp without mixing labels.
      mm: also return the displacement in world millimetres (RAS+).
      label_mode: ``"labels"`` (label vote, default) or ``"nearest"``.

    Returns:
      dict of ``fixed.source_shape`` arrays: ``vox`` ``[..., 3]`` float32 (``p + vox`` is the moving voxel that
      fixed voxel ``p`` corresponds to), and with the arguments above ``mm`` ``[..., 3]`` (``world_moving(q) -
      world_fixed(p)``), ``warped`` float32 and ``warped_labels`` int32 (0 where ``q`` leaves the moving scan).
      The arrays are in Fortran order, NIfTI's own (computed in slabs along the last axis, each one contiguous
      block): writing them costs no transposition (0.19 s for a 160x192x224 displacement field).
    """
    mov = moving if moving is not None else fixed
    u = np.asarray(flow, np.float32)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.shape != fixed.grid_shape + (3,):
        raise ValueError(f"flow: expected shape {fixed.grid_shape + (3,)}, got {u.shape}")
    if label_mode not in ("labels", "nearest"):
        raise ValueError(f"label_mode: expected 'labels' or 'nearest', got {label_mode!r}")
    for name, v in (("image", image), ("labels", labels)):
        if v is not None and tuple(np.shape(v)) != tuple(mov.source_shape):
            raise ValueError(f"{name}: expected the moving scan's shape {tuple(mov.source_shape)}, got "
                             f"{tuple(np.shape(v))}")
    f32 = lambda m: tf.constant(np.asarray(m, np.float32))  # noqa: E731
    img = None if image is None else tf.constant(np.asarray(image, np.float32).T[..., None])
    lab = None if labels is None else tf.constant(np.asarray(labels).astype(np.int32, copy=False).T)
    nx, ny, nz = (int(s) for s in fixed.source_shape)
    # C-order buffers [3, Z, Y, X] / [Z, Y, X]: their transposes are the Fortran-order [X, Y, Z(, 3)] results.
    vector, scalar = (3, nz, ny, nx), (nz, ny, nx)
    out = {"vox": np.empty(vector, np.float32)}
    if mm:
        out["mm"] = np.empty(vector, np.float32)
    if img is not None:
        out["warped"] = np.empty(scalar, np.float32)
    if lab is not None:
        out["warped_labels"] = np.empty(scalar, np.int32)
    flow_t = tf.constant(np.ascontiguousarray(u.transpose(2, 1, 0, 3)))  # [W, H, D, 3], as _pull_slab reads it
    args = (flow_t, f32(fixed.source_to_grid), f32(mov.grid_to_source), f32(fixed.source_affine),
            f32(mov.source_affine))
    for start, rows, n in _slabs((nz, ny, nx), max_voxels):  # along the last axis
        res = _pull_slab(*args, tf.constant(start, tf.int32), rows, nx, ny, img, lab, mm, label_mode)
        for k, v in res.items():
            out[k][..., start:start + n, :, :] = v.numpy()[..., :n, :, :]
    return {k: v.T for k, v in out.items()}


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _points_slab(volume, pos, mode: str):
    inside = _inside(pos, tf.shape(volume)[:3])
    out = _sample(volume, pos, mode)
    if mode == "linear" and volume.shape.rank == 4:
        inside = inside[..., None]
    return tf.where(inside, out, tf.zeros_like(out))


def sample_points(volume, coords, mode: str = "linear", max_voxels: int = CHUNK_VOXELS):
    """Samples `volume` (``[X, Y, Z]``) at arbitrary voxel positions `coords` ``[..., 3]``; 0 outside.

    For positions that are not an affine function of an output grid (e.g. a dense correspondence field);
    `sample_affine` is faster where they are. Modes as `sample_affine`.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {', '.join(_MODES)}, got {mode!r}")
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume: expected [X, Y, Z], got shape {vol.shape}")
    vol = tf.constant(vol[..., None].astype(np.float32, copy=False) if mode == "linear" else
                      vol.astype(np.int32, copy=False))
    c = np.asarray(coords, np.float32)
    flat = c.reshape(-1, 3)
    out = np.empty(flat.shape[0], np.float32 if mode == "linear" else np.int32)
    chunk = max(1, min(max_voxels, flat.shape[0]))
    pad = np.zeros((chunk, 3), np.float32)  # one slab shape: one compilation
    for s in range(0, flat.shape[0], chunk):
        n = min(chunk, flat.shape[0] - s)
        pad[:n] = flat[s:s + n]
        pad[n:] = 0
        val = _points_slab(vol, tf.constant(pad[:, None, None, :]), mode).numpy()  # [chunk, 1, 1(, 1)]
        out[s:s + n] = val.reshape(-1)[:n]
    return out.reshape(c.shape[:-1])
