"""``python -m ldr_tf.evaluate``: score a model on every pair of a dataset subset, as the original eval.py did.

One line per pair: ``fixed moving dice jaccard lm_dist_vox lm_dist_mm jac_std folding_pct seconds`` then a
``Summary`` block with ``mean (std over pairs)`` of each column. Dice/Jaccard of a pair are means over the labels
present in the fixed segmentation (background excluded); the moving labels are warped with the predicted flow
without mixing labels. The landmark distance maps each fixed landmark p to p + u(p) and measures the distance to
its moving landmark, in voxels of the grid and in mm (grid spacing of the moving subject); pairs without
landmarks show ``nan``. ``jac_std`` and ``folding_pct`` are the std of det(J) of x + u(x) and the % of voxels with
det(J) <= 0. ``seconds`` is the model call only (registration, warping included), measured after one warm-up call.

Memory is constant: each pair's flow is dropped once its line is written.

Examples::

    python -m ldr_tf.evaluate --model=exports/student --dataset=demo --subset=2 --out=eval/student
    python -m ldr_tf.evaluate --model=runs/teacher --stage=affine --dataset=demo --out=eval/affine
    python -m ldr_tf.evaluate --model=identity --dataset=demo --out=eval/identity
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags

from flags import common_flags
from ldr_tf import cli, metrics
from ldr_tf.config import save_json_atomic

FLAGS = flags.FLAGS
COLUMNS = ("dice", "jaccard", "lm_dist_vox", "lm_dist_mm", "jac_std", "folding_pct", "seconds")


def define_flags() -> None:
    if "model" in FLAGS:
        return
    common_flags.define_data_flags()
    common_flags.define_runtime_flags()
    flags.DEFINE_string("model", None, "SavedModel directory, training run directory, or 'identity'.")
    flags.DEFINE_enum("stage", "full", ["full", "affine"], "affine: only the model's affine first stage (run dir).")
    flags.DEFINE_string("subset", "2", "Scheme (e.g. 2 = validation) or subset name to evaluate.")
    flags.DEFINE_bool("paired", False, "Pair neighbours (a,b),(b,a) instead of all ordered pairs.")
    flags.DEFINE_integer("max_pairs", 0, "Evaluate only the first N pairs (0 = all).")
    flags.DEFINE_string("out", None, "Output prefix: writes <out>.txt and <out>.json.")
    flags.DEFINE_string("name", None, "Method name in the outputs (default: derived from --model).")


def _spacing_lookup(desc):
    """subject key -> grid spacing (mm) from the HDF5 attrs, or None; file handles are cached."""
    import h5py

    handles, cache = {}, {}

    def spacing(key: str):
        if key not in cache:
            path, group = desc.file_for(key)
            if path not in handles:
                handles[path] = h5py.File(path, "r")
            sp = handles[path][group].attrs.get("spacing") if group in handles[path] else None
            cache[key] = None if sp is None else np.asarray(sp, np.float64).reshape(3)
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

    from ldr_tf import warp
    from ldr_tf.pairs import make_pair_dataset, pairs_for

    n_total = len(pairs_for(desc, subset, paired=paired))
    n = min(n_total, max_pairs) if max_pairs else n_total
    ds = make_pair_dataset(desc, subset, batch_size=1, augment=False, shuffle=False, repeat=False, paired=paired,
                           image_size=image_size or registrar.image_size).take(n)
    spacing = _spacing_lookup(desc)
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
        rows.append(row)
        if line_sink is not None:
            line_sink(" ".join([id1, id2] + [_fmt(row[c]) for c in COLUMNS]))
        bar.update(i + 1, [("dice", row["dice"])])
        del out
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


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model or not FLAGS.out:
        raise cli.UsageError("--model and --out are required")
    common_flags.apply_runtime_flags(FLAGS)
    from ldr_tf.registrar import open_registrar
    from ldr_tf.train import open_dataset

    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise cli.UsageError(f"{out.parent}: output directory is not writable")
    registrar = open_registrar(FLAGS.model, stage=FLAGS.stage)
    desc = open_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size or registrar.image_size and
                        registrar.image_size[0])
    name = FLAGS.name or (Path(FLAGS.model).name + ("-affine" if FLAGS.stage == "affine" else ""))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".txt.tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("# fixed moving " + " ".join(COLUMNS) + "\n")
            res = evaluate(registrar, desc, FLAGS.subset, FLAGS.paired, FLAGS.max_pairs,
                           line_sink=lambda line: (f.write(line + "\n"), f.flush()))
            f.write("\n".join(summary_lines(res["summary"])) + "\n")
        os.replace(tmp, out.with_suffix(".txt"))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    save_json_atomic({"method": name, "model": str(FLAGS.model), "stage": FLAGS.stage, "dataset": str(desc.path),
                      "subset": FLAGS.subset, "parameters": registrar.parameters, **res},
                     out.with_suffix(".json"))
    print("\n".join(summary_lines(res["summary"])))
    print(f"wrote {out.with_suffix('.txt')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.evaluate")
