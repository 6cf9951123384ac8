"""`ldr_tf.ops.sampling`: affine resampling and pull-back onto a scan's grid, against SciPy and float64 NumPy."""

import numpy as np
import pytest
from scipy import ndimage

from ldr_tf.ops import sampling, warp
from ldr_tf.data.preprocess import Geometry


def _matrix(rng, scale=(1.3, 0.8, 1.1)):
    a = np.eye(4)
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0] * 0.15 + np.eye(3)
    a[:3, :3] = rot @ np.diag(scale)
    a[:3, 3] = rng.uniform(-2, 2, 3)
    return a


def _aligned_matrix(rng, perm, scale):
    """grid voxel -> source voxel: grid axis a along source axis perm[a], flipped where scale < 0, shifted."""
    a = np.eye(4)
    a[:3, :3] = 0.0
    for g, (k, s) in enumerate(zip(perm, scale)):
        a[k, g] = s
    a[:3, 3] = rng.uniform(-2, 2, 3) + np.where(np.asarray(scale)[np.argsort(perm)] < 0, 10.0, 0.0)
    return a


def _positions(m, shape):
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    return g @ m[:3, :3].T + m[:3, 3]


def _outside(q, shape):
    return np.any((q < -0.5) | (q > np.asarray(shape) - 0.5), axis=-1)


@pytest.mark.parametrize("max_voxels,compiled,aligned", [(None, True, False), (97, True, False), (97, False, False),
                                                        (None, True, True), (97, True, True), (97, False, True)])
def test_sample_affine_linear_matches_scipy_and_fills_outside(rng, max_voxels, compiled, aligned):
    vol = rng.random((13, 11, 9)).astype(np.float32)
    m = _aligned_matrix(rng, (1, 2, 0), (1.3, -0.8, 1.1)) if aligned else _matrix(rng)
    assert (sampling._aligned(m) is not None) == aligned
    out_shape = (10, 12, 8)
    got = sampling.sample_affine(vol, m, out_shape, fill=-7.0, max_voxels=max_voxels, compiled=compiled)
    q = _positions(m, out_shape)
    expect = ndimage.map_coordinates(vol.astype(np.float64), np.moveaxis(q, -1, 0), order=1, mode="nearest")
    outside = _outside(q, vol.shape)
    assert 0 < outside.mean() < 0.9
    np.testing.assert_allclose(got[~outside], expect[~outside], atol=1e-4)
    assert np.all(got[outside] == -7.0)


def test_sample_affine_channels_and_labels(rng):
    vol = rng.random((9, 8, 7, 2)).astype(np.float32)
    for m in (_aligned_matrix(rng, (2, 0, 1), (0.9, 1.0, -1.1)), _matrix(rng, (0.9, 1.0, 1.1))):
        got = sampling.sample_affine(vol, m, (6, 6, 6))
        for c in range(2):
            np.testing.assert_allclose(got[..., c], sampling.sample_affine(vol[..., c], m, (6, 6, 6)), atol=1e-6)
    labels = rng.integers(0, 4, (9, 8, 7)).astype(np.int32)
    q = _positions(m, (6, 6, 6)).astype(np.float32)
    for mode, method in (("labels", "linear"), ("nearest", "nearest")):
        got = sampling.sample_affine(labels, m, (6, 6, 6), mode=mode)
        ref = warp.warp_labels(labels[None], None, method=method, coords=q[None]).numpy()[0]
        ref[_outside(q, labels.shape)] = 0
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(sampling.sample_affine(labels, m, (6, 6, 6), mode=mode, compiled=False), ref)
    with pytest.raises(ValueError, match="integer label maps"):
        sampling.sample_affine(vol[..., 0], m, (4, 4, 4), mode="labels")


@pytest.mark.parametrize("aligned,max_voxels", [(False, 300), (True, 300), (True, None)])
def test_pull_back_matches_the_float64_formulas(rng, aligned, max_voxels):
    grid = (8, 9, 7)
    if aligned:  # as every grid ldr_tf.data.preprocess builds: the separable path (`_aligned_slab`)
        to_source = _aligned_matrix(rng, (2, 0, 1), (1.4, -1.7, 1.2))
    else:
        to_source = _matrix(rng, (1.5, 1.7, 1.2))
    fixed = Geometry(to_source, grid, (11, 13, 9), np.diag([1.0, 1.2, 0.9, 1.0]))
    assert (sampling._aligned(fixed.source_to_grid) is not None) == aligned
    moving = Geometry(_matrix(rng, (1.4, 1.6, 1.3)), grid, (12, 10, 11), _matrix(rng, (0.8, 1.1, 1.0)))
    flow = rng.normal(0, 1.0, grid + (3,)).astype(np.float32)
    image = rng.random(moving.source_shape).astype(np.float32)
    labels = rng.integers(0, 5, moving.source_shape).astype(np.int32)
    # compiled ahead (as ldr_tf.predict does while the model loads), then used; 300 voxels: several slabs
    sampling.compile_pull_back(fixed, moving, labels=True, mm=True, max_voxels=max_voxels)
    got = sampling.pull_back(fixed, moving, flow, image=image, labels=labels, mm=True, max_voxels=max_voxels)

    p = _positions(np.eye(4), fixed.source_shape)
    g = p @ fixed.source_to_grid[:3, :3].T + fixed.source_to_grid[:3, 3]
    d = np.stack([ndimage.map_coordinates(flow[..., c].astype(np.float64), np.moveaxis(g, -1, 0), order=1,
                                          mode="nearest") for c in range(3)], -1)
    q = (g + d) @ moving.grid_to_source[:3, :3].T + moving.grid_to_source[:3, 3]
    np.testing.assert_allclose(got["vox"], q - p, atol=2e-4)
    world = lambda a, x: x @ a[:3, :3].T + a[:3, 3]  # noqa: E731
    np.testing.assert_allclose(got["mm"], world(moving.source_affine, q) - world(fixed.source_affine, p), atol=5e-4)
    outside = _outside(q, image.shape)
    expect = ndimage.map_coordinates(image.astype(np.float64), np.moveaxis(q, -1, 0), order=1, mode="nearest")
    np.testing.assert_allclose(got["warped"][~outside], expect[~outside], atol=1e-4)
    assert np.all(got["warped"][outside] == 0) and np.all(got["warped_labels"][outside] == 0)
    ref = warp.warp_labels(labels[None], None, coords=q[None].astype(np.float32)).numpy()[0]
    agree = got["warped_labels"][~outside] == ref[~outside]
    assert agree.mean() > 0.99  # float32 vs float64 positions may flip exact ties
    # NIfTI's own layout (Fortran order): written without a transposition
    assert all(v.flags.f_contiguous and v.shape[:3] == fixed.source_shape for v in got.values())
    # the same geometry when moving is None
    same = sampling.pull_back(fixed, None, flow)
    assert set(same) == {"vox"} and same["vox"].shape == fixed.source_shape + (3,)
    with pytest.raises(ValueError, match="moving scan's shape"):
        sampling.pull_back(fixed, moving, flow, image=image[:-1])
    with pytest.raises(ValueError, match="flow: expected shape"):
        sampling.pull_back(fixed, moving, flow[:-1])


def test_sample_points_any_positions(rng):
    vol = rng.random((7, 6, 5)).astype(np.float32)
    pts = rng.uniform(-1.5, 7.5, (4, 9, 3)).astype(np.float32)
    got = sampling.sample_points(vol, pts, max_voxels=10)
    expect = ndimage.map_coordinates(vol.astype(np.float64), np.moveaxis(pts, -1, 0), order=1, mode="nearest")
    outside = _outside(pts, vol.shape)
    np.testing.assert_allclose(got[~outside], expect[~outside], atol=1e-5)
    assert got.shape == (4, 9) and np.all(got[outside] == 0)


def _axis_aligned(rng):
    """A permutation of the axes, a flip and scales (what reorientation + a preprocessing grid give)."""
    m = np.zeros((4, 4))
    m[[2, 0, 1], [0, 1, 2]] = [1.3, -0.8, 1.7]
    m[:3, 3] = [8.45, 0.33, -1.17]  # no position exactly half-way (float32 vs float64 could round ties apart)
    m[3, 3] = 1
    return m


@pytest.mark.parametrize("shape,out_shape,kind", [((13, 11, 9), (10, 12, 8), "oblique"),
                                                  ((20, 7, 16), (9, 9, 9), "oblique"),
                                                  ((9, 13, 11), (8, 16, 7), "axis-aligned")])
def test_scipy_sampler_matches_the_tensorflow_one(rng, shape, out_shape, kind):
    from ldr_tf.data import scipy_sampling

    m = _matrix(rng) if kind == "oblique" else _axis_aligned(rng)
    assert (scipy_sampling._signed_permutation(m) is None) == (kind == "oblique")
    vol = (rng.random(shape) * 300).astype(np.float32)
    got = scipy_sampling.sample_affine(vol, m, out_shape, fill=np.nan)
    want = sampling.sample_affine(vol, m, out_shape, fill=np.nan, compiled=False)
    assert got.dtype == np.float32 and got.shape == out_shape
    assert 0 < np.isnan(want).mean() < 0.9
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-5, atol=1e-3)
    labels = rng.integers(0, 6, shape).astype(np.int32)
    got = scipy_sampling.sample_affine(labels, m, out_shape, mode="nearest", fill=-1)
    want = sampling.sample_affine(labels, m, out_shape, mode="nearest", fill=-1)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="label vote needs ldr_tf.ops.sampling"):
        scipy_sampling.sample_affine(labels, m, out_shape, mode="labels")
    with pytest.raises(ValueError, match="integer label maps"):
        scipy_sampling.sample_affine(vol, m, out_shape, mode="nearest")


def test_preprocessing_engines_agree(rng):
    """The SciPy resampler (one pair in predict) and the XLA one (training data, batches) preprocess alike."""
    import nibabel as nib

    from ldr_tf.data import preprocess

    z = np.linspace(-1, 1, 40)
    head = np.exp(-(z[:, None, None] ** 2 + z[None, :, None] ** 2 / 0.8 + z[None, None, :] ** 2 / 1.3) * 3)
    data = (head * 900 + rng.random((40, 40, 40)) * 40).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([-1.1, 0.9, 1.2, 1.0]))
    spec = preprocess.recipe("brain-head", grid_size=(24, 24, 24), spacing_mm=1.7)
    spec = preprocess.Preprocessing.from_dict({**spec.to_dict(), "mask_dilation_mm": None})
    out = {e: preprocess.apply(spec, img, engine=e) for e in preprocess.ENGINES}
    for e in ("eager", "scipy"):
        np.testing.assert_allclose(out[e][3].grid_to_source, out["xla"][3].grid_to_source)
        diff = np.abs(out[e][0].astype(int) - out["xla"][0].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, e  # uint8 rounding of float32 round-off at most
    with pytest.raises(ValueError, match="engine: expected one of xla, eager, scipy"):
        preprocess.apply(spec, img, engine="numpy")


def test_compiled_helpers_are_traced_without_autograph():
    """AutoGraph's source conversion cost ~0.8 s of a one-pair predict (tracing the pull-back beside the model load);
    these functions have only Python control flow, so every XLA helper is traced with ``autograph=False``."""
    import tensorflow as tf

    helpers = [sampling._affine_slab, sampling._aligned_affine_slab, sampling._pull_slab, sampling._aligned_slab,
               sampling._aligned_interp, sampling._points_slab, warp._sample_linear_xla,
               warp._sample_labels_xla, warp._affine_field_xla, warp._upsample2_xla]
    assert [getattr(f, "_autograph", None) for f in helpers] == [False] * len(helpers)
    found = [name for mod in (sampling, warp) for name, v in vars(mod).items()
             if isinstance(v, tf.types.experimental.PolymorphicFunction)]
    assert len(found) == len(helpers), found
