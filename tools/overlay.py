"""``python -m tools.overlay``: one PNG showing a registration result on a slice of the fixed scan.

Four panels on the same slice of the fixed scan's voxel grid: the fixed scan, the moving scan brought onto the fixed
grid through the two NIfTI affines only (what "before registration" means), the warped scan (``ldr_tf.predict``'s
``warped.nii.gz``), and the fixed scan with the label contours of the fixed map (solid) and of the warped map
(dashed). With label maps, the fixed contours are drawn on every panel and each panel's own labels too (moving ->
``--moving_seg`` resampled, warped -> ``--warped_seg``), one colour per label, so misalignment shows as two
contours of the same colour that do not coincide::

    python -m tools.overlay --fixed=f.nii.gz --moving=m.nii.gz --warped=out/warped.nii.gz \\
        --fixed_seg=f_seg.nii.gz --moving_seg=m_seg.nii.gz --warped_seg=out/warped_seg.nii.gz --out=overlay.png

Slices are shown in the fixed scan's array axes, the lower remaining axis horizontal (increasing to the right) and
the other vertical (increasing upwards), without reorientation: for a RAS scan and ``--axis=2`` an axial slice with
patient right on the right and anterior at the top. The default slice is the middle of the fixed labels' bounding
box (or of the volume). Intensities of each panel are scaled to its 1st..99th percentile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import flags

from ldr_tf import cli

FLAGS = flags.FLAGS
PROG = "tools.overlay"


def define_flags(fv=FLAGS) -> None:
    if "warped" in fv:
        return
    flags.DEFINE_string("fixed", None, "Fixed scan (.nii/.nii.gz).", flag_values=fv)
    flags.DEFINE_string("moving", None, "Moving scan (resampled onto the fixed grid through the affines).",
                        flag_values=fv)
    flags.DEFINE_string("warped", None, "Warped moving scan on the fixed grid (predict's warped.nii.gz).",
                        flag_values=fv)
    flags.DEFINE_string("fixed_seg", None, "Fixed label map (contours).", flag_values=fv)
    flags.DEFINE_string("moving_seg", None, "Moving label map (contours on the moving panel).", flag_values=fv)
    flags.DEFINE_string("warped_seg", None, "Warped label map (predict's warped_seg.nii.gz).", flag_values=fv)
    flags.DEFINE_integer("axis", 2, "Fixed-grid axis the slice is taken across (0, 1 or 2).", flag_values=fv)
    flags.DEFINE_integer("slice", None, "Slice index along --axis (default: middle of the fixed labels).",
                         flag_values=fv)
    flags.DEFINE_list("labels", None, "Labels to contour (default: the 12 largest fixed labels on the slice).",
                      flag_values=fv)
    flags.DEFINE_string("out", None, "Output PNG.", flag_values=fv)
    flags.DEFINE_integer("dpi", 120, "PNG resolution.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", flag_values=fv)


def _slice_coords(shape, axis: int, index: int) -> np.ndarray:
    """Voxel positions ``[a, b, 3]`` float32 of one slice of a volume of `shape`."""
    axes = [i for i in range(3) if i != axis]
    grid = np.meshgrid(np.arange(shape[axes[0]]), np.arange(shape[axes[1]]), indexing="ij")
    out = np.empty(grid[0].shape + (3,), np.float32)
    out[..., axes[0]], out[..., axes[1]], out[..., axis] = grid[0], grid[1], index
    return out


def _take(volume, axis: int, index: int) -> np.ndarray:
    return np.take(np.asarray(volume), index, axis=axis)


def _on_fixed_slice(img, fixed, coords, labels=False) -> np.ndarray:
    """`img` sampled at the fixed slice voxels `coords` through the two affines (0 outside `img`)."""
    from ldr_tf.deploy.native import sample_native

    to_img = np.linalg.inv(img.affine) @ fixed.affine
    pos = coords @ to_img[:3, :3].T.astype(np.float32) + to_img[:3, 3].astype(np.float32)
    data = np.asarray(img.dataobj) if labels else np.asarray(img.dataobj, np.float32)
    return sample_native(data, pos, labels=labels)


def _scaled(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [1, 99])
    return np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)


def render(fixed, moving, warped, out, fixed_seg=None, moving_seg=None, warped_seg=None, axis: int = 2,
           index: int | None = None, labels=None, dpi: int = 120) -> dict:
    """Draws the overlay of nibabel images (see the module docstring) into the PNG `out`, atomically.

    Returns ``{"axis", "slice", "labels"}`` (what was drawn).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldr_tf.data import nifti

    if axis not in (0, 1, 2):
        raise ValueError(f"--axis: expected 0, 1 or 2, got {axis}")
    shape = fixed.shape[:3]
    if warped.shape[:3] != shape:
        raise ValueError(f"--warped: shape {warped.shape[:3]} differs from the fixed scan's {shape} (give predict's "
                         "warped.nii.gz, which lies on the fixed grid)")
    if warped_seg is not None:
        nifti.check_same_grid(fixed, warped_seg, label_name="--warped_seg")
    f_lab = np.asarray(fixed_seg.dataobj) if fixed_seg is not None else None
    if index is None:
        if f_lab is not None and f_lab.any():
            idx = np.nonzero(np.any(f_lab != 0, axis=tuple(i for i in range(3) if i != axis)))[0]
            index = int((idx.min() + idx.max()) // 2)
        else:
            index = shape[axis] // 2
    if not 0 <= index < shape[axis]:
        raise ValueError(f"--slice: expected 0..{shape[axis] - 1} along axis {axis}, got {index}")
    coords = _slice_coords(shape, axis, index)
    panels = [("fixed", _take(np.asarray(fixed.dataobj, np.float32), axis, index), f_lab is not None and
               _take(f_lab, axis, index)),
              ("moving (affines only)", _on_fixed_slice(moving, fixed, coords),
               moving_seg is not None and _on_fixed_slice(moving_seg, fixed, coords, labels=True)),
              ("warped", _take(np.asarray(warped.dataobj, np.float32), axis, index),
               warped_seg is not None and _take(np.asarray(warped_seg.dataobj), axis, index))]
    f_slice = panels[0][2] if f_lab is not None else None
    if labels is None and f_slice is not None:
        values, counts = np.unique(f_slice[f_slice != 0], return_counts=True)
        labels = [int(v) for v in values[np.argsort(-counts)][:12]]
    labels = [int(v) for v in (labels or [])]
    cmap = plt.get_cmap("tab20", max(len(labels), 1))

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    for ax, (title, img, lab) in zip(axes[:3], panels):
        ax.imshow(_scaled(img).T, cmap="gray", origin="lower", interpolation="nearest")
        for k, v in enumerate(labels):
            if f_slice is not None and (f_slice == v).any():
                ax.contour((f_slice == v).T, levels=[0.5], colors=[cmap(k)], linewidths=0.6, alpha=0.5)
            if lab is not False and lab is not None and title != "fixed" and (lab == v).any():
                ax.contour((lab == v).T, levels=[0.5], colors=[cmap(k)], linewidths=1.0, linestyles="dashed")
        ax.set_title(title)
    ax = axes[3]
    ax.imshow(_scaled(panels[0][1]).T, cmap="gray", origin="lower", interpolation="nearest")
    w_slice = panels[2][2]
    for k, v in enumerate(labels):
        if f_slice is not None and (f_slice == v).any():
            ax.contour((f_slice == v).T, levels=[0.5], colors=[cmap(k)], linewidths=1.0)
        if w_slice is not False and w_slice is not None and (w_slice == v).any():
            ax.contour((w_slice == v).T, levels=[0.5], colors=[cmap(k)], linewidths=1.0, linestyles="dashed")
    ax.set_title("fixed labels (solid) vs warped (dashed)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"slice {index} across axis {axis} of the fixed grid {tuple(shape)}; solid = fixed labels, "
                 f"dashed = the panel's own labels", fontsize=9)
    fig.tight_layout()
    from ldr_tf.figures import save_figure

    save_figure(fig, out, dpi=dpi)
    return {"axis": axis, "slice": index, "labels": labels}


def _main(fv) -> int:
    from ldr_tf.data import nifti

    for name in ("fixed", "moving", "warped", "out"):
        if not getattr(fv, name):
            raise cli.UsageError(f"--{name} is required")
    out = Path(fv.out)
    if not out.name.lower().endswith(".png"):
        raise cli.UsageError(f"--out: expected a .png file, got {out}")
    if out.exists() and not fv.overwrite:
        raise ValueError(f"{out}: already exists (add --overwrite to replace it)")
    from ldr_tf.atomic import check_writable

    check_writable(out.parent)
    fixed = nifti.load(fv.fixed, "image")
    moving = nifti.load(fv.moving, "image")
    warped = nifti.load(fv.warped, "image")
    fixed_seg = nifti.load(fv.fixed_seg, "labels", like=fixed) if fv.fixed_seg else None
    moving_seg = nifti.load(fv.moving_seg, "labels", like=moving) if fv.moving_seg else None
    warped_seg = nifti.load(fv.warped_seg, "labels") if fv.warped_seg else None
    try:
        labels = [int(v) for v in fv.labels] if fv.labels else None
    except ValueError:
        raise cli.UsageError(f"--labels: expected integers, got {','.join(fv.labels)}") from None
    info = render(fixed, moving, warped, out, fixed_seg, moving_seg, warped_seg, fv.axis, fv.slice, labels, fv.dpi)
    print(f"wrote {out} (slice {info['slice']} across axis {info['axis']}, labels {info['labels']})")
    return 0


def run(argv) -> int:
    """In-process entry -> exit status (0 ok, 1 error)."""
    from ldr_tf.cli import run_argv

    return run_argv(define_flags, _main, argv, PROG)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    return _main(FLAGS)


if __name__ == "__main__":
    define_flags()
    cli.run(main, PROG)
