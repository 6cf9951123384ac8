"""PNG of a dataset: the middle slices (3 orientations) of a few subjects, with label contours.

    python -m tools.show_dataset --dataset=/tmp/ixi_data/brain.json --out=/tmp/ixi_data/brain.png --subjects=4

One row per subject (the atlas first, if the dataset has one), one column per grid axis: the slice through the
middle of that axis, drawn with ``origin='lower'`` so the second remaining axis points up. Each panel is labelled
with the world direction of its axes (from the subject's ``affine`` attribute, e.g. ``R ->``, ``A ^``), so for an
RAS grid the columns are sagittal (axis D fixed), coronal (H fixed) and axial (W fixed) in neurological view
(patient right on the right). Every label present in the slice gets its own coloured contour.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from flags import import_flags
from ldr_tf import cli
from ldr_tf.data import dataset
from ldr_tf.data import importer as imp

__all__ = ["pick_keys", "render", "main", "run"]

_VIEW = {frozenset("LR"): "sagittal", frozenset("AP"): "coronal", frozenset("SI"): "axial"}


def pick_keys(desc: dataset.Descriptor, n: int, subset: str | None = None) -> list:
    """The atlas (if any) then the first keys of `subset` (or of all subsets in order), `n` in total."""
    if subset is not None and subset not in desc.subsets:
        raise ValueError(f"--subset: '{subset}' not in {desc.path} (subsets: {sorted(desc.subsets)})")
    keys = [desc.atlas] if desc.atlas else []
    pools = [desc.subsets[subset]] if subset else list(desc.subsets.values())
    for pool in pools:
        for k in pool:
            if k not in keys:
                keys.append(k)
    return keys[:max(1, n)]


def _axcodes(affine):
    import nibabel as nib  # noqa: PLC0415

    try:
        return nib.aff2axcodes(np.asarray(affine, np.float64))
    except Exception:  # noqa: BLE001  (no usable affine: show plain axis names)
        return ("D", "H", "W")


def render(desc: dataset.Descriptor, keys: list, out, physical_aspect: bool = True, dpi: int = 110) -> Path:
    """Draws `keys` of `desc` into the PNG `out` (written atomically) and returns its path."""
    import h5py  # noqa: PLC0415
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out = Path(out)
    fig, axes = plt.subplots(len(keys), 3, figsize=(9.6, 3.3 * len(keys)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for row, key in enumerate(keys):
        path, group = desc.file_for(key)
        with h5py.File(path, "r") as h5:
            subj = dataset.read_subject(h5, group, source=str(path))
        vol, seg, attrs = subj["volume"], subj["segmentation"], subj["attrs"]
        codes = _axcodes(attrs["affine"]) if "affine" in attrs else ("D", "H", "W")
        spacing = np.asarray(attrs.get("spacing", np.ones(3)), np.float64)
        for col in range(3):
            ax = axes[row, col]
            mid = vol.shape[col] // 2
            img = np.take(vol, mid, axis=col)
            lab = np.take(seg, mid, axis=col) if seg is not None else None
            a, b = [i for i in range(3) if i != col]  # image x axis = a, y axis = b
            aspect = spacing[b] / spacing[a] if physical_aspect else 1.0
            ax.imshow(img.T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0, aspect=aspect,
                      interpolation="nearest")
            if lab is not None:
                for n, v in enumerate(np.unique(lab[lab != 0])):
                    m = (lab == v).T.astype(np.float32)
                    if m.any():
                        ax.contour(m, levels=[0.5], colors=[cmap(n % 20)], linewidths=0.6)
            view = _VIEW.get(frozenset({codes[col], _opposite(codes[col])}), f"axis {col}")
            ax.set_title(f"{key} {view} ({'DHW'[col]}={mid})", fontsize=8)
            ax.set_xlabel(f"{'DHW'[a]} -> {codes[a]}", fontsize=7)
            ax.set_ylabel(f"{'DHW'[b]} -> {codes[b]}", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"{desc.path.name}: grid {tuple(desc.image_size)}, image_type {desc.image_type}", fontsize=9)
    fig.tight_layout()
    from ldr_tf.figures import save_figure

    return save_figure(fig, out, dpi=dpi)


def _opposite(c: str) -> str:
    return {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}.get(c, c)


def main(fv, argv=None) -> dict:
    del argv
    if not fv.dataset:
        raise cli.UsageError("--dataset: required (a dataset name or .json path)")
    if not fv.out:
        raise cli.UsageError("--out: required (the .png to write)")
    desc = dataset.load_descriptor(dataset.resolve_dataset(fv.dataset, fv.data_dir))
    keys = list(fv.keys) if fv.keys else pick_keys(desc, fv.subjects, fv.subset)
    path = render(desc, keys, fv.out, fv.physical_aspect, fv.dpi)
    print(f"show_dataset: wrote {path} ({len(keys)} subjects: {', '.join(keys)})")
    return {"png": str(path), "keys": keys}


def run(argv) -> int:
    """``run(["show_dataset", "--dataset=...", "--out=x.png"])`` -> exit status (0 ok, 1 error, 2 usage)."""
    return imp.run_tool("show_dataset", import_flags.define_show_dataset_flags, main, argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv))
