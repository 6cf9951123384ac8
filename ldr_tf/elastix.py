"""``python -m ldr_tf.elastix``: elastix (``itk-elastix``) registration of one pair of NIfTI scans, in its own process.

`ldr_tf.compare` runs elastix through this module in a separate Python process (method ``elastix``): itk-elastix
crashed when it ran inside the TensorFlow process. The registration uses elastix's default parameter maps (``--maps``,
default ``affine,bspline``: an affine stage, then a multi-resolution B-spline with 10 mm final grid spacing, mutual
information, adaptive stochastic gradient descent), seeded (``--seed``) and with ``--threads`` threads. Then the
moving label map is warped with nearest-neighbour interpolation (transformix, ``FinalBSplineInterpolationOrder 0``)
and the deformation field is computed on the fixed grid.

Outputs in ``--out_dir``: ``labels.npy`` (the warped moving labels on the fixed scan's voxel grid, in nibabel's array
order, int32), ``field_vox.npy`` (``[X, Y, Z, 3]`` float32: the displacement along each fixed voxel axis, in fixed
voxels, from which compare computes the Jacobian determinant) and ``result.json`` (``seconds``: the registration
alone, as for ANTs; ``total_seconds`` with reading, label warping and the field).

    python -m ldr_tf.elastix --fixed=a.nii.gz --moving=b.nii.gz --moving_labels=b_seg.nii.gz --out_dir=o
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MAPS = ("translation", "rigid", "affine", "bspline")


def check_maps(maps) -> tuple:
    """`maps` as a tuple; ValueError unless it is a non-empty subset of `MAPS`."""
    maps = tuple(maps)
    bad = [m for m in maps if m not in MAPS]
    if bad or not maps:
        raise ValueError(f"elastix maps: expected a comma-separated subset of {','.join(MAPS)}, got "
                         f"{','.join(maps) or 'nothing'}")
    return maps


def register(fixed: str, moving: str, moving_labels: str, out_dir, maps=("affine", "bspline"), threads: int = 2,
             seed: int = 0) -> dict:
    """Registers `moving` to `fixed` with elastix and writes the outputs of the module docstring into `out_dir`."""
    try:
        import itk
    except ImportError:
        raise ValueError("elastix: itk-elastix is not installed (pip install '.[peers]')") from None
    maps = check_maps(maps)
    t0 = time.perf_counter()
    f = itk.imread(str(fixed), itk.F)
    m = itk.imread(str(moving), itk.F)
    params = itk.ParameterObject.New()
    for name in maps:
        p = params.GetDefaultParameterMap(name)
        p["MaximumNumberOfThreads"] = [str(threads)]
        p["RandomSeed"] = [str(seed)]
        params.AddParameterMap(p)
    t = time.perf_counter()
    _, transform = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
    seconds = time.perf_counter() - t
    for i in range(transform.GetNumberOfParameterMaps()):
        transform.SetParameter(i, "FinalBSplineInterpolationOrder", "0")  # labels: nearest neighbour
    moving_labels, out_dir = Path(moving_labels).resolve(), Path(out_dir).resolve()
    # transformix writes its files (deformationField.nii, ...) into the working directory: a scratch one, so that
    # nothing of the user's is overwritten or left behind
    with tempfile.TemporaryDirectory(prefix="ldr_tf-elastix-") as scratch, contextlib.chdir(scratch):
        labels = itk.transformix_filter(itk.imread(str(moving_labels), itk.F), transform)
        labels = np.rint(itk.array_from_image(labels)).astype(np.int32).transpose(2, 1, 0)
        field = itk.transformix_deformation_field(m, transform)  # fixed grid, LPS millimetres
    field = np.asarray(itk.array_from_image(field), np.float64).transpose(2, 1, 0, 3)
    direction = np.asarray(f.GetDirection(), np.float64)
    spacing = np.asarray(f.GetSpacing(), np.float64)
    vox = (field @ np.linalg.inv(direction).T) / spacing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "labels.npy", labels)
    np.save(out / "field_vox.npy", vox.astype(np.float32))
    result = {"seconds": seconds, "total_seconds": time.perf_counter() - t0, "maps": list(maps), "threads": threads,
              "seed": seed}
    (out / "result.json").write_text(json.dumps(result))
    return result


def define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("fixed", None, "Fixed scan (.nii/.nii.gz).", flag_values=fv)
    flags.DEFINE_string("moving", None, "Moving scan.", flag_values=fv)
    flags.DEFINE_string("moving_labels", None, "Moving label map (warped with nearest neighbour).", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Output folder.", flag_values=fv)
    flags.DEFINE_list("maps", ["affine", "bspline"], f"elastix default parameter maps, among {', '.join(MAPS)}.",
                      flag_values=fv)
    flags.DEFINE_integer("threads", 2, "elastix threads.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of elastix's random samplers.", flag_values=fv)


def _main(fv) -> int:
    from ldr_tf import cli

    missing = [n for n in ("fixed", "moving", "moving_labels", "out_dir") if not fv[n].value]
    if missing:
        raise cli.UsageError(f"required: {', '.join('--' + n for n in missing)}")
    for n in ("fixed", "moving", "moving_labels"):
        if not Path(fv[n].value).is_file():
            raise ValueError(f"{fv[n].value}: --{n}: file not found")
    register(fv.fixed, fv.moving, fv.moving_labels, fv.out_dir, tuple(fv.maps), fv.threads, fv.seed)
    return 0


if __name__ == "__main__":
    from ldr_tf import cli

    sys.exit(cli.run_argv(define_flags, _main, sys.argv, "ldr_tf.elastix"))
