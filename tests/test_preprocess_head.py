"""Label-free preprocessing: the foreground (head) box from intensities and fixed-spacing grids."""

import nibabel as nib
import numpy as np
import pytest

from ldr_tf.data import preprocess as pp


def _head(shape=(60, 70, 50), centre=(28, 36, 22), radii=(18, 22, 15), seed=0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    inside = (((g - np.array(centre)) / np.array(radii)) ** 2).sum(-1) <= 1
    data = rng.normal(5.0, 2.0, shape).astype(np.float32)  # scanner noise
    data[inside] += 300.0 + rng.normal(0, 30.0, inside.sum())
    data[55:58, 2:5, 2:5] = 400.0  # a small bright artefact away from the head: not the largest component
    return data, inside


def test_otsu_separates_two_populations():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(10, 3, 5000), rng.normal(200, 20, 3000)])
    assert 25 < pp.otsu_threshold(v) < 150


def test_foreground_box_is_the_largest_component():
    data, inside = _head()
    smin, smax = pp.foreground_box(data)
    idx = np.nonzero(inside)
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() for i in idx])
    assert np.all(np.abs(smin - lo) <= 2) and np.all(np.abs(smax - hi) <= 2)  # computed on every 2nd voxel
    with pytest.raises(ValueError, match="scan.nii.gz: no foreground"):
        pp.foreground_box(np.zeros((10, 10, 10), np.float32), "scan.nii.gz")


def test_fixed_spacing_grid_is_centred_on_the_head_and_needs_no_labels():
    data, inside = _head()
    affine = np.diag([1.2, 0.9, 1.5, 1.0])
    img = nib.Nifti1Image(data, affine)
    spec = pp.recipe("brain-head", grid_size=(32, 32, 32), spacing_mm=3.0)
    assert not spec.needs_labels and pp.recipe("brain").needs_labels
    vol, labels, _, geom = pp.apply(spec, img)
    assert labels is None and vol.shape == (32, 32, 32)
    np.testing.assert_allclose(geom.spacing, 3.0, rtol=1e-6)
    # the grid centre sits at the centre of the head's box (world mm), within a source voxel
    centre_grid = np.array([15.5, 15.5, 15.5, 1.0])
    centre_src = (geom.grid_to_source @ centre_grid)[:3]
    idx = np.nonzero(inside)
    box_centre = (np.array([i.min() for i in idx]) + np.array([i.max() for i in idx])) / 2
    assert np.all(np.abs(centre_src - box_centre) <= 2.0)
    # the head is bright on the grid, the corners (air) are dark
    assert vol[16, 16, 16] > 100 and vol[0, 0, 0] < 20
    # round trip of the spec (spacing kept), and specs without spacing stay as they were
    again = pp.Preprocessing.from_dict(spec.to_dict())
    assert again == spec and "spacing_mm" not in pp.recipe("brain").to_dict()
    with pytest.raises(ValueError, match="spacing_mm"):
        pp.Preprocessing(spacing_mm=0)
