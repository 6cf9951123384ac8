"""``python -m ldr_tf.predict``: register NIfTI pairs with an exported model, results on the fixed scan's own grid.

For each pair: load and check the scans, preprocess them as the model's training data was (the ``preprocessing``
stored in the export's ``ldr_tf_export.json``, or ``--preprocessing``), run the SavedModel on the CPU (oneDNN;
``--threads``), map the grid result back to the fixed scan and write into ``--out_dir``:

* ``warped.nii.gz``: the moving scan (its original intensities, float32) resampled onto the fixed scan's grid
  through the registration; it has the fixed scan's shape and affine;
* ``warped_seg.nii.gz`` (with ``--moving_seg``): the moving label map warped the same way without mixing labels
  (label-aware trilinear: every voxel holds one of the moving map's labels);
* ``flow_vox.nii.gz``: the displacement field on the fixed grid, ``[X, Y, Z, 1, 3]`` float32 (NIfTI intent
  ``vector``), in voxels of the **moving** scan, pull convention: fixed voxel ``p`` corresponds to moving voxel
  ``p + d(p)``, i.e. ``warped(p) = moving(p + d(p))``;
* ``flow_mm_lps.nii.gz`` (with ``--mm``): the same correspondence in millimetres as LPS+ physical vectors, the
  displacement-field convention of ITK and ANTs (``antsApplyTransforms -r fixed -i moving -t flow_mm_lps.nii.gz``
  resamples the moving scan onto the fixed one). ITK reads intent ``vector`` components as LPS as they are;
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
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from absl import flags

from flags import common_flags
from ldr_tf import cli

FLAGS = flags.FLAGS
OUTPUTS = ("warped.nii.gz", "warped_seg.nii.gz", "flow_vox.nii.gz", "flow_mm_lps.nii.gz", "result.json")
TIMING_KEYS = ("load", "preprocess", "model", "map_back", "metrics", "write")
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
    flags.DEFINE_bool("mm", False, "Also write flow_mm_lps.nii.gz (ITK/ANTs displacement field in mm).",
                      flag_values=fv)
    flags.DEFINE_bool("warmup", None, "Run the model once on zeros first, so 'model' times a warm call (default: "
                      "with --pairs only; a single pair's 'model' then includes the first call's graph set-up).",
                      flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace existing outputs.", flag_values=fv)


def define_flags(fv=FLAGS) -> None:
    """Every flag of ``python -m ldr_tf.predict``."""
    if "model" in fv:
        return
    common_flags.define_runtime_flags(fv)
    flags.DEFINE_string("model", None, "Exported SavedModel directory (python -m ldr_tf.export), or the name of a "
                        "pretrained model shipped with ldr-tf: brain (T1 brain MRI, python -m ldr_tf.pretrained).",
                        flag_values=fv)
    define_pair_flags(fv)


# ----------------------------------------------------------------------------------------- preprocessing


def resolve_preprocessing(choice: str, metadata: dict, grid, no_crop: bool = False):
    """The `ldr_tf.data.preprocess.Preprocessing` to apply to both scans.

    Args:
      choice: ``"auto"`` (the NIfTI preprocessing stored in the export metadata), a recipe name (``brain``,
        ``liver``, ``none``) or a ``.json`` spec file.
      metadata: the export metadata (``ldr_tf_export.json``).
      grid: the model's grid ``(D, H, W)``; it replaces the spec's grid size.
      no_crop: take the scans whole (``crop="none"``, no mask).

    Raises:
      ValueError: ``auto`` for a model whose training data has no NIfTI preprocessing (e.g. the synthetic demo
        data), an unknown recipe or an unreadable spec.
    """
    from ldr_tf.data.preprocess import RECIPES, Preprocessing, recipe

    grid = tuple(int(g) for g in grid)
    if choice == "auto":
        stored = (metadata or {}).get("preprocessing")
        if isinstance(stored, dict) and "grid_size" in stored:
            spec = Preprocessing.from_dict(stored)
        else:
            kind = stored.get("kind") if isinstance(stored, dict) else None
            what = (f"was trained on '{kind}' data" if kind else "records no preprocessing")
            raise ValueError(
                f"--preprocessing: the model {what}, which has no NIfTI preprocessing to repeat; give "
                f"--preprocessing={'|'.join(RECIPES)} or a spec .json (ldr_tf.data.preprocess.Preprocessing)"
            )
    elif choice.endswith(".json"):
        try:
            spec = Preprocessing.from_dict(json.loads(Path(choice).read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"{choice}: unreadable preprocessing spec ({' '.join(str(e).split())})") from None
    elif choice in RECIPES:
        spec = recipe(choice)
    else:
        raise ValueError(f"--preprocessing: expected auto, {', '.join(RECIPES)} or a .json file, got {choice!r}")
    d = spec.to_dict()
    d["grid_size"] = list(grid)  # the model's grid always wins
    if no_crop:
        d.update(crop="none", mask_dilation_mm=None)
    return Preprocessing.from_dict(d)


def _uncropped(spec):
    from ldr_tf.data.preprocess import Preprocessing

    return Preprocessing.from_dict({**spec.to_dict(), "crop": "none", "mask_dilation_mm": None})


# ------------------------------------------------------------------------------------------- sampling


def sample_native(data, coords, labels: bool = False):
    """Samples a native volume at voxel positions `coords` ``[..., 3]`` (`ldr_tf.ops.sampling.sample_points`).

    Args:
      data: ``[X, Y, Z]`` array (an image, or integer labels).
      coords: ``[..., 3]`` float positions in voxels of `data`.
      labels: sample integer labels without mixing (label vote, `ldr_tf.ops.warp.warp_labels`) instead of trilinear
        intensities.

    Returns:
      ``coords.shape[:-1]`` float32 (int32 for labels). Positions more than half a voxel outside the volume get 0
      (background) instead of the clamped border value.
    """
    from ldr_tf.ops.sampling import sample_points

    return sample_points(data, coords, mode="labels" if labels else "linear")


# ------------------------------------------------------------------------------------------- one pair


def prepare_pair(spec, loaded: dict, compile_samplers: bool = False) -> dict:
    """Both scans of a loaded pair on the network grid (`ldr_tf.data.preprocess.apply`), as `Predictor.start` needs them.

    Recipes that crop or mask to labels use the label boxes only when both label maps are there; otherwise both
    scans are taken whole and ``note`` says so. ``compile_samplers``: also compile the pull-back sampler for this
    pair's shapes (one slab on a zero flow), so that a background thread pays the compilation while the model
    loads. Returns ``{"spec", "spec_used", "note", "fixed", "moving", "fixed_geom", "moving_geom", "seconds"}``.
    """
    from ldr_tf.data import preprocess

    t = time.perf_counter()
    f_img, m_img, m_lab, f_lab = (loaded[k] for k in ("fixed", "moving", "moving_seg", "fixed_seg"))
    used, note = spec, None
    if spec.needs_labels and (f_lab is None or m_lab is None):
        missing = ", ".join(n for n, v in (("--fixed_seg", f_lab), ("--moving_seg", m_lab)) if v is None)
        note = (f"the preprocessing crops/masks to labels, which needs both label maps (missing {missing}): "
                "both scans were taken whole (crop none, no mask)")
        used = _uncropped(spec)
    crop_f = f_lab if used.needs_labels else None
    crop_m = m_lab if used.needs_labels else None
    f_vol, _, _, f_geom = preprocess.apply(used, f_img, crop_f, want_labels=False)
    m_vol, _, _, m_geom = preprocess.apply(used, m_img, crop_m, want_labels=False)
    out = {"spec": spec, "spec_used": used, "note": note, "fixed": f_vol, "moving": m_vol, "fixed_geom": f_geom,
           "moving_geom": m_geom, "seconds": time.perf_counter() - t}
    if compile_samplers:
        from ldr_tf.ops.sampling import compile_pull_back

        compile_pull_back(f_geom, m_geom, image=True, labels=m_lab is not None)
    return out


def load_pair(fixed: str, moving: str, moving_seg: str | None = None, fixed_seg: str | None = None,
              spec=None, compile_samplers: bool = False) -> dict:
    """The pair's scans and label maps, checked (`ldr_tf.data.nifti.load`), with the seconds it took.

    Returns ``{"fixed", "moving", "moving_seg", "fixed_seg", "seconds"}`` (absent label maps are None), and with a
    `spec` also ``"prepared"``: the pair on the grid (`prepare_pair`), so that a reader thread does that work too.
    """
    from ldr_tf.data import nifti

    t = time.perf_counter()
    f_img = nifti.load(fixed, "image")
    m_img = nifti.load(moving, "image")
    m_lab = nifti.load(moving_seg, "labels", like=m_img) if moving_seg else None
    f_lab = nifti.load(fixed_seg, "labels", like=f_img) if fixed_seg else None
    out = {"fixed": f_img, "moving": m_img, "moving_seg": m_lab, "fixed_seg": f_lab,
           "seconds": time.perf_counter() - t}
    if spec is not None:
        out["prepared"] = prepare_pair(spec, out, compile_samplers)
    return out


def _remove_if_created(path: Path, existed: bool) -> None:
    if not existed and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


class Predictor:
    """Registers NIfTI pairs with a registrar (a local SavedModel, or the serving client's remote model).

    Args:
      registrar: callable ``(fixed, moving, moving_labels=None) -> {"flow", "warped"[, "warped_labels"]}`` on
        ``[1, D, H, W, 1]`` float32 arrays in [0, 1], with an ``image_size`` attribute ``(D, H, W)``
        (`ldr_tf.deploy.loader.Registrar`, `tools.serving.client.RemoteRegistrar`).
      spec: the `ldr_tf.data.preprocess.Preprocessing` applied to both scans (grid = ``registrar.image_size``).
      model_info: dict stored under ``model`` in ``result.json``.

    Attributes:
      session_seconds: one-off timings (``model_load``, ``warmup``) copied into every result's ``seconds``.
    """

    def __init__(self, registrar, spec, model_info: dict | None = None):
        if tuple(spec.grid_size) != tuple(registrar.image_size):
            raise ValueError(f"spec: grid_size {spec.grid_size} differs from the model's grid {registrar.image_size}")
        self.registrar = registrar
        self.spec = spec
        self.model_info = model_info or {}
        self.session_seconds = {}

    def warmup(self) -> float:
        """One call on zeros (traces/compiles the graph); returns its seconds (also in `session_seconds`)."""
        zeros = np.zeros((1, *self.registrar.image_size, 1), np.float32)
        t0 = time.perf_counter()
        self.registrar(zeros, zeros)
        self.session_seconds["warmup"] = time.perf_counter() - t0
        return self.session_seconds["warmup"]

    @staticmethod
    def check_outputs(out_dir: str | os.PathLike, overwrite: bool) -> None:
        """ValueError if `out_dir` already holds an output and not `overwrite`."""
        out_dir = Path(out_dir)
        clash = [n for n in OUTPUTS if (out_dir / n).exists()]
        if clash and not overwrite:
            raise ValueError(f"{out_dir / clash[0]}: already exists (add --overwrite to replace the outputs)")

    def run(self, fixed: str, moving: str, out_dir: str | os.PathLike, moving_seg: str | None = None,
            fixed_seg: str | None = None, write_mm: bool = False, overwrite: bool = False,
            loaded: dict | None = None) -> dict:
        """Registers one pair and writes its outputs into `out_dir` (module docstring); returns ``result.json``.

        The same as ``start(...)()``: see `start`.
        """
        return self.start(fixed, moving, out_dir, moving_seg, fixed_seg, write_mm, overwrite, loaded)()

    def start(self, fixed: str, moving: str, out_dir: str | os.PathLike, moving_seg: str | None = None,
              fixed_seg: str | None = None, write_mm: bool = False, overwrite: bool = False,
              loaded: dict | None = None):
        """Registers one pair and starts writing its outputs; returns ``finish()``, which waits for the files,
        puts them in place (with ``result.json``) and returns the result.

        Between the two, the files are compressed in background threads: a batch registers the next pair
        meanwhile (`run_pairs`). Until ``finish()`` returns, nothing of this pair is in `out_dir`.

        `loaded` is the pair as `load_pair` read it (e.g. in a background thread while the previous pair ran);
        None reads it here.

        Raises:
          ValueError: one line naming the file or argument (unreadable/4-D/NaN scans, labels on another grid,
            existing outputs without `overwrite`, ...). Nothing is written then.
        """
        from ldr_tf.ops import metrics
        from ldr_tf.data import nifti, preprocess
        from ldr_tf.ops.sampling import pull_back, sample_affine

        out_dir = Path(out_dir)
        self.check_outputs(out_dir, overwrite)
        if loaded is None:
            loaded = load_pair(fixed, moving, moving_seg, fixed_seg)
        f_img, m_img, m_lab, f_lab = (loaded[k] for k in ("fixed", "moving", "moving_seg", "fixed_seg"))
        times = {"load": loaded["seconds"]}
        prepared = loaded.get("prepared")
        if prepared is None or prepared["spec"] != self.spec:
            prepared = prepare_pair(self.spec, loaded)
        spec, note = prepared["spec_used"], prepared["note"]
        f_vol, m_vol, f_geom, m_geom = (prepared[k] for k in ("fixed", "moving", "fixed_geom", "moving_geom"))
        times["preprocess"] = prepared["seconds"]

        t = time.perf_counter()
        res = self.registrar(f_vol[None, ..., None].astype(np.float32) / 255.0,
                             m_vol[None, ..., None].astype(np.float32) / 255.0)
        grid_flow = np.asarray(res["flow"])[0]
        del res
        times["model"] = time.perf_counter() - t

        t = time.perf_counter()
        m_labels = np.asarray(m_lab.dataobj) if m_lab is not None else None
        native = pull_back(f_geom, m_geom, grid_flow, image=np.asarray(m_img.dataobj, np.float32),
                           labels=m_labels, mm=write_mm)
        warped, warped_seg = native["warped"], native.get("warped_labels")
        times["map_back"] = time.perf_counter() - t

        # The files are compressed in background threads (zlib releases the GIL) while the metrics run.
        existed = out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".predict-", dir=out_dir))
        affine = f_img.affine
        jobs = [("flow_vox.nii.gz", native["vox"][:, :, :, None, :], np.float32, "vector"),
                ("warped.nii.gz", warped, np.float32, None)]
        if warped_seg is not None:
            jobs.append(("warped_seg.nii.gz", warped_seg, _label_dtype(warped_seg), None))
        if write_mm:
            jobs.append(("flow_mm_lps.nii.gz", preprocess.ras_to_lps(native["mm"])[:, :, :, None, :], np.float32,
                         "vector"))
        pool = ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1))
        futures = [pool.submit(nifti.save, arr, affine, stage / name, dtype=dt, intent=intent)
                   for name, arr, dt, intent in jobs]
        try:
            t = time.perf_counter()
            result = {"fixed": str(fixed), "moving": str(moving), "moving_seg": moving_seg, "fixed_seg": fixed_seg,
                      "model": self.model_info, "grid": list(self.registrar.image_size),
                      "fixed_shape": list(f_geom.source_shape), "moving_shape": list(m_geom.source_shape),
                      "preprocessing": spec.to_dict(), "preprocessing_note": note}
            if f_lab is not None and m_lab is not None:
                f_native = np.asarray(f_lab.dataobj)
                # before registration: the moving labels on the fixed grid through the NIfTI affines only
                to_moving = np.linalg.inv(m_img.affine) @ f_img.affine
                if m_img.shape[:3] == f_img.shape[:3] and np.allclose(to_moving, np.eye(4), atol=1e-5):
                    before = m_labels  # same grid: nothing to resample
                else:
                    before = sample_affine(m_labels, to_moving, f_geom.source_shape, mode="labels")
                b = metrics.label_overlap(f_native, before)
                a = metrics.label_overlap(f_native, warped_seg)
                result.update(dice_before=b["dice"], jaccard_before=b["jaccard"], dice=a["dice"],
                              jaccard=a["jaccard"], labels=a["labels"],
                              dice_per_label={str(k): {"before": b["per_label"].get(k, (float("nan"),))[0],
                                                       "after": v[0]} for k, v in a["per_label"].items()})
            stats = metrics.jacobian_stats(grid_flow)
            result.update(jac_std_grid=stats["jac_std"], folding_pct_grid=stats["folding_pct"])
            times["metrics"] = time.perf_counter() - t
        except BaseException:
            _abandon(futures, pool, stage, out_dir, existed)
            raise
        session = dict(self.session_seconds)

        def finish() -> dict:
            return self._finish(result, times, session, futures, pool, stage, out_dir, existed, overwrite)

        return finish

    def _finish(self, result, times, session, futures, pool, stage, out_dir, existed, overwrite) -> dict:
        from ldr_tf.atomic import write_json

        try:
            t = time.perf_counter()
            for f in futures:
                f.result()
            written = sorted(f.name for f in stage.iterdir()) + ["result.json"]
            times["write"] = time.perf_counter() - t  # what the writes took beyond what they overlapped
            result["seconds"] = {**times, **session}
            result["outputs"] = written
            write_json(result, stage / "result.json")
            self.check_outputs(out_dir, overwrite)  # nothing appeared meanwhile
            for name in written:
                os.replace(stage / name, out_dir / name)
            for name in set(OUTPUTS) - set(written):  # --overwrite: no stale output of an earlier run
                if (out_dir / name).is_file():
                    (out_dir / name).unlink()
        except BaseException:
            _abandon(futures, pool, stage, out_dir, existed)
            raise
        pool.shutdown(wait=True)
        shutil.rmtree(stage, ignore_errors=True)
        return result


def _abandon(futures, pool, stage: Path, out_dir: Path, existed: bool) -> None:
    """A pair failed: stop its writes and remove everything it wrote (its staging folder, an out_dir it made)."""
    for f in futures:
        f.cancel()
    pool.shutdown(wait=True)
    shutil.rmtree(stage, ignore_errors=True)
    _remove_if_created(out_dir, existed)


def _label_dtype(labels: np.ndarray):
    """The smallest integer dtype that holds every label (uint8 for most atlases: 4x less to compress)."""
    lo, hi = int(labels.min()), int(labels.max())
    for dt in (np.uint8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return dt
    return np.int32


# ------------------------------------------------------------------------------------------- batches


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


def check_writable(out_dir: str | os.PathLike) -> None:
    """ValueError unless `out_dir` is, or can be created as, a writable folder."""
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{out_dir}: cannot create the output folder ({probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{out_dir}: output folder is not writable")


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


def run_pairs(predictor: Predictor, pairs: list, out_dir: str | os.PathLike, write_mm: bool = False,
              overwrite: bool = False, prog: str = PROG, first=None) -> list:
    """Runs `predictor` on every pair (outputs in `out_dir`, or ``out_dir/<name>`` for named pairs).

    Every destination is checked for existing outputs before the first pair runs. The next pair's files are read
    in a background thread while the current one runs (`first`: a future of `load_pair` for the first pair,
    started earlier by the caller, e.g. while the model loaded), and each pair's output files are compressed while
    the next pair is registered (`Predictor.start`). A pair that fails stops the batch: the pairs before it are
    complete, nothing of it is left. Prints one line per pair. Returns the result dicts (with ``name``).
    """
    from ldr_tf.progress import Progress

    out_dir = Path(out_dir)
    dests = [out_dir / p["name"] if p["name"] else out_dir for p in pairs]
    for d in dests:
        Predictor.check_outputs(d, overwrite)
    bar = Progress(len(pairs), label=prog.split(".")[-1], unit="pair", enabled=len(pairs) > 1)
    results = []
    reader = ThreadPoolExecutor(max_workers=1)

    def read(p):  # the next pair is read and put on the grid while the current one runs
        return reader.submit(load_pair, p["fixed"], p["moving"], p["moving_seg"], p["fixed_seg"], predictor.spec)

    def report(i, p, r):
        results.append({"name": p["name"], **r})
        bar.update(i + 1)
        line = f"{p['name'] or 'pair'}: " + ", ".join(f"{k} {r['seconds'][k]:.2f}s" for k in TIMING_KEYS)
        if "dice" in r:
            line += f"; Dice {r['dice_before']:.3f} -> {r['dice']:.3f} over {r['labels']} labels"
        if r["preprocessing_note"]:
            print(f"{prog}: note: {r['preprocessing_note']}", file=sys.stderr)
        print(line, flush=True)

    def named(p, e):
        return ValueError(f"pair {p['name']}: {' '.join(str(e).split())}") if p["name"] else e

    pending = []  # [(index, pair, finish)] of the pair whose files are still being written

    def flush():
        while pending:
            j, q, done = pending.pop()
            try:
                report(j, q, done())
            except ValueError as e:
                raise named(q, e) from None

    try:
        upcoming = first if first is not None else read(pairs[0])
        for i, (p, dest) in enumerate(zip(pairs, dests)):
            current = upcoming
            if i + 1 < len(pairs):
                upcoming = read(pairs[i + 1])
            try:
                finish = predictor.start(p["fixed"], p["moving"], dest, p["moving_seg"], p["fixed_seg"], write_mm,
                                         overwrite, loaded=current.result())
            except ValueError as e:
                flush()  # the pairs before this one are complete
                raise named(p, e) from None
            flush()  # the previous pair's files were written while this one ran
            pending.append((i, p, finish))
        flush()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        for _, _, done in pending:  # interrupted (not a ValueError): complete what was registered, or clean up
            try:
                done()
            except BaseException:  # noqa: BLE001 (its own staging folder is removed by _finish)
                pass
    return results


# ------------------------------------------------------------------------------------------- CLI


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
    common_flags.apply_runtime_flags(fv)
    from ldr_tf.deploy.loader import inference_only, open_registrar

    inference_only()
    # The first pair is read, put on the grid and the samplers compiled for its shapes while the model loads (the
    # export's metadata says the grid and the preprocessing without loading TensorFlow's graph).
    from ldr_tf.deploy.savedmodel import load_metadata

    metadata = load_metadata(model) if (model / "ldr_tf_export.json").is_file() else {}
    first = None
    if metadata.get("image_size"):
        spec = resolve_preprocessing(fv.preprocessing, metadata, metadata["image_size"], fv.no_crop)
        reader = ThreadPoolExecutor(max_workers=1)
        p0 = pairs[0]
        first = reader.submit(load_pair, p0["fixed"], p0["moving"], p0["moving_seg"], p0["fixed_seg"], spec, True)
        reader.shutdown(wait=False)
    t = time.perf_counter()
    registrar = open_registrar(model)
    load_s = time.perf_counter() - t
    spec = resolve_preprocessing(fv.preprocessing, registrar.metadata, registrar.image_size, fv.no_crop)
    info = {k: registrar.metadata.get(k) for k in ("model", "aldk", "cascades", "parameters", "trained_steps",
                                                     "xla_warp")}
    info["path"] = str(model)
    predictor = Predictor(registrar, spec, info)
    predictor.session_seconds["model_load"] = load_s
    if fv.warmup if fv.warmup is not None else len(pairs) > 1:
        predictor.warmup()
    results = run_pairs(predictor, pairs, out_dir, fv.mm, fv.overwrite, first=first)
    if fv.pairs:
        from ldr_tf.atomic import write_json

        write_json({"model": info, "pairs": results}, out_dir / "results.json")
    print(f"wrote {out_dir}", flush=True)
    return 0


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    return _main(FLAGS)


def run_argv(define, body, argv, prog: str) -> int:
    """Parses `argv` into fresh flags made by ``define(fv)`` and runs ``body(fv)``: the exit status, with one-line
    ``<prog>: error: ...`` messages on stderr for bad input (exit 1), like `ldr_tf.cli.run` but in-process."""
    fv = flags.FlagValues()
    define(fv)
    try:
        rest = fv(list(argv))
        if len(rest) > 1:
            raise cli.UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
        return int(body(fv) or 0)
    except flags.Error as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1


def run(argv) -> int:
    """In-process entry: ``run(["predict", "--model=...", ...])`` -> exit status (0 ok, 1 error)."""
    return run_argv(define_flags, _main, argv, PROG)


if __name__ == "__main__":
    define_flags()
    cli.run(main, PROG)
