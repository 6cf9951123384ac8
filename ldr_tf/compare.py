"""``python -m ldr_tf.compare``: methods side by side on the same pairs, scored on the fixed scan's native grid.

Every method registers the ORIGINAL NIfTI scans of each pair of a dataset subset (their paths are stored in the
HDF5 attributes by the import tools); its warped moving label map is scored against the fixed label map on the
fixed scan's own voxel grid, so learned models (which work on a 64^3 or 128^3 grid) and classical methods (which
work at native resolution) are judged identically.

Methods (``--method=name=spec``, repeatable, in order):

* ``identity``: the moving labels brought onto the fixed grid through the two NIfTI affines only;
* ``<run dir>:affine``: the affine first stage of a trained model alone;
* ``<SavedModel dir>`` or ``<run dir>``: a learned model (teacher, student, ...): the scans are preprocessed as the
  dataset was (its ``preprocessing`` spec), registered on the grid, and the flow is mapped back
  (`ldr_tf.data.preprocess.Geometry.flow_to_original`); ``<model>:refine=<steps>[,<steps>]``: the same with its
  flow refined for each pair (`ldr_tf.refine`: steps at half, then full resolution; time counted in the model's);
* ``ants:SyN`` (or any ANTsPy ``type_of_transform``, e.g. ``ants:Affine``): ANTs through ``antspyx``
  (``pip install .[peers]``), on the full native scans, labels resampled with ``genericLabel``; an optional third
  field sets the fraction of voxels the affine metric samples (``ants:Affine:1.0``; default 0.2, antspyx's): random
  sampling makes runs differ, and on tiny volumes a sparse draw can diverge;
* ``elastix`` (or ``elastix:<maps>``, e.g. ``elastix:rigid,affine,bspline``; default ``affine,bspline``): elastix's
  default parameter maps through ``itk-elastix`` (``pip install .[peers]``), run by `ldr_tf.elastix` in a separate
  process, on the full native scans, labels warped with nearest neighbour.

Per method: mean and median (over pairs) of each pair's Dice and Jaccard (a pair's score = mean over the labels
present in the fixed map, background excluded), % of fixed-grid voxels where the mapping folds (det J <= 0), and
seconds per pair for the registration itself (learned: preprocessing + model + the flow mapped back onto the fixed
scan, the model call alone also given, the XLA compilations for a new scan shape left out; ANTs: ``ants.registration``; elastix: the registration call), all with ``--threads`` threads (default 2). Text table, JSON and a
Dice-vs-seconds figure (log scale). With two methods or more, every method's Dice minus the ``--baseline``'s (default:
the first method) on the same pairs: mean, a 95 % interval over subject pairs (Student's t, as `ldr_tf.ablation`),
and on how many pairs it is higher.
``--structures=95,47,48``: those labels' Dice per method as well (mean over the pairs whose fixed map holds them;
every pair's per-label Dice is in the JSON).

Example::

    python -m ldr_tf.compare --dataset=brain --subset=test --out=compare/brain \\
        --method=identity --method=affine=runs/teacher:affine --method=teacher=models/teacher \\
        --method=student=models/student --method=student_plain=models/student_plain --method=ants_syn=ants:SyN
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from absl import flags

from flags import common_flags
from ldr_tf import cli
from ldr_tf.atomic import write_json, write_text

FLAGS = flags.FLAGS


def define_flags() -> None:
    if "method" in FLAGS:
        return
    common_flags.define_data_flags()
    common_flags.define_runtime_flags()
    flags.DEFINE_multi_string("method", [], "name=spec (see module doc); a bare 'identity' or spec also works.")
    flags.DEFINE_string("subset", "test", "Scheme or subset whose pairs are compared.")
    flags.DEFINE_integer("max_pairs", 0, "Only the first N pairs (0 = all).")
    flags.DEFINE_bool("paired", False, "Subject-to-subject datasets: neighbour pairs (keys 2k and 2k+1, both ways: "
                      "30 pairs for 30 test subjects) instead of every ordered pair.")
    flags.DEFINE_string("out", None, "Output prefix: <out>.txt, <out>.json, <out>.png.")
    flags.DEFINE_list("structures", [], "Label values (e.g. 95,47,48: the IXI corpus callosum and hippocampi) whose "
                      "Dice is also tabulated per method (every pair's per-label Dice is in the JSON).")
    flags.DEFINE_string("baseline", None, "Name of a method: every other method's Dice minus its, pair by pair, with "
                        "a 95 %% confidence interval over subject pairs (default: the first method).")


# ------------------------------------------------------------------------------------------- scans


def source_paths(desc, key: str) -> dict:
    """Original image / label NIfTI paths of a subject, from its HDF5 attributes (``source_file``, ``label_file``)."""
    import h5py

    path, group = desc.file_for(key)
    with h5py.File(path, "r") as h5:
        attrs = dict(h5[group].attrs)
    src, lab = attrs.get("source_file"), attrs.get("label_file")
    if not src or not Path(str(src)).is_file():
        raise ValueError(f"{path}: subject '{key}' has no readable source_file attribute ({src}); compare needs "
                         "datasets made by the import tools, with the original scans still in place")
    return {"image": str(src), "labels": str(lab) if lab else None}


class Scan:
    """A loaded NIfTI scan with its label map."""

    def __init__(self, key: str, paths: dict):
        from ldr_tf.data import nifti

        self.key = key
        self.paths = paths
        self.image = nifti.load(paths["image"], "image")
        self.labels = nifti.load(paths["labels"], "labels", like=self.image) if paths["labels"] else None

    @property
    def affine(self):
        return np.asarray(self.image.affine, np.float64)


def _grid(shape) -> np.ndarray:
    return np.moveaxis(np.indices(shape, dtype=np.float32), 0, -1)


# ------------------------------------------------------------------------------------------- methods


class Method:
    """Registers (fixed, moving) scans; returns moving voxel positions for every fixed voxel, or warped labels."""

    name = "method"
    parameters = None

    def register(self, fixed: Scan, moving: Scan) -> dict:  # pragma: no cover (interface)
        raise NotImplementedError


class Identity(Method):
    def __init__(self, name="identity"):
        self.name = name
        self.parameters = 0

    def register(self, fixed, moving):
        t = time.perf_counter()
        m = np.linalg.inv(moving.affine) @ fixed.affine
        coords = _grid(fixed.image.shape) @ m[:3, :3].T.astype(np.float32) + m[:3, 3].astype(np.float32)
        return {"coords": coords, "seconds": time.perf_counter() - t, "model_seconds": 0.0}


class Learned(Method):
    """A SavedModel or run dir (optionally only its affine stage), with the dataset's preprocessing."""

    def __init__(self, name: str, spec: str, preprocessing):
        from ldr_tf.deploy.loader import open_registrar
        from ldr_tf.predict import refine_steps
        from ldr_tf.refine import Refiner

        spec, _, refine = spec.partition(":refine=")
        try:
            self.refiner = Refiner(refine_steps(refine)) if refine else None
        except ValueError:
            raise ValueError(f"method {name}: expected <model>[:refine=<steps>[,<steps>]], got refine={refine!r}") \
                from None
        stage = "full"
        if spec.endswith(":affine"):
            spec, stage = spec[: -len(":affine")], "affine"
        self.name = name
        self.registrar = open_registrar(spec, stage=stage)
        self.parameters = self.registrar.parameters
        grid = tuple(self.registrar.image_size)
        from ldr_tf.data.preprocess import Preprocessing

        self.spec = Preprocessing.from_dict({**preprocessing.to_dict(), "grid_size": list(grid)})
        zeros = np.zeros((1, *grid, 1), np.float32)
        self.registrar.flow(zeros, zeros)  # warm-up (tracing, XLA compilation) outside the timings
        if self.refiner is not None:
            self.refiner.compile(grid)
        self._compiled_shapes = set()

    def register(self, fixed, moving):
        # The samplers of the preprocessing and of the pull-back are compiled once per scan shape: the first pair
        # of new shapes is registered once untimed (as a batch's warm-up does), so that its seconds are a pair's
        # and not the compilation's (it had added 2 s to the first of the 30 IXI test pairs, 0.07 s to the mean).
        shapes = (tuple(fixed.image.shape), tuple(moving.image.shape))
        if shapes not in self._compiled_shapes:
            self._register(fixed, moving)
            self._compiled_shapes.add(shapes)
        return self._register(fixed, moving)

    def _register(self, fixed, moving):
        from ldr_tf.deploy.native import model_input, prepare_pair
        from ldr_tf.ops.sampling import pull_back

        # Label maps reach the preprocessing only when the recipe crops or masks to labels (the old atlas
        # recipes); label-free recipes (brain-head) see the images alone, as ANTs does.
        t = time.perf_counter()
        crop = self.spec.needs_labels  # labels reach the preprocessing only when it crops to them
        pair = prepare_pair(self.spec, {"fixed": fixed.image, "moving": moving.image,
                                        "fixed_seg": fixed.labels if crop else None,
                                        "moving_seg": moving.labels if crop else None}, before=False)
        t_model = time.perf_counter()
        f_in, m_in = model_input(pair["fixed"]), model_input(pair["moving"])
        flow = self.registrar.flow(f_in, m_in)
        if self.refiner is not None:
            flow = np.asarray(self.refiner(f_in, m_in, flow))
        model_s = time.perf_counter() - t_model
        # end to end: preprocessing + model + the flow on the fixed scan's native grid (the output `predict` writes;
        # ANTs' figure is its registration call, which returns the transforms). `score` warps the moving labels
        # to these positions after the clock stops, as it does for every method returning coordinates.
        field = pull_back(pair["fixed_geom"], pair["moving_geom"], flow[0])["vox"]
        seconds = time.perf_counter() - t
        return {"coords": _grid(fixed.image.shape) + field, "seconds": seconds, "model_seconds": model_s}


class Ants(Method):
    """ANTs registration through antspyx; the moving labels are resampled with ``genericLabel``."""

    def __init__(self, name: str, transform: str = "SyN", threads: int = 2, seed: int = 0,
                 sampling_rate: float = 0.2):
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"method {name}: the affine metric's sampling rate must be in (0, 1], got {sampling_rate}")
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
        try:
            import ants  # noqa: F401
        except ImportError:
            raise ValueError(f"method {name}: antspyx is not installed (pip install '.[peers]')") from None
        self.name = name
        self.transform = transform
        self.seed = seed
        self.sampling_rate = sampling_rate
        self.parameters = None

    @staticmethod
    def _to_ants(img, dtype=np.float32):
        """nibabel image -> ANTsImage with the same voxel grid and physical placement."""
        import ants
        import nibabel as nib

        return ants.from_nibabel_nifti(nib.Nifti1Image(np.asarray(img.dataobj, dtype), img.affine))

    def register(self, fixed, moving):
        import ants

        f = self._to_ants(fixed.image)
        m = self._to_ants(moving.image)
        # ANTs samples the affine metric at random points. Fix its seed (antspyx passes config._random_seed as
        # --random-seed; its public set_ants_deterministic() would also force one thread and distort the timing);
        # with several threads runs can still differ, and sparse sampling of a tiny volume can diverge
        # (``ants:<transform>:1.0`` samples every voxel).
        ants.config._random_seed = self.seed
        t = time.perf_counter()
        reg = ants.registration(fixed=f, moving=m, type_of_transform=self.transform,
                                aff_random_sampling_rate=self.sampling_rate)
        seconds = time.perf_counter() - t
        lab = self._to_ants(moving.labels)
        warped = ants.apply_transforms(fixed=f, moving=lab, transformlist=reg["fwdtransforms"],
                                       interpolator="genericLabel")
        out = {"labels": np.rint(warped.numpy()).astype(np.int32), "seconds": seconds, "model_seconds": seconds}
        # folding: the composite displacement field (fixed -> moving, physical mm) on the fixed grid
        comp = ants.apply_transforms(fixed=f, moving=m, transformlist=reg["fwdtransforms"],
                                     compose=str(Path(reg["fwdtransforms"][0]).with_suffix("")) + "_comp")
        field = ants.image_read(comp).numpy()  # [X, Y, Z, 3] in mm (LPS)
        spacing = np.asarray(f.spacing, np.float64)
        direction = np.asarray(f.direction, np.float64)
        # displacement in fixed voxel units along each voxel axis: D^-1 d / spacing
        vox = (field @ np.linalg.inv(direction).T) / spacing
        out["jac_field"] = vox.astype(np.float32)
        for p in reg["fwdtransforms"] + reg["invtransforms"] + [comp]:
            if os.path.exists(p):
                os.unlink(p)
        return out


class Elastix(Method):
    """elastix (itk-elastix) with its default parameter maps, run by `ldr_tf.elastix` in a separate process (it crashed
    inside the TensorFlow process); the moving labels are warped with nearest-neighbour interpolation."""

    def __init__(self, name: str, maps=("affine", "bspline"), threads: int = 2, seed: int = 0,
                 timeout: float = 1800.0):
        import importlib.util

        from ldr_tf.elastix import check_maps

        if importlib.util.find_spec("itk") is None:
            raise ValueError(f"method {name}: itk-elastix is not installed (pip install '.[peers]')")
        try:
            maps = check_maps(maps)
        except ValueError as e:
            raise ValueError(f"method {name}: expected elastix[:<maps>]; {e}") from None
        self.name, self.maps, self.threads, self.seed, self.timeout = name, maps, threads, seed, timeout
        self.parameters = None

    def register(self, fixed, moving):
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ldr-elastix-") as tmp:
            cmd = [sys.executable, "-m", "ldr_tf.elastix", f"--fixed={fixed.paths['image']}",
                   f"--moving={moving.paths['image']}", f"--moving_labels={moving.paths['labels']}",
                   f"--out_dir={tmp}", f"--maps={','.join(self.maps)}", f"--threads={self.threads}",
                   f"--seed={self.seed}"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise ValueError(f"method {self.name}: elastix ran over {self.timeout:g} s on {moving.key}") from None
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                raise ValueError(f"method {self.name}: elastix failed on {fixed.key} <- {moving.key} (exit "
                                 f"{proc.returncode}): {lines[-1] if lines else 'no message'}")
            res = json.loads((Path(tmp) / "result.json").read_text())
            labels = np.load(Path(tmp) / "labels.npy")
            field = np.load(Path(tmp) / "field_vox.npy")
        if labels.shape != fixed.image.shape[:3]:
            raise ValueError(f"method {self.name}: elastix returned labels of shape {labels.shape}, expected the "
                             f"fixed grid {fixed.image.shape[:3]}")
        return {"labels": labels, "jac_field": field, "seconds": res["seconds"], "model_seconds": res["seconds"]}


def parse_method(item: str, preprocessing, threads: int) -> Method:
    name, _, spec = item.partition("=")
    if not spec:
        name, spec = (item, item) if item == "identity" else (Path(item.split(":")[0]).name, item)
    if spec == "identity":
        return Identity(name)
    if spec.startswith("ants:"):
        transform, _, rate = spec.split(":", 1)[1].partition(":")
        try:
            kw = {"sampling_rate": float(rate)} if rate else {}
        except ValueError:
            raise ValueError(f"method {name}: expected ants:<transform>[:<sampling rate>], got {spec}") from None
        return Ants(name, transform or "SyN", threads, **kw)
    if spec == "elastix" or spec.startswith("elastix:"):
        maps = spec.partition(":")[2]
        return Elastix(name, tuple(maps.split(",")) if maps else ("affine", "bspline"), threads)
    if preprocessing is None:
        raise ValueError(f"method {name}: the dataset has no NIfTI preprocessing spec to repeat (was it made by the "
                         "import tools?)")
    return Learned(name, spec, preprocessing)


# ------------------------------------------------------------------------------------------- scoring


def score(method: Method, fixed: Scan, moving: Scan) -> dict:
    from ldr_tf.ops import metrics
    from ldr_tf.deploy.native import sample_native

    res = method.register(fixed, moving)
    if "labels" in res:
        warped = res["labels"]
        field = res["jac_field"]
    else:
        warped = sample_native(np.asarray(moving.labels.dataobj), res["coords"], labels=True)
        field = res["coords"] - _grid(fixed.image.shape)
    ov = metrics.label_overlap(np.asarray(fixed.labels.dataobj), warped)
    jac = metrics.jacobian_stats(field)
    return {"dice": ov["dice"], "jaccard": ov["jaccard"], "labels": ov["labels"], "folding_pct": jac["folding_pct"],
            "jac_std": jac["jac_std"], "seconds": res["seconds"], "model_seconds": res["model_seconds"],
            # each label's Dice (JSON keys are strings): what `structure_summary` reads
            "label_dice": {str(k): v[0] for k, v in ov["per_label"].items()}}


def _stat(values):
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], np.float64)
    if not v.size:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()), "n": int(v.size)}


def compare(methods, desc, subset: str, max_pairs: int = 0, progress: bool = True, paired: bool = False) -> dict:
    from ldr_tf.data.pairs import pairs_for
    from ldr_tf.progress import Progress

    pairs = pairs_for(desc, subset, paired)
    if max_pairs:
        pairs = pairs[:max_pairs]
    rows = {m.name: [] for m in methods}
    bar = Progress(len(pairs) * len(methods), label="compare", unit="registration", enabled=progress)
    scans = {}
    done = 0
    for fixed_key, moving_key in pairs:
        for key in (fixed_key, moving_key):
            if key not in scans:
                scans[key] = Scan(key, source_paths(desc, key))
        fixed, moving = scans[fixed_key], scans[moving_key]
        if fixed.labels is None or moving.labels is None:
            raise ValueError(f"pair {fixed_key} -> {moving_key}: both scans need a label map")
        for m in methods:
            r = score(m, fixed, moving)
            rows[m.name].append({"fixed": fixed_key, "moving": moving_key, **r})
            done += 1
            bar.update(done, [(m.name, r["dice"])])
        if not paired and moving_key != fixed_key:
            scans.pop(moving_key)  # keep memory flat (in atlas mode the fixed atlas stays loaded)
        if paired and len(scans) > 2:
            for key in [k for k in scans if k not in (fixed_key, moving_key)]:
                scans.pop(key)
    summary = []
    for m in methods:
        r = rows[m.name]
        summary.append({"name": m.name, "parameters": m.parameters, "pairs": len(r),
                        **{k: _stat([x[k] for x in r]) for k in
                           ("dice", "jaccard", "folding_pct", "jac_std", "seconds", "model_seconds")}})
    return {"pairs": rows, "summary": summary}


def paired_differences(rows: dict, baseline: str) -> list:
    """Each method's Dice minus `baseline`'s on the same pairs (`ldr_tf.ablation.paired_difference`).

    The unit is a pair's two subjects, unordered (a->b and b->a share scans: not independent); the 95 % interval is
    Student's t over the units (None with fewer than 2). One dict per other method: ``name, baseline, mean, low,
    high, units, pairs, better`` (pairs where it scored higher).
    """
    from ldr_tf.ablation import arm_pair_dice, paired_difference

    if baseline not in rows:
        raise ValueError(f"--baseline {baseline!r}: no such method (have: {', '.join(rows)})")
    base = arm_pair_dice(rows, [baseline])
    out = []
    for name, r in rows.items():
        if name == baseline or not r:
            continue
        arm = arm_pair_dice(rows, [name])
        units = {frozenset(k) for k in arm}
        if len(units) >= 2:
            d = paired_difference(arm, base)
        else:
            diffs = [arm[k] - base[k] for k in arm]
            d = {"mean": float(np.mean(diffs)), "low": None, "high": None, "units": len(units), "pairs": len(arm),
                 "better": int(sum(x > 0 for x in diffs))}
        out.append({"name": name, "baseline": baseline, **d})
    return out


def difference_lines(diffs: list) -> list:
    lines = []
    for d in diffs:
        ci = "" if d["low"] is None else f" (95 % CI {d['low']:+.3f}..{d['high']:+.3f}"
        ci += f" over {d['units']} subject pairs)" if ci else ""
        lines.append(f"{d['name']} - {d['baseline']}: {d['mean']:+.3f} Dice{ci}, higher on {d['better']} of "
                     f"{d['pairs']} pairs")
    return lines


def table(summary) -> str:
    head = ("| method | Dice mean ± std | Dice median | Jaccard | % folding | s / pair (end to end) | s (model) |"
            " parameters |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    f = lambda s, k="mean", d=3: "n/a" if s[k] is None else f"{s[k]:.{d}f}"  # noqa: E731
    for s in summary:
        p = f"{s['parameters']:,}" if s["parameters"] is not None else "-"
        lines.append(f"| {s['name']} | {f(s['dice'])} ± {f(s['dice'], 'std')} | {f(s['dice'], 'median')} | "
                     f"{f(s['jaccard'])} | {f(s['folding_pct'], d=3)} | {f(s['seconds'], d=2)} | "
                     f"{f(s['model_seconds'], d=3)} | {p} |")
    return "\n".join(lines)


def parse_structures(values) -> list:
    """``--structures`` (label values as strings) -> sorted unique ints; ValueError naming a bad entry."""
    for v in values:
        if not str(v).strip().isdecimal() or int(v) <= 0:
            raise ValueError(f"--structures: expected label values (integers > 0), got {v!r}")
    return sorted({int(v) for v in values})


def structure_summary(rows: dict, labels) -> dict:
    """``{method: {label: stat}}``: each label's Dice over the pairs whose fixed map holds it (`_stat`: mean,
    median, std, n)."""
    return {name: {str(v): _stat([x["label_dice"].get(str(v)) for x in r]) for v in labels}
            for name, r in rows.items()}


def structure_table(structures: dict) -> str:
    """Markdown table of `structure_summary`: a row per method, a column per label (mean Dice, n/a if absent)."""
    labels = list(next(iter(structures.values())))
    head = "| method | " + " | ".join(f"label {v}" for v in labels) + " |\n|---|" + "---|" * len(labels)
    lines = [head]
    for name, stats in structures.items():
        cells = ["n/a" if stats[v]["mean"] is None else f"{stats[v]['mean']:.3f}" for v in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(method_specs, desc, subset: str, out, max_pairs: int = 0, threads: int = 2, paired: bool = False,
        baseline: str | None = None, structures=()) -> dict:
    """Compares `method_specs` (``name=spec`` strings) on `desc`'s `subset`; writes <out>.txt/.json/.png.

    With two methods or more, each one's Dice is also compared pair by pair with `baseline` (default: the first).
    `structures`: label values whose Dice is tabulated per method (`structure_table`).
    """
    structures = parse_structures(structures)
    from ldr_tf.data.preprocess import Preprocessing

    pp = desc.extra.get("preprocessing")
    preprocessing = Preprocessing.from_dict(pp) if isinstance(pp, dict) and "grid_size" in pp else None
    methods = [parse_method(m, preprocessing, threads) for m in method_specs]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must differ: {names}")
    if baseline is not None and baseline not in names:
        raise ValueError(f"--baseline {baseline!r}: no such method (have: {', '.join(names)})")
    t0 = time.perf_counter()
    res = compare(methods, desc, subset, max_pairs, paired=paired)
    res["differences"] = paired_differences(res["pairs"], baseline or names[0])
    out = Path(out)
    text = table(res["summary"])
    if structures:
        res["structures"] = structure_summary(res["pairs"], structures)
        text += "\n\nDice per structure (mean over the pairs whose fixed map holds it):\n" + structure_table(
            res["structures"])
    if res["differences"]:
        text += "\n\nPaired differences:\n" + "\n".join(difference_lines(res["differences"]))
    header = (f"dataset {desc.path}, subset {subset}, {res['summary'][0]['pairs']} pairs, scored on the fixed "
              f"scan's native grid; {threads} threads; {time.perf_counter() - t0:.0f} s wall")
    write_text(Path(str(out) + ".txt"), header + "\n\n" + text + "\n")
    write_json({"dataset": str(desc.path), "subset": subset, "paired": paired, "threads": threads,
                      "methods": list(method_specs),
                      **res}, Path(str(out) + ".json"))
    from ldr_tf import figures

    figures.dice_vs_speed([{"name": s["name"], "dice": s["dice"]["mean"], "dice_std": s["dice"]["std"],
                            "seconds": s["seconds"]["mean"]} for s in res["summary"]],
                          Path(str(out) + ".png"), title=f"{Path(desc.path).stem} / {subset}: Dice on the "
                                                         "native grid vs seconds per pair")
    print(header)
    print(text)
    print(f"wrote {out}.txt, {out}.json, {out}.png")
    return res


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.method or not FLAGS.out:
        raise cli.UsageError("give at least one --method and --out")
    threads = FLAGS.threads or 2
    FLAGS.threads = threads
    common_flags.apply_runtime_flags(FLAGS)
    from ldr_tf.data import dataset

    desc = dataset.load_descriptor(dataset.resolve_dataset(FLAGS.dataset, FLAGS.data_dir))
    run(FLAGS.method, desc, FLAGS.subset, FLAGS.out, FLAGS.max_pairs, threads, FLAGS.paired, FLAGS.baseline,
        FLAGS.structures)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.compare")
