"""The half-resolution student cascade (``stem="ldr_half"``): shapes, identity at init, exact affine part,
gradients, size rules and the export round trip."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ldr_tf.ops import losses, warp
from networks.cascade import CascadeConfig, RecursiveCascade

S = 64


def _half(cascades=2, affine="lite", size=S):
    keras.utils.set_random_seed(3)
    cfg = CascadeConfig(stem="ldr_half", affine=affine, cascades=cascades, image_size=(size,) * 3,
                        student_channels=(2, 4, 4, 8))
    return RecursiveCascade(cfg)


@pytest.fixture(scope="module")
def pair():
    return np.random.default_rng(7).random((2, S, S, S, 2), dtype=np.float32)


def test_shapes_and_identity_at_init(pair):
    model = _half(3)
    out = model(pair)
    assert out["agg_flow"].shape == (2, S, S, S, 3) and out["warped"].shape == (2, S, S, S, 1)
    assert out["flows"][0].shape == (2, S, S, S, 3)  # the affine stage, full resolution
    assert [tuple(f.shape) for f in out["flows"][1:]] == [(2, S // 2, S // 2, S // 2, 3)] * 3
    assert np.abs(out["agg_flow"].numpy()).max() < 1e-2
    np.testing.assert_allclose(out["warped"].numpy(), pair[..., 1:2], atol=1e-2)


def test_the_affine_part_stays_exact_at_full_resolution(pair):
    model = _half(2)
    model(pair)
    for stem in model.dense_stems:  # dense stems output exactly zero
        for v in stem.flow_head.weights:
            v.assign(tf.zeros_like(v))
    rng = np.random.default_rng(1)
    for layer in (model.affine_stem.conv7_W, model.affine_stem.conv7_b):  # some non-trivial affine map
        k = layer.kernel
        k.assign(rng.normal(0, 0.02, k.shape).astype(np.float32))
    out = model(pair)
    expect = model.affine_stage(pair)["flow"].numpy()
    assert np.abs(expect).max() > 0.1
    np.testing.assert_allclose(out["agg_flow"].numpy(), expect, atol=1e-5)
    np.testing.assert_allclose(out["warped"].numpy(), warp.warp(pair[..., 1:2], expect).numpy(), atol=1e-5)


def test_gradients_reach_every_stem(pair):
    model = _half(2, affine="none")
    with tf.GradientTape() as tape:
        out = model(pair, training=True)
        loss = tf.reduce_mean(tf.square(out["warped"] - pair[..., :1])) + 0.1 * tf.reduce_sum(losses.cascade_regularisers(out, False)["smoothness"])
    heads = [stem.flow_head.kernel for stem in model.dense_stems]
    grads = tape.gradient(loss, heads)
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


def test_size_rules():
    with pytest.raises(ValueError, match="half-resolution LDR student"):
        CascadeConfig(stem="ldr_half", affine="none", image_size=(48, 48, 48))
    CascadeConfig(stem="ldr_half", affine="none", image_size=(32, 64, 96))


def test_export_round_trip(pair, tmp_path):
    from ldr_tf.deploy.savedmodel import export_model

    model = _half(1)
    ref = model(pair[:1])
    out = export_model(model, tmp_path / "half", {"model": "student"}, xla_warp=True)
    loaded = tf.saved_model.load(str(out)).signatures["register"]
    res = loaded(fixed=tf.constant(pair[:1, ..., :1]), moving=tf.constant(pair[:1, ..., 1:]))
    np.testing.assert_allclose(res["flow"].numpy(), ref["agg_flow"].numpy(), atol=1e-5)
    np.testing.assert_allclose(res["warped"].numpy(), ref["warped"].numpy(), atol=1e-5)
