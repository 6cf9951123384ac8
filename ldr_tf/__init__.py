"""ldr-tf: light-weight deformable registration (LDR + ALDK) in TensorFlow 2 / Keras 3."""

import os as _os

# Keras 3 must use the TensorFlow backend; set before anything imports keras.
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Hide TF's INFO chatter (oneDNN banner, cpu-feature notes); warnings and errors still show.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
