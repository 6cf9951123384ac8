"""NIfTI input/output with one-line errors that name the file.

`load` reads the whole data array at once (so a corrupt or truncated file fails here, not later in the middle of a
conversion) and checks what the rest of ldr-tf assumes about an image or a label map:

* the file exists and is NIfTI-1/NIfTI-2 (``.nii`` or ``.nii.gz``) with a finite, invertible affine, and all its
  data can be read (for ``.gz`` files the whole stream is inflated so the gzip CRC is verified);
* it is 3-D (a 4-D/5-D file whose extra dimensions are all 1 is accepted and squeezed);
* images: every value is finite (no NaN/inf);
* labels: every value is integer-valued and at least one voxel is non-zero;
* labels given ``like=image``: same shape and the same affine (within `atol` mm) as the image.

Every failure raises `NiftiError` (a `ldr_tf.data.dataset.DatasetError`, hence a `ValueError`) with a one-line message
``"<path>: <what is wrong>"``. `save` writes atomically (temporary file in the same folder, then `os.replace`);
``.nii.gz`` files are compressed on several cores (`gzip_bytes`).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from ldr_tf.atomic import atomic_path
from ldr_tf.data.dataset import DatasetError

__all__ = ["NiftiError", "load", "check_same_grid", "save", "gzip_bytes", "axcodes", "NIFTI_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class NiftiError(DatasetError):
    """A NIfTI file is missing, unreadable or not what was expected. The message names the file."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def axcodes(affine) -> str:
    """Orientation letters of the voxel axes of `affine`, e.g. ``"RAS"``, ``"PSR"`` (nibabel's closest axes)."""
    return "".join(nib.aff2axcodes(np.asarray(affine, np.float64)))


def _squeeze_to_3d(data: np.ndarray, path) -> np.ndarray:
    if data.ndim < 3:
        raise NiftiError(f"{path}: expected a 3-D volume, got {data.ndim}-D data of shape {data.shape}")
    if data.ndim > 3:
        extra = data.shape[3:]
        if any(s != 1 for s in extra):
            raise NiftiError(
                f"{path}: expected a 3-D volume, got {data.ndim}-D data of shape {data.shape} "
                f"(only trailing dimensions of size 1 are accepted; split the series first)"
            )
        data = data.reshape(data.shape[:3])
    if min(data.shape) < 1:
        raise NiftiError(f"{path}: empty volume of shape {data.shape}")
    return data


def _check_affine(affine, path) -> np.ndarray:
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise NiftiError(f"{path}: the voxel-to-world affine is not a finite 4x4 matrix")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NiftiError(f"{path}: the voxel-to-world affine is singular (zero voxel size?)")
    return affine


def source_name(img, default: str) -> str:
    """The file an image was loaded from (`load` records it), else `default`."""
    get = getattr(img, "get_filename", None)
    name = get() if callable(get) else None
    return str(name) if name else default


def check_same_grid(image, labels, image_name=None, label_name=None, atol: float = 1e-3) -> None:
    """Raises `NiftiError` naming `label_name` unless `labels` lies on the same voxel grid as `image`.

    Args:
      image, labels: nibabel images (only ``shape`` and ``affine`` are used; trailing size-1 dims are ignored).
      atol: largest allowed absolute difference between the two affines, in mm (and mm per voxel).
    """
    image_name = image_name or source_name(image, "the image")
    label_name = label_name or source_name(labels, "labels")
    shape_i = tuple(image.shape[:3])
    shape_l = tuple(labels.shape[:3])
    if shape_i != shape_l:
        raise NiftiError(
            f"{label_name}: label map is on a different grid than its image ({image_name}): "
            f"shape {shape_l} vs image shape {shape_i}"
        )
    diff = float(np.max(np.abs(np.asarray(image.affine, np.float64) - np.asarray(labels.affine, np.float64))))
    if diff > atol:
        raise NiftiError(
            f"{label_name}: label map is on a different grid than its image ({image_name}): "
            f"affines differ by up to {diff:.4g} mm (tolerance {atol:g})"
        )


def load(path, what: str = "image", like=None, atol: float = 1e-3):
    """Loads and checks one NIfTI file; the data are read into memory.

    Args:
      path: a ``.nii`` or ``.nii.gz`` file.
      what: ``"image"`` (float32 data, must be finite) or ``"labels"`` (int32 data, integer-valued, not all 0).
      like: optional nibabel image this one must share its grid with (shape and affine), e.g. a label map's image.
      atol: affine tolerance (mm) for `like`.

    Returns:
      A ``nibabel.Nifti1Image`` (or ``Nifti2Image``) holding a 3-D in-memory array (float32 for images, int32 for
      labels), the file's affine and a copy of its header.

    Raises:
      NiftiError: one line naming `path`, for every problem listed in the module docstring.
    """
    if what not in ("image", "labels"):
        raise ValueError(f"what: expected 'image' or 'labels', got {what!r}")
    path = Path(path)
    if not path.exists():
        raise NiftiError(f"{path}: file not found")
    if path.is_dir():
        raise NiftiError(f"{path}: is a directory, expected a .nii or .nii.gz file")
    try:
        img = _read_gz(path) if path.name.endswith(".gz") else nib.load(str(path))
    except NiftiError:
        raise
    except FileNotFoundError:
        raise NiftiError(f"{path}: file not found") from None
    except Exception as e:  # nibabel raises many types (ImageFileError, HeaderDataError, OSError, ...)
        raise NiftiError(f"{path}: not a readable NIfTI file ({_one_line(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair, nib.Nifti2Pair)):
        raise NiftiError(f"{path}: expected a NIfTI file, got {type(img).__name__}")
    affine = _check_affine(img.affine, path)
    try:
        if what == "image":
            data = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            data = np.asarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, MemoryError) as e:
        raise NiftiError(f"{path}: corrupt or truncated data ({_one_line(e)})") from None
    data = _squeeze_to_3d(data, path)
    if what == "image":
        bad = ~np.isfinite(data)
        if bad.any():
            raise NiftiError(f"{path}: image contains {int(bad.sum())} NaN or infinite values")
    else:
        if data.dtype.kind == "b":
            data = data.astype(np.int32)
        if data.dtype.kind == "f":
            if not np.all(np.isfinite(data)):
                raise NiftiError(f"{path}: label map contains NaN or infinite values")
            if not np.all(data == np.round(data)):
                raise NiftiError(f"{path}: label map is not integer-valued (e.g. {_first_fraction(data)}); "
                                 f"is this an image rather than labels?")
        elif data.dtype.kind not in "iu":
            raise NiftiError(f"{path}: label map has non-numeric dtype {data.dtype}")
        if data.size and (data.max() > np.iinfo(np.int32).max or data.min() < np.iinfo(np.int32).min):
            raise NiftiError(f"{path}: label values do not fit in int32")
        data = data.astype(np.int32)
        if not data.any():
            raise NiftiError(f"{path}: label map is empty (every voxel is 0)")
    header = img.header.copy()
    header.set_data_dtype(data.dtype)
    out = type(img)(data, affine, header) if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) \
        else nib.Nifti1Image(data, affine, None)
    out.set_filename(str(path))  # error messages downstream name the file (source_name)
    if like is not None:
        check_same_grid(like, out, label_name=str(path), atol=atol)
    return out


def _read_gz(path: Path):
    """A ``.nii.gz`` inflated once, in memory (gzip checks its CRC and length at the end of the stream: nibabel alone
    stops reading after the voxel data, so a corrupted block that still inflates would go unnoticed)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        raise NiftiError(f"{path}: not a readable NIfTI file (not gzip-compressed data)")
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise NiftiError(f"{path}: corrupt or truncated gzip data ({_one_line(e)})") from None
    del raw
    size = int.from_bytes(data[:4], "little") if len(data) >= 4 else 0
    nifti2 = size == 540 or int.from_bytes(data[:4], "big") == 540
    return (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(data)


def _first_fraction(data: np.ndarray) -> str:
    frac = data[data != np.round(data)]
    return f"{float(frac.flat[0]):g}" if frac.size else "?"


def save(array, affine, path, dtype=None, intent: str | None = None) -> Path:
    """Writes `array` with `affine` as NIfTI-1 at `path` (``.nii`` or ``.nii.gz``), atomically.

    Args:
      array: 3-D (or 4-D/5-D, e.g. displacement fields ``[X, Y, Z, 1, 3]``) array. bool is stored as uint8.
      affine: 4x4 voxel-to-world matrix (mm, RAS).
      path: output file; its folder is created. Nothing is left at `path` if writing fails.
      dtype: optional on-disk dtype (default: the array's).
      intent: optional NIfTI intent name, e.g. ``"vector"`` for displacement fields (what ITK/ANTs expect).

    Returns:
      The path written.
    """
    path = Path(path)
    name = path.name
    if not name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"path: expected a .nii or .nii.gz file name, got {path}")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine: expected a 4x4 matrix, got shape {affine.shape}")
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if intent:
        img.header.set_intent(intent)
    if name.endswith(".nii.gz"):
        data = gzip_bytes(img.to_bytes())
        with atomic_path(path, suffix=".nii.gz") as tmp:
            Path(tmp).write_bytes(data)
    else:
        with atomic_path(path, suffix=".nii") as tmp:
            nib.save(img, tmp)
    return path


GZIP_CHUNK = 4 << 20  # bytes of input per independently deflated piece


def gzip_bytes(data: bytes, level: int = 1, threads: int | None = None) -> bytes:
    """`data` as one gzip member (RFC 1952), deflated in pieces on several threads (zlib releases the GIL).

    Each piece of `GZIP_CHUNK` bytes is deflated on its own and ended with a sync flush (the last one with the final
    block), so the pieces concatenate into one ordinary deflate stream that every gzip reader (nibabel, ITK, gzip)
    inflates; only the back-references across piece borders are lost (well under 1 % larger). Level 1, as
    nibabel's default: a 27 MB float32 scan took 0.42 s on one core and 0.2 s on two.
    """
    view = memoryview(data)
    pieces = [view[i:i + GZIP_CHUNK] for i in range(0, len(view), GZIP_CHUNK)] or [view]

    def deflate(i):
        d = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: the gzip header and trailer are ours
        return d.compress(pieces[i]) + d.flush(zlib.Z_FINISH if i == len(pieces) - 1 else zlib.Z_SYNC_FLUSH)

    workers = max(1, min(len(pieces), threads or os.cpu_count() or 1))
    if workers == 1:
        body = [deflate(i) for i in range(len(pieces))]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            body = list(pool.map(deflate, range(len(pieces))))
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # magic, deflate, no flags, no mtime, unknown OS
    trailer = struct.pack("<II", zlib.crc32(view) & 0xFFFFFFFF, len(view) & 0xFFFFFFFF)
    return b"".join([header, *body, trailer])
