"""Refinement (instance optimisation): it aligns what the network left unaligned, deterministically, from the
images alone, and rejects settings it cannot honour."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from ldr_tf.ops import warp
from ldr_tf.ops.losses import smoothness_loss
from ldr_tf.ops.losses import local_moments, local_ncc
from ldr_tf.refine import Refiner, objective_gradient

N = 32


def _texture(seed, n=N, sigma=2.0):
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((n, n, n)), sigma)
    x = (x - x.min()) / (x.max() - x.min())
    return x[None, ..., None].astype(np.float32)


def _smooth_field(seed, amplitude, n=N):
    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=(n, n, n)), 5.0) for _ in range(3)], -1)
    return (u * amplitude / np.abs(u).max())[None].astype(np.float32)


@pytest.fixture(scope="module")
def pair():
    fixed = _texture(0)
    truth = _smooth_field(1, 2.0)
    moving = warp.warp(fixed, -truth).numpy()  # fixed ~ moving(x + truth): a smooth 2-voxel deformation
    return fixed, moving, truth


def _mse(a, b):
    return float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))


def test_refinement_from_zero_aligns_a_smooth_deformation_deterministically(pair):
    fixed, moving, truth = pair
    zero = np.zeros((1, N, N, N, 3), np.float32)
    refiner = Refiner(40)
    flow = refiner(fixed, moving, zero).numpy()
    again = refiner(fixed, moving, zero).numpy()
    np.testing.assert_array_equal(flow, again)  # no state survives a call
    before = _mse(moving, fixed)
    after = _mse(warp.warp(moving, flow), fixed)
    assert after < 0.35 * before, (before, after)
    # the field found points the way of the true one (cosine 0.74 here; the smooth texture leaves some freedom)
    cosine = np.sum(flow * truth) / np.sqrt(np.sum(flow * flow) * np.sum(truth * truth))
    assert cosine > 0.6, cosine


@pytest.mark.parametrize("smooth, window", [(2.0, 5), (3.0, 3)])
def test_the_chained_gradient_is_the_objectives_automatic_gradient(pair, smooth, window):
    fixed, moving, truth = pair
    # a batch of two different pairs, flows that leave the volume in places (clamped positions)
    fixed2, moving2 = (tf.constant(np.concatenate([x, x[:, ::-1]])) for x in (fixed, moving))
    u = tf.constant(np.concatenate([truth, -3.0 * truth]))
    grid = warp.identity_grid([N, N, N])[None]
    corners = warp.trilinear_corners(moving2, grid + u)
    got = objective_gradient(fixed2, local_moments(fixed2, window), corners, u, smooth, window)
    with tf.GradientTape() as tape:
        tape.watch(u)
        loss = tf.reduce_sum(-local_ncc(fixed2, warp.warp(moving2, u), window) + smooth * smoothness_loss(u, "none"))
    want = tape.gradient(loss, u).numpy()
    assert np.abs(want[1]).max() > 0 and np.abs(want[0]).max() > 0
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5 * np.abs(want).max())  # float32 rounding


def test_levels_run_coarse_to_fine_and_zero_steps_change_nothing(pair):
    fixed, moving, truth = pair
    zero = np.zeros((1, N, N, N, 3), np.float32)
    np.testing.assert_array_equal(Refiner(0)(fixed, moving, truth).numpy(), truth)
    np.testing.assert_array_equal(Refiner((0, 0))(fixed, moving, truth).numpy(), truth)
    two = Refiner((20, 20))
    assert two.steps == [20, 20] and [lv["factor"] for lv in two.to_dict()["levels"]] == [2, 1]
    two.compile((N, N, N))
    np.testing.assert_array_equal(two._run(fixed, moving, truth, zero=True).numpy(), truth)
    coarse = Refiner(20)(fixed, moving, zero)
    fine_only = Refiner((0, 20))
    np.testing.assert_allclose(two(fixed, moving, zero).numpy(), fine_only(fixed, moving, coarse).numpy(), atol=1e-5)
    level = two.to_dict()["levels"][1]

    def fine_objective(u):
        return float(-local_ncc(fixed, warp.warp(moving, u), level["window"])[0]
                     + level["smooth"] * smoothness_loss(u))

    # (Adam's first steps overshoot at full resolution: after 5 the objective is worse, after 20 better)
    assert fine_objective(two(fixed, moving, zero)) < fine_objective(coarse) - 0.01


def test_local_ncc_is_one_for_a_linear_intensity_change_and_low_for_unrelated_images():
    # (a textured image: in flat regions the 1e-5 in the denominator dominates and the score tends to 0)
    a = tf.constant(_texture(2, sigma=0.7))
    same = local_ncc(a, 3.0 * a + 0.5, 3).numpy()
    other = local_ncc(a, tf.constant(_texture(3, sigma=0.7)), 3).numpy()
    assert same.shape == (1,) and same[0] > 0.95, same
    assert other[0] < 0.3, other


@pytest.mark.parametrize("steps, level, match", [(-1, {}, "steps"), (2.5, {}, "steps"), ((1, 2, 3), None, "3 counts"),
                                                 (1, {"window": 4}, "window"), (1, {"factor": 0}, "factor"),
                                                 (1, {"lr": 0}, "lr")])
def test_bad_settings(steps, level, match):
    with pytest.raises(ValueError, match=match):
        Refiner(steps, None if level is None else [level])


def test_a_grid_the_factor_does_not_divide_is_refused():
    x = np.zeros((1, 10, 12, 12, 1), np.float32)
    with pytest.raises(ValueError, match="not divisible by the factor 4"):
        Refiner(3, [{"factor": 4}])(x, x, np.zeros((1, 10, 12, 12, 3), np.float32))
