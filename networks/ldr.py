"""The light-weight LDR student, as the paper describes it (`LDR`) and as the original code released it
(`LDRReleased`).

The two differ (reference.md 2.3): the paper has 4^3 stride-2 convolutions with ReLU (16, 32, 64, 128 channels)
and transposed convolutions in the decoder; the released code is a VoxelMorph-style U-Net with 3^3 convs,
LeakyReLU 0.1, 32/32/32/16 channels and nearest upsampling + conv. Both end in a near-zero initialised flow head
(N(0, 1e-5) weights, zero bias), so a fresh student predicts an almost-zero flow (~identity), and both scale the
flow by `flow_multiplier` only (no x20).

References: Tran et al., "Light-weight deformable registration using adversarial learning with distilling
knowledge", IEEE TMI 2022; the released code github:aioz-ai/LDR_ALDK ``network/base_networks.py``.
"""

from __future__ import annotations

import keras

from ldr_tf.ops import warp
from networks.layers import (
    DenseStem,
    conv3d,
    conv3d_transpose,
    near_zero_initializer,
    track_layers,
)

__all__ = ["LDR", "LDRReleased", "STUDENT_HEADS"]

STUDENT_HEADS = ("deconv", "upsample")


def _flow_head_conv(kernel_size, transpose: bool, name: str):
    """3-channel flow head: N(0, 1e-5) weights, zero bias, linear; always float32 (flows stay float32 even when the
    rest of the network computes in bfloat16)."""
    if transpose:
        return conv3d_transpose(
            3, kernel_size, 2, use_bias=True, kernel_initializer=near_zero_initializer(), name=name, dtype="float32"
        )
    return conv3d(3, kernel_size, kernel_initializer=near_zero_initializer(), name=name, dtype="float32")


@keras.saving.register_keras_serializable(package="ldr_tf")
class LDR(DenseStem):
    """The paper's light-weight student.

    Encoder: four 4^3 stride-2 convolutions + ReLU with `channels` (16, 32, 64, 128) outputs: e1 at 1/2,
    e2 at 1/4, e3 at 1/8, e4 at 1/16 of the input size. Decoder: three 4^3 stride-2 transposed convolutions
    + ReLU (no bias) with the mirrored widths (64, 32, 16); the skip of the matching encoder level is
    concatenated to each one's output, so each transposed conv (and the head) reads a skip-concat:
    ``t3 = up(e4) ++ e3``, ``t2 = up(t3) ++ e2``, ``t1 = up(t2) ++ e1`` (t1 at 1/2 resolution).

    The last step to full resolution is the `head` option:

    * ``"deconv"``: a 4^3 stride-2 transposed conv from t1 straight to 3 channels at full resolution.
    * ``"upsample"`` (default): a 3^3 conv from t1 to 3 channels at half resolution, then
      `ldr_tf.ops.warp.upsample_flow` (trilinear, values doubled) to full resolution. This keeps the paper's
      count of exactly three deconvolution layers, and it is the faster head on CPU: at 128^3 (batch 1, 2
      cores) the stem takes ~0.11 s against ~0.15 s with "deconv", whose full-resolution transposed conv
      to 3 channels alone costs ~0.09 s (measured: as much as one with 16 output channels).

    Flow = head output * flow_multiplier. Parameters (any input size): 1,548,531 ("deconv"),
    1,544,979 ("upsample"). Accepts spatial sizes divisible by 16 (16, 32, 48, ...), for both heads.

    Args:
      channels: the four encoder widths (16, 32, 64, 128 in the paper).
      head: ``"deconv"`` or ``"upsample"``.
      flow_multiplier: scales the flow (1 / n for n cascades).
    """

    stride = 16
    label, what = "LDR", "the LDR student"

    def __init__(
        self, channels=(16, 32, 64, 128), head: str = "upsample", flow_multiplier: float = 1.0, **kwargs
    ):
        super().__init__(**kwargs)
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"channels: expected 4 positive encoder widths, got {channels}")
        if head not in STUDENT_HEADS:
            raise ValueError(f"head: expected one of {STUDENT_HEADS}, got {head!r}")
        self.channels = channels
        self.head = head
        self.flow_multiplier = float(flow_multiplier)
        # Layers are attributes named after themselves (`track_layers`); these tuples keep their order.
        self._encoder = track_layers(
            self, [conv3d(f, 4, 2, activation="relu", name=f"conv{i + 1}") for i, f in enumerate(channels)]
        )
        self._decoder = track_layers(
            self,
            [
                conv3d_transpose(f, 4, 2, activation="relu", name=f"deconv{i}")
                for i, f in zip((3, 2, 1), channels[2::-1])
            ],
        )
        if head == "deconv":
            self.flow_head = _flow_head_conv(4, transpose=True, name="flow")
        else:
            self.flow_head = _flow_head_conv(3, transpose=False, name="flow_half")

    def _raw(self, pair):
        """Head output before upsampling/scaling: full resolution ("deconv") or half ("upsample")."""
        skips = []
        x = pair
        for name in self._encoder:
            x = getattr(self, name)(x)
            skips.append(x)
        for name, skip in zip(self._decoder, skips[2::-1]):
            x = keras.ops.concatenate([getattr(self, name)(x), skip], axis=-1)
        return self.flow_head(x)

    _build_forward = _raw  # the layers; the upsampling and scaling below have no weights

    def _forward(self, pair):
        flow = self._raw(pair)
        if self.head == "upsample":
            flow = warp.upsample_flow(flow, 2)
        return flow * self.flow_multiplier

    def get_config(self):
        return {
            "channels": list(self.channels),
            "head": self.head,
            "flow_multiplier": self.flow_multiplier,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="ldr_tf")
class LDRReleased(DenseStem):
    """The student as the original code released it (LDR ``base_networks.LDR``, reference 2.3).

    All convolutions 3^3 + LeakyReLU(0.1). Encoder conv1..conv4, stride 2, widths `encoders` (32, 32, 32, 16).
    Decoder with `decoders` (32, 32, 32, 32, 16, 16, 16): decode4 at 1/16; then three times nearest x2
    upsampling, concat with conv3 / conv2 / conv1 and a conv (decode3, decode2, decode1 + decode1_1); a last
    nearest x2 upsampling to full resolution, concat with the input pair, decode0 and decode0_1; the flow is a
    3^3 conv to 3 channels with N(0, 1e-5) weights and zero bias. Flow = conv output * flow_multiplier.

    280,659 parameters (any input size); most of its compute is the two full-resolution convs.
    Accepts spatial sizes divisible by 16.

    Args:
      encoders: four encoder widths.
      decoders: seven decoder widths (decode4, decode3, decode2, decode1, decode1_1, decode0, decode0_1).
      flow_multiplier: scales the flow.
    """

    stride = 16
    label, what = "LDRReleased", "the released LDR student"

    def __init__(
        self,
        encoders=(32, 32, 32, 16),
        decoders=(32, 32, 32, 32, 16, 16, 16),
        flow_multiplier: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        encoders = tuple(int(c) for c in encoders)
        decoders = tuple(int(c) for c in decoders)
        if len(encoders) != 4 or min(encoders) < 1:
            raise ValueError(f"encoders: expected 4 positive widths, got {encoders}")
        if len(decoders) != 7 or min(decoders) < 1:
            raise ValueError(f"decoders: expected 7 positive widths, got {decoders}")
        self.encoders, self.decoders = encoders, decoders
        self.flow_multiplier = float(flow_multiplier)
        lrelu = "leaky_relu_01"
        self._encoder = track_layers(
            self, [conv3d(f, 3, 2, activation=lrelu, name=f"conv{i + 1}") for i, f in enumerate(encoders)]
        )
        names = ["decode4", "decode3", "decode2", "decode1", "decode1_1", "decode0", "decode0_1"]
        track_layers(self, [conv3d(f, 3, 1, activation=lrelu, name=n) for n, f in zip(names, decoders)])
        self.upsample = keras.layers.UpSampling3D(2, name="upsample")
        self.flow_head = _flow_head_conv(3, transpose=False, name="flow")

    def _forward(self, pair):
        skips = [pair]
        x = pair
        for name in self._encoder:
            x = getattr(self, name)(x)
            skips.append(x)
        x = self.decode4(x)
        x = self.decode3(keras.ops.concatenate([self.upsample(x), skips[3]], axis=-1))
        x = self.decode2(keras.ops.concatenate([self.upsample(x), skips[2]], axis=-1))
        x = self.decode1(keras.ops.concatenate([self.upsample(x), skips[1]], axis=-1))
        x = self.decode1_1(x)
        x = self.decode0(keras.ops.concatenate([self.upsample(x), skips[0]], axis=-1))
        x = self.decode0_1(x)
        return self.flow_head(x) * self.flow_multiplier

    def get_config(self):
        return {
            "encoders": list(self.encoders),
            "decoders": list(self.decoders),
            "flow_multiplier": self.flow_multiplier,
            "name": self.name,
        }
