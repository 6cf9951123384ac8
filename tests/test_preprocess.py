"""ldr_tf.data.preprocess: the spec, orientation, field of view (label boxes, the label-free head box), grids,
intensities, and the way back to the scan (Geometry)."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from ldr_tf.data import nifti
from ldr_tf.data import preprocess as pp
from tests.helpers import LAS, PSR


def _img(arr, affine=np.eye(4)):
    return nib.Nifti1Image(np.asarray(arr), affine)


# ------------------------------------------------------------------------------------------ the spec


def test_spec_json_roundtrip_and_validation():
    spec = pp.Preprocessing(grid_size=(32, 48, 16), orientation="lps", resample="keep_aspect", crop="labels",
                            crop_labels=[5, 6], intensity="percentile", percentiles=(2, 98),
                            label_map={5: 255}, label_default=0, mask_dilation_mm=3)
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["label_map"] == {"5": 255} and d["orientation"] == "LPS"
    assert pp.Preprocessing.from_dict(d) == spec
    assert pp.Preprocessing(grid_size=64).grid_size == (64, 64, 64)
    with pytest.raises(ValueError, match="unknown keys"):
        pp.Preprocessing.from_dict({**d, "zoom": 2})
    for bad in (dict(grid_size=(0, 4, 4)), dict(orientation="RAR"), dict(resample="zoom"), dict(intensity="z"),
                dict(percentiles=(99, 1)), dict(window=0), dict(crop="box"), dict(mask_dilation_mm=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pp.Preprocessing(**bad)
    assert pp.recipe("liver").intensity == "ct_window" and pp.recipe("brain").resample == "keep_aspect"


# ------------------------------------------------------------------------------------ orientation


@pytest.mark.parametrize("affine,expect", [
    (PSR, lambda p, n: (p[2], n[0] - 1 - p[0], p[1])),  # R <- axis 2, A <- flipped axis 0, S <- axis 1
    (LAS, lambda p, n: (n[0] - 1 - p[0], p[1], p[2])),  # R <- flipped axis 0
])
def test_reorientation_moves_a_bright_voxel_to_the_expected_grid_voxel(affine, expect):
    n = (9, 7, 5)
    p = (2, 5, 1)
    arr = np.full(n, 10.0, np.float32)
    arr[p] = 200.0
    r, canon = pp.reorientation_matrix(affine, n, "RAS")
    spec = pp.Preprocessing(grid_size=canon, orientation="RAS")
    vol, _, pts, geom = pp.apply(spec, _img(arr, affine), points=np.array([p, (-1, -1, -1)], np.float64))
    g = expect(p, n)
    assert vol.shape == canon
    assert np.unravel_index(np.argmax(vol), vol.shape) == g
    assert vol[g] == 200 and np.count_nonzero(vol == 200) == 1 and vol.min() == 10
    np.testing.assert_allclose(pts[0], g, atol=1e-5)
    np.testing.assert_array_equal(pts[1], -1)
    # The grid affine is RAS with the source voxel sizes, and the bright voxel keeps its world position.
    assert nifti.axcodes(geom.grid_affine) == "RAS"
    np.testing.assert_allclose(np.abs(np.diag(geom.grid_affine[:3, :3])), geom.spacing)
    np.testing.assert_allclose(geom.grid_affine @ (*g, 1), affine @ (*p, 1), atol=1e-9)


def test_other_orientations_and_native():
    n = (6, 5, 4)
    _, canon = pp.reorientation_matrix(PSR, n, "LPS")
    assert canon == (4, 6, 5)
    geom = pp.apply(pp.Preprocessing(grid_size=canon, orientation="LPS"), _img(np.ones(n), PSR))[3]
    assert nifti.axcodes(geom.grid_affine) == "LPS"
    geom = pp.apply(pp.Preprocessing(grid_size=n, orientation="native"), _img(np.ones(n), PSR))[3]
    np.testing.assert_allclose(geom.grid_to_source, np.eye(4), atol=1e-12)


# ---------------------------------------------------------------------------- field of view / sizes


def test_stretch_aligns_voxel_edges():
    n = (10, 6, 4)
    geom = pp.apply(pp.Preprocessing(grid_size=(5, 12, 7), orientation="native"), _img(np.ones(n)))[3]
    m = geom.grid_to_source
    np.testing.assert_allclose(m[:3, :3] @ np.full(3, -0.5) + m[:3, 3], [-0.5] * 3, atol=1e-12)
    np.testing.assert_allclose(m[:3, :3] @ (np.array([5, 12, 7]) - 0.5) + m[:3, 3], np.array(n) - 0.5, atol=1e-12)
    np.testing.assert_allclose(geom.spacing, [2.0, 0.5, 4 / 7])


def test_keep_aspect_is_isotropic_and_pads_outside_the_scan():
    n = (20, 10, 10)
    affine = np.diag([1.0, 2.0, 1.0, 1.0])  # extents 20, 20, 10 mm
    vol, _, _, geom = pp.apply(pp.Preprocessing(grid_size=8, orientation="native", resample="keep_aspect"),
                               _img(np.full(n, 100.0), affine))
    np.testing.assert_allclose(geom.spacing, [2.5, 2.5, 2.5])
    assert np.all(vol[:, :, [0, 1, 6, 7]] == 0) and np.all(vol[:, :, 2:6] == 100)


def test_crop_to_labels_uses_the_liver_margin():
    n = (100, 40, 30)
    lab = np.zeros(n, np.int16)
    lab[20:80, 10:30, 12:17] = 5  # extents 60, 20, 5 -> margins 6, 5, 5
    lab[90, 35, 2] = 3  # another organ: not part of the box
    spec = pp.recipe("liver", grid_size=(16, 16, 16), orientation="native", crop_labels=(5,),
                     label_map={5: 255}, label_default=0)
    vol, seg, _, geom = pp.apply(spec, _img(np.zeros(n, np.float32)), _img(lab))
    m = geom.grid_to_source
    lo = m[:3, :3] @ np.full(3, -0.5) + m[:3, 3] + 0.5
    hi = m[:3, :3] @ (np.array([16, 16, 16]) - 0.5) + m[:3, 3] + 0.5
    np.testing.assert_allclose(lo, [14, 5, 7], atol=1e-9)
    np.testing.assert_allclose(hi, [86, 35, 22], atol=1e-9)
    assert set(np.unique(seg)) == {0, 255}
    with pytest.raises(ValueError, match="no labels \\[7\\]"):
        pp.apply(pp.Preprocessing(crop="labels", crop_labels=(7,)), _img(np.zeros(n)), _img(lab))
    with pytest.raises(ValueError, match="no label map"):
        pp.apply(pp.Preprocessing(crop="labels"), _img(np.zeros(n)))


def test_crop_is_clipped_to_the_scan():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[0:3, 4:6, 7:10] = 1
    geom = pp.apply(pp.Preprocessing(grid_size=4, orientation="native", crop="labels"),
                    _img(np.zeros((10, 10, 10))), _img(lab))[3]
    m = geom.grid_to_source
    np.testing.assert_allclose(m[:3, :3] @ np.full(3, -0.5) + m[:3, 3] + 0.5, [0, 0, 2])
    np.testing.assert_allclose(m[:3, :3] @ np.full(3, 3.5) + m[:3, 3] + 0.5, [8, 10, 10])


def test_mask_dilation_zeroes_outside_the_labels():
    n = (16, 16, 16)
    lab = np.zeros(n, np.uint8)
    lab[6:10, 6:10, 6:10] = 4
    spec = pp.Preprocessing(grid_size=n, orientation="native", mask_dilation_mm=2.0)
    vol = pp.apply(spec, _img(np.full(n, 50.0)), _img(lab))[0]
    expect = np.zeros(n, bool)
    expect[4:12, 4:12, 4:12] = True  # box dilation by 2 voxels of 1 mm
    np.testing.assert_array_equal(vol == 50, expect)


# ------------------------------------------------------------------------------------- intensities


def test_ct_window_level():
    hu = np.array([-1000, -25, 120, 265, 2000], np.float32)
    arr = np.broadcast_to(hu[:, None, None], (5, 2, 2))
    vol = pp.apply(pp.Preprocessing(grid_size=(5, 2, 2), orientation="native", intensity="ct_window"),
                   _img(arr))[0]
    np.testing.assert_array_equal(vol[:, 0, 0], [0, 0, 128, 255, 255])  # 120 HU -> 127.5 -> 128


def test_percentile_normalisation(rng):
    arr = rng.permutation(np.arange(1000, dtype=np.float32)).reshape(10, 10, 10)
    vol = pp.apply(pp.Preprocessing(grid_size=10, orientation="native", intensity="percentile",
                                    percentiles=(10, 90)), _img(arr))[0]
    lo, hi = np.percentile(arr, [10, 90])
    np.testing.assert_array_equal(vol, np.round(np.clip((arr - lo) / (hi - lo) * 255, 0, 255)).astype(np.uint8))
    with pytest.raises(ValueError, match="constant"):
        pp.apply(pp.Preprocessing(grid_size=4, intensity="percentile"), _img(np.ones((4, 4, 4))))


def test_label_remapping():
    lab = np.zeros((4, 4, 4), np.int32)
    lab[0], lab[1], lab[2] = 1, 2, 3
    img = _img(np.zeros((4, 4, 4)))
    seg = pp.apply(pp.Preprocessing(grid_size=4, orientation="native", label_map={2: 7}), img, _img(lab))[1]
    assert set(np.unique(seg)) == {0, 1, 3, 7}
    seg = pp.apply(pp.Preprocessing(grid_size=4, orientation="native", label_map={2: 7}, label_default=0), img,
                   _img(lab))[1]
    np.testing.assert_array_equal(seg, np.where(lab == 2, 7, 0))


# ------------------------------------------------------------------------------ back to the scan


def test_to_original_recovers_a_ramp_and_labels_exactly():
    n = (12, 10, 8)
    idx = np.stack(np.meshgrid(*[np.arange(k) for k in n], indexing="ij"), -1).astype(np.float32)
    ramp = 20 + 6 * idx[..., 0] + 5 * idx[..., 1] + 4 * idx[..., 2]  # 20..213, linear
    lab = (idx[..., 0] // 3 + 4 * (idx[..., 1] // 4)).astype(np.int32) + 1
    _, canon = pp.reorientation_matrix(PSR, n)
    spec = pp.Preprocessing(grid_size=tuple(2 * c for c in canon))  # RAS, exact 2x upsampling
    vol, seg, _, geom = pp.apply(spec, _img(ramp, PSR), _img(lab, PSR))
    back = geom.to_original(vol.astype(np.float32))
    assert back.shape == n
    inner = (slice(1, -1),) * 3
    # Trilinear up then down reproduces a linear function; the only error is the uint8 rounding (and the
    # border clamp on the outermost voxels).
    assert np.max(np.abs(back[inner] - ramp[inner])) <= 0.5 + 1e-4
    assert np.max(np.abs(back - ramp)) <= 0.5 + 0.25 * 15 + 1e-4
    np.testing.assert_array_equal(geom.to_original(seg, order="nearest"), lab)
    with pytest.raises(ValueError, match="integer"):
        geom.to_original(vol.astype(np.float32), order="nearest")


def test_to_original_with_crop_and_downsampling():
    n = (40, 36, 30)
    idx = np.stack(np.meshgrid(*[np.arange(k) for k in n], indexing="ij"), -1).astype(np.float32)
    smooth = 120 + 100 * np.sin(idx[..., 0] / 7) * np.cos(idx[..., 1] / 9) * np.cos(idx[..., 2] / 8)
    lab = np.zeros(n, np.int32)
    lab[8:32, 6:30, 5:25] = 1
    lab[16:24, 12:24, 10:20] = 2  # blocks of >= 8 voxels: survive 2x downsampling
    spec = pp.Preprocessing(grid_size=(16, 16, 16), orientation="RAS", resample="keep_aspect", crop="labels",
                            crop_margin_voxels=2, crop_margin_fraction=0.0)
    vol, seg, _, geom = pp.apply(spec, _img(smooth, LAS), _img(lab, LAS))
    back = geom.to_original(vol.astype(np.float32), fill=-1)
    inside = back >= 0
    assert inside[lab > 0].all() and not inside.all()  # outside the crop box -> fill
    err = np.abs(back - smooth)[inside & (lab > 0)]
    assert err.mean() < 4.0 and err.max() < 25.0
    lab_back = geom.to_original(seg, order="nearest")
    agree = (lab_back == lab).mean()
    assert agree > 0.93 and set(np.unique(lab_back)) == {0, 1, 2}


def test_geometry_serialisation(tmp_path):
    n = (9, 7, 5)
    geom = pp.apply(pp.Preprocessing(grid_size=(8, 6, 4), resample="keep_aspect"), _img(np.ones(n), PSR))[3]
    g2 = pp.Geometry.from_dict(json.loads(json.dumps(geom.to_dict())))
    np.testing.assert_allclose(g2.grid_to_source, geom.grid_to_source)
    assert g2.grid_shape == (8, 6, 4) and g2.source_shape == n
    with h5py.File(tmp_path / "g.h5", "w") as h5:
        h5.create_group("s").attrs.update(geom.to_attrs())
    with h5py.File(tmp_path / "g.h5", "r") as h5:
        attrs = dict(h5["s"].attrs)
    g3 = pp.Geometry.from_attrs(attrs)
    np.testing.assert_allclose(g3.grid_affine, geom.grid_affine)
    np.testing.assert_allclose(attrs["affine"], geom.grid_affine)
    np.testing.assert_allclose(attrs["spacing"], geom.spacing)


def test_flow_to_original_in_voxels_and_mm():
    n = (6, 8, 4)  # PSR, 2 mm voxels; RAS canonical shape (4, 6, 8)
    _, canon = pp.reorientation_matrix(PSR, n)
    spec = pp.Preprocessing(grid_size=tuple(2 * c for c in canon))  # 1 mm grid
    geom = pp.apply(spec, _img(np.ones(n), PSR))[3]
    np.testing.assert_allclose(geom.spacing, [1, 1, 1])
    flow = np.zeros(geom.grid_shape + (3,), np.float32)
    flow[..., 0] = 1.0  # one grid voxel along D = 1 mm towards Right
    flow[..., 2] = -3.0  # three grid voxels along W = 3 mm towards Inferior
    vox, mm = geom.flow_to_original(flow)
    assert vox.shape == n + (3,) and mm.shape == n + (3,)
    np.testing.assert_allclose(mm.reshape(-1, 3), np.tile([1.0, 0.0, -3.0], (np.prod(n), 1)), atol=1e-5)
    # Right is source axis 2 (+), Superior is source axis 1 (+); 2 mm voxels.
    np.testing.assert_allclose(vox.reshape(-1, 3), np.tile([0.0, -1.5, 0.5], (np.prod(n), 1)), atol=1e-5)
    np.testing.assert_allclose(pp.ras_to_lps(mm)[0, 0, 0], [-1.0, 0.0, -3.0], atol=1e-5)
    # A moving scan 10 mm further right, same array: zero flow is a 10 mm displacement but 0 voxels.
    shifted = PSR.copy()
    shifted[0, 3] += 10.0
    moving = pp.apply(spec, _img(np.ones(n), shifted))[3]
    vox, mm = geom.flow_to_original(np.zeros_like(flow), moving=moving)
    np.testing.assert_allclose(mm[2, 3, 1], [10.0, 0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(vox, 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="flow"):
        geom.flow_to_original(flow[..., :2])


def test_flow_to_original_on_a_stretched_grid():
    n = (10, 12, 8)  # LAS 1.5 x 1 x 2 mm -> RAS canonical (10, 12, 8) -> grid (8, 10, 12)
    geom = pp.apply(pp.Preprocessing(grid_size=(8, 10, 12)), _img(np.ones(n), LAS))[3]
    np.testing.assert_allclose(geom.spacing, [15 / 8, 1.2, 16 / 12])
    flow = np.zeros(geom.grid_shape + (3,), np.float32)
    flow[..., 1] = 2.0  # 2 grid voxels towards Anterior = 2.4 mm = 2.4 source voxels along axis 1
    flow[..., 0] = 0.8  # 0.8 grid voxels towards Right = 1.5 mm = -1 source voxel along axis 0 (L)
    vox, mm = geom.flow_to_original(flow)
    np.testing.assert_allclose(mm.reshape(-1, 3), np.tile([1.5, 2.4, 0.0], (np.prod(n), 1)), atol=1e-5)
    np.testing.assert_allclose(vox.reshape(-1, 3), np.tile([-1.0, 2.4, 0.0], (np.prod(n), 1)), atol=1e-5)


def test_label_order_linear_is_a_per_label_vote():
    lab = np.full((5, 5, 5), 2, np.int32)
    lab[0, 0, 0] = 1
    img = _img(np.zeros((5, 5, 5)))
    # Grid voxel 0 samples source position 1/3 on every axis: nearest picks voxel 0 (label 1); the label-aware
    # linear vote gives label 1 only the weight (2/3)^3 = 0.30 against 0.70 for label 2.
    near = pp.apply(pp.Preprocessing(grid_size=3, orientation="native"), img, _img(lab))[1]
    lin = pp.apply(pp.Preprocessing(grid_size=3, orientation="native", label_order="linear"), img, _img(lab))[1]
    assert near[0, 0, 0] == 1 and lin[0, 0, 0] == 2
    assert np.all(near.reshape(-1)[1:] == 2) and np.all(lin == 2)


# ------------------------------------------------------------------- label-free field of view


def _head(shape=(60, 70, 50), centre=(28, 36, 22), radii=(18, 22, 15), seed=0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    inside = (((g - np.array(centre)) / np.array(radii)) ** 2).sum(-1) <= 1
    data = rng.normal(5.0, 2.0, shape).astype(np.float32)  # scanner noise
    data[inside] += 300.0 + rng.normal(0, 30.0, inside.sum())
    data[55:58, 2:5, 2:5] = 400.0  # a small bright artefact away from the head: not the largest component
    return data, inside


def test_otsu_separates_two_populations():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(10, 3, 5000), rng.normal(200, 20, 3000)])
    assert 25 < pp.otsu_threshold(v) < 150


def test_foreground_box_is_the_largest_component():
    data, inside = _head()
    smin, smax = pp.foreground_box(data)
    idx = np.nonzero(inside)
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() for i in idx])
    assert np.all(np.abs(smin - lo) <= 2) and np.all(np.abs(smax - hi) <= 2)  # computed on every 2nd voxel
    with pytest.raises(ValueError, match="scan.nii.gz: no foreground"):
        pp.foreground_box(np.zeros((10, 10, 10), np.float32), "scan.nii.gz")


def test_fixed_spacing_grid_is_centred_on_the_head_and_needs_no_labels():
    data, inside = _head()
    affine = np.diag([1.2, 0.9, 1.5, 1.0])
    img = nib.Nifti1Image(data, affine)
    spec = pp.recipe("brain-head", grid_size=(32, 32, 32), spacing_mm=3.0)
    assert not spec.needs_labels and pp.recipe("brain").needs_labels
    vol, labels, _, geom = pp.apply(spec, img)
    assert labels is None and vol.shape == (32, 32, 32)
    np.testing.assert_allclose(geom.spacing, 3.0, rtol=1e-6)
    # the grid centre sits at the centre of the head's box (world mm), within a source voxel
    centre_grid = np.array([15.5, 15.5, 15.5, 1.0])
    centre_src = (geom.grid_to_source @ centre_grid)[:3]
    idx = np.nonzero(inside)
    box_centre = (np.array([i.min() for i in idx]) + np.array([i.max() for i in idx])) / 2
    assert np.all(np.abs(centre_src - box_centre) <= 2.0)
    # the head is bright on the grid, the corners (air) are dark
    assert vol[16, 16, 16] > 100 and vol[0, 0, 0] < 20
    # round trip of the spec (spacing kept), and specs without spacing stay as they were
    again = pp.Preprocessing.from_dict(spec.to_dict())
    assert again == spec and "spacing_mm" not in pp.recipe("brain").to_dict()
    with pytest.raises(ValueError, match="spacing_mm"):
        pp.Preprocessing(spacing_mm=0)
