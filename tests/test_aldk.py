"""`ldr_tf.training.aldk`: where the penalty is taken, the penalty against finite differences, the student's losses."""

import numpy as np
import pytest
import tensorflow as tf

from ldr_tf.training import aldk


class Quadratic:
    """A critic with a known gradient: D(x) = sum(w * x^2) per sample, dD/dx = 2 w x."""

    def __init__(self, shape, seed=0):
        self.w = tf.constant(np.random.default_rng(seed).normal(size=shape).astype(np.float32))

    def __call__(self, x, training=False):
        return tf.reduce_sum(self.w * tf.square(x), axis=[1, 2, 3, 4])


def _flows(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(batch, 2, 3, 2, 3)).astype(np.float32)),
            tf.constant(rng.normal(size=(batch, 2, 3, 2, 3)).astype(np.float32)))


def test_joint_deformation_fixed_and_random():
    phi_s, phi_t = _flows()
    np.testing.assert_allclose(aldk.joint_deformation(phi_s, phi_t, 0.1).numpy(),
                               (0.1 * phi_t + 0.9 * phi_s).numpy(), rtol=1e-6)
    a = aldk.joint_deformation(phi_s, phi_t, 0.1, "random", seed=[1, 2]).numpy()
    b = aldk.joint_deformation(phi_s, phi_t, 0.1, "random", seed=[1, 2]).numpy()
    c = aldk.joint_deformation(phi_s, phi_t, 0.1, "random", seed=[1, 3]).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # each sample lies on its own segment between phi_s and phi_t, at its own point
    d = (phi_t - phi_s).numpy()
    e = [np.sum((a[i] - phi_s.numpy()[i]) * d[i]) / np.sum(d[i] ** 2) for i in range(3)]
    for i in range(3):
        np.testing.assert_allclose(a[i], phi_s.numpy()[i] + e[i] * d[i], atol=1e-5)
    assert all(0 <= x <= 1 for x in e) and len(set(np.round(e, 6))) == 3
    with pytest.raises(ValueError, match="needs a seed"):
        aldk.joint_deformation(phi_s, phi_t, 0.1, "random")
    with pytest.raises(ValueError, match="point"):
        aldk.joint_deformation(phi_s, phi_t, 0.1, "middle")


@pytest.mark.parametrize("norm", ["l2", "rms"])
def test_penalty_at_random_interpolates_matches_finite_differences(norm):
    phi_s, phi_t = _flows(1)
    critic = Quadratic(phi_s.shape[1:], seed=2)
    phi_hat = aldk.joint_deformation(phi_s, phi_t, 0.1, "random", seed=[4, 5])
    got = aldk.gradient_penalty(critic, phi_hat, norm=norm).numpy()
    x = phi_hat.numpy().astype(np.float64)
    w = critic.w.numpy().astype(np.float64)
    n = x[0].size
    for i in range(x.shape[0]):
        grad = np.zeros_like(x[i])
        h = 1e-2
        for idx in np.ndindex(x[i].shape):  # central differences of D (exact for a quadratic)
            up, down = x[i].copy(), x[i].copy()
            up[idx] += h
            down[idx] -= h
            grad[idx] = (np.sum(w * up ** 2) - np.sum(w * down ** 2)) / (2 * h)
        scale = np.sqrt(n) if norm == "rms" else 1.0
        expect = (scale * np.linalg.norm(grad) - 1.0) ** 2
        np.testing.assert_allclose(got[i], expect, rtol=1e-3)


def test_critic_losses_random_point_and_wgan_generator_loss():
    phi_s, phi_t = _flows(2)
    critic = Quadratic(phi_s.shape[1:], seed=3)
    terms = aldk.critic_losses(critic, phi_s, phi_t, 0.1, 10.0, gp_point="random", seed=[7, 8])
    np.testing.assert_allclose(terms["loss"].numpy(),
                               (terms["d_student"] - terms["d_teacher"] + 10.0 * terms["gp"]).numpy(), rtol=1e-5)
    wgan = aldk.discrimination_loss(critic, phi_s, phi_t, mode="wgan").numpy()
    np.testing.assert_allclose(wgan, (critic(phi_t) - critic(phi_s)).numpy(), rtol=1e-5)
    absolute = aldk.discrimination_loss(critic, phi_s, phi_t, mode="abs").numpy()
    np.testing.assert_allclose(absolute, np.abs(wgan), rtol=1e-5)


def test_dense_residual_removes_exactly_the_affine_part(rng):
    from ldr_tf.ops import warp

    A = np.eye(3)[None] + 0.1 * rng.normal(size=(2, 3, 3))
    b = 3 * rng.normal(size=(2, 3))
    affine = warp.affine_to_flow(tf.constant(A, tf.float32), tf.constant(b, tf.float32), (8, 10, 12))
    dense = tf.constant(rng.normal(size=(2, 8, 10, 12, 3)), tf.float32)
    np.testing.assert_allclose(warp.dense_residual(affine).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(warp.dense_residual(affine + dense).numpy(), warp.dense_residual(dense).numpy(),
                               atol=1e-4)
    r = warp.dense_residual(dense).numpy()
    np.testing.assert_allclose(r.mean(axis=(1, 2, 3)), 0, atol=1e-5)  # no translation left


def test_distillation_loss_ignores_affine_differences(rng):
    from ldr_tf.ops import losses, warp

    dense = tf.constant(rng.normal(size=(2, 8, 8, 8, 3)), tf.float32)
    shift = warp.affine_to_flow(tf.eye(3, batch_shape=[2]), tf.constant([[4.0, 0, 0], [0, -2.0, 1.0]]), (8, 8, 8))
    assert float(losses.distillation_loss(dense + shift, dense, "l2")) == pytest.approx(0, abs=1e-8)
    other = tf.constant(rng.normal(size=(2, 8, 8, 8, 3)), tf.float32)
    l2 = losses.distillation_loss(dense, other, "l2", "none").numpy()
    l1 = losses.distillation_loss(dense, other, "l1", "none").numpy()
    assert l2.shape == (2,) and (l2 > 1).all() and (l1 > 0.5).all()
    with pytest.raises(ValueError, match="kind: expected one of"):
        losses.distillation_loss(dense, other, "kl")


def test_views_of_a_deformation(rng):
    from ldr_tf.ops import warp

    flow = tf.constant(rng.normal(size=(1, 8, 8, 8, 3)), tf.float32)
    pair = tf.constant(rng.random((1, 8, 8, 8, 2)), tf.float32)
    assert aldk.make_view(pair, "total", "none")(flow).shape[-1] == 3
    images = aldk.make_view(pair, "total", "images")(flow).numpy()
    np.testing.assert_array_equal(images[..., 3:], pair.numpy())
    warped = aldk.make_view(pair, "residual", "warped")(flow).numpy()
    np.testing.assert_allclose(warped[..., :3], warp.dense_residual(flow).numpy(), atol=1e-6)
    np.testing.assert_allclose(warped[..., 4:], warp.warp(pair[..., 1:2], flow).numpy(), atol=1e-6)
    assert aldk.make_view(pair, "residual", "warped").channels() == 5
    with pytest.raises(ValueError, match="condition: expected one of"):
        aldk.make_view(pair, "total", "labels")
    # the penalty of a warped view differentiates through the warp: finite and per sample
    from networks.critic import Critic

    flow = tf.constant(rng.normal(size=(1, 32, 32, 32, 3)), tf.float32)  # the critic's stride is 32
    view = aldk.make_view(tf.constant(rng.random((1, 32, 32, 32, 2)), tf.float32), "total", "warped")
    critic = Critic()
    critic(view(flow))
    gp = aldk.gradient_penalty(critic, flow, view)
    assert gp.shape == (1,) and np.isfinite(gp.numpy()).all()
