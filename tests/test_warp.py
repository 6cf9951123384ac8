import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import map_coordinates

from ldr_tf.ops import warp as W


@pytest.fixture(params=[True, False], ids=["xla", "gather"])
def sampler(request):
    old = W.xla_warp_enabled()
    W.set_xla_warp(request.param)
    yield request.param
    W.set_xla_warp(old)


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)


def _scipy_warp(img, flow):
    """img [D,H,W,C], flow [D,H,W,3] -> map_coordinates(order=1, mode='nearest') per channel."""
    coords = np.moveaxis(_grid(img.shape[:3]) + flow, -1, 0)
    return np.stack([map_coordinates(img[..., c].astype(np.float64), coords, order=1, mode="nearest")
                     for c in range(img.shape[-1])], -1)


def test_warp_matches_scipy_including_outside(rng, sampler):
    img = rng.random((2, 12, 10, 9, 2)).astype(np.float32)
    # large displacements: many sample positions leave the volume on every side
    flow = (rng.standard_normal((2, 12, 10, 9, 3)) * 6).astype(np.float32)
    assert np.any(_grid((12, 10, 9)) + flow[0] < 0) and np.any(_grid((12, 10, 9))[..., 0] + flow[0, ..., 0] > 11)
    out = W.warp(img, flow).numpy()
    for b in range(2):
        np.testing.assert_allclose(out[b], _scipy_warp(img[b], flow[b]), atol=1e-5)


def test_identity_flow_is_exact(rng, sampler):
    img = rng.random((1, 8, 7, 6, 3)).astype(np.float32)
    out = W.warp(img, np.zeros((1, 8, 7, 6, 3), np.float32)).numpy()
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_integer_shift_moves_along_its_axis(rng, axis):
    img = rng.random((1, 9, 8, 7, 1)).astype(np.float32)
    flow = np.zeros((1, 9, 8, 7, 3), np.float32)
    flow[..., axis] = 2.0  # pull from x + 2 along `axis`
    out = W.warp(img, flow).numpy()
    src = [slice(None)] * 5
    dst = [slice(None)] * 5
    src[axis + 1] = slice(2, None)
    dst[axis + 1] = slice(0, -2)
    np.testing.assert_array_equal(out[tuple(dst)], img[tuple(src)])
    # the last two slices along the axis are clamped to the border slice
    edge = [slice(None)] * 5
    edge[axis + 1] = slice(-1, None)
    tail = [slice(None)] * 5
    tail[axis + 1] = slice(-2, None)
    np.testing.assert_array_equal(out[tuple(tail)], np.repeat(img[tuple(edge)], 2, axis=axis + 1))


def test_dynamic_shapes_inside_tf_function(rng):
    f = tf.function(W.warp, input_signature=[tf.TensorSpec([None, None, None, None, 1]),
                                             tf.TensorSpec([None, None, None, None, 3])])
    for shape in [(1, 5, 6, 7), (2, 4, 4, 4)]:
        img = rng.random(shape + (1,)).astype(np.float32)
        flow = rng.standard_normal(shape + (3,)).astype(np.float32)
        np.testing.assert_allclose(f(img, flow).numpy(), W.warp(img, flow).numpy(), atol=1e-6)


def test_gradients_match_finite_differences(rng, sampler):
    img = tf.constant(rng.random((1, 5, 5, 5, 1)), tf.float64)
    # keep sample positions away from integer knots, where trilinear interpolation has no derivative
    flow = tf.constant(rng.uniform(0.2, 0.8, (1, 5, 5, 5, 3)) * np.sign(rng.standard_normal((1, 5, 5, 5, 3))),
                       tf.float64)
    weights = tf.constant(rng.standard_normal((1, 5, 5, 5, 1)), tf.float64)

    def f(i, u):
        return tf.reduce_sum(W.warp(i, u) * weights)

    theor, numer = tf.test.compute_gradient(f, [img, flow], delta=1e-4)
    for t, n in zip(theor, numer):
        np.testing.assert_allclose(t, n, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "xla"])
def test_interpolated_corners_give_the_sample_and_its_automatic_derivative(rng, compiled):
    img = tf.constant(rng.random((2, 7, 6, 5, 2)), tf.float32)
    # positions inside, outside on every side (clamped: zero derivative along that axis) and on the last voxel
    coords = rng.uniform(-2.0, 8.0, (2, 4, 5, 3, 3)).astype(np.float32)
    coords[0, 0, 0, 0] = [6.0, 5.0, 4.0]
    coords = tf.constant(coords)

    def corners_then_interpolation(i, c):
        return W.interpolate_corners(*W.trilinear_corners(i, c))

    fn = tf.function(corners_then_interpolation, jit_compile=True) if compiled else corners_then_interpolation
    value, gradient = fn(img, coords)
    assert value.shape == (2, 4, 5, 3, 2) and gradient.shape == (2, 4, 5, 3, 2, 3)
    np.testing.assert_allclose(value.numpy(), W.resample(img, coords).numpy(), atol=1e-6)
    for c in range(2):
        with tf.GradientTape() as tape:
            tape.watch(coords)
            out = W.resample(img, coords)[..., c]
        np.testing.assert_allclose(gradient[..., c, :].numpy(), tape.gradient(out, coords).numpy(), atol=1e-6)
    outside = (coords.numpy() < 0) | (coords.numpy() > np.array([6, 5, 4]))
    assert outside.any() and (~outside).any()
    assert np.all(gradient.numpy()[..., 0, :][outside] == 0)


def test_compose_equals_warping_twice(rng):
    shape = (1, 16, 16, 16)
    x = _grid(shape[1:])
    img = (np.sin(x[..., 0] / 3) * np.cos(x[..., 1] / 4) + x[..., 2] / 16)[None, ..., None].astype(np.float32)
    # two smooth fields of ~1.5 voxels
    u1 = np.stack([1.5 * np.sin(x[..., (c + 1) % 3] / 5 + c) for c in range(3)], -1)[None].astype(np.float32)
    u2 = np.stack([1.2 * np.cos(x[..., (c + 2) % 3] / 6 + c) for c in range(3)], -1)[None].astype(np.float32)
    twice = W.warp(W.warp(img, u1), u2).numpy()
    once = W.warp(img, W.compose(u1, u2)).numpy()
    inner = (slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    err = np.abs(twice - once)[inner]
    assert err.mean() < 0.01 and err.max() < 0.05  # interpolation error only (measured 0.006 / 0.03)
    naive = np.abs(twice - W.warp(img, u1 + u2).numpy())[inner]
    assert naive.mean() > 3 * err.mean()  # adding the fields instead of composing them is wrong


def test_affine_flow_reproduces_rotation_and_translation(sampler):
    """Both paths (XLA-fused for a static grid, plain broadcasts otherwise) against the coordinates."""
    shape = (9, 11, 13)
    th = np.deg2rad(20)
    A = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    b = np.array([1.0, -2.0, 0.5])
    flow = W.affine_to_flow(A[None].astype(np.float32), b[None].astype(np.float32), shape).numpy()[0]
    centre = (np.array(shape) - 1) / 2
    x = _grid(shape)
    expected = (x - centre) @ A.T + b + centre  # where each voxel samples
    np.testing.assert_allclose(x + flow, expected, atol=1e-4)
    # identity matrix and zero translation give a zero field
    zero = W.affine_to_flow(np.eye(3, dtype=np.float32)[None], np.zeros((1, 3), np.float32), shape)
    assert np.abs(zero.numpy()).max() == 0
    # a grid size known only when the graph runs, and the gradient with respect to A and b
    dynamic = tf.function(lambda A, b, n: W.affine_to_flow(A, b, n),
                          input_signature=[tf.TensorSpec([None, 3, 3]), tf.TensorSpec([None, 3]),
                                           tf.TensorSpec([3], tf.int32)])
    got = dynamic(A[None].astype(np.float32), b[None].astype(np.float32), tf.constant(shape)).numpy()[0]
    np.testing.assert_allclose(got, flow, atol=1e-5)
    At, bt = tf.Variable(A[None].astype(np.float32)), tf.Variable(b[None].astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(W.affine_to_flow(At, bt, shape) ** 2)
    gA, gb = tape.gradient(loss, [At, bt])
    xc = (x - centre).reshape(-1, 3)
    u = flow.reshape(-1, 3)
    np.testing.assert_allclose(gA.numpy()[0], 2 * u.T @ xc, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(gb.numpy()[0], 2 * u.sum(0), rtol=1e-4, atol=1e-2)


def test_compose_affine_is_exact_generic_compose(rng):
    shape = (10, 10, 10)
    A = (np.eye(3) + 0.05 * rng.standard_normal((3, 3)))[None].astype(np.float32)
    b = rng.standard_normal((1, 3)).astype(np.float32)
    aff = W.affine_to_flow(A, b, shape)
    x = _grid(shape)
    new = np.stack([0.8 * np.sin(x[..., c] / 4) for c in range(3)], -1)[None].astype(np.float32)
    exact = W.compose_affine(A, aff, new).numpy()
    generic = W.compose(aff, new).numpy()
    inner = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(exact[inner], generic[inner], atol=1e-4)  # affine fields interpolate exactly


def test_warp_labels_never_mixes_and_matches_onehot_argmax(rng):
    labels = rng.choice([0, 3, 7, 42], size=(1, 8, 8, 8)).astype(np.int32)
    flow = (rng.standard_normal((1, 8, 8, 8, 3)) * 2).astype(np.float32)
    out = W.warp_labels(labels, flow).numpy()
    assert set(np.unique(out)) <= {0, 3, 7, 42}
    values = np.array([0, 3, 7, 42])
    onehot = (labels[..., None] == values).astype(np.float32)
    scores = W.warp(onehot, flow).numpy()
    best = values[np.argmax(scores, -1)]
    # identical except where two labels tie exactly (argmax order may differ there)
    srt = np.sort(scores, -1)
    clear = srt[..., -1] - srt[..., -2] > 1e-5
    np.testing.assert_array_equal(out[clear], best[clear])
    near = W.warp_labels(labels[..., None], flow, method="nearest").numpy()
    assert near.shape == (1, 8, 8, 8, 1) and set(np.unique(near)) <= {0, 3, 7, 42}
    ident = W.warp_labels(labels, np.zeros_like(flow)).numpy()
    np.testing.assert_array_equal(ident, labels)


def test_sample_points_inside_and_outside(rng):
    flow = rng.standard_normal((1, 6, 6, 6, 3)).astype(np.float32)
    pts = np.array([[[2.0, 3.0, 1.0], [2.5, 3.25, 1.75], [-0.5, 2.0, 2.0], [10.0, 2.0, 2.0]]], np.float32)
    out = W.sample_points(flow, pts).numpy()[0]
    np.testing.assert_allclose(out[0], flow[0, 2, 3, 1], atol=1e-6)
    ref = [map_coordinates(flow[0, ..., c], pts[0, 1:2].T, order=1) for c in range(3)]
    np.testing.assert_allclose(out[1], np.concatenate(ref), atol=1e-5)
    np.testing.assert_allclose(out[2], 0.5 * flow[0, 0, 2, 2], atol=1e-6)  # half-way to the zero padding
    np.testing.assert_allclose(out[3], 0.0, atol=1e-6)


def test_upsample_flow_keeps_a_linear_field_linear():
    x = _grid((4, 4, 4))
    coarse = np.stack([0.5 * x[..., 0] + 1, 0 * x[..., 1] - 2, 0.25 * x[..., 2]], -1)[None].astype(np.float32)
    fine = W.upsample_flow(coarse, 2).numpy()[0]
    assert fine.shape == (8, 8, 8, 3)
    xf = _grid((8, 8, 8))
    pos = (xf + 0.5) / 2 - 0.5  # coarse position of each fine voxel
    inner = (slice(1, -1),) * 3
    expected = 2 * np.stack([0.5 * pos[..., 0] + 1, -2 + 0 * pos[..., 1], 0.25 * pos[..., 2]], -1)
    np.testing.assert_allclose(fine[inner], expected[inner], atol=1e-5)


@pytest.mark.parametrize(
    "image_shape, flow_shape, match",
    [
        ((8, 8, 8, 1), (1, 8, 8, 8, 3), "image: expected a rank-5"),
        ((1, 8, 8, 8, 1), (1, 8, 8, 8, 2), "flow: expected 3 channels"),
        ((1, 8, 8, 8, 1), (2, 8, 8, 8, 3), "flow: batch and spatial sizes must match image"),
        ((1, 8, 8, 8, 1), (1, 8, 8, 9, 3), "flow: batch and spatial sizes must match image"),
    ],
)
def test_bad_shapes_raise_named_errors(image_shape, flow_shape, match):
    with pytest.raises(ValueError, match=match):
        W.warp(np.zeros(image_shape, np.float32), np.zeros(flow_shape, np.float32))


def test_other_bad_inputs():
    z = np.zeros((1, 4, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="new: expected 3 channels"):
        W.compose(z, z[..., :2])
    with pytest.raises(ValueError, match="labels: expected an integer tensor"):
        W.warp_labels(np.zeros((1, 4, 4, 4), np.float32), z)
    with pytest.raises(ValueError, match="points: expected shape"):
        W.sample_points(z, np.zeros((1, 4, 2), np.float32))
    with pytest.raises(ValueError, match="A: expected"):
        W.affine_to_flow(np.eye(3, dtype=np.float32), np.zeros((1, 3), np.float32), (4, 4, 4))


@pytest.mark.parametrize("factor", [2, 3])
def test_upsample_flow_equals_the_border_clamped_sampler(rng, sampler, factor):
    coarse = rng.standard_normal((2, 5, 4, 6, 3)).astype(np.float32)
    fine = W.upsample_flow(coarse, factor).numpy()
    assert fine.shape == (2, 5 * factor, 4 * factor, 6 * factor, 3)
    for b in range(2):
        pos = (_grid(fine.shape[1:4]) + 0.5) / factor - 0.5
        ref = np.stack([map_coordinates(coarse[b, ..., c].astype(np.float64), np.moveaxis(pos, -1, 0), order=1,
                                        mode="nearest") for c in range(3)], -1) * factor
        np.testing.assert_allclose(fine[b], ref, atol=1e-5)
    if factor == 2:  # coarse fields this small skip XLA (upsample_flow); its compiled form must agree too
        np.testing.assert_allclose(W._upsample2_xla(tf.constant(coarse)).numpy(), fine, atol=1e-6)
