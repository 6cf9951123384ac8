"""Shared building blocks of the registration networks and the critic.

Conventions of the original TF1 code (reference.md section 1), reproduced with Keras 3 layers:

* every convolution uses SAME padding (Keras' asymmetric "same" padding for stride 2, as TF1) and
  ``lecun_uniform`` weights, i.e. U(+-sqrt(3 / fan_in)) with fan_in = k^3 * C_in (tflearn ``uniform_scaling``);
* regular convolutions carry a zero-initialised bias; transposed convolutions (4^3, stride 2) carry none;
* the registration networks use LeakyReLU with slope 0.1 (`leaky_relu_01`).

Also the size checks shared by every network: a network with total stride ``s`` accepts spatial sizes divisible
by ``s``, and a bad size raises a one-line ``ValueError`` naming the allowed sizes.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import keras

__all__ = [
    "leaky_relu_01",
    "leaky_relu_01_max",
    "conv3d",
    "conv3d_transpose",
    "near_zero_initializer",
    "spatial_size",
    "check_divisible",
    "track_layers",
    "dtype_policy",
    "COMPUTE_DTYPES",
]

COMPUTE_DTYPES = ("float32", "bfloat16")

LEAKY_SLOPE = 0.1  # tflearn leaky_relu default used by the RCN/LDR networks
FLOW_INIT_STD = 1e-5  # std of the near-zero flow head of the LDR / VoxelMorph students


@keras.saving.register_keras_serializable(package="ldr_tf")
def leaky_relu_01(x):
    """LeakyReLU with negative slope 0.1 (the RCN/LDR ``convolveLeakyReLU`` activation)."""
    return keras.activations.leaky_relu(x, negative_slope=LEAKY_SLOPE)


@keras.saving.register_keras_serializable(package="ldr_tf")
def leaky_relu_01_max(x):
    """The same function as `leaky_relu_01`, written ``max(x, 0.1 x)``.

    For a convolution whose output feeds a pooling layer: TensorFlow's graph optimizer (remapper) tries to fuse
    Conv3D + BiasAdd + LeakyRelu there, fails on the gradient that needs the pre-activation, and prints an
    ``E ... remapper failed: ... LeakyReluGrad`` line at every training trace (harmless, but alarming). This form
    is not a LeakyRelu op, so nothing is attempted; the values and gradients are the same.
    """
    return keras.ops.maximum(x, LEAKY_SLOPE * x)


def _activation(activation):
    return {"leaky_relu_01": leaky_relu_01, "leaky_relu_01_max": leaky_relu_01_max}.get(activation, activation)


def conv3d(
    filters: int,
    kernel_size=3,
    strides=1,
    activation=None,
    padding: str = "same",
    use_bias: bool = True,
    kernel_initializer="lecun_uniform",
    name: str | None = None,
    dtype=None,
) -> keras.layers.Conv3D:
    """A 3D convolution with the reference conventions (SAME, lecun_uniform, zero bias).

    Args:
      filters: output channels.
      kernel_size, strides: int or 3-tuple.
      activation: None (linear), ``"leaky_relu_01"`` (slope 0.1), or any Keras activation (``"relu"``, ...).
      padding: ``"same"`` or ``"valid"``.
      use_bias: whether to add a (zero-initialised) bias.
      kernel_initializer: Keras initializer or its name.
      name: layer name.
      dtype: Keras dtype policy (None = the current global policy; flow heads pass "float32").

    Returns:
      A ``keras.layers.Conv3D`` mapping ``[B, D, H, W, C_in]`` to ``[B, D/s, H/s, W/s, filters]`` (SAME).
    """
    return keras.layers.Conv3D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        activation=_activation(activation),
        use_bias=use_bias,
        kernel_initializer=kernel_initializer,
        bias_initializer="zeros",
        name=name,
        dtype=dtype,
    )


def conv3d_transpose(
    filters: int,
    kernel_size=4,
    strides=2,
    activation=None,
    use_bias: bool = False,
    kernel_initializer="lecun_uniform",
    name: str | None = None,
    dtype=None,
) -> keras.layers.Conv3DTranspose:
    """A transposed 3D convolution (default 4^3, stride 2, no bias: the reference ``upconvolve``).

    Keras computes lecun fan_in of a transposed kernel as k^3 * C_out, which is what tflearn does.

    Returns:
      A ``keras.layers.Conv3DTranspose`` mapping ``[B, D, H, W, C_in]`` to ``[B, 2D, 2H, 2W, filters]``.
    """
    return keras.layers.Conv3DTranspose(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        activation=_activation(activation),
        use_bias=use_bias,
        kernel_initializer=kernel_initializer,
        bias_initializer="zeros",
        name=name,
        dtype=dtype,
    )


def near_zero_initializer() -> keras.initializers.Initializer:
    """N(0, 1e-5) kernel initializer of the LDR flow heads: a fresh student predicts an almost-zero flow."""
    return keras.initializers.RandomNormal(mean=0.0, stddev=FLOW_INIT_STD)


def spatial_size(input_shape, channels: int | None, what: str) -> tuple:
    """Checks a ``[B, D, H, W, C]`` shape and returns its spatial part ``(D, H, W)`` (entries may be None).

    Raises:
      ValueError: wrong rank, or a known channel count other than `channels`.
    """
    shape = tuple(input_shape)
    if len(shape) != 5:
        raise ValueError(f"{what}: expected an input of shape [B, D, H, W, C], got {shape}")
    if channels is not None and shape[-1] is not None and shape[-1] != channels:
        raise ValueError(f"{what}: expected {channels} input channels in [B, D, H, W, {channels}], got {shape}")
    return tuple(None if s is None else int(s) for s in shape[1:4])


def check_divisible(
    sizes: Sequence, multiple: int, what: str, label: str = "input size", minimum: int | None = None
) -> None:
    """Raises a ValueError naming the allowed sizes unless every known size is a multiple of `multiple`.

    Args:
      sizes: spatial sizes ``(D, H, W)``; None entries (unknown until run time) are not checked.
      multiple: the network's total stride.
      what: who needs it, e.g. ``"the VTN stem"``.
      label: what `sizes` is called in the message (``"image_size"``, ``"input size"``).
      minimum: optional smallest allowed size (also a multiple of `multiple`).

    Raises:
      ValueError: e.g. ``image_size (96, 96, 80): the VTN stem needs every size divisible by 64
        (e.g. 64, 128, 192)``.
    """
    sizes = tuple(sizes)
    lowest = max(multiple, minimum or multiple)
    ok = all(s is None or (s % multiple == 0 and s >= lowest) for s in sizes)
    if not ok:
        examples = ", ".join(str(lowest + i * multiple) for i in range(3))
        at_least = f" and at least {lowest}" if lowest > multiple else ""
        raise ValueError(
            f"{label} {sizes}: {what} needs every size divisible by {multiple}{at_least} (e.g. {examples})"
        )


def track_layers(owner, layers) -> tuple:
    """Sets each layer as an attribute of `owner` named after the layer and returns the names, in order.

    Keras 3 wraps a list or dict of layers in its own tracked collections, which `tf.train.Checkpoint` does
    not see (the layers' weights would silently be left out of checkpoints). Direct attributes are seen by both
    Keras and TF; keep the returned tuple of names to iterate over the layers.

    Raises:
      ValueError: a layer name is already an attribute of `owner`.
    """
    names = []
    for layer in layers:
        if hasattr(owner, layer.name):
            raise ValueError(f"layer name {layer.name!r} clashes with an attribute of {type(owner).__name__}")
        setattr(owner, layer.name, layer)
        names.append(layer.name)
    return tuple(names)


@contextlib.contextmanager
def dtype_policy(name: str):
    """Layers constructed inside compute in `name`'s dtype: ``"float32"`` or ``"bfloat16"`` (Keras'
    ``mixed_bfloat16``: float32 weights, bfloat16 convolutions). Restores the previous global policy on exit."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected one of {COMPUTE_DTYPES}, got {name!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if name == "bfloat16" else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class DenseStem(keras.Model):
    """Base of the dense stems (VTN, LDR, LDRReleased): ``pair [B, D, H, W, 2] -> flow [B, D, H, W, 3]`` in voxels.

    Subclasses set ``stride`` (every spatial size must be a multiple), ``label`` and ``what`` (for errors) and
    implement ``_forward(pair)``; ``_build_forward`` (default ``_forward``) is what `build` traces symbolically to
    create the layers.
    """

    stride = 16
    label = "stem"
    what = "the stem"

    def _forward(self, pair):  # pragma: no cover (interface)
        raise NotImplementedError

    def _build_forward(self, pair):
        return self._forward(pair)

    def build(self, input_shape):
        check_divisible(spatial_size(input_shape, 2, self.label), self.stride, self.what)
        self._build_forward(keras.KerasTensor(tuple(input_shape)))
        self.built = True

    def call(self, pair, training=False):
        """Predicts a dense flow.

        Args:
          pair: ``[B, D, H, W, 2]`` = concat([fixed, moving]), sizes divisible by ``stride``.
          training: unused (no dropout or normalisation).

        Returns:
          ``[B, D, H, W, 3]`` displacement in voxels.
        """
        check_divisible(spatial_size(pair.shape, 2, self.label), self.stride, self.what)
        return self._forward(pair)
