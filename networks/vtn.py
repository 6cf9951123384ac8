"""VTN dense deformable subnetwork: the teacher's stem (RCN ``base_networks.VTN``, reference 2.2).

References: Zhao et al., VTN, J-BHI 2019; Zhao et al., "Recursive Cascaded Networks", ICCV 2019.
"""

from __future__ import annotations

import keras

from networks.layers import (
    DenseStem,
    conv3d,
    conv3d_transpose,
    near_zero_initializer,
    track_layers,
)

__all__ = ["VTN"]


@keras.saving.register_keras_serializable(package="ldr_tf")
class VTN(DenseStem):
    """VTN dense flow network.

    Encoder (3^3 convs + LeakyReLU 0.1): conv1 c /2, conv2 2c /2, conv3 4c /2, conv3_1 4c, conv4 8c /2,
    conv4_1 8c, conv5 16c /2, conv5_1 16c, conv6 32c /2, conv6_1 32c (c = `channels`; 16..512 for c = 16).
    Decoder, from the coarsest level up: ``pred_k`` = 3^3 conv to 3 channels (bias, linear), ``upsamp`` = its
    4^3 stride-2 transposed conv (3 -> 3, no bias), ``deconv`` = 4^3 stride-2 transposed conv of the features
    (+ LeakyReLU 0.1, no bias), then concat([skip, deconv, upsampled prediction]). Skips: conv5_1, conv4_1,
    conv3_1, conv2, conv1. The last step, ``pred0``, is a 4^3 stride-2 transposed conv of the 64^3 concat to
    3 channels at full resolution (no bias, linear). With ``identity_init=True`` (our default) its kernel is
    N(0, 1e-5) like the LDR heads, so a fresh VTN predicts ~zero flow; ``False`` keeps the original's
    lecun-uniform kernel, whose x20 output starts at flows of several voxels.

    Flow = pred0 * 20 * flow_multiplier. 28,252,203 parameters with c = 16 (independent of the input size).
    Accepts spatial sizes divisible by 64 (64, 128, 192, ...).

    Args:
      channels: width multiplier c (16 = reference; 4-8 for tests and demos).
      flow_multiplier: scales the flow (RCN gives each of n dense stems 1 / n).
      identity_init: near-zero flow head (start at the identity) instead of the original's lecun-uniform.
    """

    stride = 64
    label, what = "VTN", "the VTN stem"

    def __init__(self, channels: int = 16, flow_multiplier: float = 1.0, identity_init: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.identity_init = bool(identity_init)
        if int(channels) < 1:
            raise ValueError(f"channels: expected a positive integer, got {channels}")
        self.channels = c = int(channels)
        self.flow_multiplier = float(flow_multiplier)
        spec = [  # (name, filters, stride)
            ("conv1", c, 2), ("conv2", 2 * c, 2), ("conv3", 4 * c, 2), ("conv3_1", 4 * c, 1),
            ("conv4", 8 * c, 2), ("conv4_1", 8 * c, 1), ("conv5", 16 * c, 2), ("conv5_1", 16 * c, 1),
            ("conv6", 32 * c, 2), ("conv6_1", 32 * c, 1),
        ]  # fmt: skip
        # Layers are attributes named after themselves (`track_layers`); these tuples keep their order.
        self._encoder = track_layers(
            self, [conv3d(f, 3, s, activation="leaky_relu_01", name=n) for n, f, s in spec]
        )
        # Decoder levels 6 -> 2: (prediction level, feature deconv width); skips listed in the same order.
        levels = [(6, 16 * c), (5, 8 * c), (4, 4 * c), (3, 2 * c), (2, c)]
        self._preds = track_layers(self, [conv3d(3, 3, name=f"pred{k}") for k, _ in levels])
        self._upsamps = track_layers(self, [conv3d_transpose(3, name=f"upsamp{k}to{k - 1}") for k, _ in levels])
        self._deconvs = track_layers(
            self, [conv3d_transpose(f, activation="leaky_relu_01", name=f"deconv{k - 1}") for k, f in levels]
        )
        self.pred0 = conv3d_transpose(
            3, kernel_initializer=near_zero_initializer() if self.identity_init else "lecun_uniform", name="pred0",
            dtype="float32",  # flows stay float32 when the rest computes in bfloat16
        )
        self._skips = ("conv5_1", "conv4_1", "conv3_1", "conv2", "conv1")

    def _forward(self, pair):
        feats = {}
        x = pair
        for name in self._encoder:
            x = getattr(self, name)(x)
            feats[name] = x
        for pred, upsamp, deconv, skip in zip(self._preds, self._upsamps, self._deconvs, self._skips):
            up = getattr(self, upsamp)(getattr(self, pred)(x))  # [B, 2d, 2h, 2w, 3]
            x = keras.ops.concatenate([feats[skip], getattr(self, deconv)(x), up], axis=-1)
        return self.pred0(x) * (20.0 * self.flow_multiplier)

    def get_config(self):
        return {"channels": self.channels, "flow_multiplier": self.flow_multiplier,
                "identity_init": self.identity_init, "name": self.name}
