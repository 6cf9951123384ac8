"""ldr-tf: light-weight deformable registration (LDR + ALDK) in TensorFlow 2 / Keras 3, for CPUs."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "ldr_tf" / "__init__.py").read_text()).group(1)

setup(
    name="ldr-tf",
    version=version,
    description="Fast 3D deformable registration on CPU: RCN teacher, LDR student, ALDK distillation",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ldr_tf*", "networks*", "flags*", "tools*"]),
    include_package_data=True,
    package_data={
        "tools": ["serving/*.config", "serving/*.yml", "serving/*.md"],
        # the pretrained SavedModels (python -m ldr_tf.pretrained)
        "ldr_tf": ["pretrained/*/*.pb", "pretrained/*/*.json", "pretrained/*/variables/*"],
    },
    install_requires=[
        # CPU wheel by default. On a GPU host: `pip install tensorflow==2.21.0` then `pip install --no-deps -e .`
        "tensorflow-cpu>=2.20,<2.22",
        "keras>=3.12,<4",
        "numpy>=1.26",
        "h5py>=3.10",
        "nibabel>=5.2",
        "absl-py>=2.1",
        "tensorboard>=2.20,<2.22",  # training summaries (tf.summary needs it; tensorflow-cpu does not pull it in)
        "matplotlib>=3.8",  # report figures (Dice-vs-speed plot, slice comparisons, overlays)
        "scipy>=1.11",  # connected components of the label-free head box (ldr_tf.data.preprocess); test oracle
    ],
    extras_require={
        # grpcio: the serving client tests (stand-in gRPC server); pytest-xdist: `make test` runs the test files in
        # 2-4 processes (tests/conftest.py), half the wall time on 2 cores (tracing is single-threaded Python)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "grpcio>=1.60"],
        # everything the optional tests need (.ci/run installs it, so that no test skips in CI)
        "ci": ["pytest>=8", "pytest-xdist>=3.5", "grpcio>=1.60", "antspyx>=0.6", "itk-elastix>=0.25", "pyyaml>=6"],
        # tools/serving (gRPC client). Also run `pip install --no-deps tensorflow-serving-api==2.21.0`: listing it
        # here would pull in the full `tensorflow` wheel next to tensorflow-cpu (its metadata requires it).
        "serving": ["grpcio>=1.60"],
        "peers": ["antspyx>=0.6", "itk-elastix>=0.25"],  # ANTs SyN and elastix for python -m ldr_tf.compare
    },
)
