"""``python -m ldr_tf.predict``: register NIfTI pairs with an exported model, results on the fixed scan's own grid.

For each pair: load and check the scans, preprocess them exactly as the model's training data was (the
``preprocessing`` stored in the export's ``ldr_tf_export.json``, or ``--preprocessing``), run the SavedModel on the
CPU (oneDNN; ``--threads``), map the grid result back to the fixed scan and write into ``--out_dir``:

* ``warped.nii.gz``: the moving scan (its original intensities) warped onto the fixed scan's grid and affine;
* ``warped_seg.nii.gz`` (with ``--moving_seg``): its label map warped without mixing labels;
* ``flow_vox.nii.gz``: the displacement field on the fixed grid, ``[X, Y, Z, 1, 3]`` (NIfTI intent ``vector``), in
  voxels of the **moving** scan, pull convention: fixed voxel ``p`` corresponds to moving voxel ``p + d(p)``;
* ``flow_mm_lps.nii.gz`` (with ``--mm``): the same correspondence in millimetres, LPS+ physical coordinates, i.e.
  the displacement-field convention of ITK and ANTs (``antsApplyTransforms -t flow_mm_lps.nii.gz`` resamples the
  moving scan onto the fixed one);
* ``result.json``: input files, model, timings (load, preprocess, model call, map back, write) and, with both label
  maps, Dice/Jaccard before (through the NIfTI affines only) and after registration, on the fixed grid.

Many pairs in one call: ``--pairs=list.csv`` with a header and columns ``fixed,moving`` (optional ``moving_seg``,
``fixed_seg``, ``name``); each pair goes to ``<out_dir>/<name>/`` and a ``results.json`` summarises all.
Outputs are written to temporary names and renamed when complete; an existing output is never overwritten unless
``--overwrite``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags

from flags import common_flags
from ldr_tf import cli, metrics

FLAGS = flags.FLAGS
OUTPUTS = ("warped.nii.gz", "warped_seg.nii.gz", "flow_vox.nii.gz", "flow_mm_lps.nii.gz", "result.json")


def define_flags() -> None:
    if "fixed" in FLAGS:
        return
    common_flags.define_runtime_flags()
    flags.DEFINE_string("model", None, "Exported SavedModel directory (python -m ldr_tf.export).")
    flags.DEFINE_string("fixed", None, "Fixed scan (.nii/.nii.gz).")
    flags.DEFINE_string("moving", None, "Moving scan (.nii/.nii.gz); any shape or orientation.")
    flags.DEFINE_string("moving_seg", None, "Moving label map (warped and written as warped_seg.nii.gz).")
    flags.DEFINE_string("fixed_seg", None, "Fixed label map (for Dice, and for label-based cropping).")
    flags.DEFINE_string("pairs", None, "CSV of pairs: header + columns fixed,moving[,moving_seg,fixed_seg,name].")
    flags.DEFINE_string("out_dir", None, "Output folder.")
    flags.DEFINE_string("preprocessing", "auto",
                        "auto (from the export metadata), a recipe name (liver, brain, none) or a JSON file.")
    flags.DEFINE_bool("no_crop", False, "Do not crop/mask to labels even if the preprocessing says so.")
    flags.DEFINE_bool("mm", False, "Also write flow_mm_lps.nii.gz (ITK/ANTs displacement field in mm).")
    flags.DEFINE_bool("warmup", True, "Run the model once on zeros first, so 'model' times a warm call.")
    flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")


# ----------------------------------------------------------------------------------------- preprocessing


def resolve_preprocessing(choice: str, metadata: dict, grid, no_crop: bool = False):
    """The `Preprocessing` to apply: from the export metadata (auto), a recipe, or a JSON file."""
    from ldr_tf.preprocess import Preprocessing, recipe

    grid = tuple(int(g) for g in grid)
    if choice == "auto":
        stored = (metadata or {}).get("preprocessing")
        if isinstance(stored, dict) and "grid_size" in stored:
            spec = Preprocessing.from_dict(stored)
        else:
            kind = (stored or {}).get("kind") if isinstance(stored, dict) else None
            raise ValueError(
                f"the model's training data has no NIfTI preprocessing to repeat ({kind or 'none recorded'}); "
                "give --preprocessing=liver|brain|none or a JSON spec"
            )
    elif choice.endswith(".json"):
        try:
            spec = Preprocessing.from_dict(json.loads(Path(choice).read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"{choice}: unreadable preprocessing spec ({e})") from None
    else:
        spec = recipe(choice)
    d = spec.to_dict()
    d["grid_size"] = list(grid)  # the model's grid always wins
    if no_crop:
        d.update(crop="none", mask_dilation_mm=None)
    return Preprocessing.from_dict(d)


# ------------------------------------------------------------------------------------------- sampling


def _sample_native(data, coords, labels: bool = False, chunk: int = 1 << 21):
    """Samples a native volume at voxel positions `coords` ``[..., 3]`` (chunked: bounded memory).

    Positions more than half a voxel outside the volume get 0 (background) instead of the clamped border.
    """
    import tensorflow as tf

    from ldr_tf import warp

    shape = coords.shape[:-1]
    flat = coords.reshape(-1, 3).astype(np.float32)
    out = np.empty(flat.shape[0], np.int32 if labels else np.float32)
    vol = tf.constant(data.astype(np.int32 if labels else np.float32)[None])
    if not labels:
        vol = vol[..., None]
    hi = np.asarray(data.shape, np.float32) - 0.5
    for s in range(0, flat.shape[0], chunk):
        c = flat[s:s + chunk]
        n = c.shape[0]
        pad = np.zeros((chunk, 3), np.float32)  # constant chunk shape: one trace
        pad[:n] = c
        cc = tf.constant(pad[None, :, None, None, :])
        if labels:
            v = warp.warp_labels(vol, None, method="linear", coords=cc).numpy().reshape(-1)[:n]
        else:
            v = warp.resample(vol, cc).numpy().reshape(-1)[:n]
        outside = np.any((c < -0.5) | (c > hi), axis=1)
        v[outside] = 0
        out[s:s + n] = v
    return out.reshape(shape)


def _native_grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


# ------------------------------------------------------------------------------------------- one pair


class Predictor:
    """Registers NIfTI pairs with a registrar (a local SavedModel, or the serving client's remote model).

    Args:
      registrar: callable ``(fixed, moving, moving_labels=None) -> {"flow", "warped"[, "warped_labels"]}`` on
        ``[1, D, H, W, 1]`` arrays, with an ``image_size`` attribute (`ldr_tf.registrar.Registrar`).
      spec: the `ldr_tf.preprocess.Preprocessing` applied to both scans.
    """

    def __init__(self, registrar, spec, model_info: dict | None = None):
        self.registrar = registrar
        self.spec = spec
        self.model_info = model_info or {}

    def warmup(self) -> float:
        size = tuple(self.registrar.image_size)
        zeros = np.zeros((1, *size, 1), np.float32)
        t0 = time.perf_counter()
        self.registrar(zeros, zeros)
        return time.perf_counter() - t0

    def run(self, fixed: str, moving: str, out_dir: str | os.PathLike, moving_seg: str | None = None,
            fixed_seg: str | None = None, write_mm: bool = False, overwrite: bool = False) -> dict:
        """Registers one pair and writes its outputs into `out_dir`; returns the result dict."""
        from ldr_tf import nifti, preprocess
        from ldr_tf.config import save_json_atomic

        out_dir = Path(out_dir)
        clash = [n for n in OUTPUTS if (out_dir / n).exists()]
        if clash and not overwrite:
            raise ValueError(f"{out_dir}: already holds {clash[0]} (add --overwrite to replace)")
        times = {}
        t = time.perf_counter()
        f_img = nifti.load(fixed, "image")
        m_img = nifti.load(moving, "image")
        m_lab = nifti.load(moving_seg, "labels", like=m_img) if moving_seg else None
        f_lab = nifti.load(fixed_seg, "labels", like=f_img) if fixed_seg else None
        times["load"] = time.perf_counter() - t

        t = time.perf_counter()
        f_vol, _, _, f_geom = preprocess.apply(self.spec, f_img, f_lab)
        m_vol, m_grid_lab, _, m_geom = preprocess.apply(self.spec, m_img, m_lab)
        times["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        res = self.registrar(f_vol[None, ..., None].astype(np.float32) / 255.0,
                             m_vol[None, ..., None].astype(np.float32) / 255.0)
        times["model"] = time.perf_counter() - t

        t = time.perf_counter()
        vox, mm = f_geom.flow_to_original(res["flow"][0], moving=m_geom)
        p = _native_grid(f_geom.source_shape)
        coords = p + vox
        warped = _sample_native(np.asarray(m_img.dataobj, np.float32), coords)
        warped_seg = _sample_native(np.asarray(m_lab.dataobj), coords, labels=True) if m_lab is not None else None
        result = {"fixed": str(fixed), "moving": str(moving), "moving_seg": moving_seg, "fixed_seg": fixed_seg,
                  "model": self.model_info, "grid": list(self.registrar.image_size)}
        if f_lab is not None and warped_seg is not None:
            f_native = np.asarray(f_lab.dataobj)
            # before registration: the moving labels brought onto the fixed grid through the NIfTI affines only
            to_moving = np.linalg.inv(m_img.affine) @ f_img.affine
            before = _sample_native(np.asarray(m_lab.dataobj), p @ to_moving[:3, :3].T + to_moving[:3, 3], labels=True)
            b = metrics.label_overlap(f_native, before)
            a = metrics.label_overlap(f_native, warped_seg)
            result.update(dice_before=b["dice"], jaccard_before=b["jaccard"], dice=a["dice"], jaccard=a["jaccard"],
                          labels=a["labels"])
        stats = metrics.jacobian_stats(res["flow"][0])
        result.update(jac_std_grid=stats["jac_std"], folding_pct_grid=stats["folding_pct"])
        times["map_back"] = time.perf_counter() - t

        t = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".predict-", dir=out_dir))
        try:
            affine = f_img.affine
            nifti.save(warped, affine, stage / "warped.nii.gz", dtype=np.float32)
            if warped_seg is not None:
                nifti.save(warped_seg, affine, stage / "warped_seg.nii.gz", dtype=np.int32)
            nifti.save(vox[:, :, :, None, :], affine, stage / "flow_vox.nii.gz", dtype=np.float32, intent="vector")
            if write_mm:
                lps = preprocess.ras_to_lps(mm)
                nifti.save(lps[:, :, :, None, :], affine, stage / "flow_mm_lps.nii.gz", dtype=np.float32,
                           intent="vector")
            times["write"] = time.perf_counter() - t
            result["seconds"] = times
            result["outputs"] = sorted(p.name for p in stage.iterdir()) + ["result.json"]
            save_json_atomic(result, stage / "result.json")
            for f in stage.iterdir():
                os.replace(f, out_dir / f.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return result


# ------------------------------------------------------------------------------------------- CLI


def read_pairs_csv(path: str) -> list:
    """Rows of a pairs CSV as dicts with keys fixed, moving, moving_seg, fixed_seg, name."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ValueError(f"{path}: cannot read the pairs CSV ({e.strerror})") from None
    if not rows:
        raise ValueError(f"{path}: no pairs (expected a header line and one row per pair)")
    if not {"fixed", "moving"} <= set(rows[0]):
        raise ValueError(f"{path}: the header must name columns fixed and moving, got {list(rows[0])}")
    out, names = [], set()
    for i, r in enumerate(rows, 1):
        if not r.get("fixed") or not r.get("moving"):
            raise ValueError(f"{path}: row {i} lacks a fixed or moving file")
        name = (r.get("name") or f"pair{i:04d}").strip()
        if name in names or "/" in name or name.startswith("."):
            raise ValueError(f"{path}: row {i}: pair name {name!r} is repeated or not a plain folder name")
        names.add(name)
        base = path.parent
        res = lambda v: str((base / v).resolve()) if v and not os.path.isabs(v) else (v or None)  # noqa: E731
        out.append({"name": name, "fixed": res(r["fixed"]), "moving": res(r["moving"]),
                    "moving_seg": res(r.get("moving_seg")), "fixed_seg": res(r.get("fixed_seg"))})
    return out


def _check_writable(out_dir: Path) -> None:
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{out_dir}: output folder is not writable")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model or not FLAGS.out_dir:
        raise cli.UsageError("--model and --out_dir are required")
    if bool(FLAGS.pairs) == bool(FLAGS.fixed or FLAGS.moving):
        raise cli.UsageError("give either --fixed and --moving, or --pairs=list.csv")
    if not FLAGS.pairs and not (FLAGS.fixed and FLAGS.moving):
        raise cli.UsageError("--fixed and --moving are both required")
    out_dir = Path(FLAGS.out_dir)
    _check_writable(out_dir)
    pairs = read_pairs_csv(FLAGS.pairs) if FLAGS.pairs else [
        {"name": None, "fixed": FLAGS.fixed, "moving": FLAGS.moving, "moving_seg": FLAGS.moving_seg,
         "fixed_seg": FLAGS.fixed_seg}]
    for p in pairs:  # fail on missing inputs before loading TensorFlow and the model
        for k in ("fixed", "moving", "moving_seg", "fixed_seg"):
            if p[k] and not Path(p[k]).is_file():
                raise ValueError(f"{p[k]}: file not found ({k})")
    common_flags.apply_runtime_flags(FLAGS)
    from ldr_tf.registrar import open_registrar

    t = time.perf_counter()
    registrar = open_registrar(FLAGS.model)
    if registrar.kind != "saved_model":
        raise cli.UsageError(f"{FLAGS.model}: predict runs exported SavedModels (python -m ldr_tf.export)")
    load_s = time.perf_counter() - t
    spec = resolve_preprocessing(FLAGS.preprocessing, registrar.metadata, registrar.image_size, FLAGS.no_crop)
    info = {k: registrar.metadata.get(k) for k in ("model", "aldk", "cascades", "parameters", "trained_steps")}
    info["path"] = str(FLAGS.model)
    predictor = Predictor(registrar, spec, info)
    warm = predictor.warmup() if FLAGS.warmup else None
    from ldr_tf.progress import Progress

    bar = Progress(len(pairs), label="predict", unit="pair", enabled=len(pairs) > 1)
    results = []
    for i, p in enumerate(pairs):
        dest = out_dir / p["name"] if p["name"] else out_dir
        r = predictor.run(p["fixed"], p["moving"], dest, p["moving_seg"], p["fixed_seg"], FLAGS.mm, FLAGS.overwrite)
        r["seconds"]["model_load"] = load_s
        r["seconds"]["warmup"] = warm
        results.append({"name": p["name"], **r})
        bar.update(i + 1)
        line = f"{p['name'] or 'pair'}: " + ", ".join(f"{k} {v:.2f}s" for k, v in r["seconds"].items()
                                                    if v is not None and k not in ("model_load", "warmup"))
        if "dice" in r:
            line += f"; Dice {r['dice_before']:.3f} -> {r['dice']:.3f} over {r['labels']} labels"
        print(line, flush=True)
    if FLAGS.pairs:
        from ldr_tf.config import save_json_atomic

        save_json_atomic({"model": info, "pairs": results}, out_dir / "results.json")
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.predict")
