"""The ALDK discriminator / critic on deformation fields.

References: Tran et al., LDR + ALDK, IEEE TMI 2022 (section "Discrimination Loss", Figure 3).
"""

from __future__ import annotations

import keras

from networks.layers import check_divisible, conv3d, spatial_size, track_layers

__all__ = ["Critic", "CRITIC_OUTPUTS"]

CRITIC_OUTPUTS = ("sigmoid", "linear")


@keras.saving.register_keras_serializable(package="ldr_tf")
class Critic(keras.Model):
    """Six 3D convolution layers on a flow; the output is the mean feature M per sample.

    Our reading of the paper's text (reference 2.6):

    * layer 1: a stride-1 3^3 convolution to 3 channels that keeps the input resolution ("injects the
      condition information with a matched tensor dimension"). The paper gives neither its kernel nor its
      activation: we use 3^3 and **linear** (a ReLU on only 3 channels would discard the sign of the
      displacements);
    * layers 2-6: 4^3 stride-2 convolutions with `channels` (16, 32, 64, 128, 256) outputs and ReLU, except
      the last, which is followed by `output_activation`;
    * M = mean of the last layer's output over all positions and channels -> one value per sample.

    The released code differs (5^3 kernels, LeakyReLU 0.2, a flatten + dense logit tied to 128^3); this critic
    has no dense layer, so it accepts any size divisible by its total stride 32.

    ``output_activation="sigmoid"`` (default) is the paper's discriminator: M lies in (0, 1). A WGAN-GP critic
    (what the released code's loss and gradient penalty actually assume) is normally **linear**: use
    ``output_activation="linear"``, for which M is an unbounded score and the gradient penalty is meaningful.
    Weights are lecun-uniform with zero biases (no normalisation layers, as WGAN-GP requires).

    Args:
      channels: widths of layers 2-6.
      output_activation: ``"sigmoid"`` or ``"linear"``.
      first_channels: output channels of layer 1 (3 in the paper).
    """

    stride = 32

    def __init__(
        self,
        channels=(16, 32, 64, 128, 256),
        output_activation: str = "sigmoid",
        first_channels: int = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5 or min(channels) < 1:
            raise ValueError(f"channels: expected 5 positive widths (layers 2-6), got {channels}")
        if output_activation not in CRITIC_OUTPUTS:
            raise ValueError(f"output_activation: expected one of {CRITIC_OUTPUTS}, got {output_activation!r}")
        self.channels = channels
        self.output_activation = output_activation
        self.first_channels = int(first_channels)
        self.layer1 = conv3d(self.first_channels, 3, 1, name="conv1")
        acts = ["relu"] * 4 + [None if output_activation == "linear" else "sigmoid"]
        convs = [conv3d(f, 4, 2, activation=a, name=f"conv{i + 2}") for i, (f, a) in enumerate(zip(channels, acts))]
        self._convs = track_layers(self, convs)  # attributes conv2..conv6 (see `track_layers`)

    def _features(self, flow):
        x = self.layer1(flow)
        for name in self._convs:
            x = getattr(self, name)(x)
        return x  # [B, D/32, H/32, W/32, channels[-1]]

    def features(self, flow, training=False):
        """The last layer's feature map ``[B, D/32, H/32, W/32, channels[-1]]`` (after its activation); the
        critic's score M is its mean. ALDK's feature-matching discrimination loss compares these maps."""
        self._check(flow.shape)
        return self._features(flow)

    def _check(self, shape):
        check_divisible(spatial_size(shape, None, "Critic"), self.stride, "the critic")

    def build(self, input_shape):
        self._check(input_shape)
        self._features(keras.KerasTensor(tuple(input_shape)))
        self.built = True

    def call(self, flow, training=False):
        """Scores flows.

        Args:
          flow: ``[B, D, H, W, C]`` (C = 3 for a flow), sizes divisible by 32.
          training: unused.

        Returns:
          ``[B]`` mean feature M (in (0, 1) with the sigmoid output).
        """
        self._check(flow.shape)
        return keras.ops.mean(self._features(flow), axis=[1, 2, 3, 4])

    def get_config(self):
        return {
            "channels": list(self.channels),
            "output_activation": self.output_activation,
            "first_channels": self.first_channels,
            "name": self.name,
        }
