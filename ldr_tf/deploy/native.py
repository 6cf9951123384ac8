"""Registration on the fixed scan's own grid: the data path of ``python -m ldr_tf.predict`` and ``ldr_tf.compare``.

`load_pair` reads and checks a pair of NIfTI scans, `prepare_pair` puts both on the network grid with the model's
preprocessing (`resolve_preprocessing`), `model_input` scales them as the networks were trained (0..255 -> [0, 1]),
`ldr_tf.ops.sampling.pull_back` brings the flow, the warped scan and the warped labels back onto the fixed scan,
and `Predictor` does all of it for one pair and writes the files (`run_pairs` for many). The outputs and their
conventions are described in `ldr_tf.predict`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

OUTPUTS = ("warped.nii.gz", "warped_seg.nii.gz", "flow_vox.nii", "flow_mm_lps.nii", "result.json")
# Written by ldr-tf before 0.2 (the flows gzipped): an existing one is a clash, and --overwrite removes it.
OLD_OUTPUTS = ("flow_vox.nii.gz", "flow_mm_lps.nii.gz")
TIMING_KEYS = ("load", "preprocess", "model", "map_back", "metrics", "write")


def model_input(volume: np.ndarray) -> np.ndarray:
    """A preprocessed volume (0..255 on the grid, ``[D, H, W]``) as the networks take it: ``[1, D, H, W, 1]`` float32
    in [0, 1] (the dataset reader divides by 255 the same way)."""
    return volume[None, ..., None].astype(np.float32) / 255.0


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


def labels_before(f_img, m_img, m_labels: np.ndarray, f_shape, compiled: bool = True) -> np.ndarray:
    """The moving labels on the fixed scan's grid through the two NIfTI affines only ("before registration").

    `compiled`: as `ldr_tf.ops.sampling.sample_affine` (False for a one-off pair)."""
    from ldr_tf.ops.sampling import sample_affine

    to_moving = np.linalg.inv(m_img.affine) @ f_img.affine
    if m_img.shape[:3] == f_img.shape[:3] and np.allclose(to_moving, np.eye(4), atol=1e-5):
        return m_labels  # same grid: nothing to resample
    return sample_affine(m_labels, to_moving, tuple(f_shape), mode="labels", compiled=compiled)


def prepare_pair(spec, loaded: dict, before: bool = True, engine: str = "xla") -> dict:
    """Both scans of a loaded pair on the network grid (`ldr_tf.data.preprocess.apply`), as `Predictor.start` needs them.

    Recipes that crop or mask to labels use the label boxes only when both label maps are there; otherwise both
    scans are taken whole and ``note`` says so. `engine`: the resampler (`ldr_tf.data.preprocess.apply`:
    ``"xla"`` for batches, ``"scipy"`` for a one-off pair; with ``"scipy"`` and ``before=False`` nothing here uses
    TensorFlow). Returns ``{"spec", "spec_used", "note", "fixed", "moving", "fixed_geom",
    "moving_geom", "seconds"}`` and, with both label maps and `before`, the scores ``"before_overlap"`` of
    `labels_before` (`add_before`), so that a reader thread does that work.
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
    f_vol, _, _, f_geom = preprocess.apply(used, f_img, crop_f, want_labels=False, engine=engine)
    m_vol, _, _, m_geom = preprocess.apply(used, m_img, crop_m, want_labels=False, engine=engine)
    out = {"spec": spec, "spec_used": used, "note": note, "fixed": f_vol, "moving": m_vol, "fixed_geom": f_geom,
           "moving_geom": m_geom}
    out["seconds"] = time.perf_counter() - t
    if before:
        add_before(out, loaded, compiled=engine == "xla")
    return out


def add_before(prepared: dict, loaded: dict, compiled: bool = True) -> dict:
    """With both label maps, adds the "before registration" scores to a `prepare_pair` result (``"before_overlap"``:
    `ldr_tf.ops.metrics.label_overlap` of `labels_before`), so that a reader thread does that work; returns
    `prepared`. Its seconds are added to ``prepared["seconds"]``."""
    f_img, m_img, m_lab, f_lab = (loaded[k] for k in ("fixed", "moving", "moving_seg", "fixed_seg"))
    if f_lab is None or m_lab is None:
        return prepared
    from ldr_tf.ops import metrics

    t = time.perf_counter()
    before = labels_before(f_img, m_img, np.asarray(m_lab.dataobj), prepared["fixed_geom"].source_shape, compiled)
    prepared["before_overlap"] = metrics.label_overlap(np.asarray(f_lab.dataobj), before)
    prepared["seconds"] += time.perf_counter() - t
    return prepared


def compile_for(pair: dict, mm: bool = False) -> None:
    """Compiles the pull-back (`ldr_tf.ops.sampling.compile_pull_back`) for a pair put on the grid (a `load_pair`
    result with its `prepare_pair` result under ``"prepared"``), as `Predictor.start` will call it (the moving
    scan, its labels if any, millimetres if `mm`): a thread pays the compilation while the model loads."""
    from ldr_tf.ops.sampling import compile_pull_back

    prepared = pair["prepared"]
    compile_pull_back(prepared["fixed_geom"], prepared["moving_geom"], image=True,
                      labels=pair["moving_seg"] is not None, mm=mm)


def load_pair(fixed: str, moving: str, moving_seg: str | None = None, fixed_seg: str | None = None,
              spec=None, engine: str = "xla") -> dict:
    """The pair's scans and label maps, checked (`ldr_tf.data.nifti.load`), with the seconds it took.

    Returns ``{"fixed", "moving", "moving_seg", "fixed_seg", "seconds"}`` (absent label maps are None), and with a
    `spec` also ``"prepared"``: the pair on the grid (`prepare_pair`, `engine` as there), so that a reader thread
    does that work too. Without a `spec` nothing here uses TensorFlow (it can run while TensorFlow is imported).
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
        out["prepared"] = prepare_pair(spec, out, engine=engine)
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
      refiner: optional `ldr_tf.refine.Refiner`: the model's flow is refined for each pair before it is mapped back
        (its settings are stored under ``model.refine``, its time under ``seconds.refine``).

    Attributes:
      session_seconds: one-off timings (``model_load``, ``warmup``) copied into every result's ``seconds``.
    """

    def __init__(self, registrar, spec, model_info: dict | None = None, refiner=None):
        if tuple(spec.grid_size) != tuple(registrar.image_size):
            raise ValueError(f"spec: grid_size {spec.grid_size} differs from the model's grid {registrar.image_size}")
        self.registrar = registrar
        self.spec = spec
        self.refiner = refiner if refiner is not None and refiner.levels else None
        self.model_info = dict(model_info or {})
        if self.refiner is not None:
            self.model_info["refine"] = self.refiner.to_dict()
        self.session_seconds = {}

    def warmup(self) -> float:
        """One call on zeros (traces/compiles the graph, and the refinement); returns its seconds (also in
        `session_seconds`)."""
        zeros = np.zeros((1, *self.registrar.image_size, 1), np.float32)
        t0 = time.perf_counter()
        self.registrar.flow(zeros, zeros)
        if self.refiner is not None:
            self.refiner.compile(self.registrar.image_size)
        self.session_seconds["warmup"] = time.perf_counter() - t0
        return self.session_seconds["warmup"]

    @staticmethod
    def check_outputs(out_dir: str | os.PathLike, overwrite: bool) -> None:
        """ValueError if `out_dir` already holds an output and not `overwrite`."""
        out_dir = Path(out_dir)
        clash = [n for n in OUTPUTS + OLD_OUTPUTS if (out_dir / n).exists()]
        if clash and not overwrite:
            raise ValueError(f"{out_dir / clash[0]}: already exists (add --overwrite to replace the outputs)")

    def run(self, fixed: str, moving: str, out_dir: str | os.PathLike, moving_seg: str | None = None,
            fixed_seg: str | None = None, write_mm: bool = False, overwrite: bool = False,
            loaded: dict | None = None, ready=()) -> dict:
        """Registers one pair and writes its outputs into `out_dir` (module docstring); returns ``result.json``.

        The same as ``start(...)()``: see `start`.
        """
        return self.start(fixed, moving, out_dir, moving_seg, fixed_seg, write_mm, overwrite, loaded, ready)()

    def start(self, fixed: str, moving: str, out_dir: str | os.PathLike, moving_seg: str | None = None,
              fixed_seg: str | None = None, write_mm: bool = False, overwrite: bool = False,
              loaded: dict | None = None, ready=()):
        """Registers one pair and starts writing its outputs; returns ``finish()``, which waits for the files,
        puts them in place (with ``result.json``) and returns the result.

        Between the two, the files are compressed in background threads: a batch registers the next pair
        meanwhile (`run_pairs`). Until ``finish()`` returns, nothing of this pair is in `out_dir`.

        `loaded` is the pair as `load_pair` read it (e.g. in a background thread while the previous pair ran);
        None reads it here. `ready`: futures of work for this pair done elsewhere (compiling the pull-back, its
        "before" scores), waited for after the model call, before the pull-back.

        Raises:
          ValueError: one line naming the file or argument (unreadable/4-D/NaN scans, labels on another grid,
            existing outputs without `overwrite`, ...). Nothing is written then.
        """
        from ldr_tf.ops import metrics
        from ldr_tf.data import nifti, preprocess
        from ldr_tf.ops.sampling import pull_back

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
        f_in, m_in = model_input(f_vol), model_input(m_vol)
        grid_flow = self.registrar.flow(f_in, m_in)[0]
        times["model"] = time.perf_counter() - t
        for r in ready:  # (the refinement's compilation may be among them)
            r.result()
        if self.refiner is not None:
            t = time.perf_counter()
            grid_flow = np.asarray(self.refiner(f_in, m_in, grid_flow[None]))[0]
            times["refine"] = time.perf_counter() - t
        # The grid flow's Jacobian statistics in a thread while the flow is pulled back (NumPy releases the GIL).
        jac_pool = ThreadPoolExecutor(max_workers=1)
        jacobian = jac_pool.submit(metrics.jacobian_stats, grid_flow)
        jac_pool.shutdown(wait=False)
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
        # The flows are written uncompressed: gzip shrinks a float32 displacement field by only ~25 % and took
        # 1.7 s for a 160x192x224 one on 2 cores (the warped scan and labels compress 3-20x and stay gzipped).
        jobs = [("flow_vox.nii", native["vox"][:, :, :, None, :], np.float32, "vector"),
                ("warped.nii.gz", warped, np.float32, None)]
        if warped_seg is not None:
            jobs.append(("warped_seg.nii.gz", warped_seg, _label_dtype(warped_seg), None))
        if write_mm:
            jobs.append(("flow_mm_lps.nii", preprocess.ras_to_lps(native["mm"])[:, :, :, None, :], np.float32,
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
                b = prepared.get("before_overlap")
                if b is None:
                    b = metrics.label_overlap(f_native, labels_before(f_img, m_img, m_labels, f_geom.source_shape))
                a = metrics.label_overlap(f_native, warped_seg)
                result.update(dice_before=b["dice"], jaccard_before=b["jaccard"], dice=a["dice"],
                              jaccard=a["jaccard"], labels=a["labels"],
                              dice_per_label={str(k): {"before": b["per_label"].get(k, (float("nan"),))[0],
                                                       "after": v[0]} for k, v in a["per_label"].items()})
            stats = jacobian.result()
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
            for name in set(OUTPUTS + OLD_OUTPUTS) - set(written):  # --overwrite: no stale output of an earlier run
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


def run_pairs(predictor: Predictor, pairs: list, out_dir: str | os.PathLike, write_mm: bool = False,
              overwrite: bool = False, prog: str = "ldr_tf.predict", first=None, ready=()) -> list:
    """Runs `predictor` on every pair (outputs in `out_dir`, or ``out_dir/<name>`` for named pairs).

    Every destination is checked for existing outputs before the first pair runs. The next pair's files are read
    in a background thread while the current one runs (`first`: a future of `load_pair` for the first pair,
    started earlier by the caller, e.g. while the model loaded; `ready`: `Predictor.start`'s, for the first pair),
    and each pair's output files are compressed while
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
        keys = [k for k in TIMING_KEYS[:3] + ("refine",) + TIMING_KEYS[3:] if k in r["seconds"]]
        line = f"{p['name'] or 'pair'}: " + ", ".join(f"{k} {r['seconds'][k]:.2f}s" for k in keys)
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
                                         overwrite, loaded=current.result(), ready=ready if i == 0 else ())
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
