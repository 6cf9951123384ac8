"""ldr_tf.data.augment: B-spline free-form deformation applied to image, labels and landmarks."""

import numpy as np
import pytest
import tensorflow as tf

from ldr_tf.data import augment as A
from ldr_tf.ops import warp as W


def _rcn_segment_field(control, n):
    """Independent NumPy version of the original segment-wise cubic B-spline (N divisible by grid - 1), 1-D."""
    g = len(control)
    padded = np.concatenate([[0.0], control, [0.0]])
    s = n // (g - 1)
    out = np.zeros(n)
    for v in range(n):
        i, u = v // s, (v % s + 0.5) / s
        coef = [(1 - u) ** 3 / 6, (3 * u**3 - 6 * u**2 + 4) / 6, (-3 * u**3 + 3 * u**2 + 3 * u + 1) / 6, u**3 / 6]
        out[v] = sum(c * padded[i + k] for k, c in enumerate(coef))
    return out


def test_dense_field_matches_the_original_segment_formula(rng):
    n, g = 16, 5
    control = rng.standard_normal((1, g, g, g, 3)).astype(np.float32)
    flow = A.control_to_flow(control, (n, n, n)).numpy()[0]
    # separable: along each axis the field is the 1-D spline of the lattice with the other indices contracted
    wz = np.stack([_rcn_segment_field(np.eye(g)[k], n) for k in range(g)], 1)  # [n, g]
    expected = np.einsum("di,hj,wk,ijkc->dhwc", wz, wz, wz, control[0].astype(np.float64))
    np.testing.assert_allclose(flow, expected, atol=1e-5)


def test_weights_are_a_partition_of_unity_inside_the_volume():
    for n, g in [(16, 5), (20, 4), (13, 6)]:
        w = A.bspline_weights(tf.range(n, dtype=tf.float32), n, g).numpy()
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
        assert w.shape == (n, g + 2) and (w >= 0).all()


def test_points_evaluate_the_same_spline(rng):
    shape = (12, 14, 16)
    control = rng.standard_normal((2, 5, 5, 5, 3)).astype(np.float32)
    flow = A.control_to_flow(control, shape).numpy()
    idx = np.stack([rng.integers(0, s, (2, 7)) for s in shape], -1)
    at = A.control_at_points(control, shape, idx.astype(np.float32)).numpy()
    for b in range(2):
        np.testing.assert_allclose(at[b], flow[b][tuple(idx[b].T)], atol=1e-5)


def test_sample_power_range_and_concentration():
    x = A.sample_power(-0.4, 0.4, 3, [20000], seed=[3, 4]).numpy()
    assert x.min() >= -0.4 and x.max() <= 0.4
    # |x| = |u|^3 with u uniform on [0, 0.4^(1/3)]: median |x| = 0.4 / 8
    assert abs(np.median(np.abs(x)) - 0.05) < 0.005
    assert abs(np.mean(x)) < 0.01


def _blob_case(n=24):
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(np.float32)
    centre = np.array([9.0, 13.0, 11.0], np.float32)
    r2 = ((g - centre) ** 2).sum(-1)
    image = np.exp(-r2 / 20.0)[None, ..., None].astype(np.float32)
    seg = np.where(r2 <= 16, 7, np.where(g[..., 0] > 18, 3, 0)).astype(np.int32)[None]
    points = np.array([[centre, [-1.0, -1.0, -1.0], [2.0, 20.0, 5.0]]], np.float32)
    return image, seg, points, centre


def test_image_labels_points_and_flow_agree():
    image, seg, points, centre = _blob_case()
    params = A.FFDParams(amplitude=0.6, power=1.0)  # +-3.6 voxels at 24^3: a clearly visible deformation
    out = A.augment_moving(image, seg, points, tf.constant([[5, 11]], tf.int64), params)
    flow = out["flow"]
    assert float(tf.reduce_max(tf.abs(flow))) > 1.5
    # the image and the labels are the originals pulled through aug_flow
    np.testing.assert_allclose(out["moving"].numpy(), W.warp(image, flow).numpy(), atol=1e-6)
    np.testing.assert_array_equal(out["moving_seg"].numpy(), W.warp_labels(seg, flow).numpy())
    assert set(np.unique(out["moving_seg"])) <= {0, 3, 7}  # never a mixture like 5
    # the landmark at the blob centre sits at the centre of the moved blob, within a voxel
    moved = out["moving_points"].numpy()[0]
    blob = np.argwhere(out["moving_seg"].numpy()[0] == 7).mean(0)
    assert np.linalg.norm(moved[0] - centre) > 1.0  # it did move
    assert np.linalg.norm(moved[0] - blob) < 1.0
    # brightest voxel of the smooth blob agrees too
    peak = np.array(np.unravel_index(np.argmax(out["moving"].numpy()[0, ..., 0]), (24, 24, 24)))
    assert np.linalg.norm(moved[0] - peak) <= 1.0
    # exactness: p' + a(p') = p, with a sampled trilinearly from the dense field (independent path)
    a_at = W.sample_points(flow, moved[None, [0, 2]]).numpy()[0]
    np.testing.assert_allclose(moved[[0, 2]] + a_at, points[0, [0, 2]], atol=0.05)
    np.testing.assert_array_equal(moved[1], [-1, -1, -1])  # missing stays missing


def test_seeded_and_switchable():
    image, seg, points, _ = _blob_case(16)
    seeds = tf.constant([[1, 2]], tf.int64)
    a = A.augment_moving(image, seg, points, seeds)
    b = A.augment_moving(image, seg, points, seeds)
    c = A.augment_moving(image, seg, points, tf.constant([[1, 3]], tf.int64))
    np.testing.assert_array_equal(a["flow"].numpy(), b["flow"].numpy())
    np.testing.assert_array_equal(a["moving"].numpy(), b["moving"].numpy())
    assert np.abs(a["flow"].numpy() - c["flow"].numpy()).max() > 0.1
    off = A.augment_moving(image, seg, points, seeds, params=None)
    np.testing.assert_array_equal(off["moving"].numpy(), image)
    np.testing.assert_array_equal(off["moving_seg"].numpy(), seg)
    np.testing.assert_array_equal(off["moving_points"].numpy(), points)
    assert off["flow"].shape == (1, 16, 16, 16, 3) and not np.any(off["flow"].numpy())


def test_default_amplitude_follows_the_reference():
    # 5^3 lattice of sample_power(-0.4, 0.4, 3) * N // 4: at 64^3 every control value is within +-6.4 voxels
    c = A.random_control(tf.constant([0, 9], tf.int64), (64, 64, 32)).numpy()
    assert c.shape == (5, 5, 5, 3)
    assert np.abs(c[..., :2]).max() <= 6.4 + 1e-5 and np.abs(c[..., 2]).max() <= 3.2 + 1e-5


def test_bad_parameters():
    for kwargs, name in [({"grid": 1}, "grid"), ({"amplitude": -1}, "amplitude"), ({"power": 0}, "power"),
                         ({"label_method": "cubic"}, "label_method"), ({"point_iterations": -2}, "point_iterations")]:
        with pytest.raises(ValueError, match=name):
            A.FFDParams(**kwargs)
    with pytest.raises(ValueError, match="moving"):
        A.augment_moving(np.zeros((1, 8, 8, 8), np.float32), np.zeros((1, 8, 8, 8), np.int32),
                         np.zeros((1, 6, 3), np.float32), tf.constant([[0, 0]], tf.int64))
