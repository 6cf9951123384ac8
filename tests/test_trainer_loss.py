"""The student's loss weights are what the configuration says: one gamma for the whole unsupervised loss."""

import pytest

from ldr_tf.training.config import TrainConfig
from ldr_tf.training.trainer import student_loss


@pytest.mark.parametrize("gamma", [0.3, 0.9, 1.0])
def test_gamma_scales_reconstruction_and_regularisers_alike(gamma):
    cfg = TrainConfig(model="student", gamma=gamma, teacher="t", out_dir="o")
    rec, regs, dis = 0.25, 2.0, 3.0
    plain = student_loss(rec, regs, cfg)
    assert plain == pytest.approx(rec + regs)  # without ALDK: gamma plays no part
    aldk = student_loss(rec, regs, cfg, dis)
    assert aldk == pytest.approx(gamma * (rec + regs) + (1 - gamma) * dis)
    # the ratio of reconstruction to regularisation is the same with and without ALDK
    with_more_reg = student_loss(rec, 2 * regs, cfg, dis) - aldk
    assert with_more_reg == pytest.approx(gamma * regs)


def test_plain_student_uses_a_teacher_only_when_given():
    assert not TrainConfig(model="student", aldk=False, out_dir="o").uses_teacher
    assert TrainConfig(model="student", aldk=False, teacher="runs/t", out_dir="o").uses_teacher
    assert not TrainConfig(model="student", aldk=False, teacher="runs/t", out_dir="o").uses_critic
    with pytest.raises(ValueError, match="needs --teacher"):
        TrainConfig(model="student", aldk=True, out_dir="o").validate()
    TrainConfig(model="student", aldk=False, out_dir="o").validate()
