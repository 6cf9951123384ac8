"""Training losses, as pure TF functions.

Every loss computes one value **per sample** (shape ``[B]``) and then applies an explicit `reduction`:

* ``"sum"`` (default): sum over the batch. This is what the original RCN/LDR code does for every term, so the
  loss weights of the paper (reg 1.0, det 0.1, ortho 0.1) keep their meaning at batch 4. Under
  ``tf.distribute`` each replica sums its own samples and the gradients are summed across replicas, which
  equals the sum over the global batch.
* ``"mean"``: mean over the batch.
* ``"none"``: the ``[B]`` vector.

References: Zhao et al., "Recursive Cascaded Networks", ICCV 2019; Tran et al., "LDR + ALDK", IEEE TMI 2022.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "reduce",
    "correlation_loss",
    "local_ncc",
    "lncc_loss",
    "smoothness_loss",
    "affine_det_loss",
    "affine_ortho_loss",
    "sampled_dice_loss",
    "distillation_loss",
    "cascade_regularisers",
    "DISTILL_KINDS",
]

DISTILL_KINDS = ("l2", "l1")

NCC_EPS = 1e-5  # added to the product of the local variances
PEARSON_EPS = 1e-6  # added to each variance, as in the reference implementation
ORTHO_EPS = 1e-5  # C = A^T A + eps I


def reduce(per_sample: tf.Tensor, reduction: str) -> tf.Tensor:
    """Applies ``"sum"``, ``"mean"`` or ``"none"`` to a ``[B]`` tensor."""
    if reduction == "sum":
        return tf.reduce_sum(per_sample)
    if reduction == "mean":
        return tf.reduce_mean(per_sample)
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction: expected 'sum', 'mean' or 'none', got {reduction!r}")


def _check_volume(name, x, channels=None):
    if x.shape.rank is not None and x.shape.rank != 5:
        raise ValueError(f"{name}: expected [B, D, H, W, C], got shape {tuple(x.shape)}")
    if channels is not None and x.shape.rank is not None and x.shape[-1] not in (None, channels):
        raise ValueError(f"{name}: expected {channels} channels, got shape {tuple(x.shape)}")


def correlation_loss(fixed, warped, reduction: str = "sum") -> tf.Tensor:
    """``1 - r`` with ``r`` the Pearson correlation of each sample over all its voxels and channels.

    ``r = cov / sqrt((var_f + 1e-6) (var_w + 1e-6))``; 0 for identical images, up to 2 for inverted ones.

    Args:
      fixed, warped: ``[B, D, H, W, C]`` images (values in [0, 1] in this project).
    """
    fixed = tf.convert_to_tensor(fixed)
    warped = tf.convert_to_tensor(warped, dtype=fixed.dtype)
    _check_volume("fixed", fixed)
    _check_volume("warped", warped)
    if fixed.shape.is_fully_defined() and warped.shape.is_fully_defined() and fixed.shape != warped.shape:
        raise ValueError(f"warped: shape {tuple(warped.shape)} must equal fixed's {tuple(fixed.shape)}")
    axes = [1, 2, 3, 4]
    mf = tf.reduce_mean(fixed, axes, keepdims=True)
    mw = tf.reduce_mean(warped, axes, keepdims=True)
    df, dw = fixed - mf, warped - mw
    cov = tf.reduce_mean(df * dw, axes)
    vf = tf.reduce_mean(tf.square(df), axes)
    vw = tf.reduce_mean(tf.square(dw), axes)
    r = cov / tf.sqrt((vf + PEARSON_EPS) * (vw + PEARSON_EPS))
    return reduce(1.0 - r, reduction)


def _box(x, window: int):
    """Mean over a ``window^3`` box around each voxel, separable, the volume mirrored at its border (edge voxels
    included: for ``window=3`` the edge is repeated). Explicit padding and VALID pooling: with SAME pooling XLA
    constant-folded the border counts for seconds at every compilation."""
    r = window // 2
    for axis in (1, 2, 3):
        pad = [[0, 0]] * 5
        pad[axis] = [r, r]
        k = [1, 1, 1, 1, 1]
        k[axis] = window
        x = tf.nn.avg_pool3d(tf.pad(x, pad, mode="SYMMETRIC"), k, [1, 1, 1, 1, 1], "VALID")
    return x


def local_moments(fixed, window: int = 5):
    """``(mean, variance)`` of `fixed` in a ``window^3`` box around each voxel: the fixed image's part of
    `local_ncc`, which a loop over one pair (`ldr_tf.refine`) computes once."""
    mf = _box(fixed, window)
    return mf, _box(fixed * fixed, window) - mf * mf


def local_ncc(fixed, warped, window: int = 5, fixed_moments=None) -> tf.Tensor:
    """Mean over voxels and channels of the squared local correlation ``cov^2 / (var_f var_w + 1e-5)`` in a
    ``window^3`` box (`_box`), per sample (``[B]``): about 1 where the images agree up to a local linear intensity map, 0
    where they are unrelated or flat. `fixed_moments`: `local_moments` of `fixed` if already computed (the same
    result)."""
    mf, vf = local_moments(fixed, window) if fixed_moments is None else fixed_moments
    mw = _box(warped, window)
    cov = _box(fixed * warped, window) - mf * mw
    vw = _box(warped * warped, window) - mw * mw
    return tf.reduce_mean(cov * cov / (vf * vw + NCC_EPS), axis=[1, 2, 3, 4])


def lncc_loss(fixed, warped, window: int = 5, reduction: str = "sum") -> tf.Tensor:
    """``1 - local_ncc``: 0 for images that agree up to a local linear intensity map, 1 for unrelated ones. The
    similarity of ANTs SyN and VoxelMorph (squared, as they use it), and of `ldr_tf.refine`."""
    fixed = tf.convert_to_tensor(fixed)
    warped = tf.convert_to_tensor(warped, dtype=fixed.dtype)
    _check_volume("fixed", fixed)
    _check_volume("warped", warped)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window: expected an odd number >= 1, got {window}")
    return reduce(1.0 - local_ncc(fixed, warped, window), reduction)


def smoothness_loss(flow, reduction: str = "sum") -> tf.Tensor:
    """Gradient smoothness of a flow with forward differences, normalised as the reference does.

    Per sample: ``(0.5 * sum(dD u)^2 + 0.5 * sum(dH u)^2 + 0.5 * sum(dW u)^2) / (D * H * W * 3)``, the sums
    running over all valid forward differences and all 3 channels. A linear field ``u = a * x_0`` has
    ``dD u = a`` on ``(D - 1) H W`` positions of one channel, so its loss is ``0.5 a^2 (D-1) H W / (3 D H W)``.
    """
    flow = tf.convert_to_tensor(flow)
    _check_volume("flow", flow, 3)
    dd = flow[:, 1:] - flow[:, :-1]
    dh = flow[:, :, 1:] - flow[:, :, :-1]
    dw = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    axes = [1, 2, 3, 4]
    total = 0.5 * (
        tf.reduce_sum(tf.square(dd), axes)
        + tf.reduce_sum(tf.square(dh), axes)
        + tf.reduce_sum(tf.square(dw), axes)
    )
    n = tf.cast(tf.reduce_prod(tf.shape(flow)[1:]), flow.dtype)
    return reduce(total / n, reduction)


def _check_matrix(A):
    A = tf.convert_to_tensor(A)
    if A.shape.rank is not None and (A.shape.rank != 3 or A.shape[1:] not in ((3, 3), (None, None))):
        raise ValueError(f"A: expected [B, 3, 3], got shape {tuple(A.shape)}")
    return A


def affine_det_loss(A, reduction: str = "sum") -> tf.Tensor:
    """``0.5 (det A - 1)^2`` per sample: penalises volume change of the affine stage (weight 0.1 in RCN)."""
    A = _check_matrix(A)
    return reduce(0.5 * tf.square(tf.linalg.det(A) - 1.0), reduction)


def affine_ortho_loss(A, reduction: str = "sum") -> tf.Tensor:
    """Orthogonality loss of RCN/VTN: ``sum_i (l_i + (1+e)^2 / l_i) - 6 (1+e)``, ``l_i`` eigenvalues of
    ``C = A^T A + e I`` (e = 1e-5), written with the elementary symmetric polynomials of C so it needs no
    eigen-decomposition: ``s1 + (1+e)^2 s2 / s3 - 6 (1+e)``. Zero for any rotation, positive otherwise.
    """
    A = _check_matrix(A)
    eps = ORTHO_EPS
    C = tf.matmul(A, A, transpose_a=True) + eps * tf.eye(3, dtype=A.dtype)
    s1 = tf.linalg.trace(C)
    # s2 = sum of the principal 2x2 minors
    s2 = (
        C[:, 0, 0] * C[:, 1, 1] - C[:, 0, 1] * C[:, 1, 0]
        + C[:, 0, 0] * C[:, 2, 2] - C[:, 0, 2] * C[:, 2, 0]
        + C[:, 1, 1] * C[:, 2, 2] - C[:, 1, 2] * C[:, 2, 1]
    )
    s3 = tf.linalg.det(C)
    per = s1 + (1.0 + eps) ** 2 * s2 / s3 - 6.0 * (1.0 + eps)
    return reduce(per, reduction)


DICE_EPS = 1e-5


def sampled_dice_loss(fixed_seg, moving_seg, flow, label_values, k: int, seed, reduction: str = "sum",
                      half: bool = False):
    """``1 - mean soft Dice`` between the fixed label map and the moving one warped by `flow`, over `k` labels.

    The semi-supervised term of VoxelMorph, made affordable for atlases with many labels (148 DLMUSE regions at
    128^3 would need 148 one-hot channels): each call scores `k` distinct labels drawn from `label_values` with
    the stateless `seed` (a new draw every training step), so every label is supervised on average without the
    memory of all of them at once. The moving one-hot maps are warped trilinearly (`ldr_tf.ops.warp.warp`), so the
    loss is differentiable with respect to the flow. A label absent from both maps scores Dice 1 (loss 0).

    Args:
      fixed_seg, moving_seg: ``[B, D, H, W]`` (or ``[..., 1]``) integer label maps.
      flow: ``[B, D, H, W, 3]`` displacement (pull) registering moving to fixed.
      label_values: 1-D int tensor of the labels to draw from (background excluded).
      k: labels per call (``min(k, len(label_values))``).
      seed: shape ``[2]`` integer stateless seed.
      half: score at half resolution: the one-hot maps become x2 average-pooled occupancies and the flow its x2
        average, halved (voxels of the half grid). 8x less memory (at 128^3 the full-resolution term with 16
        labels drove a training process past 23 GB); the gradient still reaches every voxel of the flow.
    """
    from ldr_tf.ops import warp  # noqa: PLC0415

    fixed_seg = tf.convert_to_tensor(fixed_seg)
    moving_seg = tf.convert_to_tensor(moving_seg)
    if fixed_seg.shape.rank == 5:
        fixed_seg, moving_seg = fixed_seg[..., 0], moving_seg[..., 0]
    label_values = tf.cast(tf.convert_to_tensor(label_values), tf.int32)
    n = tf.size(label_values)
    k = tf.minimum(int(k), n)
    scores = tf.random.stateless_uniform(tf.shape(label_values), seed=seed)
    labels = tf.gather(label_values, tf.math.top_k(scores, k).indices)  # k distinct labels
    f1h = tf.cast(tf.equal(tf.cast(fixed_seg, tf.int32)[..., None], labels), tf.float32)
    m1h = tf.cast(tf.equal(tf.cast(moving_seg, tf.int32)[..., None], labels), tf.float32)
    flow = tf.convert_to_tensor(flow, tf.float32)
    if half:
        f1h, m1h = (tf.nn.avg_pool3d(x, 2, 2, "VALID") for x in (f1h, m1h))
        flow = tf.nn.avg_pool3d(flow, 2, 2, "VALID") / 2.0
    w1h = warp.warp(m1h, flow)
    inter = tf.reduce_sum(w1h * f1h, axis=[1, 2, 3])
    denom = tf.reduce_sum(w1h + f1h, axis=[1, 2, 3])
    dice = (2.0 * inter + DICE_EPS) / (denom + DICE_EPS)  # [B, k]
    return reduce(1.0 - tf.reduce_mean(dice, axis=-1), reduction)


def distillation_loss(phi_s, phi_t, kind: str = "l2", reduction: str = "sum") -> tf.Tensor:
    """Direct distillation: the distance between the dense residuals (`ldr_tf.ops.warp.dense_residual`) of the
    student's and the teacher's flows, in voxels: ``mean((r_s - r_t)^2)`` (``"l2"``) or ``mean(|r_s - r_t|)``
    (``"l1"``) over voxels and channels, per sample. The teacher's flow is a constant."""
    from ldr_tf.ops.warp import dense_residual

    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind: expected one of {DISTILL_KINDS}, got {kind!r}")
    diff = dense_residual(phi_s) - tf.stop_gradient(dense_residual(phi_t))
    per_sample = tf.reduce_mean(tf.square(diff) if kind == "l2" else tf.abs(diff), axis=[1, 2, 3, 4])
    return reduce(per_sample, reduction)


def cascade_regularisers(out: dict, has_affine: bool) -> dict:
    """The regularisers of a `networks.cascade.RecursiveCascade` output, per sample (``[B]`` each):
    ``smoothness`` (the sum over the dense stems of `smoothness_loss` of each stem's own flow), ``det_loss`` and
    ``ortho_loss`` (of the affine stage's matrix; zeros without an affine stage)."""
    zeros = tf.zeros(tf.shape(out["agg_flow"])[:1], out["agg_flow"].dtype)
    smoothness = zeros
    for u in out["dense_flows"]:
        smoothness = smoothness + smoothness_loss(u, "none")
    if not has_affine:
        return {"smoothness": smoothness, "det_loss": zeros, "ortho_loss": zeros}
    return {"smoothness": smoothness, "det_loss": affine_det_loss(out["A"], "none"),
            "ortho_loss": affine_ortho_loss(out["A"], "none")}
