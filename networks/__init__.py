"""Keras 3 layers and models: affine stage, VTN cascades, the light-weight student, the critic."""

import ldr_tf as _ldr_tf  # noqa: F401  (sets KERAS_BACKEND before keras is imported)
