"""CT smoke test of the liver import path: the two TotalSegmentator slabs of ``shared/data/totalseg_ct`` ->
``ct-smoke.json`` + ``ct-smoke.h5``.

    python -m tools.import_ct --data_dir=/tmp/ixi_data

The original liver preprocessing (reference 7.4) on real CT: RAS orientation, crop to the bounding box of the liver
(TotalSegmentator label 5) padded by max(10 %, 5 voxels) on each side, ``stretch`` onto the grid (trilinear image,
nearest-neighbour labels), window/level W=290 / L=120 HU -> 0..255. The segmentation is the liver mask stored as
**0/255** (label 5 -> 255, every other organ -> 0), the value the original liver files use; our label-aware tools
treat 255 as just a label id (``segmentation_class_value = {"liver": 255}``).

Slabs: ``example_ct`` (122x101x112 at 3 mm) with a label map of only 30 slices, and ``example_ct_dicom``
(512x512x20 at 0.98x0.98x2 mm, LPS) with a label map on its grid. The 30-slice label map carries the CT's own affine
(so it claims to cover slices 0..29, the pelvis), but its content (T11-L4 vertebrae, ribs, liver, spleen, kidneys)
lines up with slices **82..111**: there the liver voxels read 46 HU median (5..95th percentile 21..67 HU), in slices
0..29 they span -991..272 HU (air, fat, bone). The tool therefore cuts the image to slices 82..111 and puts the
label map on that grid (``SLABS``), and refuses any slab whose liver voxels do not look like liver
(`check_liver_hu`). Both slabs end inside the liver, so the crop box is clipped to the slab.
Both subjects are in subsets ``train`` and ``val``: this is a smoke test, not a training set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from flags import import_flags
from ldr_tf import cli
from ldr_tf.data import dataset, nifti
from ldr_tf.data import preprocess as pp
from ldr_tf.data import importer as imp
from ldr_tf.data.ixi import DEFAULT_SHARED_DATA

__all__ = ["SLABS", "ct_spec", "load_slab", "check_liver_hu", "main", "run"]

# id: (image file, label file, image slices along the last axis that the label map covers, or None = all)
SLABS = {
    "example_ct": ("example_ct.nii.gz", "example_seg.nii.gz", (82, 112)),
    "example_ct_dicom": ("example_ct_dicom.nii.gz", "example_seg_dicom_on_img_grid.nii.gz", None),
}


def ct_spec(grid_size=(64, 64, 64), liver_label: int = 5, window: float = 290.0,
            level: float = 120.0) -> pp.Preprocessing:
    """The liver `Preprocessing` for multi-organ CT label maps: crop to `liver_label`, liver -> 255, rest -> 0."""
    return pp.recipe("liver", grid_size=tuple(grid_size), orientation="RAS", crop_labels=(liver_label,),
                     label_map={liver_label: 255}, label_default=0, window=window, level=level)


def load_slab(image_path, label_path, slices=None):
    """Loads a CT slab and its label map. With ``slices=(start, stop)`` the image is cut to those slices of its
    last axis and the label map (which must have ``stop - start`` slices) is placed on the cut image's grid,
    ignoring its own affine. Returns ``(image, labels, note)``."""
    img = nifti.load(image_path, "image")
    note = ""
    if slices is not None:
        start, stop = slices
        total = img.shape[2]
        if not 0 <= start < stop <= total:
            raise ValueError(f"{image_path}: slices {start}..{stop - 1} do not exist (the image has {total})")
        img = img.slicer[:, :, start:stop]
        lab = nifti.load(label_path, "labels")
        if lab.shape != img.shape:
            raise nifti.NiftiError(f"{label_path}: expected a label map of shape {img.shape} (slices {start}.."
                                   f"{stop - 1} of {image_path}), got {lab.shape}")
        lab = nib.Nifti1Image(np.asarray(lab.dataobj), img.affine)
        note = f"image slices {start}..{stop - 1} of {total}, where the {stop - start}-slice label map lines up"
    else:
        lab = nifti.load(label_path, "labels", like=img)
    return img, lab, note


def check_liver_hu(image, labels, liver_label: int, where: str) -> float:
    """Raises ValueError unless the liver voxels look like liver (median 0..200 HU, >= 90 % within -100..300 HU);
    this catches a label map that does not line up with its CT. Returns the median HU."""
    hu = np.asarray(image.dataobj, np.float64)[np.asarray(labels.dataobj) == liver_label]
    if not hu.size:
        raise ValueError(f"{where}: no voxel with the liver label {liver_label}")
    med = float(np.median(hu))
    inside = float(np.mean((hu > -100) & (hu < 300)))
    if not (0.0 <= med <= 200.0 and inside >= 0.9):
        raise ValueError(f"{where}: liver voxels read {med:.0f} HU median with {100 * inside:.0f} % in -100..300 HU; "
                         f"the label map does not line up with the image")
    return med


def main(fv, argv=None) -> dict:
    ct_dir = Path(fv.ct_dir)
    grid = imp.parse_grid(fv.grid_size)
    try:
        spec = ct_spec(grid, fv.liver_label, fv.window, fv.level)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    subjects = []
    for sid, (im, lb, slices) in SLABS.items():
        img, lab, note = load_slab(ct_dir / im, ct_dir / lb, slices)
        med = check_liver_hu(img, lab, fv.liver_label, str(ct_dir / lb))
        note = f"{note}; liver median {med:.0f} HU".lstrip("; ")
        subjects.append(imp.Subject(sid, img, lab, None, source_file=str((ct_dir / im).resolve()), note=note))
    ids = sorted(SLABS)
    data_dir = Path(fv.data_dir).expanduser() if fv.data_dir else dataset.default_data_dir()
    extra = {"source": {"tool": "tools.import_ct", "argv": list(argv or [])[1:], "ct_dir": str(ct_dir.resolve()),
                        "license": "TotalSegmentator test files (Apache-2.0)",
                        "note": "smoke test: two partial slabs, the same two subjects in train and val"}}
    return imp.convert(subjects, spec, data_dir / f"{fv.name}.json", split={"train": ids, "val": ids},
                       image_type="liver", class_names={255: "liver"}, overwrite=fv.overwrite,
                       progress=fv.progress, extra=extra)


def run(argv) -> int:
    """``run(["import_ct", "--data_dir=..."])`` -> exit status (0 ok, 1 error, 2 usage)."""
    return imp.run_tool(
        "import_ct", lambda fv: import_flags.define_import_ct_flags(fv, str(DEFAULT_SHARED_DATA / "totalseg_ct")),
        main, argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv))
