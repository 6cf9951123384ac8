"""Affine stages: the VTN affine subnetwork (teacher) and the light LDR affine stem (student, brain).

Both regress a 3x3 matrix ``W`` and a translation ``b`` from the concatenated pair with a conv encoder and a
head of two VALID convolutions whose kernel covers the whole remaining feature volume, so the head's
parameter count depends on the input size (at 128^3: 2^3 x 512 for `AffineStem`, 3^3 x 128 for
`AffineLiteStem`). The affine map is ``x_c -> A x_c + b`` with ``A = I + W`` on centred voxel coordinates
(`ldr_tf.ops.warp.affine_to_flow`); row r of A is output axis r. With ``identity_init=True`` (our default) the
head's kernels start at zero, so a fresh stem predicts the identity; ``identity_init=False`` keeps the original's
lecun-uniform head, which starts from a random affine (measured: a demo teacher then needs ~400 steps just to get
back to the Dice it had before registration).

References: Zhao et al., "Unsupervised 3D end-to-end medical image registration with volume tweening network"
(VTN), J-BHI 2019; Zhao et al., "Recursive Cascaded Networks", ICCV 2019; Tran et al., LDR + ALDK, TMI 2022.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ldr_tf.ops import warp
from networks.layers import check_divisible, conv3d, spatial_size, track_layers

__all__ = ["AffineStem", "AffineLiteStem"]


class _AffineBase(keras.Model):
    """Shared head: encoder features -> (W, b) -> A and the affine flow."""

    #: total stride and smallest legal size, set by subclasses
    stride = 64
    min_size = 64
    label = "the affine stem"

    def __init__(self, flow_multiplier: float = 1.0, identity_init: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.flow_multiplier = float(flow_multiplier)
        self.identity_init = bool(identity_init)
        # Subclasses set `self._encoder_names` (see `track_layers`): the layers applied before the head.
        self._encoder_names = ()
        self.conv7_W = None  # created in build: kernel = remaining feature size
        self.conv7_b = None
        self.image_size = None

    @property
    def encoder(self) -> list:
        """The layers applied in order before the head."""
        return [getattr(self, n) for n in self._encoder_names]

    def _features(self, x):
        for layer in self.encoder:
            x = layer(x)
        return x

    def build(self, input_shape):
        size = spatial_size(input_shape, 2, type(self).__name__)
        if None in size:
            raise ValueError(
                f"{type(self).__name__}: the affine head is tied to the input size, which must be known "
                f"at build time; got input shape {tuple(input_shape)}"
            )
        check_divisible(size, self.stride, self.label, minimum=self.min_size)
        feats = self._features(keras.KerasTensor(tuple(input_shape)))
        kernel = tuple(int(s) for s in feats.shape[1:4])
        init = "zeros" if self.identity_init else "lecun_uniform"
        # the head is float32 whatever the encoder computes in (A and b need the precision)
        self.conv7_W = conv3d(9, kernel, padding="valid", use_bias=False, kernel_initializer=init, name="conv7_W",
                              dtype="float32")
        self.conv7_b = conv3d(3, kernel, padding="valid", use_bias=False, kernel_initializer=init, name="conv7_b",
                              dtype="float32")
        self.conv7_W(feats)
        self.conv7_b(feats)
        self.image_size = size
        self.built = True

    def call(self, pair, training=False):
        """Predicts the affine stage.

        Args:
          pair: ``[B, D, H, W, 2]`` = concat([fixed, moving]); (D, H, W) must be the size it was built for.
          training: unused (no dropout or normalisation).

        Returns:
          dict with ``flow`` [B, D, H, W, 3] (displacement ``(A - I) x_c + b`` in voxels), ``A`` [B, 3, 3],
          ``W`` [B, 3, 3] (= A - I), ``b`` [B, 3] (its regularisers are the training step's:
          `ldr_tf.ops.losses.cascade_regularisers`).
        """
        size = spatial_size(pair.shape, 2, type(self).__name__)
        if self.image_size is not None and None not in size and size != self.image_size:
            raise ValueError(
                f"{type(self).__name__}: built for input size {self.image_size} (the affine head is tied "
                f"to it), got input shape {tuple(pair.shape)}"
            )
        feats = self._features(pair)
        W = tf.reshape(self.conv7_W(feats), [-1, 3, 3]) * self.flow_multiplier  # [B, 3, 3], row = out axis
        b = tf.reshape(self.conv7_b(feats), [-1, 3]) * self.flow_multiplier  # [B, 3]
        A = W + tf.eye(3, dtype=W.dtype)
        shape = self.image_size if self.image_size is not None else tf.shape(pair)[1:4]
        flow = warp.affine_to_flow(A, b, shape)  # [B, D, H, W, 3]
        return {
            "flow": flow,
            "A": A,
            "W": W,
            "b": b,
        }


@keras.saving.register_keras_serializable(package="ldr_tf")
class AffineStem(_AffineBase):
    """VTN affine subnetwork (RCN ``VTNAffineStem``).

    Encoder: ten 3^3 convolutions + LeakyReLU(0.1) with widths c, 2c, 4c, 4c, 8c, 8c, 16c, 16c, 32c, 32c
    (c = `channels`; 16..512 for c = 16), stride 2 on the 1st, 2nd, 3rd, 5th, 7th and 9th, so the total stride
    is 64. Head: ``conv7_W`` (9 outputs) and ``conv7_b`` (3 outputs), VALID, no bias, linear, kernel = the
    remaining feature size. 14,166,288 parameters at 128^3 with c = 16.

    Accepts spatial sizes divisible by 64 (64, 128, 192, ...); once built, only that size.

    Args:
      channels: width multiplier c (16 = reference).
      flow_multiplier: scales W and b (1 in RCN).
      identity_init: zero-initialised head (start at the identity) instead of the original's lecun-uniform.
    """

    stride = 64
    min_size = 64
    label = "the VTN affine stem"

    def __init__(self, channels: int = 16, flow_multiplier: float = 1.0, identity_init: bool = True, **kwargs):
        super().__init__(flow_multiplier=flow_multiplier, identity_init=identity_init, **kwargs)
        if int(channels) < 1:
            raise ValueError(f"channels: expected a positive integer, got {channels}")
        self.channels = int(channels)
        c = self.channels
        spec = [  # (name, filters, stride)
            ("conv1", c, 2), ("conv2", 2 * c, 2), ("conv3", 4 * c, 2), ("conv3_1", 4 * c, 1),
            ("conv4", 8 * c, 2), ("conv4_1", 8 * c, 1), ("conv5", 16 * c, 2), ("conv5_1", 16 * c, 1),
            ("conv6", 32 * c, 2), ("conv6_1", 32 * c, 1),
        ]  # fmt: skip
        self._encoder_names = track_layers(
            self, [conv3d(f, 3, s, activation="leaky_relu_01", name=n) for n, f, s in spec]
        )

    def get_config(self):
        return {"channels": self.channels, "flow_multiplier": self.flow_multiplier,
                "identity_init": self.identity_init, "name": self.name}


@keras.saving.register_keras_serializable(package="ldr_tf")
class AffineLiteStem(_AffineBase):
    """Light affine stem of the LDR student for brain data (LDR ``LDRUtilStem``, reference 2.4).

    Four 3^3 stride-2 convolutions + LeakyReLU(0.1) (16, 32, 64, 128 channels), a 3^3 stride-2 VALID average
    pooling, then the same VALID head as `AffineStem` (kernel 3^3 at 128^3). 332,880 parameters at 128^3.

    Accepts spatial sizes divisible by 16 and at least 48 (the pooling needs 3 feature voxels); once built,
    only that size.

    Args:
      channels: the four encoder widths.
      flow_multiplier: scales W and b (1 in LDR).
      identity_init: zero-initialised head (start at the identity) instead of the original's lecun-uniform.
    """

    stride = 16
    min_size = 48
    label = "the lite affine stem"

    def __init__(self, channels=(16, 32, 64, 128), flow_multiplier: float = 1.0, identity_init: bool = True,
                 **kwargs):
        super().__init__(flow_multiplier=flow_multiplier, identity_init=identity_init, **kwargs)
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"channels: expected 4 positive encoder widths, got {channels}")
        self.channels = channels
        last = len(channels) - 1  # the last conv feeds the pooling: see `networks.layers.leaky_relu_01_max`
        encoder = [
            conv3d(f, 3, 2, activation="leaky_relu_01_max" if i == last else "leaky_relu_01", name=f"conv{i + 1}")
            for i, f in enumerate(channels)
        ]
        encoder.append(keras.layers.AveragePooling3D(3, 2, padding="valid", name="avg_pool"))
        self._encoder_names = track_layers(self, encoder)

    def get_config(self):
        return {"channels": list(self.channels), "flow_multiplier": self.flow_multiplier,
                "identity_init": self.identity_init, "name": self.name}
