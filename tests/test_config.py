"""`ldr_tf.training.config` (TrainConfig, run configs, the network a run trains), the learning-rate schedules and the
flag presets of `ldr_tf.train`."""

import dataclasses
import json
import types

import numpy as np
import pytest
from absl import flags

from flags import train_flags
from ldr_tf.training.config import TrainConfig, load_run_config, network_config


def test_round_trip_and_unknown_keys_are_ignored():
    cfg = TrainConfig(model="student", aldk=False, cascades=2, student_stem="ldr_half", out_dir="o", seed=7)
    d = cfg.to_dict()
    assert TrainConfig.from_dict({**d, "from_a_newer_version": 1}) == cfg
    assert json.loads(json.dumps(d)) == d  # plain JSON


@pytest.mark.parametrize("change, flag", [
    (dict(cascades=0), "--cascades"), (dict(batch=0), "--batch"), (dict(steps=-1), "--steps"),
    (dict(seg_weight=-0.1), "--seg_weight"), (dict(gamma=1.5), "--gamma"), (dict(beta=-0.1), "--beta"),
    (dict(critic_beta1=1.0), "--critic_beta1"), (dict(critic_every=0), "--critic_steps and --critic_every"),
    (dict(out_dir=""), "--out_dir"), (dict(aldk=True, teacher=None), "needs --teacher"),
])
def test_validate_names_the_flag(change, flag):
    base = dict(model="student", aldk=False, out_dir="o")
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**{**base, **change}).validate()


def test_load_run_config_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: not a training run directory"):
        load_run_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: unreadable run config"):
        load_run_config(tmp_path)


def test_network_config_follows_the_run():
    teacher = network_config(TrainConfig(model="teacher", cascades=2, channels=8, affine="vtn"), (64, 64, 64))
    assert (teacher["stem"], teacher["cascades"], teacher["channels"], teacher["affine"]) == ("vtn", 2, 8, "vtn")
    student = network_config(TrainConfig(model="student", cascades=3, student_stem="ldr_half", affine="lite",
                                         student_head="upsample"), [64, 64, 64])
    assert (student["stem"], student["cascades"], student["affine"]) == ("ldr_half", 3, "lite")
    assert student["student_head"] == "upsample" and list(student["image_size"]) == [64, 64, 64]


def test_every_train_config_field_comes_from_a_flag():
    """config_from_flags must carry every TrainConfig field (a new field without a flag would silently default)."""
    from ldr_tf import train

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    fv = types.SimpleNamespace(**{n: f"<{n}>" for n in names})
    fv.model, fv.affine = "student", "auto"
    cfg = train.config_from_flags(fv)
    for n in names:
        if n not in ("model", "affine", "dataset_path"):  # dataset_path: resolved by train.main, not a flag
            assert getattr(cfg, n) == f"<{n}>", n
    assert cfg.affine == "lite"  # auto: lite for the student, vtn for the teacher
    fv.model = "teacher"
    assert train.config_from_flags(fv).affine == "vtn"


def test_distill_auto_is_direct_distillation_with_a_teacher_and_none_without():
    from ldr_tf import train
    from ldr_tf.training.config import resolve_distill, student_description

    fv = types.SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})
    fv.model, fv.affine, fv.distill = "student", "auto", "auto"
    plain = train.config_from_flags(fv)
    assert (plain.distill, plain.aldk) == ("none", False)
    fv.teacher_cache = "flows.h5"
    distilled = train.config_from_flags(fv)
    assert (distilled.distill, distilled.aldk) == ("l2", False)
    assert resolve_distill("auto", "teacher", True) == "none" and resolve_distill("l1", "student", False) == "l1"
    fv.distill = "none"  # a teacher given only to log flow_gap: the plain student
    assert train.config_from_flags(fv).distill == "none"
    assert distilled.distill_weight == 0.3  # chosen on the validation pairs (README, ALDK)
    assert student_description(distilled) == "student with direct distillation (l2, weight 0.3)"
    assert student_description(plain) == "student without distillation (reconstruction loss only)"
    assert student_description(TrainConfig(aldk=True, distill="l2", distill_weight=0.5)) == \
        "student with direct distillation (l2, weight 0.5) + ALDK"


def test_rcn_step_schedule_and_the_others():
    from ldr_tf.training.trainer import RCNStepSchedule, make_schedule

    sched = RCNStepSchedule(1e-4, 100)
    lr = np.array([float(sched(s)) for s in (0, 59, 60, 79, 80, 99)])
    np.testing.assert_allclose(lr, [1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 2.5e-5], rtol=1e-6)
    assert RCNStepSchedule(**sched.get_config()).get_config() == sched.get_config()
    assert make_schedule("constant", 3e-4, 10) == 3e-4
    cosine = make_schedule("cosine", 1e-4, 100)
    assert float(cosine(0)) == pytest.approx(1e-4) and float(cosine(100)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="--lr_schedule: unknown schedule 'linear'"):
        make_schedule("linear", 1e-4, 10)


def test_preset_fills_only_flags_not_given():
    fv = flags.FlagValues()
    flags.DEFINE_enum("preset", None, sorted(train_flags.PRESETS), "", flag_values=fv)
    for key, value in train_flags.PRESETS["demo"].items():
        if isinstance(value, int):
            flags.DEFINE_integer(key, 0, "", flag_values=fv)
        else:
            flags.DEFINE_string(key, None, "", flag_values=fv)
    fv(["train", "--preset=demo", "--steps=5", "--dataset=mine"])
    train_flags.apply_preset(fv)
    demo = train_flags.PRESETS["demo"]
    assert fv.steps == 5 and fv.dataset == "mine"  # given: kept
    assert fv.image_size == demo["image_size"] and fv.batch == demo["batch"]  # not given: from the preset
