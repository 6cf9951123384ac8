"""Stems and critic: shapes, near-identity students, parameter counts, size errors, configs, seeds."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ldr_tf.ops import losses, warp
from networks.affine import AffineLiteStem, AffineStem
from networks.critic import Critic
from networks.layers import check_divisible
from networks.ldr import LDR, LDRReleased
from networks.vtn import VTN

SHAPE_128 = (None, 128, 128, 128, 2)


def _pair(rng, size, batch=1):
    return rng.random((batch, size, size, size, 2), dtype=np.float32)


# ------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "factory, expected",
    [
        (lambda: AffineStem(), 14_166_288),  # reference 2.1 (encoder 14,117,136 + heads 49,152)
        (lambda: VTN(channels=16), 28_252_203),  # reference 2.2
        (lambda: LDRReleased(), 280_659),  # reference 2.3
        (lambda: AffineLiteStem(), 332_880),  # reference 2.4
        # paper student: 4^3 convs 2-16-32-64-128 (+bias), deconvs 128-64, 128-32, 64-16 (no bias), head
        (lambda: LDR(head="deconv"), 2064 + 32800 + 131136 + 524416 + 524288 + 262144 + 65536 + 64 * 32 * 3 + 3),
        (lambda: LDR(head="upsample"), 2064 + 32800 + 131136 + 524416 + 524288 + 262144 + 65536 + 27 * 32 * 3 + 3),
    ],
    ids=["affine", "vtn", "ldr_released", "lite", "ldr_deconv", "ldr_upsample"],
)
def test_parameter_counts_at_128(factory, expected):
    model = factory()
    model.build(SHAPE_128)
    assert model.count_params() == expected


def test_critic_parameter_count_is_size_independent():
    # 3^3 3->3, then 4^3 convs 3-16-32-64-128-256, all with bias
    expected = 27 * 9 + 3 + 64 * 3 * 16 + 16 + 64 * 16 * 32 + 32 + 64 * 32 * 64 + 64 + 64 * 64 * 128 + 128
    expected += 64 * 128 * 256 + 256
    for size in (32, 128):
        critic = Critic()
        critic.build((None, size, size, size, 3))
        assert critic.count_params() == expected == 2_789_094


def test_affine_head_kernel_follows_the_input_size():
    stem = AffineStem(channels=2)
    stem.build((None, 128, 128, 64, 2))
    assert tuple(stem.conv7_W.kernel.shape) == (2, 2, 1, 64, 9)
    lite = AffineLiteStem()
    lite.build((None, 128, 128, 128, 2))
    assert tuple(lite.conv7_b.kernel.shape) == (3, 3, 3, 128, 3)


# ------------------------------------------------------------------------------------ forward


def test_vtn_forward_shape_and_scale(rng):
    pair = _pair(rng, 64, batch=2)
    flow = VTN(channels=4)(pair)
    assert flow.shape == (2, 64, 64, 64, 3)
    # flow = pred0 * 20 * flow_multiplier: halving the multiplier halves the flow for the same weights
    half = VTN(channels=4, flow_multiplier=0.5)
    half.build(pair.shape)
    ref = VTN(channels=4)
    ref.build(pair.shape)
    half.set_weights(ref.get_weights())
    np.testing.assert_allclose(half(pair).numpy(), 0.5 * ref(pair).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: LDR(head="deconv"), lambda: LDR(head="upsample"), LDRReleased],
                         ids=["ldr_deconv", "ldr_upsample", "ldr_released"])  # fmt: skip
def test_fresh_student_is_near_identity(rng, make):
    pair = _pair(rng, 64)
    flow = make()(pair).numpy()
    assert flow.shape == (1, 64, 64, 64, 3)
    assert 0 < np.abs(flow).max() < 1e-2
    warped = warp.warp(pair[..., 1:2], flow).numpy()
    np.testing.assert_allclose(warped, pair[..., 1:2], atol=1e-2)


def test_upsample_head_doubles_a_constant_half_resolution_flow(rng):
    pair = _pair(rng, 32)
    for head, factor in (("deconv", 1.0), ("upsample", 2.0)):
        model = LDR(channels=(2, 4, 4, 8), head=head, flow_multiplier=0.25)
        model.build(pair.shape)
        model.flow_head.kernel.assign(tf.zeros_like(model.flow_head.kernel))
        model.flow_head.bias.assign([1.0, -2.0, 4.0])
        flow = model(pair).numpy()
        expected = factor * 0.25 * np.array([1.0, -2.0, 4.0], np.float32)
        np.testing.assert_allclose(flow, np.broadcast_to(expected, flow.shape), atol=1e-6)


def test_affine_stems_outputs(rng):
    pair = _pair(rng, 64, batch=2)
    for stem in (AffineStem(channels=2), AffineLiteStem(channels=(2, 4, 4, 8))):
        out = stem(pair)
        assert out["flow"].shape == (2, 64, 64, 64, 3)
        assert out["A"].shape == (2, 3, 3) and out["b"].shape == (2, 3)
        np.testing.assert_allclose(out["A"].numpy() - out["W"].numpy(), np.broadcast_to(np.eye(3), (2, 3, 3)),
                                   atol=1e-6)  # fmt: skip
        expected = warp.affine_to_flow(out["A"], out["b"], (64, 64, 64)).numpy()
        np.testing.assert_allclose(out["flow"].numpy(), expected, atol=1e-5)
        A = out["A"].numpy()
        det = losses.affine_det_loss(out["A"], "none").numpy()
        np.testing.assert_allclose(det, 0.5 * (np.linalg.det(A) - 1) ** 2, rtol=1e-4, atol=1e-7)


def test_affine_stem_zero_head_is_identity(rng):
    pair = _pair(rng, 64)
    stem = AffineStem(channels=2)
    stem.build(pair.shape)
    stem.conv7_W.kernel.assign(tf.zeros_like(stem.conv7_W.kernel))
    stem.conv7_b.kernel.assign(tf.zeros_like(stem.conv7_b.kernel))
    out = stem(pair)
    np.testing.assert_allclose(out["A"].numpy()[0], np.eye(3), atol=1e-7)
    assert np.abs(out["flow"].numpy()).max() == 0.0
    assert abs(float(losses.affine_det_loss(out["A"], "none")[0])) < 1e-10
    assert abs(float(losses.affine_ortho_loss(out["A"], "none")[0])) < 1e-4


@pytest.mark.parametrize("size", [32, 64])
def test_critic_returns_one_value_per_sample(rng, size):
    flows = rng.normal(size=(2, size, size, size, 3)).astype(np.float32)
    score = Critic(channels=(4, 4, 8, 8, 8))(flows).numpy()
    assert score.shape == (2,)
    assert np.all((score > 0) & (score < 1))
    linear = Critic(channels=(4, 4, 8, 8, 8), output_activation="linear")
    linear.build(flows.shape)
    sig = Critic(channels=(4, 4, 8, 8, 8))
    sig.build(flows.shape)
    sig.set_weights(linear.get_weights())
    # Same weights: the sigmoid critic is the mean of sigmoid(last layer), the linear one the mean of it.
    feats = linear._features(flows).numpy()
    np.testing.assert_allclose(linear(flows).numpy(), feats.mean(axis=(1, 2, 3, 4)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sig(flows).numpy(), (1 / (1 + np.exp(-feats))).mean(axis=(1, 2, 3, 4)),
                               rtol=1e-5)  # fmt: skip


# --------------------------------------------------------------------------------- size errors


@pytest.mark.parametrize(
    "make, shape, match",
    [
        (lambda: VTN(channels=2), (None, 96, 96, 80, 2), r"input size \(96, 96, 80\): the VTN stem needs every "
                                                         r"size divisible by 64 \(e.g. 64, 128, 192\)"),
        (lambda: AffineStem(channels=2), (None, 32, 64, 64, 2), "divisible by 64"),
        (lambda: AffineLiteStem(), (None, 32, 32, 32, 2), r"divisible by 16 and at least 48 \(e.g. 48, 64, 80\)"),
        (lambda: LDR(), (None, 40, 48, 48, 2), r"divisible by 16 \(e.g. 16, 32, 48\)"),
        (lambda: LDR(head="upsample"), (None, 24, 48, 48, 2), "divisible by 16"),
        (LDRReleased, (None, 48, 48, 8, 2), "divisible by 16"),
        (Critic, (None, 48, 64, 64, 3), r"the critic needs every size divisible by 32 \(e.g. 32, 64, 96\)"),
        (lambda: VTN(channels=2), (None, 64, 64, 64, 3), "expected 2 input channels"),
        (lambda: LDR(), (None, 64, 64, 64), r"\[B, D, H, W, C\]"),
    ],
)
def test_bad_sizes_raise_value_errors_naming_allowed_sizes(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make().build(shape)


def test_bad_size_at_call_and_affine_tied_to_built_size(rng):
    with pytest.raises(ValueError, match="divisible by 16"):
        LDR(channels=(2, 2, 2, 2))(rng.random((1, 40, 32, 32, 2), dtype=np.float32))
    stem = AffineLiteStem(channels=(2, 2, 2, 2))
    stem.build((None, 64, 64, 64, 2))
    with pytest.raises(ValueError, match=r"built for input size \(64, 64, 64\)"):
        stem(rng.random((1, 48, 48, 48, 2), dtype=np.float32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="head"):
        LDR(head="pixelshuffle")
    with pytest.raises(ValueError, match="channels"):
        LDR(channels=(16, 32, 64))
    with pytest.raises(ValueError, match="output_activation"):
        Critic(output_activation="tanh")
    with pytest.raises(ValueError, match="channels"):
        VTN(channels=0)


def test_check_divisible_skips_unknown_sizes():
    check_divisible((None, 64, None), 64, "x")
    with pytest.raises(ValueError, match=r"image_size \(0, 64, 64\)"):
        check_divisible((0, 64, 64), 64, "x", label="image_size")


# ------------------------------------------------------------------------------ configs, seeds


@pytest.mark.parametrize(
    "model",
    [AffineStem(channels=2, flow_multiplier=0.5), AffineLiteStem(channels=(2, 3, 4, 5)), VTN(channels=3),
     LDR(channels=(2, 4, 6, 8), head="upsample", flow_multiplier=0.25), LDRReleased(encoders=(4, 4, 4, 2)),
     Critic(channels=(2, 3, 4, 5, 6), output_activation="linear")],
    ids=lambda m: type(m).__name__,
)  # fmt: skip
def test_config_round_trip(model):
    config = model.get_config()
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert type(restored) is type(model) and restored.get_config() == config


def test_same_seed_same_weights():
    weights = []
    for seed in (7, 7, 8):
        keras.utils.set_random_seed(seed)
        model = LDR(channels=(2, 2, 4, 4))
        model.build((None, 16, 16, 16, 2))
        weights.append(np.concatenate([w.ravel() for w in model.get_weights()]))
    np.testing.assert_array_equal(weights[0], weights[1])
    assert not np.array_equal(weights[0], weights[2])
