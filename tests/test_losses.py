import numpy as np
import pytest

from ldr_tf.ops import losses as L


def test_correlation_identical_and_affine_related_images(rng):
    a = rng.random((2, 6, 6, 6, 1)).astype(np.float32)
    # exactly 1 - var / (var + 1e-6): the reference epsilon leaves ~1e-5 for variances ~0.08
    np.testing.assert_allclose(L.correlation_loss(a, a, "none").numpy(), 0.0, atol=5e-5)
    np.testing.assert_allclose(L.correlation_loss(a, 3 * a + 1, "none").numpy(), 0.0, atol=5e-5)
    np.testing.assert_allclose(L.correlation_loss(a, 1 - a, "none").numpy(), 2.0, atol=5e-5)


def test_correlation_matches_numpy_and_reductions(rng):
    a = rng.random((3, 5, 5, 5, 1))
    b = rng.random((3, 5, 5, 5, 1))
    per = L.correlation_loss(a, b, "none").numpy()
    ref = [1 - np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(3)]
    np.testing.assert_allclose(per, ref, atol=1e-4)  # the 1e-6 epsilon barely moves r here
    np.testing.assert_allclose(L.correlation_loss(a, b).numpy(), per.sum(), rtol=1e-6)
    np.testing.assert_allclose(L.correlation_loss(a, b, "mean").numpy(), per.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        L.correlation_loss(a, b, "avg")


def test_correlation_epsilon_on_constant_image():
    a = np.ones((1, 4, 4, 4, 1), np.float32)
    # variances 0: the epsilons keep the ratio finite; the covariance is 0, so r = 0 and the loss is exactly 1
    np.testing.assert_allclose(L.correlation_loss(a, a).numpy(), 1.0, atol=1e-6)
    ramp = np.arange(64, dtype=np.float32).reshape(1, 4, 4, 4, 1)
    np.testing.assert_allclose(L.correlation_loss(a, ramp).numpy(), 1.0, atol=1e-6)


def test_lncc_loss_against_a_direct_computation(rng):
    a = rng.random((2, 7, 6, 5, 1)).astype(np.float32)
    b = rng.random((2, 7, 6, 5, 1)).astype(np.float32)
    per = L.lncc_loss(a, b, 3, "none").numpy()
    # by hand: the 3x3x3 box of each voxel, the volume mirrored at its border (edge voxels repeated)
    pa = np.pad(a, [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)], mode="symmetric")
    pb = np.pad(b, [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)], mode="symmetric")
    ref = np.zeros(2)
    for n in range(2):
        vals = []
        for x in range(7):
            for y in range(6):
                for z in range(5):
                    u = pa[n, x:x + 3, y:y + 3, z:z + 3, 0].ravel().astype(np.float64)
                    v = pb[n, x:x + 3, y:y + 3, z:z + 3, 0].ravel().astype(np.float64)
                    cov = (u * v).mean() - u.mean() * v.mean()
                    vals.append(cov ** 2 / (u.var() * v.var() + L.NCC_EPS))
        ref[n] = 1 - np.mean(vals)
    np.testing.assert_allclose(per, ref, atol=2e-4)
    assert L.lncc_loss(a, 2 * a + 1, 3).numpy() < 0.02  # a local linear intensity change costs (almost) nothing
    assert L.lncc_loss(a, b, 3, "sum").numpy() == pytest.approx(per.sum(), rel=1e-6)
    with pytest.raises(ValueError, match="window: expected an odd number"):
        L.lncc_loss(a, b, 4)
    # the fixed image's moments computed once (as ldr_tf.refine does) give the same value, bit for bit
    moments = L.local_moments(a, 3)
    np.testing.assert_array_equal(L.local_ncc(a, b, 3, moments).numpy(), L.local_ncc(a, b, 3).numpy())


def test_smoothness_of_a_linear_ramp():
    D, H, W = 6, 5, 4
    flow = np.zeros((1, D, H, W, 3))
    flow[..., 1] = 0.7 * np.arange(D)[:, None, None]  # channel 1 grows along axis 0
    expected = 0.5 * 0.7 ** 2 * (D - 1) * H * W / (D * H * W * 3)
    np.testing.assert_allclose(L.smoothness_loss(flow).numpy(), expected, rtol=1e-6)
    assert L.smoothness_loss(np.ones((2, 4, 4, 4, 3)) * 5).numpy() == 0.0  # translations are free


def test_affine_losses_on_rotation_and_scaling():
    th = 0.4
    R = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])[None]
    np.testing.assert_allclose(L.affine_det_loss(R).numpy(), 0.0, atol=1e-10)
    np.testing.assert_allclose(L.affine_ortho_loss(R).numpy(), 0.0, atol=1e-8)
    S = np.diag([2.0, 1.0, 1.0])[None]
    np.testing.assert_allclose(L.affine_det_loss(S).numpy(), 0.5, rtol=1e-6)
    # eigenvalues of A^T A + eps: 4+eps, 1+eps, 1+eps
    e = 1e-5
    lam = np.array([4 + e, 1 + e, 1 + e])
    ref = np.sum(lam + (1 + e) ** 2 / lam) - 6 * (1 + e)
    np.testing.assert_allclose(L.affine_ortho_loss(S).numpy(), ref, rtol=1e-6)
    both = np.concatenate([R, S])
    np.testing.assert_allclose(L.affine_ortho_loss(both, "none").numpy(), [0, ref], atol=1e-7)
    with pytest.raises(ValueError, match="A: expected"):
        L.affine_det_loss(np.eye(3))


def test_sampled_dice_loss_values_gradient_and_seed():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    seg = np.zeros((2, 8, 8, 8), np.int32)
    seg[:, 2:6, 2:6, 2:6] = 3
    seg[:, 0:2, :, :] = 7
    values = tf.constant([3, 7, 9], tf.int32)  # 9 is absent from both maps: Dice 1 (loss 0)
    zero = tf.zeros([2, 8, 8, 8, 3])
    same = L.sampled_dice_loss(seg, seg, zero, values, 3, [1, 2], "none")
    np.testing.assert_allclose(same.numpy(), 0.0, atol=1e-5)
    other = np.where(seg == 3, 7, np.where(seg == 7, 3, 0)).astype(np.int32)  # labels swapped: no overlap
    swapped = L.sampled_dice_loss(seg, other, zero, values, 3, [1, 2], "none").numpy()
    np.testing.assert_allclose(swapped, 2.0 / 3.0, atol=1e-4)  # two of the three labels fully wrong
    # differentiable in the flow, and the same seed draws the same labels
    flow = tf.Variable(rng.normal(0, 0.5, (2, 8, 8, 8, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = L.sampled_dice_loss(seg, seg, flow, values, 2, [5, 6])
    grad = tape.gradient(loss, flow)
    assert float(tf.reduce_max(tf.abs(grad))) > 0
    a = L.sampled_dice_loss(seg, other, flow, values, 1, [3, 4]).numpy()
    b = L.sampled_dice_loss(seg, other, flow, values, 1, [3, 4]).numpy()
    assert a == b


def test_sampled_dice_loss_at_half_resolution():
    import tensorflow as tf

    seg = np.zeros((1, 8, 8, 8), np.int32)
    seg[:, 2:6, 2:6, 2:6] = 3
    seg[:, 0:2, :, :] = 7
    other = np.where(seg == 3, 7, np.where(seg == 7, 3, 0)).astype(np.int32)
    values = tf.constant([3, 7], tf.int32)
    zero = tf.zeros([1, 8, 8, 8, 3])
    np.testing.assert_allclose(L.sampled_dice_loss(seg, seg, zero, values, 2, [1, 2], half=True).numpy(), 0.0,
                               atol=1e-5)
    np.testing.assert_allclose(L.sampled_dice_loss(seg, other, zero, values, 2, [1, 2], half=True).numpy(), 1.0,
                               atol=1e-4)
    # a flow of 2 voxels is 1 voxel of the half grid: a block moved by 2 voxels is registered exactly either way
    fixed = np.zeros((1, 8, 8, 8), np.int32)
    fixed[:, 2:4, 2:6, 2:6] = 3
    moving = np.roll(fixed, 2, axis=1)
    shift = np.zeros((1, 8, 8, 8, 3), np.float32)
    shift[..., 0] = 2.0
    for h in (False, True):
        np.testing.assert_allclose(L.sampled_dice_loss(fixed, moving, shift, values[:1], 1, [1, 2], half=h).numpy(),
                                   0.0, atol=1e-4)
        assert L.sampled_dice_loss(fixed, moving, zero, values[:1], 1, [1, 2], half=h).numpy() > 0.9
