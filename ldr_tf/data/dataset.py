"""Datasets in the RCN/LDR format: HDF5 subjects plus a JSON descriptor.

HDF5 layout (compatible with the original RCN/LDR files)
--------------------------------------------------------
Each subject is an HDF5 **group** (possibly nested, e.g. ``ixi/IXI002``) holding:

* ``volume``: ``[D, H, W]`` intensities on 0..255 (uint8 as written by our tools; any numeric dtype is read and
  divided by 255, exactly like the original code).
* ``segmentation`` (optional): ``[D, H, W]`` integer label map (liver: 0/255; brain: label ids).
* ``point`` (optional): ``[P, 3]`` landmark voxel coordinates on the stored grid; missing landmarks are -1.

Our import tools add group attributes so results can be mapped back to the original scan (all optional when
reading): ``affine`` (4x4 voxel-to-world of the stored grid, mm), ``spacing`` (mm per stored voxel),
``source_file``, ``source_shape``, ``source_affine`` (4x4 of the original NIfTI).

JSON descriptor
---------------
``files`` ``{prefix: {"type": "HDF5", "path": ...}}`` (prefix ``"/"`` is the default file; relative paths are
relative to the JSON), ``image_size`` ``[D, H, W]``, ``image_type`` (``"liver"``, ``"brain"``, ...),
``subsets`` ``{name: [keys]}``, ``schemes`` ``{"1": {subset: fraction}, "2": {...}, name: {...}}`` (``"1"`` =
training, ``"2"`` = validation), optional ``atlas`` (a key: every pair is atlas -> subject) and
``segmentation_class_value`` ``{name: value}``. A key ``"ixi/IXI002"`` is looked up in the file of prefix ``ixi``
if there is one, else in the default file, as ``/ixi/IXI002``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldr_tf.atomic import plain_mode, write_text

__all__ = [
    "DATA_DIR_ENV",
    "DatasetError",
    "default_data_dir",
    "resolve_dataset",
    "Descriptor",
    "load_descriptor",
    "write_descriptor",
    "H5Writer",
    "read_subject",
]

DATA_DIR_ENV = "LDR_TF_DATA_DIR"
BUILTIN = {
    "liver": "tools: python -m tools.import_nifti --recipe=liver (see README 'Data')",
    "brain": "python -m tools.import_ixi (the IXI recipe) or python -m tools.import_nifti --recipe=brain",
    "demo": "generated automatically on first use (ldr_tf.data.synthetic)",
    "demo-brain": "generated automatically on first use (ldr_tf.data.synthetic)",
}


class DatasetError(ValueError):
    """A dataset file or descriptor is missing, corrupt or inconsistent. The message names the file."""


def default_data_dir() -> Path:
    """``$LDR_TF_DATA_DIR`` if set, else ``~/.cache/ldr_tf/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ldr_tf" / "data"


def resolve_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Turns ``--dataset`` into a descriptor path.

    ``liver``/``brain``/``demo``/``demo-brain`` (or any bare name) mean ``<data_dir>/<name>.json``; anything ending in
    ``.json`` or containing a path separator is a path. Raises `DatasetError` saying where it looked and which
    tool builds the dataset. The synthetic ``demo`` datasets are built by `ldr_tf.data.synthetic.ensure_demo_dataset`,
    which callers invoke before this when they want on-demand generation.
    """
    if not name:
        raise DatasetError("--dataset is empty: give liver, brain, demo, demo-brain or a path to a .json")
    if name.endswith(".json") or os.sep in name or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise DatasetError(f"{path}: dataset descriptor not found")
        return path
    base = Path(data_dir).expanduser() if data_dir else default_data_dir()
    path = base / f"{name}.json"
    if not path.is_file():
        how = BUILTIN.get(name, "python -m tools.import_nifti (see README 'Data')")
        raise DatasetError(
            f"{path}: dataset '{name}' not found (looked in {base}; set --data_dir or ${DATA_DIR_ENV}); "
            f"build it with {how}"
        )
    return path


@dataclass
class Descriptor:
    """A parsed dataset JSON. `files` maps prefixes to absolute HDF5 paths."""

    path: Path
    files: dict
    image_size: tuple
    image_type: str
    subsets: dict
    schemes: dict
    atlas: str | None = None
    segmentation_class_value: dict | None = None
    extra: dict = field(default_factory=dict)

    def file_for(self, key: str) -> tuple[Path, str]:
        """(HDF5 path, group path inside it) for a subject key."""
        prefix = key.split("/", 1)[0] if "/" in key else None
        if prefix is not None and prefix in self.files:
            return self.files[prefix], "/" + key
        if "/" in self.files:
            return self.files["/"], "/" + key
        raise DatasetError(f"{self.path}: key '{key}' has no file (no prefix '{prefix}' and no default '/')")

    def to_json(self) -> dict:
        base = self.path.parent
        files = {}
        for k, p in self.files.items():
            p = Path(p)
            try:
                rel = os.path.relpath(p, base)
            except ValueError:
                rel = str(p)
            files[k] = {"type": "HDF5", "path": rel}
        out = {
            "files": files,
            "image_size": list(self.image_size),
            "image_type": self.image_type,
            "subsets": self.subsets,
            "schemes": self.schemes,
        }
        if self.atlas:
            out["atlas"] = self.atlas
        if self.segmentation_class_value:
            out["segmentation_class_value"] = self.segmentation_class_value
        out.update(self.extra)
        return out


def load_descriptor(path: str | os.PathLike, check_files: bool = True) -> Descriptor:
    """Reads and validates a dataset JSON; every problem is a one-line `DatasetError` naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: dataset descriptor not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not a readable JSON descriptor ({e})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    for key in ("files", "image_size", "subsets"):
        if key not in raw:
            raise DatasetError(f"{path}: missing required key '{key}'")
    files = {}
    for prefix, spec in raw["files"].items():
        p = spec.get("path") if isinstance(spec, dict) else spec
        if not p:
            raise DatasetError(f"{path}: files['{prefix}'] has no path")
        p = Path(p)
        if not p.is_absolute():
            p = (path.parent / p).resolve()
        if check_files and not p.is_file():
            raise DatasetError(f"{path}: names a missing HDF5 file {p} (prefix '{prefix}')")
        files[prefix] = p
    size = raw["image_size"]
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)):
        raise DatasetError(f"{path}: image_size must be three positive integers, got {size!r}")
    subsets = raw["subsets"]
    if not isinstance(subsets, dict) or not all(isinstance(v, list) for v in subsets.values()):
        raise DatasetError(f"{path}: subsets must map names to lists of keys")
    schemes = {str(k): v for k, v in raw.get("schemes", {}).items()}
    for name, scheme in schemes.items():
        for subset in scheme:
            if subset not in subsets:
                raise DatasetError(f"{path}: scheme '{name}' names unknown subset '{subset}'")
    known = {"files", "image_size", "image_type", "subsets", "schemes", "atlas", "segmentation_class_value"}
    return Descriptor(
        path=path,
        files=files,
        image_size=tuple(size),
        image_type=str(raw.get("image_type", "generic")),
        subsets=subsets,
        schemes=schemes,
        atlas=raw.get("atlas"),
        segmentation_class_value=raw.get("segmentation_class_value"),
        extra={k: v for k, v in raw.items() if k not in known},
    )


def _atomic_target(path: Path) -> Path:
    """A temporary file beside `path` with a plain file's mode (for writers that keep it open, like `H5Writer`)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    plain_mode(tmp)
    return Path(tmp)


def write_descriptor(desc: Descriptor) -> None:
    """Writes `desc` to ``desc.path`` atomically (temporary file, then rename)."""
    write_text(desc.path, json.dumps(desc.to_json(), indent=1) + "\n")


class H5Writer:
    """Writes subjects into a new HDF5 file atomically: nothing appears at `path` unless `close()` succeeds.

    Use as a context manager; an exception inside the block removes the temporary file and leaves any existing
    file at `path` untouched.
    """

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _atomic_target(self.path)
        self._h5 = h5py.File(self._tmp, "w")

    def add(self, key: str, volume, segmentation=None, points=None, attrs: dict | None = None) -> None:
        """Adds one subject. `volume` must be uint8 0..255 (or will be checked and cast), [D, H, W]."""
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise DatasetError(f"{self.path}: subject '{key}' volume must be 3-D, got shape {volume.shape}")
        if not np.all(np.isfinite(volume)):
            raise DatasetError(f"{self.path}: subject '{key}' volume contains NaN or infinite values")
        if volume.dtype != np.uint8:
            if volume.min() < 0 or volume.max() > 255:
                raise DatasetError(f"{self.path}: subject '{key}' volume must lie in 0..255")
            volume = np.round(volume).astype(np.uint8)
        grp = self._h5.require_group(key)
        grp.create_dataset("volume", data=volume, compression="gzip", compression_opts=4, chunks=True)
        if segmentation is not None:
            seg = np.asarray(segmentation)
            if seg.shape != volume.shape:
                raise DatasetError(
                    f"{self.path}: subject '{key}' segmentation shape {seg.shape} != volume shape {volume.shape}"
                )
            dtype = np.uint8 if seg.min() >= 0 and seg.max() <= 255 else np.int32
            grp.create_dataset("segmentation", data=seg.astype(dtype), compression="gzip", chunks=True)
        if points is not None:
            pts = np.asarray(points, np.float32)
            if pts.ndim != 2 or pts.shape[1] != 3:
                raise DatasetError(f"{self.path}: subject '{key}' points must be [P, 3], got {pts.shape}")
            grp.create_dataset("point", data=pts)
        for k, v in (attrs or {}).items():
            grp.attrs[k] = v

    def set_attrs(self, attrs: dict) -> None:
        """Sets file-level (root group) attributes, e.g. the parameters a generated file was made with."""
        for k, v in attrs.items():
            self._h5.attrs[k] = v

    def close(self) -> None:
        self._h5.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._h5.close()
        finally:
            if self._tmp.exists():
                self._tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def read_subject(h5, key: str, what=("volume", "segmentation", "point"), source: str = "") -> dict:
    """Reads one subject group from an open ``h5py.File``.

    Returns ``{"volume": float32 [D,H,W] in [0,1], "segmentation": int32 or None, "point": float32 [P,3] or None,
    "attrs": dict}``. Raises `DatasetError` naming `source` (the file) and the key on any problem.
    """
    where = f"{source or h5.filename}: subject '{key}'"
    try:
        grp = h5[key]
    except KeyError:
        raise DatasetError(f"{where} not found in the file") from None
    out = {"segmentation": None, "point": None, "attrs": dict(grp.attrs)}
    try:
        if "volume" in what:
            if "volume" not in grp:
                raise DatasetError(f"{where} has no 'volume' dataset")
            vol = np.asarray(grp["volume"][()], np.float32) / 255.0
            if vol.ndim != 3:
                raise DatasetError(f"{where}: volume must be 3-D, got shape {vol.shape}")
            if not np.all(np.isfinite(vol)):
                raise DatasetError(f"{where}: volume contains NaN or infinite values")
            out["volume"] = vol
        if "segmentation" in what and "segmentation" in grp:
            out["segmentation"] = np.asarray(grp["segmentation"][()]).astype(np.int32)
        if "point" in what and "point" in grp:
            out["point"] = np.asarray(grp["point"][()], np.float32).reshape(-1, 3)
    except DatasetError:
        raise
    except OSError as e:  # truncated / corrupt chunks surface as OSError in h5py
        raise DatasetError(f"{where}: unreadable data ({e})") from None
    return out


def open_dataset(name: str, data_dir, image_size):
    """Resolves --dataset (generating the synthetic demo data on first use) and loads its descriptor."""
    if name in ("demo", "demo-brain"):
        from ldr_tf.data import synthetic

        synthetic.ensure_demo_dataset(name, data_dir=data_dir, size=image_size or 64)
    return load_descriptor(resolve_dataset(name, data_dir))
