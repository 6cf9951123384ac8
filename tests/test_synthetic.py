"""ldr_tf.data.synthetic: deterministic procedural demo datasets (small sizes here; defaults are 64^3)."""

import hashlib
import os

import h5py
import numpy as np
import pytest

from ldr_tf.data import pairs as P
from ldr_tf.data import synthetic as S
from ldr_tf.data.dataset import load_descriptor
from ldr_tf.ops.metrics import label_overlap

SIZE = 32
SUBJECTS = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return S.ensure_demo_dataset("demo", tmp_path_factory.mktemp("a"), size=SIZE, subjects=SUBJECTS, progress=False)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    return S.ensure_demo_dataset("demo-brain", tmp_path_factory.mktemp("b"), size=SIZE, subjects=SUBJECTS,
                                 progress=False)


def _read(json_path):
    desc = load_descriptor(json_path)
    with h5py.File(desc.files["/"], "r") as f:
        return desc, {k: {n: np.asarray(f[k][n]) for n in f[k]} | {"attrs": dict(f[k].attrs)} for k in f}


def _digest(subjects):
    h = hashlib.sha256()
    for k in sorted(subjects):
        for n in ("volume", "segmentation", "point"):
            h.update(subjects[k][n].tobytes())
    return h.hexdigest()


def test_descriptor_and_subject_layout(demo, brain):
    desc, subj = _read(demo)
    assert desc.image_size == (SIZE,) * 3 and desc.image_type == "liver" and desc.atlas is None
    assert desc.subsets == {"train": ["s000", "s001"], "val": ["s002", "s003"]}
    assert desc.schemes == {"1": {"train": 1.0}, "2": {"val": 1.0}}
    assert desc.extra["preprocessing"]["kind"] == "synthetic" and desc.extra["preprocessing"]["modality"] == "ct"
    assert desc.extra["preprocessing"]["intensity"] == "0..255 stored, /255 at read"
    assert len(desc.extra["landmarks"]) == 6
    assert set(desc.segmentation_class_value.values()) == set(range(1, 15))
    s = subj["s000"]
    assert s["volume"].dtype == np.uint8 and s["volume"].shape == (SIZE,) * 3 and s["volume"].max() > 200
    assert s["point"].shape == (6, 3) and np.all(s["point"] >= 0) and np.all(s["point"] <= SIZE - 1)
    np.testing.assert_allclose(s["attrs"]["spacing"], [320.0 / SIZE] * 3)
    assert s["attrs"]["affine"].shape == (4, 4)
    # the world position of the grid centre is 0
    np.testing.assert_allclose(s["attrs"]["affine"] @ np.r_[(SIZE - 1) / 2 * np.ones(3), 1], [0, 0, 0, 1])
    import nibabel as nib

    # voxel axes: superior->inferior, anterior->posterior, right->left
    assert nib.aff2axcodes(s["attrs"]["affine"]) == ("I", "P", "L")

    bdesc, bsubj = _read(brain)
    assert bdesc.image_type == "brain" and bdesc.atlas == "atlas" and "atlas" in bsubj
    assert bdesc.extra["preprocessing"]["modality"] == "mri"
    assert len(bdesc.segmentation_class_value) >= 20
    assert len(np.unique(bsubj["atlas"]["segmentation"])) > 30  # many labels are present, even at 32^3
    assert P.pairs_for(bdesc, "train") == [("atlas", "s000"), ("atlas", "s001")]


def test_subjects_differ_by_a_deformation_but_share_anatomy_and_intensities(demo, brain):
    for path, min_common in ((demo, 14), (brain, 30)):
        _, subj = _read(path)
        a, b = subj["s000"], subj["s001"]
        la, lb = a["segmentation"], b["segmentation"]
        common = set(np.unique(la)) & set(np.unique(lb))
        assert len(common - {0}) >= min_common
        dice = label_overlap(la, lb)["dice"]
        print(f"{path.stem}: mean Dice between two subjects before registration: {dice:.3f}")
        assert 0.15 < dice < 0.75  # overlapping anatomy, clearly misaligned
        # large labels have similar mean intensities in both subjects
        for v in common:
            ma, mb = la == v, lb == v
            if ma.sum() >= 200 and mb.sum() >= 200:
                assert abs(a["volume"][ma].mean() - b["volume"][mb].mean()) < 20, v


def test_landmarks_follow_the_anatomy(demo):
    desc, subj = _read(demo)
    targets = np.array(list(S.CT_LANDMARKS.values()))
    template_labels = S._paint_ct(targets)
    for i, key in enumerate(["s000", "s001", "s002"]):
        pts = subj[key]["point"].astype(np.float64)
        # exact: the deformation maps each landmark onto its template point
        x = (2 * pts + 1) / SIZE - 1
        np.testing.assert_allclose(S.subject_deformation("demo", i, 0)(x), targets, atol=1e-5)
        # and the subject's label map has the template structure right there
        seg = subj[key]["segmentation"]
        for p, lab in zip(np.round(pts).astype(int), template_labels):
            nb = seg[tuple(slice(max(c - 1, 0), c + 2) for c in p)]
            assert lab in nb
    assert np.abs(subj["s000"]["point"] - subj["s001"]["point"]).max() > 1.0  # they moved


def test_same_seed_same_arrays_other_seed_different(tmp_path, demo):
    again = S.ensure_demo_dataset("demo", tmp_path / "x", size=SIZE, subjects=SUBJECTS, progress=False)
    _, first = _read(demo)
    _, second = _read(again)
    for k in first:
        for n in ("volume", "segmentation", "point"):
            np.testing.assert_array_equal(first[k][n], second[k][n])
    assert _digest(first) == _digest(second)
    other = S.ensure_demo_dataset("demo", tmp_path / "y", size=SIZE, subjects=SUBJECTS, seed=1, progress=False)
    _, third = _read(other)
    assert _digest(third) != _digest(first)
    assert not np.array_equal(third["s000"]["volume"], first["s000"]["volume"])


def test_reuse_and_regeneration(tmp_path):
    path = S.ensure_demo_dataset("demo", tmp_path, size=16, subjects=4, progress=False)
    h5 = path.with_suffix(".h5")
    stamp = (path.stat().st_mtime_ns, h5.stat().st_mtime_ns)
    assert S.ensure_demo_dataset("demo", tmp_path, size=16, subjects=4, progress=False) == path
    assert (path.stat().st_mtime_ns, h5.stat().st_mtime_ns) == stamp  # reused
    S.ensure_demo_dataset("demo", tmp_path, size=16, subjects=5, progress=False)
    desc, subj = _read(path)
    assert len(subj) == 5 and desc.extra["synthetic"]["subjects"] == 5  # regenerated
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no partial files left
    with pytest.raises(ValueError, match="name"):
        S.ensure_demo_dataset("demo-lung", tmp_path)
    with pytest.raises(ValueError, match="subjects"):
        S.ensure_demo_dataset("demo", tmp_path, size=16, subjects=2, progress=False)


def test_pipeline_streams_the_generated_dataset(brain):
    batch = next(iter(P.make_pair_dataset(brain, "train", 2, seed=0)))
    assert batch["fixed"].shape == (2, SIZE, SIZE, SIZE, 1)
    assert list(batch["id1"].numpy()) == [b"atlas", b"atlas"]
    assert batch["has_seg"].numpy().all() and np.any(batch["aug_flow"].numpy())
    assert 0.0 <= float(batch["moving"].numpy().min()) and float(batch["moving"].numpy().max()) <= 1.0
