"""``python -m ldr_tf.predict``: register NIfTI pairs with an exported model, results on the fixed scan's own grid.

For each pair: load and check the scans, preprocess them as the model's training data was (the ``preprocessing``
stored in the export's ``ldr_tf_export.json``, or ``--preprocessing``), run the SavedModel on the CPU (oneDNN;
``--threads``), map the grid result back to the fixed scan and write into ``--out_dir``:

* ``warped.nii.gz``: the moving scan (its original intensities, float32) resampled onto the fixed scan's grid
  through the registration; it has the fixed scan's shape and affine;
* ``warped_seg.nii.gz`` (with ``--moving_seg``): the moving label map warped the same way without mixing labels
  (label-aware trilinear: every voxel holds one of the moving map's labels);
* ``flow_vox.nii``: the displacement field on the fixed grid, ``[X, Y, Z, 1, 3]`` float32 (NIfTI intent
  ``vector``), in voxels of the **moving** scan, pull convention: fixed voxel ``p`` corresponds to moving voxel
  ``p + d(p)``, i.e. ``warped(p) = moving(p + d(p))``;
* ``flow_mm_lps.nii`` (with ``--mm``): the same correspondence in millimetres as LPS+ physical vectors, the
  displacement-field convention of ITK and ANTs (``antsApplyTransforms -r fixed -i moving -t flow_mm_lps.nii``
  resamples the moving scan onto the fixed one). ITK reads intent ``vector`` components as LPS as they are.
  The two flows are not gzipped: a float displacement field compresses by only ~25 % and gzip took 1.7 s of a
  one-pair run (``gzip flow_vox.nii`` afterwards if disk space matters: every reader takes ``.nii.gz`` too);
* ``result.json``: input files, model, the preprocessing used, timings in seconds (``load``, ``preprocess``,
  ``model``, ``map_back``, ``metrics``, ``write``; ``model_load`` and ``warmup`` once per call) and, with both label
  maps, Dice/Jaccard before (the moving labels brought onto the fixed grid through the NIfTI affines only) and after
  registration, overall and per label.

The two scans may have any shape, voxel size and orientation: each is reoriented and resampled onto the network grid
on its own, and the result goes back through both geometries (`ldr_tf.data.preprocess.Geometry`).

Preprocessing. Models trained on the synthetic demo data record ``{"kind": "synthetic"}`` rather than a NIfTI recipe,
so ``--preprocessing=brain|liver|none`` or a spec JSON (`ldr_tf.data.preprocess.Preprocessing.to_dict`) must be given.
The grid size is always the model's. Recipes that crop (or mask) to labels (``brain``, ``liver``) use the label
boxes only when BOTH label maps are given; otherwise both scans are taken whole (crop ``none``, no mask), which
``result.json`` records under ``preprocessing_note`` (``--no_crop`` forces this).

Many pairs in one call: ``--pairs=list.csv`` with a header and columns ``fixed,moving`` (optional ``moving_seg``,
``fixed_seg``, ``name``; relative paths are relative to the CSV); each pair goes to ``<out_dir>/<name>/`` (default
name ``pair0001``, ...) and ``<out_dir>/results.json`` summarises all. Outputs are written under temporary names and
renamed when complete; an existing output is never replaced unless ``--overwrite`` (which also removes outputs of an
earlier run that this run does not produce). A failing pair stops the batch with a one-line error: the pairs before
it are complete, nothing of the failing one is left.
"""

from __future__ import annotations

import csv
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from absl import flags

from flags import common_flags
from ldr_tf import cli
from ldr_tf.atomic import check_writable
from ldr_tf.deploy.native import (Predictor, add_before, compile_for, load_pair, prepare_pair, resolve_preprocessing,
                                  run_pairs)

FLAGS = flags.FLAGS
PROG = "ldr_tf.predict"


def define_pair_flags(fv=FLAGS) -> None:
    """Flags naming the pairs and the outputs (shared with ``tools.serving.client``)."""
    if "fixed" in fv:
        return
    flags.DEFINE_string("fixed", None, "Fixed scan (.nii/.nii.gz).", flag_values=fv)
    flags.DEFINE_string("moving", None, "Moving scan (.nii/.nii.gz); any shape or orientation.", flag_values=fv)
    flags.DEFINE_string("moving_seg", None, "Moving label map (warped and written as warped_seg.nii.gz).",
                        flag_values=fv)
    flags.DEFINE_string("fixed_seg", None, "Fixed label map (for Dice, and for label-based cropping).",
                        flag_values=fv)
    flags.DEFINE_string("pairs", None, "CSV of pairs: header + columns fixed,moving[,moving_seg,fixed_seg,name].",
                        flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Output folder.", flag_values=fv)
    flags.DEFINE_string("preprocessing", "auto",
                        "auto (from the export metadata), a recipe name (brain, liver, none) or a spec .json file.",
                        flag_values=fv)
    flags.DEFINE_bool("no_crop", False, "Take both scans whole even if the preprocessing crops/masks to labels.",
                      flag_values=fv)
    flags.DEFINE_bool("mm", False, "Also write flow_mm_lps.nii (ITK/ANTs displacement field in mm).",
                      flag_values=fv)
    flags.DEFINE_bool("warmup", True, "Batches (--pairs): run the model once on zeros while the first pair is put "
                      "on the grid, so that the first call's one-off graph set-up, timed as 'warmup', overlaps the "
                      "preprocessing; 'model' then times a warm call. A single pair is put on the grid while "
                      "TensorFlow is imported, so there is nothing to overlap: its 'model' time includes the set-up.",
                      flag_values=fv)
    define_refine_flag(fv, "Refinement: the model's flow improved for each pair by gradient steps on the local "
                       "image correlation (ldr_tf.refine; no labels). Steps at half resolution, optionally followed "
                       "by steps at full resolution. auto (default): the model's recommended setting "
                       "(ldr_tf_export.json 'refine'; the brain model: 10 steps, +0.09 Dice, about 0.25 s per pair "
                       "on 2 cores plus 3-5 s of compilation once per process), none for a model without one; 0 or "
                       "empty: off (the network alone, fastest); 50 or 50,20: more accuracy for more time (brain "
                       "model: +0.11 and +0.14 Dice, 1.3 and 5-6 s per pair).", default="auto")
    flags.DEFINE_bool("overwrite", False, "Replace existing outputs.", flag_values=fv)


def define_refine_flag(fv, help_text: str, default: str = "") -> None:
    """``--refine`` (step counts at half[,full] resolution, or ``auto``: the model's recommendation; checked when
    parsed): predict and the serving client (default ``auto``), distill (default off)."""
    flags.DEFINE_string("refine", default, help_text, flag_values=fv)
    flags.register_validator("refine", _refine_steps_ok,
                             message="expected auto or 1 or 2 step counts >= 0, comma-separated (e.g. 10 or 50,20)",
                             flag_values=fv)


def refine_steps(value: str) -> list:
    """``--refine``'s step counts (``"50,20"`` -> ``[50, 20]``; ``""`` -> ``[]``)."""
    return [int(v) for v in value.split(",")] if value.strip() else []


def recommended_refine(metadata: dict | None) -> list:
    """The refinement an export recommends (its metadata's ``refine.steps``, written by ``tools.ship_pretrained
    --refine``), ``[]`` when it has none; ValueError for a malformed entry."""
    entry = (metadata or {}).get("refine")
    if entry is None:
        return []
    steps = entry.get("steps") if isinstance(entry, dict) else None
    if (not isinstance(steps, list) or len(steps) > 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in steps)):
        raise ValueError(f"the model's metadata 'refine' entry is malformed (expected {{\"steps\": [n] or [n, m]}}, "
                         f"got {entry!r})")
    return list(steps)


def refiner_from_flags(fv, metadata: dict | None = None):
    """The `ldr_tf.refine.Refiner` that ``--refine`` asks for (``auto``: `recommended_refine` of the model's
    `metadata`), or None (imports TensorFlow when it is on)."""
    value = fv.refine
    steps = recommended_refine(metadata) if value.strip() == "auto" else refine_steps(value)
    if not any(steps):
        return None
    from ldr_tf.refine import Refiner

    return Refiner(steps)


def _refine_steps_ok(value) -> bool:
    if value.strip() == "auto":
        return True
    try:
        steps = refine_steps(value)
    except ValueError:
        return False
    return len(steps) <= 2 and all(n >= 0 for n in steps)


def define_flags(fv=FLAGS) -> None:
    """Every flag of ``python -m ldr_tf.predict``."""
    if "model" in fv:
        return
    common_flags.define_runtime_flags(fv)
    flags.DEFINE_string("model", None, "Exported SavedModel directory (python -m ldr_tf.export), or the name of a "
                        "pretrained model shipped with ldr-tf: brain (T1 brain MRI, python -m ldr_tf.pretrained).",
                        flag_values=fv)
    define_pair_flags(fv)


def read_pairs_csv(path: str | os.PathLike) -> list:
    """Rows of a pairs CSV as dicts with keys name, fixed, moving, moving_seg, fixed_seg (absolute paths or None).

    Raises:
      ValueError: unreadable file, missing columns or files, repeated or unsafe pair names.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read the pairs CSV ({getattr(e, 'strerror', None) or e})") from None
    if not rows:
        raise ValueError(f"{path}: no pairs (expected a header line and one row per pair)")
    if not {"fixed", "moving"} <= set(rows[0]):
        raise ValueError(f"{path}: the header must name columns fixed and moving, got {list(rows[0])}")
    base = path.parent

    def resolve(v):
        v = (v or "").strip()
        return None if not v else str(Path(v) if os.path.isabs(v) else (base / v).resolve())

    out, names = [], set()
    for i, r in enumerate(rows, 1):
        if not (r.get("fixed") or "").strip() or not (r.get("moving") or "").strip():
            raise ValueError(f"{path}: row {i} lacks a fixed or moving file")
        name = (r.get("name") or "").strip() or f"pair{i:04d}"
        if name in names or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"{path}: row {i}: pair name {name!r} is repeated or not a plain folder name")
        names.add(name)
        out.append({"name": name, "fixed": resolve(r["fixed"]), "moving": resolve(r["moving"]),
                    "moving_seg": resolve(r.get("moving_seg")), "fixed_seg": resolve(r.get("fixed_seg"))})
    return out


def pairs_from_flags(fv) -> list:
    """The pairs named by --fixed/--moving/... or --pairs, with every input file checked to exist."""
    if bool(fv.pairs) == bool(fv.fixed or fv.moving):
        raise cli.UsageError("give either --fixed and --moving, or --pairs=list.csv")
    if not fv.pairs and not (fv.fixed and fv.moving):
        raise cli.UsageError("--fixed and --moving are both required")
    if fv.pairs and (fv.moving_seg or fv.fixed_seg):
        raise cli.UsageError("--moving_seg/--fixed_seg go into the --pairs CSV (columns moving_seg, fixed_seg)")
    pairs = read_pairs_csv(fv.pairs) if fv.pairs else [
        {"name": None, "fixed": fv.fixed, "moving": fv.moving, "moving_seg": fv.moving_seg,
         "fixed_seg": fv.fixed_seg}]
    for p in pairs:
        for k in ("fixed", "moving", "moving_seg", "fixed_seg"):
            if p[k] and not Path(p[k]).is_file():
                what = "is a folder, expected a .nii/.nii.gz file" if Path(p[k]).is_dir() else "file not found"
                raise ValueError(f"{p[k]}: {what} (--{k}{' in ' + str(fv.pairs) if fv.pairs else ''})")
    return pairs


# ------------------------------------------------------------------------------------------- CLI


def _prepare(loaded, spec, engine: str, before: bool) -> dict:
    """The pair read by a `load_pair` future, put on the grid (`deploy.native.prepare_pair`)."""
    pair = loaded.result()
    return {**pair, "prepared": prepare_pair(spec, pair, before=before, engine=engine)}


def _done_or_none(future):
    """The result of a reader future, or None if it failed (its own future reports the error to the main thread)."""
    try:
        return future.result()
    except (ValueError, OSError):
        return None


def _before(first) -> None:
    """The "before registration" scores of a `_prepare` future's pair (`deploy.native.add_before`)."""
    pair = _done_or_none(first)
    if pair is not None:
        add_before(pair["prepared"], pair, compiled=False)


def _compile(prepared, mm: bool) -> None:
    """Compiles the pull-back for the pair of a `_prepare` future."""
    pair = _done_or_none(prepared)
    if pair is not None:
        compile_for(pair, mm)


def _main(fv) -> int:
    if not fv.model or not fv.out_dir:
        raise cli.UsageError("--model (an exported SavedModel directory or a pretrained name, e.g. brain) and "
                             "--out_dir are required")
    pairs = pairs_from_flags(fv)  # fail on missing inputs before loading TensorFlow and the model
    out_dir = Path(fv.out_dir)
    check_writable(out_dir)
    from ldr_tf import pretrained

    model = pretrained.resolve(fv.model)
    if not model.is_dir():
        raise ValueError(f"{model}: --model: not found or not a folder (expected an exported SavedModel directory)")
    if not (model / "saved_model.pb").is_file():
        hint = ("it is a training run directory: export it first with python -m ldr_tf.export"
                if (model / "config.json").is_file() else "no saved_model.pb")
        raise ValueError(f"{model}: --model: not a SavedModel directory ({hint})")
    for p in pairs:  # existing outputs: refuse before the (slow) model load
        Predictor.check_outputs(out_dir / p["name"] if p["name"] else out_dir, fv.overwrite)
    if fv.pairs and (out_dir / "results.json").exists() and not fv.overwrite:
        raise ValueError(f"{out_dir / 'results.json'}: already exists (add --overwrite to replace the outputs)")
    # The first pair is read while TensorFlow is imported (NIfTI reading does not use it); a single pair is also put
    # on the grid then (SciPy's resampler, no TensorFlow), so that the model's first call can take it as soon as the
    # model is loaded. Then the pull-back sampler is compiled for its shapes while the model loads, and the "before"
    # scores are computed. The export's metadata says the grid and the preprocessing without loading TensorFlow.
    from ldr_tf.deploy.savedmodel import load_metadata

    metadata = load_metadata(model) if (model / "ldr_tf_export.json").is_file() else {}
    first = loaded = None
    waits = []
    single = len(pairs) == 1
    if metadata.get("image_size"):
        spec = resolve_preprocessing(fv.preprocessing, metadata, metadata["image_size"], fv.no_crop)
        # Two workers when the pair has labels (their "before" scores then run beside the compilation).
        reader = ThreadPoolExecutor(max_workers=2 if pairs[0]["moving_seg"] else 1)
        p0 = pairs[0]
        loaded = reader.submit(load_pair, p0["fixed"], p0["moving"], p0["moving_seg"], p0["fixed_seg"])
        if single:
            first = reader.submit(_prepare, loaded, spec, "scipy", False)
    common_flags.apply_runtime_flags(fv)  # imports TensorFlow; thread settings before any TensorFlow op
    from ldr_tf.deploy.loader import inference_only, open_registrar

    inference_only()
    refiner = refiner_from_flags(fv, metadata)
    if loaded is not None:
        if first is None:  # a batch: the XLA-compiled resampler pays off from the second scan on
            first = reader.submit(_prepare, loaded, spec, "xla", True)
        if single and p0["moving_seg"] and p0["fixed_seg"]:
            waits.append(reader.submit(_before, first))
    t = time.perf_counter()
    registrar = open_registrar(model)
    load_s = time.perf_counter() - t
    if loaded is not None:
        # The pull-back is compiled after the load, not beside it: its trace is Python (GIL-bound) work that slowed
        # the load by 0.2 s, while the model's first call, which comes next, leaves a core free (its own XLA
        # compilations run one after the other).
        if refiner is not None and single:  # (a batch compiles it in its warm-up call)
            waits.append(reader.submit(refiner.compile, spec.grid_size))
        waits.append(reader.submit(_compile, first, fv.mm))
        reader.shutdown(wait=False)
    spec = resolve_preprocessing(fv.preprocessing, registrar.metadata, registrar.image_size, fv.no_crop)
    info = {k: registrar.metadata.get(k) for k in ("model", "aldk", "cascades", "parameters", "trained_steps",
                                                     "xla_warp")}
    info["path"] = str(model)
    predictor = Predictor(registrar, spec, info, refiner)
    predictor.session_seconds["model_load"] = load_s
    # The warm-up call (one-off graph and oneDNN set-up) overlaps the preprocessing; when the pair is already on the
    # grid there is nothing to overlap, and its first call does the set-up instead.
    if fv.warmup and not single:
        predictor.warmup()
    results = run_pairs(predictor, pairs, out_dir, fv.mm, fv.overwrite, first=first, ready=waits)
    if fv.pairs:
        from ldr_tf.atomic import write_json

        write_json({"model": info, "pairs": results}, out_dir / "results.json")
    print(f"wrote {out_dir}", flush=True)
    return 0


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    return _main(FLAGS)


def run(argv) -> int:
    """In-process entry: ``run(["predict", "--model=...", ...])`` -> exit status (0 ok, 1 error)."""
    return cli.run_argv(define_flags, _main, argv, PROG)


if __name__ == "__main__":
    cli.without_keras()  # this command only runs SavedModels: TensorFlow's import 1.2 s shorter
    define_flags()
    cli.run(main, PROG, fast_exit=True)
