"""ldr-tf: light-weight deformable registration (LDR + ALDK) in TensorFlow 2 / Keras 3.

Importing this package (and so ``networks`` and every command-line tool) prepares the process for TensorFlow before
TensorFlow itself is imported:

* ``KERAS_BACKEND=tensorflow`` (Keras 3 must use TensorFlow here);
* ``TF_ENABLE_ONEDNN_OPTS=1`` unless the variable is already set: TensorFlow turns its oneDNN kernels on by default
  only on CPUs with AVX-512 VNNI/BF16 or AMX; on AVX2-only CPUs (most laptops and desktops, AMD Zen 2/3, many cloud
  VMs) 3D transposed and thin-output convolutions are otherwise 25-50x slower. An explicit
  ``TF_ENABLE_ONEDNN_OPTS=0`` is respected. TensorFlow reads the variable once, when it is first imported, so
  ``import ldr_tf`` must come before ``import tensorflow`` for this to take effect (`ldr_tf.cpu.onednn_enabled`
  says what the process got);
* ``TF_CPP_MIN_LOG_LEVEL=1`` unless set: TensorFlow's INFO lines are hidden (warnings and errors still show). The
  one oneDNN line TensorFlow prints before its logging starts ("oneDNN custom operations are on ...") is expected:
  it says the fast kernels are in use.
"""

import os as _os

# Keras 3 must use the TensorFlow backend; set before anything imports keras.
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# oneDNN on every x86 CPU (TensorFlow enables it by default only with AVX-512 VNNI/BF16 or AMX); respect a user's 0.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# Hide TF's INFO chatter (cpu-feature notes); warnings and errors still show.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.3.3"
