import numpy as np
import pytest

from ldr_tf.ops import metrics as M


def test_dice_jaccard_on_hand_made_boxes():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[0:4] = True  # 400 voxels
    b[2:6] = True  # 400 voxels, overlap 200
    assert M.dice(a, b) == pytest.approx(0.5)
    assert M.jaccard(a, b) == pytest.approx(200 / 600)
    assert np.isnan(M.dice(np.zeros_like(a), np.zeros_like(a)))


def test_label_overlap_means_over_fixed_labels():
    fixed = np.zeros((4, 4, 4), int)
    fixed[:2] = 1
    fixed[2:, :2] = 2
    warped = fixed.copy()
    warped[2:, :2] = 0  # label 2 lost completely
    warped[0, 0, 0] = 5  # label absent from fixed: not scored
    r = M.label_overlap(fixed, warped)
    assert set(r["per_label"]) == {1, 2}
    d1 = 2 * 31 / (32 + 31)
    assert r["per_label"][2][0] == 0.0
    assert r["dice"] == pytest.approx((d1 + 0.0) / 2)
    with pytest.raises(ValueError, match="warped_seg: shape"):
        M.label_overlap(fixed, warped[:3])


def test_landmark_distance_in_voxels_and_mm():
    fp = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [-1, -1, -1]])
    mp = np.array([[2.0, 2.0, 3.0], [5.0, 8.0, 9.0], [1.0, 1.0, 1.0]])
    du = np.zeros((3, 3))
    r = M.landmark_distance(fp, mp, du, spacing=(2.0, 1.0, 1.0))
    assert r["count"] == 2
    assert r["voxels"] == pytest.approx((1 + 5) / 2)
    assert r["mm"] == pytest.approx((2 + 5) / 2)
    du[0] = [1, 0, 0]
    assert M.landmark_distance(fp, mp, du)["voxels"] == pytest.approx(5 / 2)


def test_jacobian_of_known_fields():
    g = np.stack(np.meshgrid(*[np.arange(8.0)] * 3, indexing="ij"), -1)
    assert np.allclose(M.jacobian_determinant(np.zeros((8, 8, 8, 3))), 1.0)
    scale = 0.5 * g  # x -> 1.5 x: det = 1.5^3
    assert np.allclose(M.jacobian_determinant(scale), 1.5 ** 3)
    stats = M.jacobian_stats(scale)
    assert stats["jac_std"] == pytest.approx(0.0, abs=1e-12) and stats["folding_pct"] == 0.0
    fold = np.zeros((8, 8, 8, 3))
    fold[..., 0] = -2.0 * g[..., 0]  # x -> -x along axis 0: det = -1 everywhere
    assert M.jacobian_stats(fold)["folding_pct"] == 100.0
    local = np.zeros((8, 8, 8, 3))
    local[4:, ..., 0] = -3.0  # a step that makes x + u(x) non-monotone around slice 4
    s = M.jacobian_stats(local)
    assert 0 < s["folding_pct"] < 100 and s["jac_min"] <= 0
    with pytest.raises(ValueError, match="flow: expected shape"):
        M.jacobian_determinant(np.zeros((8, 8, 8, 2)))


def test_one_pass_counts_equal_the_label_by_label_loop(rng):
    a = rng.integers(0, 6, (20, 18, 16))
    b = np.where(rng.random(a.shape) < 0.8, a, rng.integers(0, 7, a.shape))
    fast = M.label_overlap(a, b)
    slow = M.label_overlap(a.astype(float), b.astype(float))  # float maps take the per-label loop
    assert fast["labels"] == slow["labels"] == 5
    assert fast["dice"] == pytest.approx(slow["dice"]) and fast["jaccard"] == pytest.approx(slow["jaccard"])
    for k, v in slow["per_label"].items():
        assert fast["per_label"][k] == pytest.approx(v)
    big = a.astype(np.int64) * 10_000_000  # out of the histogram's range: the loop again
    assert M.label_overlap(big, b * 10_000_000)["dice"] == pytest.approx(slow["dice"])
