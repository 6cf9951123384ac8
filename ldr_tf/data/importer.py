"""NIfTI folders -> an ldr-tf dataset (one HDF5 file + its JSON descriptor).

    python -m tools.import_nifti --images='/data/img/{id}.nii.gz' --labels='/data/seg/{id}_seg.nii.gz' \\
        --landmarks='/data/lm/{id}.csv' --recipe=liver --output=/data/out/liver.json

Every image is loaded and checked (`ldr_tf.data.nifti.load`), preprocessed with one `ldr_tf.data.preprocess.Preprocessing`
(the recipe plus any preprocessing flag), and written as an HDF5 group ``/<id>`` with ``volume`` (uint8),
``segmentation`` (labels, if any), ``point`` (landmarks, if any) and attributes ``spacing``, ``affine`` (grid
voxel -> world mm), ``grid_to_source``, ``grid_shape``, ``source_file``, ``source_shape``, ``source_affine``,
``label_file``, ``landmark_file``. The descriptor gets subsets ``train``/``val``/``test`` (schemes ``"1"``, ``"2"``,
``"test"``), the atlas if any, and the spec under ``preprocessing`` so new scans can be preprocessed identically.

Landmark CSV: one row per landmark, ``x,y,z``: 0-based voxel indices ``i,j,k`` of the source NIfTI array as
nibabel loads it (``--landmark_units=mm`` for world RAS+ millimetres instead). Sub-voxel values are fine. A
missing landmark is a row ``-1,-1,-1`` or an empty row ``,,``; it stays -1 on the grid. Lines starting with
``#`` and a first line that is not numeric (a header) are ignored. All files must list the same number of rows.

Outputs are written atomically. On any bad subject the tool prints one line naming the file and exits with 1,
leaving no output; ``--skip_bad`` reports and skips such subjects instead.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from absl import flags

from flags import import_flags
from ldr_tf import cli
from ldr_tf.cli import UsageError
from ldr_tf.data import dataset, nifti
from ldr_tf.data import preprocess as pp

__all__ = ["Subject", "find_subjects", "read_landmarks", "read_label_names", "make_split", "convert",
           "spec_from_flags", "parse_grid", "parse_ints", "run_tool", "run", "main"]




@dataclass
class Subject:
    """One scan to import.

    Attributes:
      id: subject id (the HDF5 key).
      image, labels: paths, or in-memory nibabel images already checked with `ldr_tf.data.nifti.load` (e.g. a slab cut
        out of a larger scan); then `source_file` names the file they came from.
      landmarks: landmark CSV path or None.
      crop_mask: path or in-memory image on the image's grid, used only to crop/mask (not stored).
      source_file: the path recorded as ``source_file`` (default: the image path).
      note: free text stored in the ``source_note`` attribute (e.g. which slices were used).
    """

    id: str
    image: Path
    labels: Path | None = None
    landmarks: Path | None = None
    crop_mask: Path | None = None
    source_file: str | None = None
    note: str = ""


# ------------------------------------------------------------------------------------------ discovery


def _glob_to_regex(pattern: str) -> str:
    out = []
    for ch in pattern:
        out.append("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch))
    return "".join(out)


def _strip_nifti(name: str) -> str:
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def _expand(pattern: str, sid: str, what: str) -> Path | None:
    """The one file `pattern` names for subject `sid` (None if none); two or more matches are an error."""
    path = pattern.replace("{id}", sid)
    if any(c in path for c in "*?["):
        hits = sorted(glob.glob(path))
        if len(hits) > 1:
            raise ValueError(f"--{what}: pattern {path} matches {len(hits)} files for subject {sid}, expected one")
        return Path(hits[0]) if hits else None
    return Path(path) if os.path.exists(path) else None


def find_subjects(images: str, labels: str | None = None, landmarks: str | None = None) -> list[Subject]:
    """Subjects matched by file-name patterns, sorted by id.

    Args:
      images: glob with one ``{id}`` placeholder, or a plain glob (id = file name without ``.nii``/``.nii.gz``).
      labels: pattern with ``{id}`` naming each subject's label map; every subject must have one.
      landmarks: pattern with ``{id}`` naming landmark CSVs; subjects without one get no landmarks.

    Raises:
      ValueError: no image, a missing label map, a pattern without ``{id}``, or two images with the same id.
    """
    if not images:
        raise UsageError("--images: required (a glob such as '/data/img/{id}.nii.gz')")
    if images.count("{id}") > 1:
        raise UsageError(f"--images: expected at most one '{{id}}' placeholder, got {images}")
    for name, pat in (("labels", labels), ("landmarks", landmarks)):
        if pat and "{id}" not in pat:
            raise UsageError(f"--{name}: the pattern must contain '{{id}}' to match images, got {pat}")
    files = sorted(glob.glob(images.replace("{id}", "*")))
    if "{id}" in images:
        head, tail = images.split("{id}")
        rx = re.compile("^" + _glob_to_regex(head) + "(?P<id>[^/]+?)" + _glob_to_regex(tail) + "$")
    subjects, seen = [], {}
    for f in files:
        if os.path.isdir(f):
            continue
        if "{id}" in images:
            m = rx.match(f)
            if not m:
                continue
            sid = m.group("id")
        else:
            sid = _strip_nifti(os.path.basename(f))
        if sid in seen:
            raise ValueError(f"--images: subject id '{sid}' matches two files: {seen[sid]} and {f}")
        seen[sid] = f
        lab = None
        if labels:
            lab = _expand(labels, sid, "labels")
            if lab is None:
                raise ValueError(f"{f}: no label map for subject '{sid}' (expected {labels.replace('{id}', sid)})")
        lm = _expand(landmarks, sid, "landmarks") if landmarks else None
        subjects.append(Subject(sid, Path(f), lab, lm))
    if not subjects:
        raise ValueError(f"--images: no file matches {images}")
    return sorted(subjects, key=lambda s: s.id)


def read_landmarks(path, image=None, units: str = "voxel") -> np.ndarray:
    """Reads a landmark CSV (format in the module docstring) into ``[P, 3]`` source voxel coordinates.

    Args:
      path: CSV file.
      image: nibabel image, needed for ``units="mm"`` (its affine maps voxels to world mm).
      units: ``"voxel"`` or ``"mm"`` (world RAS+).

    Returns:
      float64 ``[P, 3]``; missing landmarks are ``-1`` rows.
    """
    path = Path(path)
    rows = []
    try:
        with open(path, newline="") as fh:
            lines = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read landmark CSV ({e})") from None
    for n, row in enumerate(lines, 1):
        cells = [c.strip() for c in row]
        if not cells or (len(cells) == 1 and not cells[0]) or cells[0].startswith("#"):
            continue
        if len(cells) != 3:
            raise ValueError(f"{path}: line {n}: expected 3 values x,y,z, got {len(cells)}")
        if all(c == "" for c in cells):
            rows.append([-1.0, -1.0, -1.0])
            continue
        try:
            vals = [float(c) for c in cells]
        except ValueError:
            if not rows and n == 1:  # a header line
                continue
            raise ValueError(f"{path}: line {n}: expected numbers x,y,z, got {','.join(cells)}") from None
        if not all(np.isfinite(vals)):
            vals = [-1.0, -1.0, -1.0]
        rows.append(vals)
    if not rows:
        raise ValueError(f"{path}: no landmark rows")
    pts = np.asarray(rows, np.float64)
    missing = np.all(pts == -1, axis=1)
    if units == "mm":
        if image is None:
            raise ValueError("image: needed to convert landmarks in mm to voxels")
        inv = np.linalg.inv(np.asarray(image.affine, np.float64))
        pts = pts @ inv[:3, :3].T + inv[:3, 3]
        pts[missing] = -1
    elif units != "voxel":
        raise ValueError(f"units: expected 'voxel' or 'mm', got {units!r}")
    if image is not None:
        shape = np.asarray(image.shape[:3], np.float64)
        bad = ~missing & np.any((pts < -0.5) | (pts > shape - 0.5), axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{path}: landmark {i + 1} at {pts[i].round(2).tolist()} (voxels) lies outside the "
                             f"image of shape {tuple(image.shape[:3])}")
    return pts


def read_label_names(path) -> dict:
    """``{label value: name}`` from a CSV with columns ``Index`` and ``Name`` (else: first and last column)."""
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read label names ({e})") from None
    if not rows:
        raise ValueError(f"{path}: empty label-name CSV")
    head = [c.strip().lower() for c in rows[0]]
    vi, ni = (head.index("index"), head.index("name")) if {"index", "name"} <= set(head) else (0, -1)
    names = {}
    for n, r in enumerate(rows[1:] if "index" in head or "name" in head else rows, 1):
        try:
            names[int(r[vi])] = r[ni].strip()
        except (ValueError, IndexError):
            raise ValueError(f"{path}: row {n}: expected a label value and a name, got {r}") from None
    return names


def make_split(ids: list, val_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 0,
               counts: tuple | None = None) -> dict:
    """Seeded split of subject ids into ``{"train": [...], "val": [...], "test": [...]}`` (each sorted).

    The ids are sorted, permuted with ``numpy.random.default_rng(seed)``, and cut into test, val, train (in that
    order) using `counts` ``(train, val, test)`` if given, else rounded fractions.
    """
    ids = sorted(ids)
    n = len(ids)
    if counts is not None:
        n_train, n_val, n_test = (int(c) for c in counts)
        if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test != n:
            raise ValueError(f"split: counts {tuple(counts)} must be >= 0 and add up to the {n} subjects")
    else:
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"split: val_fraction {val_fraction} + test_fraction {test_fraction} must lie in [0, 1)")
        n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    perm = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test), "_order": perm}


# ---------------------------------------------------------------------------------------- conversion


def _check_output(json_path: Path, h5_path: Path, overwrite: bool) -> None:
    for p in (json_path, h5_path):
        if p.exists() and not overwrite:
            raise ValueError(f"{p}: exists already (use --overwrite to replace it)")
        if p.exists() and p.is_dir():
            raise ValueError(f"{p}: is a directory")
    for d in {json_path.parent, h5_path.parent}:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".ldr_tf_write_test.", dir=d)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise ValueError(f"{d}: output folder is not writable ({e.strerror or e})") from None


def _convert_one(spec, subj: Subject, landmark_units: str, n_points: int | None):
    img = subj.image if _in_memory(subj.image) else nifti.load(subj.image, "image")
    lab = subj.labels
    if lab is not None and not _in_memory(lab):
        lab = nifti.load(lab, "labels", like=img)
    mask = subj.crop_mask
    if isinstance(mask, (str, os.PathLike)):
        mask = nifti.load(mask, "labels", like=img)
    pts = read_landmarks(subj.landmarks, img, landmark_units) if subj.landmarks else None
    if pts is not None and n_points is not None and len(pts) != n_points:
        raise ValueError(f"{subj.landmarks}: {len(pts)} landmarks, but other subjects have {n_points}")
    try:
        vol, seg, gpts, geom = pp.apply(spec, img, lab, pts, crop_mask=mask)
    except nifti.NiftiError:
        raise
    except ValueError as e:
        raise ValueError(f"{subj.image}: {e}") from None
    attrs = geom.to_attrs()
    attrs.update(
        subject=subj.id,
        source_file=subj.source_file or _where(subj.image),
        label_file=_where(subj.labels) if subj.labels is not None else "",
        landmark_file=str(Path(subj.landmarks).resolve()) if subj.landmarks else "",
        source_orientation=nifti.axcodes(img.affine),
        source_note=subj.note,
    )
    source_labels = [] if lab is None else \
        sorted(int(v) for v in pp.remap_labels(np.unique(lab.dataobj), spec) if v != 0)
    return vol, seg, gpts, attrs, source_labels


def _in_memory(x) -> bool:
    return hasattr(x, "affine") and hasattr(x, "dataobj")


def _where(x) -> str:
    if _in_memory(x):
        name = x.get_filename()
        return str(Path(name).resolve()) if name else ""
    return str(Path(x).resolve())


def _progbar(n, enabled):
    if not enabled:
        return None
    from ldr_tf.progress import Progress  # noqa: PLC0415

    return Progress(n, label="import", unit="subject")


def convert(subjects: list, spec: pp.Preprocessing, output, *, split: dict, h5_path=None, atlas: str | None = None,
            atlas_subject: Subject | None = None, image_type: str = "generic", class_names: dict | None = None,
            landmark_units: str = "voxel", skip_bad: bool = False, overwrite: bool = False,
            progress: bool = True, extra: dict | None = None, log=None) -> dict:
    """Converts `subjects` into ``output`` (JSON) + HDF5; returns a summary dict.

    Args:
      subjects: the `Subject` list (ids must be unique).
      spec: preprocessing applied to every subject (and the atlas).
      output: descriptor path (``.json``).
      split: ``{subset: [ids]}``; empty subsets are dropped; scheme "1" = train, "2" = val, "test" = test.
      h5_path: HDF5 path (default: `output` with ``.h5``).
      atlas: id of the subject used as atlas (taken out of every subset), or None.
      atlas_subject: a separate scan used as atlas, stored under key ``"atlas"`` (exclusive with `atlas`).
      image_type: descriptor ``image_type``.
      class_names: ``{label: name}`` for ``segmentation_class_value`` (default: the label value as name).
      landmark_units: see `read_landmarks`.
      skip_bad: report and skip failing subjects instead of raising.
      extra: more descriptor keys.
      log: callable for messages (default: print to stderr).

    Raises:
      ValueError: one line naming the file, for the first bad subject (unless `skip_bad`) or bad output; nothing
        is written then.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    output = Path(output)
    if output.suffix != ".json":
        raise UsageError(f"--output: expected a .json path, got {output}")
    h5_path = Path(h5_path) if h5_path else output.with_suffix(".h5")
    if atlas and atlas_subject:
        raise UsageError("atlas: give a subject id or a separate scan, not both")
    ids = [s.id for s in subjects]
    if len(set(ids)) != len(ids):
        raise ValueError("subjects: duplicate ids")
    if atlas_subject is not None and "atlas" in ids:
        raise ValueError("--atlas: a subject is already called 'atlas'; the separate atlas scan needs that key")
    if atlas and atlas not in ids:
        raise ValueError(f"--atlas: subject '{atlas}' not found among the {len(ids)} subjects")
    known = set(ids)
    for name, members in split.items():
        unknown = [m for m in members if m not in known]
        if unknown:
            raise ValueError(f"split: subset '{name}' names unknown subjects {unknown[:5]}")
    _check_output(output, h5_path, overwrite)

    todo = list(subjects) + ([dataclasses.replace(atlas_subject, id="atlas")] if atlas_subject else [])
    t0 = time.time()
    bar = _progbar(len(todo), progress)
    done, skipped, labels_seen = [], [], set()
    n_points, n_labelled = None, 0
    writer = dataset.H5Writer(h5_path)
    try:
        for i, subj in enumerate(todo):
            try:
                vol, seg, pts, attrs, source_labels = _convert_one(spec, subj, landmark_units, n_points)
            except (ValueError, OSError) as e:
                msg = " ".join(str(e).split())
                is_atlas = subj.id == atlas or (atlas_subject is not None and i == len(todo) - 1)
                if not skip_bad or is_atlas:
                    raise ValueError(msg) from None
                skipped.append({"id": subj.id, "error": msg})
                log(f"\nskipped {subj.id}: {msg}")
                continue
            finally:
                if bar is not None:
                    bar.update(i + 1)
            if pts is not None:
                n_points = len(pts)
            if seg is not None:
                n_labelled += 1
                labels_seen.update(source_labels)  # labels of the source maps: tiny ones may vanish on the grid
            writer.add(subj.id, vol, seg, pts, attrs)
            done.append(subj.id)
        if not done or done == ["atlas"]:
            raise ValueError(f"{output}: no subject could be converted")
        ok = set(done)
        subsets = {}
        for name, members in split.items():
            kept = [m for m in members if m in ok and m != atlas]
            if kept and not name.startswith("_"):
                subsets[name] = kept
        if not subsets:
            raise ValueError(f"{output}: every subset is empty after removing the atlas and skipped subjects")
        writer.close()
    except BaseException:
        writer.abort()
        raise

    schemes = {}
    for key, name in (("1", "train"), ("2", "val"), ("test", "test")):
        if name in subsets:
            schemes[key] = {name: 1.0}
    for name in subsets:
        if name not in ("train", "val", "test"):
            schemes[name] = {name: 1.0}
    class_names = class_names or {}
    scv = {class_names.get(v, str(v)): v for v in sorted(labels_seen)} if labels_seen else None
    desc_extra = {
        "preprocessing": spec.to_dict(),
        "import": {
            "subjects": len(done) - (1 if atlas_subject else 0),
            "skipped": skipped,
            "labelled": n_labelled,
            "landmarks": n_points or 0,
            "landmark_units": "grid voxels (D, H, W), -1 = missing",
            "seconds": round(time.time() - t0, 1),
        },
    }
    desc_extra.update(extra or {})
    desc = dataset.Descriptor(
        path=output, files={"/": h5_path.resolve()}, image_size=spec.grid_size, image_type=image_type,
        subsets=subsets, schemes=schemes, atlas=("atlas" if atlas_subject else atlas),
        segmentation_class_value=scv, extra=desc_extra,
    )
    try:
        dataset.write_descriptor(desc)
    except BaseException:
        h5_path.unlink(missing_ok=True)
        raise
    return {"json": str(output), "h5": str(h5_path), "subjects": done, "skipped": skipped,
            "seconds": time.time() - t0, "bytes": h5_path.stat().st_size + output.stat().st_size}


# --------------------------------------------------------------------------------------------- flags


def parse_ints(values, name):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UsageError(f"--{name}: expected integers, got {','.join(values)}") from None


def parse_grid(values, name="grid_size"):
    g = parse_ints(values, name)
    if len(g) == 1:
        g = g * 3
    if len(g) != 3 or min(g) < 1:
        raise UsageError(f"--{name}: expected one or three positive integers, got {','.join(values)}")
    return tuple(g)


def spec_from_flags(fv: flags.FlagValues) -> pp.Preprocessing:
    """The recipe's `Preprocessing` with every preprocessing flag that was given applied on top."""
    over = {}
    if fv.grid_size is not None:
        over["grid_size"] = parse_grid(fv.grid_size)
    for name in ("orientation", "resample", "crop", "crop_margin_fraction", "crop_margin_voxels", "intensity",
                 "window", "level", "label_order", "mask_dilation_mm", "spacing_mm"):
        if getattr(fv, name) is not None:
            over[name] = getattr(fv, name)
    if fv.crop_labels is not None:
        over["crop_labels"] = tuple(parse_ints(fv.crop_labels, "crop_labels"))
    if fv.percentiles is not None:
        try:
            over["percentiles"] = tuple(float(v) for v in fv.percentiles)
        except ValueError:
            raise UsageError(f"--percentiles: expected two numbers, got {fv.percentiles}") from None
    if fv.label_map is not None:
        lm = {}
        for item in filter(None, (x.strip() for x in fv.label_map.split(","))):
            try:
                a, b = item.split(":")
                lm[int(a)] = int(b)
            except ValueError:
                raise UsageError(f"--label_map: expected 'src:dst,...' integers, got {fv.label_map!r}") from None
        over["label_map"] = lm
    if fv.label_default is not None:
        if fv.label_default == "keep":
            over["label_default"] = None
        else:
            try:
                over["label_default"] = int(fv.label_default)
            except ValueError:
                raise UsageError(f"--label_default: expected 'keep' or an integer, got {fv.label_default!r}") \
                    from None
    try:
        return pp.recipe(fv.recipe, **over)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def _load_split_file(path) -> dict:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable split JSON ({e})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise ValueError(f"{path}: expected {{subset: [subject ids]}}")
    return {str(k): [str(x) for x in v] for k, v in raw.items()}


def main(fv: flags.FlagValues, argv_for_record=None) -> dict:
    """Runs the import with parsed flags; returns `convert`'s summary."""
    if not fv.output:
        raise UsageError("--output: required (the dataset .json to write)")
    spec = spec_from_flags(fv)
    subjects = find_subjects(fv.images, fv.labels, fv.landmarks)
    ids = [s.id for s in subjects]
    atlas_id, atlas_subject = None, None
    if fv.atlas:
        if fv.atlas.endswith(nifti.NIFTI_SUFFIXES) or os.sep in fv.atlas:
            atlas_subject = Subject("atlas", Path(fv.atlas), Path(fv.atlas_labels) if fv.atlas_labels else None,
                                    None, Path(fv.atlas_mask) if fv.atlas_mask else None)
        else:
            atlas_id = fv.atlas
    elif fv.atlas_labels or fv.atlas_mask:
        raise UsageError("--atlas_labels/--atlas_mask: need --atlas=<NIfTI path>")
    if fv.split_file:
        split = _load_split_file(fv.split_file)
        listed = {m for v in split.values() for m in v}
        unlisted = [i for i in ids if i not in listed and i != atlas_id]
        if unlisted:
            print(f"import_nifti: note: {len(unlisted)} subjects are in no subset of {fv.split_file} (converted "
                  f"but not used): {unlisted[:5]}", file=sys.stderr)
    else:
        split = make_split([i for i in ids if i != atlas_id], fv.val_fraction, fv.test_fraction, fv.split_seed)
    class_names = read_label_names(fv.label_names) if fv.label_names else None
    image_type = fv.image_type or (fv.recipe if fv.recipe != "none" else "generic")
    return convert(
        subjects, spec, fv.output, split=split, h5_path=fv.h5, atlas=atlas_id, atlas_subject=atlas_subject,
        image_type=image_type, class_names=class_names, landmark_units=fv.landmark_units, skip_bad=fv.skip_bad,
        overwrite=fv.overwrite, progress=fv.progress,
        extra={"source": {"tool": "tools.import_nifti", "argv": list(argv_for_record or [])[1:]}},
    )


def run_tool(name: str, define, body, argv) -> int:
    """Runs an import command in-process (`ldr_tf.cli.run_argv`: one-line errors, exit 1 for bad input and 2 for a bad
    command line): ``body(fv, argv)`` returns `convert`'s summary, printed as one line."""

    def go(fv):
        summary = body(fv, argv)
        if isinstance(summary, dict) and "json" in summary:
            print(f"{name}: wrote {summary['json']} and {summary['h5']} ({len(summary['subjects'])} subjects, "
                  f"{len(summary['skipped'])} skipped, {summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s)")
        return 0

    return cli.run_argv(define, go, argv, name)


def run(argv) -> int:
    """Command-line entry: ``run(["import_nifti", "--images=...", ...])`` -> exit status (0 ok, 1 error, 2 usage)."""
    return run_tool("import_nifti", import_flags.define_import_nifti_flags, main, argv)

