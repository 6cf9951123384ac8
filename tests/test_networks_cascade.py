"""RecursiveCascade: outputs, composition semantics, config round trip, checkpoints, size errors."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from ldr_tf.ops import losses, warp
from networks.cascade import CascadeConfig, RecursiveCascade

S = 64  # test volume size (VTN and the VTN affine stem need multiples of 64)

TINY = {
    "teacher": dict(stem="vtn", affine="vtn", channels=2),
    "student_lite": dict(stem="ldr", affine="lite", student_channels=(2, 4, 4, 8)),
    "student_none": dict(stem="ldr", affine="none", student_channels=(2, 4, 4, 8), student_head="deconv"),
    "released_none": dict(stem="ldr_released", affine="none"),
}


def _cascade(kind, cascades=2, size=S, **kw):
    cfg = CascadeConfig(cascades=cascades, image_size=(size,) * 3, **{**TINY[kind], **kw})
    return RecursiveCascade(cfg)


@pytest.fixture(scope="module")
def pair():
    return np.random.default_rng(5).random((2, S, S, S, 2), dtype=np.float32)


@pytest.mark.parametrize("kind, cascades", [("teacher", 2), ("student_lite", 3), ("student_none", 3),
                                            ("released_none", 1)])  # fmt: skip
def test_outputs_and_shapes(pair, kind, cascades):
    model = _cascade(kind, cascades)
    out = model(pair)
    has_affine = model.config.affine != "none"
    assert len(out["flows"]) == cascades + int(has_affine)
    for f in out["flows"] + [out["agg_flow"]]:
        assert f.shape == (2, S, S, S, 3)
    assert out["warped"].shape == (2, S, S, S, 1)
    reg = losses.cascade_regularisers(out, has_affine)
    for key in ("smoothness", "det_loss", "ortho_loss"):
        assert reg[key].shape == (2,)
    assert out["A"].shape == (2, 3, 3) and out["b"].shape == (2, 3)
    dense = out["flows"][int(has_affine):]
    assert len(out["dense_flows"]) == len(dense) == cascades
    expected = sum(losses.smoothness_loss(u, "none").numpy() for u in dense)
    np.testing.assert_allclose(reg["smoothness"].numpy(), expected, rtol=1e-5)
    if has_affine:
        np.testing.assert_allclose(reg["det_loss"].numpy(), losses.affine_det_loss(out["A"], "none").numpy())
    else:
        np.testing.assert_array_equal(out["A"].numpy(), np.broadcast_to(np.eye(3), (2, 3, 3)))
        assert not out["b"].numpy().any() and not reg["det_loss"].numpy().any()


def test_fresh_student_cascade_is_near_identity(pair):
    out = _cascade("student_none", 3)(pair)
    assert np.abs(out["agg_flow"].numpy()).max() < 1e-2
    np.testing.assert_allclose(out["warped"].numpy(), pair[..., 1:2], atol=1e-2)


@pytest.mark.parametrize("head, factor", [("deconv", 1.0), ("upsample", 2.0)])
def test_constant_translations_add_up_and_flow_multiplier_is_split(head, factor):
    """Each stem predicts a constant field: the composed field is their sum, the warp a shift of the original."""
    size = 32
    moving = np.random.default_rng(1).random((1, size, size, size), dtype=np.float32)
    pair = np.stack([np.zeros_like(moving), moving], -1)
    cfg = CascadeConfig(stem="ldr", affine="none", cascades=2, image_size=(size,) * 3,
                        student_channels=(2, 2, 2, 2), student_head=head, flow_multiplier=2.0)  # fmt: skip
    model = RecursiveCascade(cfg)
    model.build(pair.shape)
    for stem, bias in zip(model.dense_stems, ([1.0, 0.0, 0.5], [0.0, -2.0, 0.0])):
        stem.flow_head.kernel.assign(tf.zeros_like(stem.flow_head.kernel))
        stem.flow_head.bias.assign(bias)
    out = model(pair)
    # each stem gets flow_multiplier / cascades = 1; the "upsample" head doubles half-resolution values
    np.testing.assert_allclose(out["flows"][0].numpy()[0, 3, 4, 5], factor * np.array([1.0, 0.0, 0.5]), atol=1e-6)
    total = factor * np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_allclose(out["agg_flow"].numpy(), np.broadcast_to(total, (1, size, size, size, 3)), atol=1e-5)
    np.testing.assert_allclose(losses.cascade_regularisers(out, False)["smoothness"].numpy(), [0.0], atol=1e-10)
    dz, dy, dx = (int(v) for v in np.floor(total))
    fx = total[2] - dx
    inner = np.s_[4:-4, 4:-4, 4:-4]
    shifted = np.roll(moving[0], (-dz, -dy, -dx), axis=(0, 1, 2))
    shifted_x1 = np.roll(moving[0], (-dz, -dy, -dx - 1), axis=(0, 1, 2))
    expected = (1 - fx) * shifted + fx * shifted_x1  # trilinear = linear along W only
    np.testing.assert_allclose(out["warped"].numpy()[0, ..., 0][inner], expected[inner], atol=1e-5)


@pytest.mark.parametrize("kind", ["teacher", "student_none"])
def test_composition_wiring_matches_the_rcn_recursion(pair, kind):
    """Stem k >= 2 sees (fixed, warped_{k-1}); the original moving image is re-warped with the total field."""
    model = _cascade(kind, 2)
    out = model(pair)
    fixed, moving = pair[..., :1], pair[..., 1:]
    if model.affine_stem is not None:
        aff = model.affine_stem(pair)
        A = aff["A"].numpy()
        agg = aff["flow"].numpy()
        u = model.dense_stems[0](np.concatenate([fixed, warp.warp(moving, agg).numpy()], -1)).numpy()
        agg = agg + np.einsum("bij,bdhwj->bdhwi", A, u)  # exact after the affine stage
    else:
        agg = model.dense_stems[0](pair).numpy()
    warped = warp.warp(moving, agg).numpy()
    u = model.dense_stems[1](np.concatenate([fixed, warped], -1)).numpy()
    agg = u + warp.warp(agg, u).numpy()  # agg_k(x) = u_k(x) + agg_{k-1}(x + u_k(x))
    np.testing.assert_allclose(out["agg_flow"].numpy(), agg, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["warped"].numpy(), warp.warp(moving, agg).numpy(), atol=1e-4)
    np.testing.assert_allclose(out["flows"][-1].numpy(), u, rtol=1e-4, atol=1e-4)


def test_affine_stage_alone(pair):
    model = _cascade("student_lite", 1)
    out = model(pair)
    aff = model.affine_stage(pair)
    np.testing.assert_allclose(aff["flow"].numpy(), out["flows"][0].numpy(), atol=1e-6)
    np.testing.assert_allclose(aff["warped"].numpy(), warp.warp(pair[..., 1:], aff["flow"]).numpy(), atol=1e-6)
    np.testing.assert_allclose(aff["A"].numpy(), out["A"].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="no affine stage"):
        _cascade("student_none", 1).affine_stage(pair)


def test_affine_only_cascade(pair):
    out = _cascade("student_lite", 0)(pair)
    assert len(out["flows"]) == 1
    np.testing.assert_allclose(out["agg_flow"].numpy(), out["flows"][0].numpy())
    assert not out["dense_flows"] and not losses.cascade_regularisers(out, True)["smoothness"].numpy().any()


# ------------------------------------------------------------------------------ config, checkpoints


def test_config_dict_round_trip():
    cfg = CascadeConfig(stem="ldr", cascades=3, affine="lite", image_size=(64, 128, 128), student_head="deconv",
                        student_channels=(8, 16, 32, 64), flow_multiplier=0.5)  # fmt: skip
    d = json.loads(json.dumps(cfg.to_dict()))
    assert CascadeConfig.from_dict(d) == cfg
    assert set(d) == {f.name for f in dataclasses.fields(CascadeConfig)}
    with pytest.raises(ValueError, match="unknown keys"):
        CascadeConfig.from_dict({**d, "depth": 3})


def test_model_get_config_from_config_gives_the_same_network(pair):
    model = _cascade("student_lite", 2)
    ref = model(pair)
    clone = RecursiveCascade.from_config(model.get_config())
    assert clone.config == model.config
    clone.build(pair.shape)
    assert clone.count_params() == model.count_params()
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(pair)["agg_flow"].numpy(), ref["agg_flow"].numpy())
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert isinstance(restored, RecursiveCascade) and restored.config == model.config


def test_keras_file_round_trip(pair, tmp_path):
    model = _cascade("student_lite", 1)
    ref = model(pair)
    model.save(tmp_path / "cascade.keras")
    loaded = keras.saving.load_model(tmp_path / "cascade.keras")
    assert isinstance(loaded, RecursiveCascade) and loaded.config == model.config
    np.testing.assert_array_equal(loaded(pair)["agg_flow"].numpy(), ref["agg_flow"].numpy())


@pytest.mark.parametrize("kind", ["teacher", "student_lite"])
def test_checkpoint_save_restore_gives_identical_outputs(pair, kind, tmp_path):
    keras.utils.set_random_seed(1)
    model = _cascade(kind, 2)
    ref = model(pair)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    keras.utils.set_random_seed(2)
    other = _cascade(kind, 2)
    before = other(pair)
    assert not np.allclose(before["agg_flow"].numpy(), ref["agg_flow"].numpy())
    # every weight is in the checkpoint (Keras 3 lists of layers would be silently left out)
    saved = {name for name, _ in tf.train.list_variables(path) if name.startswith("model/")}
    assert len(saved) == len(model.weights)
    tf.train.Checkpoint(model=other).restore(path).assert_existing_objects_matched()
    after = other(pair)
    for key in ("agg_flow", "warped", "A", "b"):
        np.testing.assert_array_equal(after[key].numpy(), ref[key].numpy())


def test_export_round_trip_through_ldr_tf_export(tmp_path):
    """The project's exporter (not Keras alone) on a non-cubic-multiple-of-64 student: outputs equal the model's."""
    from ldr_tf.deploy.savedmodel import export_model

    size = 48
    model = _cascade("student_lite", 2, size=size)
    x = np.random.default_rng(3).random((1, size, size, size, 2), dtype=np.float32)
    ref = model(x)
    out = export_model(model, tmp_path / "export", {"model": "student"}, xla_warp=False)
    got = tf.saved_model.load(str(out)).signatures["register"](fixed=tf.constant(x[..., :1]),
                                                               moving=tf.constant(x[..., 1:]))
    np.testing.assert_allclose(got["flow"].numpy(), ref["agg_flow"].numpy(), atol=1e-5)
    np.testing.assert_allclose(got["warped"].numpy(), ref["warped"].numpy(), atol=1e-5)


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=(96, 96, 80)),
         r"image_size \(96, 96, 80\): the VTN stem needs every size divisible by 64 \(e.g. 64, 128, 192\)"),
        (dict(stem="ldr", affine="none", image_size=(40, 48, 48)), r"the LDR student stem needs .* by 16"),
        (dict(stem="ldr", affine="vtn", image_size=(96, 96, 96)), "the VTN affine stem needs .* by 64"),
        (dict(stem="ldr", affine="lite", image_size=(32, 32, 32)), "at least 48"),
        (dict(stem="unet"), "stem: expected one of"),
        (dict(affine="rigid"), "affine: expected one of"),
        (dict(student_head="nearest"), "student_head"),
        (dict(affine="none", cascades=0), "cascades"),
        (dict(image_size=(64, 64)), r"image_size: expected \(D, H, W\)"),
    ],
)  # fmt: skip
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CascadeConfig(**kwargs)


def test_bad_input_sizes_raise(pair):
    model = _cascade("student_lite", 1)
    with pytest.raises(ValueError, match=r"tied to image_size \(64, 64, 64\)"):
        model.build((None, 128, 128, 128, 2))
    no_affine = _cascade("student_none", 1)
    with pytest.raises(ValueError, match=r"input size \(40, 64, 64\): the LDR student stem needs every size"):
        no_affine(np.zeros((1, 40, 64, 64, 2), np.float32))
    with pytest.raises(ValueError, match="expected 2 input channels"):
        no_affine(np.zeros((1, 64, 64, 64, 3), np.float32))
    # without an affine stage other legal sizes work
    assert no_affine(np.zeros((1, 32, 48, 64, 2), np.float32))["agg_flow"].shape == (1, 32, 48, 64, 3)


def test_teacher_and_student_parameter_counts_at_128():
    teacher = RecursiveCascade(CascadeConfig(stem="vtn", affine="vtn", cascades=1))
    teacher.build((None, 128, 128, 128, 2))
    assert teacher.count_params() == 14_166_288 + 28_252_203
    student = RecursiveCascade(CascadeConfig(stem="ldr", affine="lite", cascades=3, student_head="upsample"))
    student.build((None, 128, 128, 128, 2))
    assert student.count_params() == 332_880 + 3 * 1_544_979
