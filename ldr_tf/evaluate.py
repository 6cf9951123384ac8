"""``python -m ldr_tf.evaluate``: score a model on every pair of a dataset subset, as the original eval.py did.

``--model`` is an exported SavedModel, a training run directory (``--stage=affine``: its affine first stage alone)
or ``identity`` (zero flow: the "before registration" baseline). Writes ``<out>.txt`` and ``<out>.json`` (``--out`` is
a prefix; dots in it are kept, ``eval/v1.2`` gives ``eval/v1.2.txt``).

``<out>.txt``: a ``# fixed moving <columns>`` header, one line per pair: ``fixed moving dice jaccard lm_dist_vox
lm_dist_mm jac_std folding_pct seconds``, then a ``Summary`` block with ``mean (std over pairs)`` of each column.

* ``dice``, ``jaccard``: means over the labels present in the fixed segmentation (background excluded); the moving
  labels are warped with the predicted flow without mixing labels. ``nan`` for pairs without segmentations.
* ``lm_dist_vox``, ``lm_dist_mm``: each fixed landmark p is mapped to p + u(p) and compared with its moving
  landmark, in voxels of the network grid and in mm (grid spacing of the moving subject, rescaled when the
  network grid differs from the dataset's); ``nan`` without landmarks.
* ``jac_std``, ``folding_pct``: std of det(J) of x + u(x), and the % of voxels with det(J) <= 0.
* ``seconds``: the model call only (registration and warping), measured after one warm-up call.

``<out>.json``: the method, model, stage, dataset, subset, parameter count, every pair's row (the columns above plus
``labels`` = number of labels scored, ``jac_min``) and the summary (mean, std, median, n per column).

Memory is constant: a pair's row holds scalars only and its flow is dropped once the line is written.

Examples::

    python -m ldr_tf.evaluate --model=exports/student --dataset=demo --subset=2 --out=eval/student
    python -m ldr_tf.evaluate --model=runs/teacher --stage=affine --dataset=demo --out=eval/affine
    python -m ldr_tf.evaluate --model=identity --dataset=demo --out=eval/identity
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
from absl import flags

from flags import common_flags
from ldr_tf import cli
from ldr_tf.ops import metrics
from ldr_tf.atomic import atomic_path, write_json

FLAGS = flags.FLAGS
COLUMNS = ("dice", "jaccard", "lm_dist_vox", "lm_dist_mm", "jac_std", "folding_pct", "seconds")


def define_flags() -> None:
    if "model" in FLAGS:
        return
    common_flags.define_data_flags()
    common_flags.define_runtime_flags()
    flags.DEFINE_string("model", None, "SavedModel directory, training run directory, a pretrained name (brain) or "
                        "'identity'.")
    flags.DEFINE_enum("stage", "full", ["full", "affine"], "affine: only the model's affine first stage (run dir).")
    flags.DEFINE_string("subset", "2", "Scheme (e.g. 2 = validation) or subset name to evaluate.")
    flags.DEFINE_bool("paired", False, "Pair neighbours (a,b),(b,a) instead of all ordered pairs.")
    flags.DEFINE_integer("max_pairs", 0, "Evaluate only the first N pairs (0 = all).")
    flags.DEFINE_string("out", None, "Output prefix: writes <out>.txt and <out>.json.")
    flags.DEFINE_string("name", None, "Method name in the outputs (default: derived from --model).")


def _spacing_lookup(desc, grid=None):
    """subject key -> spacing (mm) of a voxel of `grid` (default the dataset's grid) from the HDF5 attrs, or None.

    The HDF5 ``spacing`` is per voxel of the dataset's grid; on another network grid a voxel spans
    ``spacing * dataset_size / grid`` mm. Spacings are cached; the files are opened per lookup.
    """
    import h5py

    scale = np.ones(3)
    if grid is not None:
        scale = np.asarray(desc.image_size, np.float64) / np.asarray(grid, np.float64)
    cache = {}

    def spacing(key: str):
        if key not in cache:
            path, group = desc.file_for(key)
            with h5py.File(path, "r") as h5:
                sp = h5[group].attrs.get("spacing") if group in h5 else None
            cache[key] = None if sp is None else np.asarray(sp, np.float64).reshape(3) * scale
        return cache[key]

    return spacing


def _fmt(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def evaluate(registrar, desc, subset: str = "2", paired: bool = False, max_pairs: int = 0, image_size=None,
             progress: bool = True, line_sink=None) -> dict:
    """Scores `registrar` on every pair of `subset`; returns ``{"pairs": [...rows], "summary": {...}}``.

    `line_sink`, when given, receives each formatted line as soon as the pair is done (the rows themselves hold
    scalars only, so memory stays constant whatever the number of pairs).
    """
    import tensorflow as tf

    from ldr_tf.progress import Progress

    from ldr_tf.ops import warp
    from ldr_tf.data.pairs import make_pair_dataset, pairs_for

    n_total = len(pairs_for(desc, subset, paired=paired))
    n = min(n_total, max_pairs) if max_pairs else n_total
    grid = tuple(image_size or registrar.image_size or desc.image_size)
    ds = make_pair_dataset(desc, subset, batch_size=1, augment=False, shuffle=False, repeat=False, paired=paired,
                           image_size=grid).take(n)
    spacing = _spacing_lookup(desc, grid)
    bar = Progress(n, label="evaluate", unit="pair", enabled=progress)
    rows, warm = [], False
    for i, batch in enumerate(ds):
        id1, id2 = batch["id1"][0].numpy().decode(), batch["id2"][0].numpy().decode()
        has_seg = bool(batch["has_seg"][0])
        labels = batch["moving_seg"][..., None] if has_seg else None
        if not warm:  # first call traces/compiles the graph; keep it out of the timings
            registrar(batch["fixed"], batch["moving"], labels)
            warm = True
        t0 = time.perf_counter()
        out = registrar(batch["fixed"], batch["moving"], labels)
        seconds = time.perf_counter() - t0
        row = {"fixed": id1, "moving": id2, "seconds": seconds}
        if has_seg:
            ov = metrics.label_overlap(batch["fixed_seg"][0].numpy(), out["warped_labels"][0, ..., 0])
            row.update(dice=ov["dice"], jaccard=ov["jaccard"], labels=ov["labels"])
        else:
            row.update(dice=float("nan"), jaccard=float("nan"), labels=0)
        fp, mp = batch["fixed_points"][0].numpy(), batch["moving_points"][0].numpy()
        row["lm_dist_vox"] = row["lm_dist_mm"] = float("nan")
        if fp.size and np.any(np.all(fp != -1, axis=1)):
            disp = warp.sample_points(tf.constant(out["flow"]), fp[None])[0].numpy()
            lm = metrics.landmark_distance(fp, mp, disp, spacing=spacing(id2))
            row["lm_dist_vox"] = lm["voxels"]
            row["lm_dist_mm"] = lm["mm"] if lm["mm"] is not None else float("nan")
        row.update(metrics.jacobian_stats(out["flow"][0]))
        del out
        rows.append(row)
        if line_sink is not None:
            line_sink(" ".join([id1, id2] + [_fmt(row[c]) for c in COLUMNS]))
        bar.update(i + 1, [("dice", row["dice"])])
    return {"pairs": rows, "summary": summarise(rows)}


def summarise(rows) -> dict:
    """``{column: {"mean", "std", "median", "n"}}`` over pairs, ignoring NaN entries."""
    summary = {}
    for c in COLUMNS:
        vals = np.array([r[c] for r in rows], np.float64)
        vals = vals[~np.isnan(vals)]
        summary[c] = ({"mean": float(vals.mean()), "std": float(vals.std()), "median": float(np.median(vals)),
                       "n": int(vals.size)} if vals.size else {"mean": None, "std": None, "median": None, "n": 0})
    summary["pairs"] = len(rows)
    return summary


def summary_lines(summary: dict) -> list:
    lines = ["Summary"]
    for c in COLUMNS:
        s = summary[c]
        lines.append(f"{c}: {_fmt(s['mean'])} ({_fmt(s['std'])})" if s["n"] else f"{c}: nan")
    return lines


def output_paths(prefix: str | os.PathLike) -> tuple:
    """``(<prefix>.txt, <prefix>.json)``; the suffixes are appended, so dots in the prefix are kept."""
    prefix = str(prefix)
    return Path(prefix + ".txt"), Path(prefix + ".json")


def write_report(registrar, desc, out: str | os.PathLike, subset: str = "2", paired: bool = False,
                 max_pairs: int = 0, name: str | None = None, model: str = "", stage: str = "full",
                 image_size=None, progress: bool = True) -> dict:
    """Runs `evaluate` and writes ``<out>.txt`` (lines as they come, renamed when complete) and ``<out>.json``.

    Returns the JSON dict.
    """
    txt, js = output_paths(out)
    with atomic_path(txt) as tmp, open(tmp, "w") as f:
        f.write("# fixed moving " + " ".join(COLUMNS) + "\n")
        res = evaluate(registrar, desc, subset, paired, max_pairs, image_size=image_size, progress=progress,
                       line_sink=lambda line: (f.write(line + "\n"), f.flush()))
        f.write("\n".join(summary_lines(res["summary"])) + "\n")
    report = {"method": name or (Path(str(model)).name + ("-affine" if stage == "affine" else "")),
              "model": str(model), "stage": stage, "dataset": str(desc.path), "subset": subset,
              "parameters": registrar.parameters, "columns": list(COLUMNS), **res}
    write_json(report, js)
    return report


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model or not FLAGS.out:
        raise cli.UsageError("--model and --out are required")
    txt, js = output_paths(FLAGS.out)
    from ldr_tf.atomic import check_writable

    check_writable(txt.parent)
    if FLAGS.model != "identity" and not Path(FLAGS.model).exists():  # before TensorFlow loads
        raise ValueError(f"{FLAGS.model}: model not found (give a SavedModel directory, a training run directory "
                         "or 'identity')")
    common_flags.apply_runtime_flags(FLAGS)
    from ldr_tf.deploy.loader import open_registrar
    from ldr_tf.data.dataset import open_dataset

    registrar = open_registrar(FLAGS.model, stage=FLAGS.stage)
    size = FLAGS.image_size or (registrar.image_size[0] if registrar.image_size else None)
    desc = open_dataset(FLAGS.dataset, FLAGS.data_dir, size)
    report = write_report(registrar, desc, FLAGS.out, FLAGS.subset, FLAGS.paired, FLAGS.max_pairs, FLAGS.name,
                          FLAGS.model, FLAGS.stage, image_size=(FLAGS.image_size,) * 3 if FLAGS.image_size else None)
    print("\n".join(summary_lines(report["summary"])))
    print(f"wrote {txt} and {js}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.evaluate")
