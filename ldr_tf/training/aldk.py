"""Adversarial Learning with Distilling Knowledge (ALDK): the critic's and the student's losses.

The paper (Tran et al., TMI 2022) writes, for the student's final deformation phi_s and the teacher's phi_t:

    L_adv = gamma * l_rec + (1 - gamma) * l_dis
    l_dis = || D(phi_s) - D(phi_t) ||_2^2 + lambda * (|| grad_{phi_hat} D(phi_hat) ||_2 - 1)^2
    phi_hat = beta * phi_t + (1 - beta) * phi_s

with D a critic over deformations whose first layer "injects the condition information with a matched tensor
dimension". It does not spell out the critic's own objective. Ours (all per sample, ``[B]``):

* the critic sees ``concat([phi, fixed, moving])``: the deformation together with the pair it registers (the
  condition, ``--critic_condition=images``, default), so it can learn which deformations fit which pair, not only
  what teacher deformations look like in general (``--critic_condition=none`` gives it the deformation alone);
* critic step: ``L_D = D(phi_s) - D(phi_t) + lambda * GP(phi_hat)``, the WGAN-GP critic objective with teacher
  deformations as "real" and student ones as "fake" (the released code's sign), the penalty at the paper's joint
  deformation phi_hat, its gradient taken with a GradientTape. The penalty keeps D 1-Lipschitz with respect to the
  **RMS** distance between deformations, in voxels (``--gp_norm=rms``, default): ``(sqrt(N) ||grad D||_2 - 1)^2``
  with N = 3 D H W values per deformation. Then D's scores are in voxels at every grid size, and the gradient it
  passes to the student (norm ~ 1/sqrt(N), ~1e-3 at 64^3) is commensurate with the reconstruction loss's (measured
  ~5e-4 at 64^3). With the plain Euclidean norm (``--gp_norm=l2``, the textbook WGAN-GP) that gradient is ~2000x
  larger and the student follows the critic alone;
* student step, ``l_dis`` (``--dis_loss``), a distance between the critic's views of the two deformations:

  - ``"abs"`` (default): ``|D(phi_s) - D(phi_t)|``. With the WGAN critic ranking teacher above student, its
    gradient is the WGAN generator's, ``-grad D(phi_s)``, of bounded size;
  - ``"square"``: the paper's literal ``(D(phi_s) - D(phi_t))^2``, whose gradient grows with the gap; usable with
    the sigmoid critic only;
  - ``"feature"``: ``mean((F(phi_s) - F(phi_t))^2)`` over the critic's last feature map F (whose mean is D).

  The gradient penalty regularises the critic only (for the student it would need second-order gradients
  through D and constrains nothing the student controls).

Measured on the synthetic demo (64^3, 600 student steps; README "ALDK" has the table): with the paper's sigmoid
critic the penalty stayed at ~1.0 (the critic's gradient vanished: a mean of saturated sigmoids) and the student
stopped improving (validation Dice 0.40 vs 0.66 without ALDK); with a linear critic and the paper's lambda = 0.1
the critic's scores grew without bound (1e4 within 150 steps) and the squared loss exploded (1e8).

What the critic sees of a deformation is a `View` (``--critic_flow``, ``--critic_condition``): the total flow
(default, the paper's) or its dense residual (`ldr_tf.ops.warp.dense_residual`: the affine part removed, which
otherwise dominates the flow's magnitude and makes the critic compare two affine stages), conditioned on nothing,
on the pair ``[fixed, moving]`` (default) or on ``[fixed, moving warped by the flow]`` (``warped``: the critic can
check correspondence, not only the look of the deformation).

`critic` is a callable ``[B, D, H, W, C] -> [B]`` (`networks.critic.Critic`); `condition` is a `View`, a
``[B, D, H, W, 2]`` (fixed, moving) pair (= ``View(pair)``) or None.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

__all__ = ["View", "make_view", "critic_input", "gradient_penalty", "critic_losses", "discrimination_loss", "joint_deformation",
           "DIS_LOSSES", "GP_NORMS", "GP_POINTS", "CRITIC_FLOWS", "CRITIC_CONDITIONS"]

_NORM_EPS = 1e-12  # keeps the gradient of sqrt finite at a zero gradient
DIS_LOSSES = ("abs", "square", "feature", "wgan")
GP_NORMS = ("rms", "l2")
GP_POINTS = ("fixed", "random")
CRITIC_FLOWS = ("total", "residual")
CRITIC_CONDITIONS = ("images", "warped", "none")


@dataclasses.dataclass(frozen=True)
class View:
    """What the critic sees of a deformation ``phi``: ``flow`` ``"total"`` (phi) or ``"residual"`` (phi minus its
    least-squares affine part), followed by the condition: ``[fixed, moving]`` (``warped=False``), ``[fixed,
    moving(x + phi(x))]`` (``warped=True``) or nothing (``pair=None``). The pair is a constant."""

    pair: tf.Tensor | None = None
    flow: str = "total"
    warped: bool = False

    def __post_init__(self):
        if self.flow not in CRITIC_FLOWS:
            raise ValueError(f"flow: expected one of {CRITIC_FLOWS}, got {self.flow!r}")
        if self.warped and self.pair is None:
            raise ValueError("View: warped=True needs the pair")

    def channels(self) -> int:
        return 3 + (0 if self.pair is None else 2)

    def __call__(self, phi) -> tf.Tensor:
        from ldr_tf.ops import warp

        x = warp.dense_residual(phi) if self.flow == "residual" else phi
        if self.pair is None:
            return x
        pair = tf.stop_gradient(tf.cast(self.pair, phi.dtype))
        fixed, moving = pair[..., :1], pair[..., 1:2]
        if self.warped:
            moving = warp.warp(moving, phi)
        return tf.concat([x, fixed, moving], axis=-1)


def make_view(pair, flow: str = "total", condition: str = "images") -> View:
    """The `View` of ``--critic_flow`` / ``--critic_condition`` for a batch's ``pair`` ``[B, D, H, W, 2]``."""
    if condition not in CRITIC_CONDITIONS:
        raise ValueError(f"condition: expected one of {CRITIC_CONDITIONS}, got {condition!r}")
    return View(None if condition == "none" else pair, flow, condition == "warped")


def _view(condition) -> View:
    if isinstance(condition, View):
        return condition
    return View(None if condition is None else tf.stop_gradient(condition))


def critic_input(flow, condition=None) -> tf.Tensor:
    """What the critic sees of `flow` (`condition`: a `View`, a pair or None)."""
    return _view(condition)(flow)


def joint_deformation(phi_s, phi_t, beta: float, point: str = "fixed", seed=None) -> tf.Tensor:
    """Where the penalty is taken: ``phi_hat = e * phi_t + (1 - e) * phi_s``.

    ``point="fixed"``: ``e = beta`` for every sample (the paper's joint deformation). ``"random"``: ``e ~ U(0, 1)``
    drawn per sample with the stateless `seed` (shape ``[2]``), the WGAN-GP recipe, which constrains the critic
    along the whole segment between student and teacher instead of at one point near the student.
    """
    if point not in GP_POINTS:
        raise ValueError(f"point: expected one of {GP_POINTS}, got {point!r}")
    if point == "fixed":
        return beta * phi_t + (1.0 - beta) * phi_s
    if seed is None:
        raise ValueError("joint_deformation: point='random' needs a seed")
    e = tf.random.stateless_uniform(tf.shape(phi_s)[:1], seed=seed, dtype=phi_s.dtype)
    e = tf.reshape(e, [-1, 1, 1, 1, 1])
    return e * phi_t + (1.0 - e) * phi_s


def gradient_penalty(critic, phi_hat, condition=None, norm: str = "rms", training: bool = True) -> tf.Tensor:
    """``(s * || d D(phi_hat) / d phi_hat ||_2 - 1)^2`` per sample (``[B]``), the norm over all voxels and channels
    of the deformation (not the condition); ``s = sqrt(3 D H W)`` for ``norm="rms"``, 1 for ``"l2"``."""
    if norm not in GP_NORMS:
        raise ValueError(f"norm: expected one of {GP_NORMS}, got {norm!r}")
    phi_hat = tf.convert_to_tensor(phi_hat)
    with tf.GradientTape() as tape:
        tape.watch(phi_hat)
        # samples are independent, so the gradient of the sum holds each sample's own gradient
        total = tf.reduce_sum(critic(critic_input(phi_hat, condition), training=training))
    grad = tape.gradient(total, phi_hat)
    length = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3, 4]) + _NORM_EPS)
    if norm == "rms":
        length = length * tf.sqrt(tf.cast(tf.reduce_prod(tf.shape(phi_hat)[1:]), length.dtype))
    return tf.square(length - 1.0)


def critic_losses(critic, phi_s, phi_t, beta: float, lambda_gp: float, condition=None, gp_norm: str = "rms",
                  gp_point: str = "fixed", seed=None) -> dict:
    """The critic step's terms, per sample: ``{"loss", "d_student", "d_teacher", "gp"}``.

    `phi_s`, `phi_t` and `condition` are treated as constants (gradients reach only the critic). The penalty is
    taken at `joint_deformation` (`gp_point`, `beta`, `seed`).
    """
    phi_s = tf.stop_gradient(phi_s)
    phi_t = tf.stop_gradient(phi_t)
    condition = _view(condition)
    d_s = critic(critic_input(phi_s, condition), training=True)
    d_t = critic(critic_input(phi_t, condition), training=True)
    gp = gradient_penalty(critic, joint_deformation(phi_s, phi_t, beta, gp_point, seed), condition, gp_norm)
    return {"loss": d_s - d_t + lambda_gp * gp, "d_student": d_s, "d_teacher": d_t, "gp": gp}


def discrimination_loss(critic, phi_s, phi_t, mode: str = "abs", condition=None) -> tf.Tensor:
    """The student's ``l_dis`` per sample (``[B]``); gradients reach phi_s (and so the student), not phi_t.

    ``mode``: ``"abs"`` ``|D(phi_s) - D(phi_t)|``, ``"square"`` ``(D(phi_s) - D(phi_t))^2``, ``"feature"``
    (mean squared difference of the critic's last feature maps, ``critic.features``) or ``"wgan"``
    (``D(phi_t) - D(phi_s)``: the WGAN generator loss, whatever the sign of the gap).
    """
    phi_t = tf.stop_gradient(phi_t)
    condition = _view(condition)
    x_s, x_t = critic_input(phi_s, condition), critic_input(phi_t, condition)
    if mode == "feature":
        diff = critic.features(x_s, training=False) - critic.features(x_t, training=False)
        return tf.reduce_mean(tf.square(diff), axis=[1, 2, 3, 4])
    gap = critic(x_s, training=False) - critic(x_t, training=False)
    if mode == "abs":
        return tf.abs(gap)
    if mode == "square":
        return tf.square(gap)
    if mode == "wgan":
        return -gap
    raise ValueError(f"mode: expected one of {DIS_LOSSES}, got {mode!r}")
