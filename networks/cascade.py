"""Recursive cascades: an optional affine stage followed by N dense stems (teacher or student).

Composition follows RCN exactly (reference 3.2): stem 1 sees (fixed, moving); stem k >= 2 sees
(fixed, warped_{k-1}); after an affine first stage the total field is ``affine_flow + A u`` (exact, no
interpolation), otherwise ``compose(agg, u) = u + agg(x + u)``; the **original** moving image is re-warped with
the total field after every stem.

References: Zhao et al., "Recursive Cascaded Networks", ICCV 2019; Tran et al., LDR + ALDK, IEEE TMI 2022.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from ldr_tf.ops import warp
from networks.affine import AffineLiteStem, AffineStem
from networks.layers import COMPUTE_DTYPES, check_divisible, dtype_policy, spatial_size, track_layers
from networks.ldr import LDR, STUDENT_HEADS, LDRReleased
from networks.vtn import VTN

__all__ = ["CascadeConfig", "RecursiveCascade", "STEMS", "AFFINES", "HALF_RESOLUTION_STEMS"]

STEMS = ("vtn", "ldr", "ldr_released", "ldr_half")
# Stems whose cascades run at half resolution (`RecursiveCascade` docstring): one upsampling and one
# full-resolution warp at the end instead of full-resolution stems, compositions and warps in every cascade.
HALF_RESOLUTION_STEMS = ("ldr_half",)
AFFINES = ("vtn", "lite", "none")

# (total stride, smallest size, who) of every stem kind: the legal image sizes.
_SIZE_RULES = {
    "vtn": (VTN.stride, VTN.stride, "the VTN stem"),
    "ldr": (LDR.stride, LDR.stride, "the LDR student stem"),
    "ldr_released": (LDRReleased.stride, LDRReleased.stride, "the released LDR student stem"),
    "ldr_half": (2 * LDR.stride, 2 * LDR.stride, "the half-resolution LDR student stem"),
    "affine_vtn": (AffineStem.stride, AffineStem.min_size, "the VTN affine stem"),
    "affine_lite": (AffineLiteStem.stride, AffineLiteStem.min_size, "the lite affine stem"),
}


@dataclasses.dataclass
class CascadeConfig:
    """What a `RecursiveCascade` is made of.

    Attributes:
      stem: dense stem kind: ``"vtn"`` (teacher), ``"ldr"`` (the paper's student), ``"ldr_released"``
        (the student of the original code) or ``"ldr_half"`` (the paper's student stems, run at half
        resolution: the light student, `RecursiveCascade`).
      cascades: number N of dense stems (0 is allowed with an affine stage: affine only).
      affine: first stage: ``"vtn"`` (VTN affine subnetwork), ``"lite"`` (LDR's light affine stem) or
        ``"none"``.
      image_size: spatial size (D, H, W) the model is built for; the affine head is tied to it.
      channels: VTN width c (16 = reference), used by the VTN dense stems and the VTN affine stem.
      student_channels: encoder widths of the ``"ldr"`` student.
      student_head: last step of the ``"ldr"`` student to full resolution: ``"deconv"`` (4^3 stride-2
        transposed conv) or ``"upsample"`` (3^3 conv at half resolution + trilinear x2 upsampling of the flow).
        Default ``"upsample"``: measured faster on CPU at 128^3 (see README "Networks").
      flow_multiplier: each dense stem gets ``flow_multiplier / cascades``; the affine stage gets 1 (RCN).
      identity_init: start every stage at the identity: zero affine heads and a near-zero VTN flow head (the
        student's heads are near zero either way). False reproduces the original's random initial affine and
        large initial VTN flows.
      compute_dtype: ``"float32"`` or ``"bfloat16"``: the stems' convolutions run in bfloat16 (weights stay
        float32, so checkpoints are interchangeable); flow heads, affine heads, composition and warping stay
        float32. Faster on CPUs with AVX-512 BF16 (see README "Performance").
    """

    stem: str = "vtn"
    cascades: int = 1
    affine: str = "vtn"
    image_size: tuple = (128, 128, 128)
    channels: int = 16
    student_channels: tuple = (16, 32, 64, 128)
    student_head: str = "upsample"
    flow_multiplier: float = 1.0
    identity_init: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self):
        self.image_size = tuple(int(s) for s in self.image_size)
        self.student_channels = tuple(int(c) for c in self.student_channels)
        self.cascades = int(self.cascades)
        self.channels = int(self.channels)
        self.flow_multiplier = float(self.flow_multiplier)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the field when a value is out of range or the image size is illegal."""
        if self.stem not in STEMS:
            raise ValueError(f"stem: expected one of {STEMS}, got {self.stem!r}")
        if self.affine not in AFFINES:
            raise ValueError(f"affine: expected one of {AFFINES}, got {self.affine!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: expected one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.student_head not in STUDENT_HEADS:
            raise ValueError(f"student_head: expected one of {STUDENT_HEADS}, got {self.student_head!r}")
        if self.cascades < 0 or (self.cascades == 0 and self.affine == "none"):
            raise ValueError(
                f"cascades: expected >= 1 (or 0 with an affine stage), got {self.cascades} with affine={self.affine!r}"
            )
        if self.channels < 1:
            raise ValueError(f"channels: expected a positive integer, got {self.channels}")
        if len(self.student_channels) != 4 or min(self.student_channels) < 1:
            raise ValueError(f"student_channels: expected 4 positive widths, got {self.student_channels}")
        if len(self.image_size) != 3:
            raise ValueError(f"image_size: expected (D, H, W), got {self.image_size}")
        for key in self.size_rules():
            stride, minimum, who = _SIZE_RULES[key]
            check_divisible(self.image_size, stride, who, label="image_size", minimum=minimum)

    def size_rules(self) -> list:
        """Keys of `_SIZE_RULES` that constrain the image size of this configuration."""
        keys = [self.stem] if self.cascades > 0 else []
        if self.affine != "none":
            keys.append(f"affine_{self.affine}")
        return keys

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples as lists) of every field."""
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["student_channels"] = list(self.student_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CascadeConfig":
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"CascadeConfig: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


def _pool2(x):
    """x2 average pooling of ``[B, D, H, W, C]`` (each half-resolution voxel = the mean of its 8 children)."""
    return tf.nn.avg_pool3d(x, 2, 2, "VALID")


def _dense_stem(cfg: CascadeConfig, index: int) -> keras.Model:
    fm = cfg.flow_multiplier / cfg.cascades
    name = f"deform_stem_{index}"
    if cfg.stem == "vtn":
        return VTN(channels=cfg.channels, flow_multiplier=fm, identity_init=cfg.identity_init, name=name)
    if cfg.stem in ("ldr", "ldr_half"):
        return LDR(channels=cfg.student_channels, head=cfg.student_head, flow_multiplier=fm, name=name)
    return LDRReleased(flow_multiplier=fm, name=name)


@keras.saving.register_keras_serializable(package="ldr_tf")
class RecursiveCascade(keras.Model):
    """[affine stage] + N dense stems, composed as in RCN.

    With a half-resolution stem (``stem="ldr_half"``) the affine stage runs at full resolution, then the pair is
    average-pooled x2 once and every dense stem, composition and warp of the cascade runs on that half-resolution
    grid (the affine stage's field there is exact: same ``A``, half the translation, on the half grid's centred
    coordinates). At the end the dense part of the total field (total minus the affine field) is upsampled x2
    with the fixed separable stencil (`ldr_tf.ops.warp.upsample_flow`, values doubled), added to the exact
    full-resolution affine field, and the original moving image is warped once at full resolution. ``flows``
    then holds the affine field at full resolution and the stems' own flows at half resolution (in half-grid
    voxels, as their smoothness terms).

    Args:
      config: a `CascadeConfig` or its dict (`CascadeConfig.to_dict`).
      **kwargs: `keras.Model` arguments (``name``).

    Raises:
      ValueError: bad config values or an image size the stems cannot take (the message names the allowed sizes).
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = CascadeConfig.from_dict(config)
        if not isinstance(config, CascadeConfig):
            raise ValueError(f"config: expected a CascadeConfig or its dict, got {type(config).__name__}")
        config.validate()
        self.config = dataclasses.replace(config)  # private copy
        with dtype_policy(config.compute_dtype):  # the stems' layers take the compute dtype at construction
            if config.affine == "vtn":
                self.affine_stem = AffineStem(channels=config.channels, identity_init=config.identity_init,
                                              name="affine_stem")
            elif config.affine == "lite":
                self.affine_stem = AffineLiteStem(identity_init=config.identity_init, name="affine_stem")
            else:
                self.affine_stem = None
            # Attributes deform_stem_1..N (a Keras list would be invisible to tf.train.Checkpoint).
            self._stem_names = track_layers(self, [_dense_stem(config, i + 1) for i in range(config.cascades)])

    @property
    def dense_stems(self) -> list:
        """The N dense stems, in order."""
        return [getattr(self, n) for n in self._stem_names]

    # ------------------------------------------------------------------------------------- checks

    def _check_input(self, shape) -> None:
        size = spatial_size(shape, 2, "RecursiveCascade")
        if self.affine_stem is not None:
            if None not in size and size != self.config.image_size:
                d, h, w = self.config.image_size
                raise ValueError(
                    f"input size {size}: this cascade has an affine stage tied to image_size "
                    f"{self.config.image_size}; expected input shape [B, {d}, {h}, {w}, 2]"
                )
        for key in self.config.size_rules():
            stride, minimum, who = _SIZE_RULES[key]
            check_divisible(size, stride, who, minimum=minimum)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self._check_input(input_shape)
        if self.affine_stem is not None:
            self.affine_stem.build(input_shape)
        stem_shape = input_shape
        if self.config.stem in HALF_RESOLUTION_STEMS:
            stem_shape = input_shape[:1] + tuple(None if d is None else d // 2 for d in input_shape[1:4]) + (2,)
        for stem in self.dense_stems:
            stem.build(stem_shape)
        self.built = True

    # ------------------------------------------------------------------------------------ forward

    def _affine(self, pair, training):
        """(affine stem outputs dict, warped moving) for the affine stage."""
        out = self.affine_stem(pair, training=training)
        warped = tf.ensure_shape(warp.warp(pair[..., 1:2], out["flow"]), pair[..., 1:2].shape)
        return out, warped

    def affine_stage(self, pair, training=False) -> dict:
        """The affine stage alone (for "affine only" evaluations).

        Args:
          pair: ``[B, D, H, W, 2]`` = concat([fixed, moving]).

        Returns:
          dict with ``flow`` [B, D, H, W, 3], ``warped`` [B, D, H, W, 1] (moving warped by it), ``A`` [B, 3, 3],
          ``b`` [B, 3].

        Raises:
          ValueError: the cascade has no affine stage.
        """
        if self.affine_stem is None:
            raise ValueError("affine_stage: this cascade has no affine stage (config.affine='none')")
        pair = tf.convert_to_tensor(pair, tf.float32)
        self._check_input(pair.shape)
        out, warped = self._affine(pair, training)
        return {"flow": out["flow"], "warped": warped, "A": out["A"], "b": out["b"]}

    def call(self, pair, training=False):
        """Registers moving to fixed.

        Args:
          pair: ``[B, D, H, W, 2]`` = concat([fixed, moving]) (fixed first).
          training: passed to the stems.

        Returns:
          dict:
            ``flows``: list of each stem's own flow ``[B, D, H, W, 3]`` (affine stage first if present);
            ``agg_flow``: ``[B, D, H, W, 3]`` composed flow; ``warped``: ``[B, D, H, W, 1]`` original moving
            image warped by it; ``dense_flows``: the dense stems' own flows (``flows`` without the affine stage's);
            ``A`` ``[B, 3, 3]``, ``b`` ``[B, 3]`` (identity / zeros without affine stage). The regularisers are
            computed by the training step from these (`ldr_tf.ops.losses.cascade_regularisers`).
        """
        pair = tf.convert_to_tensor(pair, tf.float32)
        self._check_input(pair.shape)
        full_pair = pair
        fixed, moving = pair[..., :1], pair[..., 1:2]
        batch = tf.shape(pair)[0]
        flows = []
        agg = warped = None
        half = self.config.stem in HALF_RESOLUTION_STEMS
        if self.affine_stem is not None:
            if half:  # the moving image is warped on the half grid below: no full-resolution warp here
                out, warped = self.affine_stem(pair, training=training), None
            else:
                out, warped = self._affine(pair, training)
            affine_flow, A, b = out["flow"], out["A"], out["b"]
            agg = affine_flow
            flows.append(affine_flow)
        else:
            A = tf.eye(3, batch_shape=[batch], dtype=pair.dtype)
            b = tf.zeros([batch, 3], pair.dtype)
        if half:
            full_affine = agg
            fixed, moving = _pool2(fixed), _pool2(moving)
            pair = tf.concat([fixed, moving], axis=-1)
            if agg is not None:  # the affine field on the half grid: centred coordinates halve, A stays
                grid = fixed.shape[1:4] if fixed.shape[1:4].is_fully_defined() else tf.shape(fixed)[1:4]
                affine_flow = warp.affine_to_flow(A, b / 2.0, grid)
                agg = affine_flow
                warped = warp.warp(moving, agg)
        dense_flows = []
        for k, stem in enumerate(self.dense_stems):
            inputs = pair if agg is None else tf.concat([fixed, warped], axis=-1)
            u = stem(inputs, training=training)  # [B, D, H, W, 3]
            flows.append(u)
            dense_flows.append(u)
            if agg is None:
                agg = u
            elif k == 0:  # right after the affine stage: exact composition
                agg = warp.compose_affine(A, affine_flow, u)
            else:
                agg = warp.compose(agg, u)
            warped = warp.warp(moving, agg)
        if half:
            fixed, moving = full_pair[..., :1], full_pair[..., 1:2]
            dense = agg if full_affine is None else agg - affine_flow
            agg = warp.upsample_flow(dense, 2)
            if full_affine is not None:
                agg = full_affine + agg
            warped = warp.warp(moving, agg)
        # The XLA sampler relaxes static shapes; restore them for the next stem and for callers.
        agg = tf.ensure_shape(agg, full_pair.shape[:-1] + (3,))
        warped = tf.ensure_shape(warped, moving.shape)
        return {
            "flows": flows,
            "agg_flow": agg,
            "warped": warped,
            "dense_flows": dense_flows,
            "A": A,
            "b": b,
        }

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}
