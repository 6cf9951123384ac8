"""ldr_tf.ops.warp.invert_flow: fixed-point inverse of a displacement field."""

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from ldr_tf.ops import warp as W


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)


def test_constant_translation_inverts_exactly():
    u = np.zeros((1, 8, 9, 10, 3), np.float32)
    u[..., :] = [1.5, -2.0, 0.25]
    v = W.invert_flow(u, iterations=3).numpy()
    np.testing.assert_allclose(v, -u, atol=1e-6)


def test_affine_field_inverse_matches_the_inverse_matrix():
    shape = (20, 20, 20)
    th = np.deg2rad(8)
    A = np.array([[1.05, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    b = np.array([0.5, -1.0, 0.75])
    u = W.affine_to_flow(A[None].astype(np.float32), b[None].astype(np.float32), shape)
    v = W.invert_flow(u, iterations=30).numpy()[0]
    # analytic inverse map: x_c -> A^-1 (x_c - b)
    Ai = np.linalg.inv(A)
    xc = _grid(shape) - (np.array(shape) - 1) / 2
    expected = (xc - b) @ Ai.T - xc
    inner = (slice(4, -4),) * 3  # x + v(x) stays inside the grid there, so border clamping plays no role
    np.testing.assert_allclose(v[inner], expected[inner], atol=1e-3)


def test_smooth_field_composes_to_identity(rng):
    shape = (24, 24, 24)
    x = _grid(shape)
    u = np.stack([2.0 * np.sin(x[..., (c + 1) % 3] / 4 + c) * np.cos(x[..., (c + 2) % 3] / 5)
                  for c in range(3)], -1)
    v = W.invert_flow(u[None].astype(np.float32), iterations=20).numpy()[0].astype(np.float64)
    # independent evaluation of v(x) + u(x + v(x)) with scipy
    pos = np.moveaxis(x + v, -1, 0)
    u_at = np.stack([map_coordinates(u[..., c], pos, order=1, mode="nearest") for c in range(3)], -1)
    residual = np.linalg.norm(v + u_at, axis=-1)[4:-4, 4:-4, 4:-4]
    naive = np.linalg.norm(-u + np.stack([map_coordinates(u[..., c], np.moveaxis(x - u, -1, 0), order=1,
                                                          mode="nearest") for c in range(3)], -1),
                           axis=-1)[4:-4, 4:-4, 4:-4]
    assert residual.max() < 0.05 and residual.mean() < 0.01  # trilinear interpolation error only
    assert naive.mean() > 10 * residual.mean()  # -u is not the inverse of u


def test_bad_arguments():
    with pytest.raises(ValueError, match="flow"):
        W.invert_flow(np.zeros((1, 4, 4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="iterations"):
        W.invert_flow(np.zeros((1, 4, 4, 4, 3), np.float32), iterations=-1)
