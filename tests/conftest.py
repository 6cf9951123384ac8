"""Shared test setup: TF backend and quiet logs, absl flags marked parsed, seeded RNG, data paths."""

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags as absl_flags  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DATA = Path(os.environ.get("LDR_TF_SHARED_DATA", SHARED_DATA))


def pytest_configure(config):
    # Library code may read absl FLAGS; under pytest nobody parses argv.
    if not absl_flags.FLAGS.is_parsed():
        absl_flags.FLAGS.mark_as_parsed()


def pytest_xdist_auto_num_workers(config):
    """Workers for ``pytest -n auto`` (`make test`): one per CPU this process may use, at most 4 (each worker holds
    its own TensorFlow, 1-3 GB at the peak of the export tests; more workers gain little)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data; tests using it skip when it is absent (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_student(tmp_path_factory) -> dict:
    """One 32^3 student run with random weights and its export (XLA sampler, the default), made once per session:
    ``{"run", "export", "root"}``."""
    from ldr_tf.deploy import savedmodel
    from tests.helpers import make_run, student_network

    root = tmp_path_factory.mktemp("shared_student")
    run = make_run(root / "run", student_network())
    out = savedmodel.export_run(run, root / "export", xla_warp=True)
    return {"run": run, "export": out, "root": root}


@pytest.fixture(scope="session")
def scans(tmp_path_factory) -> dict:
    """The phantom pair as NIfTI files: fixed (RAS, 2 mm) and moving (another orientation and voxel size, a shifted
    subject), with their label maps: ``{"fixed", "fixed_seg", "moving", "moving_seg", "dir"}``."""
    from tests.helpers import FIXED_SHAPE, MOVING_SHAPE, fixed_affine, moving_affine, phantom, save_nifti, world_points

    d = tmp_path_factory.mktemp("nifti")
    fa, ma = fixed_affine(), moving_affine()
    m_shape = (MOVING_SHAPE[2], MOVING_SHAPE[0], MOVING_SHAPE[1])
    f_lab, f_img = phantom(world_points(fa, FIXED_SHAPE))
    m_lab, m_img = phantom(world_points(ma, m_shape) + np.array([2.0, -1.5, 1.0]))  # a shifted subject
    return {"fixed": save_nifti(d / "f.nii.gz", f_img, fa), "fixed_seg": save_nifti(d / "f_seg.nii.gz", f_lab, fa),
            "moving": save_nifti(d / "m.nii.gz", m_img, ma),
            "moving_seg": save_nifti(d / "m_seg.nii.gz", m_lab, ma), "dir": d}
