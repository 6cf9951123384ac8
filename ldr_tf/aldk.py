"""Adversarial Learning with Distilling Knowledge (ALDK): the critic's and the student's losses.

The paper (Tran et al., TMI 2022) writes, for the student's final deformation phi_s and the teacher's phi_t:

    L_adv = gamma * l_rec + (1 - gamma) * l_dis
    l_dis = || D(phi_s) - D(phi_t) ||_2^2 + lambda * (|| grad_{phi_hat} D(phi_hat) ||_2 - 1)^2
    phi_hat = beta * phi_t + (1 - beta) * phi_s

with D a critic over deformations. It does not spell out the critic's own objective. Ours (all per sample, ``[B]``):

* critic step: ``L_D = D(phi_s) - D(phi_t) + lambda * GP(phi_hat)`` -- the WGAN-GP critic objective, teacher flows
  playing "real" and student flows "fake" (the released code's sign), with the penalty at the paper's joint
  deformation phi_hat, its gradient taken with a GradientTape;
* student step, ``l_dis`` in one of two readings of the paper's ``|| D(phi_s) - D(phi_t) ||_2^2`` (``--dis_loss``):

  - ``"feature"`` (default): D's output is the critic's last feature map F (its mean is the score M), and
    ``l_dis = mean((F(phi_s) - F(phi_t))^2)`` over that map -- feature matching, which gives the student a
    gradient for every feature the critic has learned to tell teacher and student deformations apart by;
  - ``"score"``: ``l_dis = (M(phi_s) - M(phi_t))^2``, a single number per pair.

  The gradient penalty regularises the critic only (for the student it would need second-order gradients
  through D and constrains nothing the student controls).

Each function takes the critic as a callable ``flow [B, D, H, W, 3] -> [B]``.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["gradient_penalty", "critic_losses", "discrimination_loss", "joint_deformation", "DIS_LOSSES"]

_NORM_EPS = 1e-12  # keeps the gradient of sqrt finite at a zero gradient


def joint_deformation(phi_s, phi_t, beta: float) -> tf.Tensor:
    """``phi_hat = beta * phi_t + (1 - beta) * phi_s``."""
    return beta * phi_t + (1.0 - beta) * phi_s


def gradient_penalty(critic, phi_hat, training: bool = True) -> tf.Tensor:
    """``(|| d D(phi_hat) / d phi_hat ||_2 - 1)^2`` per sample, the norm over all voxels and channels. ``[B]``."""
    phi_hat = tf.convert_to_tensor(phi_hat)
    with tf.GradientTape() as tape:
        tape.watch(phi_hat)
        # samples are independent, so the gradient of the sum holds each sample's own gradient
        total = tf.reduce_sum(critic(phi_hat, training=training))
    grad = tape.gradient(total, phi_hat)
    norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3, 4]) + _NORM_EPS)
    return tf.square(norm - 1.0)


def critic_losses(critic, phi_s, phi_t, beta: float, lambda_gp: float) -> dict:
    """The critic step's terms, per sample: ``{"loss", "d_student", "d_teacher", "gp"}``.

    `phi_s` and `phi_t` are treated as constants (gradients reach only the critic).
    """
    phi_s = tf.stop_gradient(phi_s)
    phi_t = tf.stop_gradient(phi_t)
    d_s = critic(phi_s, training=True)
    d_t = critic(phi_t, training=True)
    gp = gradient_penalty(critic, joint_deformation(phi_s, phi_t, beta))
    return {"loss": d_s - d_t + lambda_gp * gp, "d_student": d_s, "d_teacher": d_t, "gp": gp}


DIS_LOSSES = ("feature", "score")


def discrimination_loss(critic, phi_s, phi_t, mode: str = "feature") -> tf.Tensor:
    """The student's ``l_dis`` per sample (``[B]``); gradients reach phi_s (and so the student), not phi_t.

    ``mode="feature"``: mean squared difference of the critic's last feature maps (``critic.features``);
    ``mode="score"``: squared difference of the critic's scores.
    """
    phi_t = tf.stop_gradient(phi_t)
    if mode == "feature":
        diff = critic.features(phi_s, training=False) - critic.features(phi_t, training=False)
        return tf.reduce_mean(tf.square(diff), axis=[1, 2, 3, 4])
    if mode == "score":
        return tf.square(critic(phi_s, training=False) - critic(phi_t, training=False))
    raise ValueError(f"mode: expected one of {DIS_LOSSES}, got {mode!r}")
