"""Helpers shared by the test modules (the fixtures built from them are in conftest.py): random-weight training runs,
the analytic NIfTI phantom pair on two different grids."""

import os
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import tensorflow as tf

from ldr_tf.atomic import write_json
from ldr_tf.training import checkpoints as runs

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
# The demo data's record: not a NIfTI recipe, so predict needs --preprocessing.
SYNTHETIC_PREPROCESSING = {"kind": "synthetic", "modality": "mri", "intensity": "0..255 stored, /255 at read"}


def student_network(size=SIZE, affine="none", cascades=1) -> dict:
    from networks.cascade import CascadeConfig

    return CascadeConfig(stem="ldr", cascades=cascades, affine=affine, image_size=(size,) * 3).to_dict()


def make_run(run_dir, network: dict, model: str = "student", seed: int = 0, scale: float = 0.05,
             preprocessing=None, dataset=None) -> Path:
    """A training run directory (config.json + one checkpoint) holding random, non-trivial weights.

    Every variable is drawn from N(0, scale^2) (biases too), so the flows are neither zero nor the identity-init
    ones: what the export must reproduce is a generic network.
    """
    run_dir = Path(run_dir)
    keras.utils.set_random_seed(seed)
    net = runs.build_network(network)
    rng = np.random.default_rng(seed)
    for v in net.weights:
        v.assign(rng.normal(0.0, scale, v.shape).astype(np.float32))
    write_json({"train": {"model": model, "aldk": False}, "network": network,
                      "preprocessing": preprocessing if preprocessing is not None else SYNTHETIC_PREPROCESSING,
                      "dataset": dataset or {"path": "none"}}, run_dir / "config.json")
    tf.train.Checkpoint(model=net).save(str(run_dir / runs.CHECKPOINT_DIR / "ckpt"))
    return run_dir


# Both phantoms fill the same world box [-30, 30] x [-34, 34] x [-28, 28] mm, on different voxel grids.
FIXED_SHAPE = (30, 34, 28)  # RAS, 2 mm
MOVING_SHAPE = (40, 40, 40)  # before reorientation: 1.5 x 1.7 x 1.4 mm
LABELS = (2, 17, 41)


def phantom(world):
    """Labels and intensities (0..255) of an analytic head-like phantom at world points ``[..., 3]`` (mm)."""
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    lab = np.zeros(world.shape[:-1], np.int16)
    body = (x / 26) ** 2 + (y / 30) ** 2 + (z / 24) ** 2 < 1
    lab[body] = 2
    lab[((x - 6) / 9) ** 2 + ((y + 4) / 12) ** 2 + ((z - 3) / 8) ** 2 < 1] = 17
    lab[((x + 10) / 7) ** 2 + ((y - 9) / 8) ** 2 + ((z + 5) / 9) ** 2 < 1] = 41
    img = np.where(body, 80.0 + 0.8 * y + 0.5 * z, 5.0)
    img = img + np.where(lab == 17, 90.0, 0.0) + np.where(lab == 41, 45.0, 0.0)
    return lab, img.astype(np.float32)


def world_points(affine, shape):
    idx = np.moveaxis(np.indices(shape, dtype=np.float64), 0, -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def fixed_affine():
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    a[:3, 3] = [-29.0, -33.0, -27.0]
    return a


def moving_affine():
    """Array axes (S, L, P): axis 0 runs up (z, 1.4 mm), axis 1 to the left (-x, 1.5 mm), axis 2 back (-y, 1.7)."""
    a = np.zeros((4, 4))
    a[2, 0] = 1.4
    a[0, 1] = -1.5
    a[1, 2] = -1.7
    a[3, 3] = 1.0
    a[:3, 3] = [30.0 - 0.75, 34.0 - 0.85, -28.0 + 0.7]
    return a


def save_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


# PSR like IXI: array axis 0 -> posterior (-y), axis 1 -> superior (+z), axis 2 -> right (+x); 2 mm voxels.
PSR = np.array([[0, 0, 2.0, -20], [-2.0, 0, 0, 30], [0, 2.0, 0, -10], [0, 0, 0, 1]])
# LAS: axis 0 -> left (-x), 1 -> anterior, 2 -> superior; 1.5 x 1 x 2 mm voxels.
LAS = np.array([[-1.5, 0, 0, 12], [0, 1.0, 0, -7], [0, 0, 2.0, 3], [0, 0, 0, 1]])
