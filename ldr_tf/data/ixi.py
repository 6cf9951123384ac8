"""The IXI brain recipe: the 150 T1 scans + DLMUSE label maps of ``shared/data/ixi`` -> ``brain.json`` + ``brain.h5``.

    python -m tools.import_ixi --data_dir=/tmp/ixi_data            # 64^3, atlas = a training subject
    python -m tools.import_ixi --grid_size=128 --atlas=mni          # 128^3, atlas = MNI152 template (no labels)

What it does (all decisions are flags):

* subjects: ``t1/<id>_T1.nii.gz`` with ``dlmuse_seg/<id>_T1_DLMUSE.nii.gz``, sorted by id;
* split: seeded permutation of the sorted ids into 110 train / 10 val / 30 test (``--split``, ``--seed``); subsets
  ``train``, ``val``, ``test``; schemes ``"1"`` = train, ``"2"`` = val, ``"test"`` = test;
* atlas-based pairs like the original brain setup (fixed = atlas, moving = each subject): the atlas is one training
  subject (``--atlas_id``, default the first training id of the seeded permutation), taken out of ``train`` (so 109
  training subjects remain); or ``--atlas=mni``: the MNI152 template preprocessed the same way (cropped to its
  grey + white matter probability > 0.5 box), stored as key ``atlas`` without labels;
* preprocessing: RAS, ``keep_aspect`` (isotropic) onto ``--grid_size`` (default 64^3), 1st..99th percentile ->
  0..255 (computed inside the field of view), labels by nearest neighbour and kept as they are (148 DLMUSE ids);
* skull (the scans are not skull-stripped): ``--skull=crop`` (default) crops to the label map's bounding box +
  max(10 %, 5 voxels) so the brain fills the grid (the skull remains around it); ``mask`` also zeroes everything
  outside the labels dilated by ``--mask_mm``; ``none`` keeps the whole head;
* ``segmentation_class_value`` names from ``meta/list_MUSE_single.csv`` (then ``list_MUSE_all.csv``, then
  ``MUSE_<id>``); per-subject attributes keep the source paths and the `ldr_tf.data.preprocess.Geometry`, so results can
  be mapped back to the native scans.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from flags import import_flags
from ldr_tf import cli
from ldr_tf.data import dataset, nifti
from ldr_tf.data import preprocess as pp
from ldr_tf.data import importer as imp

__all__ = ["DEFAULT_SHARED_DATA", "muse_names", "ixi_spec", "main", "run"]

DEFAULT_SHARED_DATA = Path(os.environ.get("LDR_TF_SHARED_DATA",
                                          Path(__file__).resolve().parents[3] / "shared" / "data"))
MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


def muse_names(meta_dir) -> dict:
    """``{MUSE id: name}`` from ``list_MUSE_single.csv``, completed by ``list_MUSE_all.csv`` where present."""
    meta_dir = Path(meta_dir)
    names = {}
    for f in ("list_MUSE_all.csv", "list_MUSE_single.csv"):  # single last: it wins
        if (meta_dir / f).is_file():
            names.update(imp.read_label_names(meta_dir / f))
    return names


def ixi_spec(grid_size=(64, 64, 64), skull: str = "crop", mask_mm: float = 4.0,
             percentiles=(1.0, 99.0), spacing_mm: float | None = None) -> pp.Preprocessing:
    """The IXI `Preprocessing`: RAS, keep_aspect, percentile normalisation, crop/mask per `skull`.

    ``skull="head"`` is label-free (`ldr_tf.data.preprocess.RECIPES` ``brain-head``): the head box from intensities and
    isotropic `spacing_mm` voxels (default ``256 / max(grid_size)`` mm) centred on it.
    """
    if skull not in ("crop", "mask", "none", "head"):
        raise ValueError(f"skull: expected crop, mask, none or head, got {skull!r}")
    if skull == "head":
        spacing = spacing_mm if spacing_mm is not None else 256.0 / max(grid_size)
        return pp.recipe("brain-head", grid_size=tuple(grid_size), percentiles=tuple(percentiles),
                         spacing_mm=spacing)
    if spacing_mm is not None:
        raise ValueError("spacing_mm: only with skull=head")
    return pp.recipe(
        "brain", grid_size=tuple(grid_size), orientation="RAS", percentiles=tuple(percentiles),
        crop="none" if skull == "none" else "labels", mask_dilation_mm=mask_mm if skull == "mask" else None,
    )


def _mni_atlas(mni_dir: Path, crop: bool) -> imp.Subject:
    t1 = mni_dir / MNI_T1
    img = nifti.load(t1, "image")
    mask = None
    if crop:
        gm = nifti.load(mni_dir / MNI_GM, "image", like=img)
        wm = nifti.load(mni_dir / MNI_WM, "image", like=img)
        brain = (np.asarray(gm.dataobj) + np.asarray(wm.dataobj)) > 0.5
        if not brain.any():
            raise ValueError(f"{mni_dir / MNI_GM}: grey + white matter probability never exceeds 0.5")
        mask = nib.Nifti1Image(brain.astype(np.uint8), img.affine)
    return imp.Subject("atlas", img, None, None, mask, source_file=str(t1.resolve()),
                       note="MNI152 2009a template; crop box from grey+white matter probability > 0.5")


def main(fv, argv=None) -> dict:
    ixi = Path(fv.ixi_dir)
    if not (ixi / "t1").is_dir():
        raise ValueError(f"{ixi / 't1'}: IXI folder not found (set --ixi_dir)")
    grid = imp.parse_grid(fv.grid_size)
    try:
        percentiles = tuple(float(p) for p in fv.percentiles)
        spec = ixi_spec(grid, fv.skull, fv.mask_mm, percentiles, fv.spacing_mm)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    subjects = imp.find_subjects(str(ixi / "t1" / "{id}_T1.nii.gz"),
                                 str(ixi / "dlmuse_seg" / "{id}_T1_DLMUSE.nii.gz"))
    if fv.subjects:
        by_id = {s.id: s for s in subjects}
        missing = [s for s in fv.subjects if s not in by_id]
        if missing:
            raise ValueError(f"--subjects: not found in {ixi / 't1'}: {missing}")
        subjects = [by_id[s] for s in sorted(set(fv.subjects))]
    counts = imp.parse_ints(fv.split, "split")
    if len(counts) != 3:
        raise cli.UsageError(f"--split: expected three numbers train,val,test, got {fv.split}")
    split = imp.make_split([s.id for s in subjects], counts=counts, seed=fv.seed)
    atlas_id, atlas_subject = None, None
    if fv.atlas == "subject":
        train_order = [i for i in split["_order"] if i in set(split["train"])]
        atlas_id = fv.atlas_id or (train_order[0] if train_order else None)
        if atlas_id is None:
            raise ValueError("--split: no training subject to use as atlas")
        if atlas_id not in {s.id for s in subjects}:
            raise ValueError(f"--atlas_id: subject '{atlas_id}' not found")
    elif fv.atlas_id:
        raise cli.UsageError("--atlas_id: only with --atlas=subject")
    elif fv.atlas == "mni":
        atlas_subject = _mni_atlas(Path(fv.mni_dir), crop=spec.crop == "labels")
    data_dir = Path(fv.data_dir).expanduser() if fv.data_dir else dataset.default_data_dir()
    output = data_dir / f"{fv.name}.json"
    extra = {
        "source": {
            "tool": "tools.import_ixi", "argv": list(argv or [])[1:], "ixi_dir": str(ixi.resolve()),
            "split": {"counts": counts, "seed": fv.seed}, "atlas": fv.atlas if atlas_id is None else atlas_id,
            "skull": fv.skull, "license": "IXI: CC BY-SA 3.0; DLMUSE labels: NiChart (UPenn SBIA licence)",
        },
    }
    names = {v: f"MUSE_{v}" for v in range(1, 256)}  # ids without a name in the MUSE lists (46, 69)
    names.update(muse_names(ixi / "meta"))
    return imp.convert(subjects, spec, output, split=split, atlas=atlas_id, atlas_subject=atlas_subject,
                       image_type="brain", class_names=names, overwrite=fv.overwrite,
                       progress=fv.progress, extra=extra)


def run(argv) -> int:
    """``run(["import_ixi", "--data_dir=...", ...])`` -> exit status (0 ok, 1 error, 2 usage)."""
    return imp.run_tool(
        "import_ixi",
        lambda fv: import_flags.define_import_ixi_flags(fv, str(DEFAULT_SHARED_DATA / "ixi"),
                                                        str(DEFAULT_SHARED_DATA / "mni152")),
        main, argv)

