"""ldr_tf.data.nifti: checked loading, atomic saving."""

import os

import nibabel as nib
import numpy as np
import pytest

from ldr_tf.data import nifti
from tests.helpers import LAS, PSR



def _save(path, arr, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return path


def _img(arr, affine=np.eye(4)):
    return nib.Nifti1Image(np.asarray(arr), affine)


def _one_line_error(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# ----------------------------------------------------------------------------------------------- load


def test_load_image_and_labels(tmp_path, rng):
    a = rng.random((6, 5, 4)).astype(np.float32)
    img = nifti.load(_save(tmp_path / "a.nii.gz", a, PSR))
    assert img.shape == (6, 5, 4) and img.get_fdata().dtype == np.float64
    np.testing.assert_allclose(np.asarray(img.dataobj), a)
    np.testing.assert_allclose(img.affine, PSR)
    lab = nifti.load(_save(tmp_path / "l.nii.gz", (a > 0.5).astype(np.float32) * 3, PSR), "labels", like=img)
    assert np.asarray(lab.dataobj).dtype == np.int32 and set(np.unique(lab.dataobj)) <= {0, 3}
    assert nifti.axcodes(PSR) == "PSR" and nifti.axcodes(LAS) == "LAS"


def test_load_accepts_trailing_singleton_dims(tmp_path):
    img = nifti.load(_save(tmp_path / "a.nii.gz", np.ones((4, 3, 2, 1), np.float32)))
    assert img.shape == (4, 3, 2)


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated_gz", "corrupt_gz", "truncated_nii", "text",
                                  "4d", "2d", "nan", "inf", "dir"])
def test_load_image_errors(tmp_path, rng, case):
    ok = rng.random((8, 8, 8)).astype(np.float32)
    path = tmp_path / "bad.nii.gz"
    if case == "missing":
        pass
    elif case == "garbage":
        path.write_bytes(os.urandom(2000))
    elif case in ("truncated_gz", "corrupt_gz"):
        _save(tmp_path / "ok.nii.gz", ok)
        raw = bytearray((tmp_path / "ok.nii.gz").read_bytes())
        if case == "truncated_gz":
            raw = raw[: len(raw) // 2]
        else:
            raw[len(raw) // 2: len(raw) // 2 + 40] = bytes(40)  # still inflates; only the CRC notices
        path.write_bytes(bytes(raw))
    elif case == "truncated_nii":
        path = tmp_path / "bad.nii"
        _save(tmp_path / "ok.nii", ok)
        path.write_bytes((tmp_path / "ok.nii").read_bytes()[:-500])
    elif case == "text":
        path = tmp_path / "bad.nii"
        path.write_text("not an image\n" * 40)
    elif case == "4d":
        _save(path, np.zeros((4, 4, 4, 3), np.float32))
    elif case == "2d":
        _save(path, np.zeros((4, 4), np.float32))
    elif case in ("nan", "inf"):
        ok[1, 2, 3] = np.nan if case == "nan" else np.inf
        _save(path, ok)
    elif case == "dir":
        path.mkdir()
    with pytest.raises(nifti.NiftiError) as e:
        nifti.load(path, "image")
    msg = _one_line_error(e, path)
    expect = {"missing": "not found", "garbage": "not a readable NIfTI", "truncated_gz": "truncated",
              "corrupt_gz": "CRC", "truncated_nii": "truncated", "text": "not a readable NIfTI",
              "4d": "4-D", "2d": "2-D", "nan": "NaN", "inf": "NaN or infinite", "dir": "directory"}[case]
    assert expect in msg


def test_load_label_errors(tmp_path):
    img = _img(np.zeros((6, 6, 6), np.float32), PSR)
    empty = _save(tmp_path / "empty.nii.gz", np.zeros((6, 6, 6), np.uint8), PSR)
    with pytest.raises(nifti.NiftiError, match="empty"):
        nifti.load(empty, "labels")
    frac = np.zeros((6, 6, 6), np.float32)
    frac[2, 2, 2] = 1.5
    with pytest.raises(nifti.NiftiError, match="not integer-valued"):
        nifti.load(_save(tmp_path / "frac.nii.gz", frac, PSR), "labels")
    one = np.zeros((6, 6, 6), np.uint8)
    one[1, 1, 1] = 2
    with pytest.raises(nifti.NiftiError, match="different grid.*shape") as e:
        nifti.load(_save(tmp_path / "shape.nii.gz", one[:5], PSR), "labels", like=img)
    _one_line_error(e, tmp_path / "shape.nii.gz")
    moved = PSR.copy()
    moved[0, 3] += 0.5
    with pytest.raises(nifti.NiftiError, match="different grid.*affines differ"):
        nifti.load(_save(tmp_path / "aff.nii.gz", one, moved), "labels", like=img)
    tiny = PSR.copy()
    tiny[0, 3] += 1e-5  # float32 round-off in headers is tolerated
    assert nifti.load(_save(tmp_path / "tiny.nii.gz", one, tiny), "labels", like=img).shape == (6, 6, 6)


def test_save_roundtrip_and_atomic(tmp_path, rng):
    a = rng.integers(0, 200, (5, 4, 3)).astype(np.int16)
    out = nifti.save(a, LAS, tmp_path / "sub" / "x.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), a)
    np.testing.assert_allclose(back.affine, LAS)
    with pytest.raises(Exception):
        nifti.save(np.array([[[object()]]], dtype=object), LAS, tmp_path / "y.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.nii.gz"]
    with pytest.raises(ValueError, match="nii"):
        nifti.save(a, LAS, tmp_path / "z.img")


def test_gzip_bytes_is_one_gzip_member_in_parallel_pieces(tmp_path, rng, monkeypatch):
    import gzip

    data = rng.integers(0, 4, 50_000).astype(np.uint8).tobytes() + bytes(20_000)  # some entropy, some zeros
    monkeypatch.setattr(nifti, "GZIP_CHUNK", 7_000)  # 10 pieces
    packed = nifti.gzip_bytes(data, threads=3)
    assert gzip.decompress(packed) == data and packed[:2] == b"\x1f\x8b"
    assert len(packed) < len(data) // 2
    assert gzip.decompress(nifti.gzip_bytes(b"")) == b""
    # a multi-piece .nii.gz reads back through nibabel; a truncated one fails our checked load
    a = rng.normal(size=(20, 30, 40)).astype(np.float32)
    out = nifti.save(a, LAS, tmp_path / "big.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), a)
    np.testing.assert_array_equal(np.asarray(nifti.load(out, "image").dataobj), a)
    (tmp_path / "cut.nii.gz").write_bytes(out.read_bytes()[:-100])
    with pytest.raises(nifti.NiftiError, match="cut.nii.gz"):
        nifti.load(tmp_path / "cut.nii.gz", "image")
