"""ldr_tf.data.importer / import_ixi / import_ct / show_dataset, run in-process through their ``run(argv)``."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from ldr_tf.data import dataset
from ldr_tf.data import preprocess as pp
from tools import import_ct, show_dataset
from ldr_tf.data import importer as import_nifti
from ldr_tf.data import ixi as import_ixi
from tests.helpers import LAS, PSR

SHAPE = (12, 10, 8)


def _save(path, arr, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return path


def _subject(root, sid, affine, bright, landmarks=True, seed=0):
    """Image with a smooth background and one bright voxel at `bright`; labels: two boxes; landmarks CSV."""
    rng = np.random.default_rng(seed)
    img = 40 + 20 * rng.random(SHAPE)
    img[bright] = 250
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:10, 2:8, 1:7] = 3
    lab[4:7, 3:6, 2:5] = 8
    _save(root / "img" / f"{sid}_t1.nii.gz", img.astype(np.float32), affine)
    _save(root / "seg" / f"{sid}_seg.nii.gz", lab, affine)
    if landmarks:
        (root / "lm").mkdir(exist_ok=True)
        (root / "lm" / f"{sid}.csv").write_text(
            "x,y,z\n" f"{bright[0]},{bright[1]},{bright[2]}\n" "-1,-1,-1\n" ",,\n" "# comment\n" "3.5,2,1\n")


@pytest.fixture
def nifti_dir(tmp_path):
    root = tmp_path / "in"
    for i, (sid, aff) in enumerate([("s01", PSR), ("s02", LAS), ("s03", PSR), ("s04", LAS)]):
        _subject(root, sid, aff, bright=(3 + i, 4, 5), seed=i)
    return root


def _args(root, out, *extra):
    return ["import_nifti", f"--images={root}/img/{{id}}_t1.nii.gz", f"--labels={root}/seg/{{id}}_seg.nii.gz",
            f"--landmarks={root}/lm/{{id}}.csv", f"--output={out}", "--progress=false", *extra]


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_roundtrip_to_hdf5_and_json(nifti_dir, tmp_path):
    out = tmp_path / "out" / "ds.json"
    rc = import_nifti.run(_args(nifti_dir, out, "--recipe=brain", "--grid_size=16", "--val_fraction=0.34",
                                "--atlas=s01", "--split_seed=3"))
    assert rc == 0
    assert _files(out.parent) == ["ds.h5", "ds.json"]
    desc = dataset.load_descriptor(out)
    assert desc.image_size == (16, 16, 16) and desc.image_type == "brain" and desc.atlas == "s01"
    members = desc.subsets["train"] + desc.subsets["val"]
    assert sorted(members) == ["s02", "s03", "s04"] and len(desc.subsets["val"]) == 1
    assert desc.schemes == {"1": {"train": 1.0}, "2": {"val": 1.0}}
    assert desc.segmentation_class_value == {"3": 3, "8": 8}
    spec = pp.Preprocessing.from_dict(desc.extra["preprocessing"])
    assert spec == pp.recipe("brain", grid_size=(16, 16, 16))
    with h5py.File(desc.files["/"], "r") as h5:
        assert sorted(h5) == ["s01", "s02", "s03", "s04"]
        assert h5["s02/volume"].dtype == np.uint8
        for key in ("s01", "s02"):
            s = dataset.read_subject(h5, key)
            assert s["volume"].shape == (16, 16, 16) and s["volume"].dtype == np.float32
            assert 0.0 <= s["volume"].min() and s["volume"].max() == 1.0
            assert s["segmentation"].dtype == np.int32 and set(np.unique(s["segmentation"])) == {0, 3, 8}
            assert s["point"].shape == (4, 3)
            np.testing.assert_array_equal(s["point"][1:3], -1)
            a = s["attrs"]
            for name in ("spacing", "affine", "source_file", "source_shape", "source_affine", "grid_to_source",
                         "label_file", "landmark_file"):
                assert name in a
            assert a["source_file"].endswith(f"{key}_t1.nii.gz")
            np.testing.assert_array_equal(a["source_shape"], SHAPE)
            geom = pp.Geometry.from_attrs(a)
            # The stored landmarks are the CSV's source voxels mapped through the stored geometry.
            np.testing.assert_allclose(geom.points_to_source(s["point"])[[0, 3]],
                                       [[3 + int(key[-1]) - 1, 4, 5], [3.5, 2, 1]], atol=1e-4)
            # Brain recipe: isotropic grid, RAS.
            np.testing.assert_allclose(a["spacing"], a["spacing"][0])
            assert "".join(nib.aff2axcodes(a["affine"])) == "RAS"


def test_bright_voxel_and_landmark_land_on_the_same_grid_voxel(nifti_dir, tmp_path):
    """recipe none, grid = the RAS array shape of each scan: image voxels and landmarks move identically."""
    out = tmp_path / "o" / "ds.json"
    # PSR (12, 10, 8) -> RAS (8, 12, 10); LAS (12, 10, 8) stays (12, 10, 8); use the PSR subjects only.
    rc = import_nifti.run(_args(nifti_dir, out, "--recipe=none", "--grid_size=8,12,10", "--val_fraction=0",
                                "--intensity=none", f"--images={nifti_dir}/img/s0[13]_t1.nii.gz", "--labels=",
                                "--landmarks="))
    assert rc == 0
    with h5py.File(out.with_suffix(".h5"), "r") as h5:
        keys = sorted(h5)
        assert keys == ["s01_t1", "s03_t1"]  # plain glob: id = file name
        for key, i in zip(keys, (0, 2)):
            vol = h5[key]["volume"][()]
            g = np.unravel_index(np.argmax(vol), vol.shape)
            p = (3 + i, 4, 5)
            assert g == (p[2], SHAPE[0] - 1 - p[0], p[1]) and vol[g] == 250
            assert "point" not in h5[key]  # the plain-glob id does not match the landmark pattern


def test_landmarks_follow_the_image_for_both_orientations(nifti_dir, tmp_path):
    out = tmp_path / "o" / "ds.json"
    for sid, grid in (("s01", "8,12,10"), ("s02", "12,10,8")):
        rc = import_nifti.run(_args(nifti_dir, out, "--recipe=none", f"--grid_size={grid}", "--val_fraction=0",
                                    f"--images={nifti_dir}/img/{{id}}_t1.nii.gz", "--overwrite"))
        assert rc == 0
        with h5py.File(out.with_suffix(".h5"), "r") as h5:
            vol, pts = h5[sid]["volume"][()], h5[sid]["point"][()]
        assert vol.shape == tuple(int(v) for v in grid.split(","))
        g = np.unravel_index(np.argmax(vol), vol.shape)
        assert vol[g] == 250
        np.testing.assert_allclose(pts[0], g, atol=1e-4)


def test_atlas_nifti_and_split_file(nifti_dir, tmp_path):
    atlas = _save(tmp_path / "atlas" / "tpl.nii.gz", np.full(SHAPE, 90.0, np.float32) +
                  np.arange(SHAPE[0])[:, None, None], PSR)
    amask = np.zeros(SHAPE, np.uint8)
    amask[3:9, 2:8, 2:6] = 1
    _save(tmp_path / "atlas" / "mask.nii.gz", amask, PSR)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["s01", "s02"], "val": ["s03"], "test": ["s04"]}))
    out = tmp_path / "o" / "ds.json"
    rc = import_nifti.run(_args(nifti_dir, out, "--recipe=brain", "--grid_size=8", f"--split_file={split}",
                                f"--atlas={atlas}", f"--atlas_mask={tmp_path / 'atlas' / 'mask.nii.gz'}"))
    assert rc == 0
    desc = dataset.load_descriptor(out)
    assert desc.atlas == "atlas" and desc.subsets == {"train": ["s01", "s02"], "val": ["s03"], "test": ["s04"]}
    assert desc.schemes["test"] == {"test": 1.0}
    with h5py.File(desc.files["/"], "r") as h5:
        s = dataset.read_subject(h5, "atlas")
        assert s["segmentation"] is None and s["volume"].shape == (8, 8, 8)
        assert s["attrs"]["source_file"].endswith("tpl.nii.gz")


BAD_CASES = ["corrupt", "truncated", "4d", "nan", "empty_labels", "label_grid", "unwritable", "under_file"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gives_one_error_and_no_output(nifti_dir, tmp_path, capsys, case):
    out = tmp_path / "out" / "ds.json"
    img = nifti_dir / "img" / "s03_t1.nii.gz"
    seg = nifti_dir / "seg" / "s03_seg.nii.gz"
    culprit = img
    if case == "corrupt":
        raw = bytearray(img.read_bytes())
        raw[40:80] = bytes(40)
        img.write_bytes(bytes(raw))
    elif case == "truncated":
        img.write_bytes(img.read_bytes()[:-100])
    elif case == "4d":
        _save(img, np.ones(SHAPE + (2,), np.float32), PSR)
    elif case == "nan":
        arr = np.ones(SHAPE, np.float32)
        arr[1, 1, 1] = np.nan
        _save(img, arr, PSR)
    elif case == "empty_labels":
        _save(seg, np.zeros(SHAPE, np.uint8), PSR)
        culprit = seg
    elif case == "label_grid":
        _save(seg, np.ones((12, 10, 7), np.uint8), PSR)
        culprit = seg
    elif case == "unwritable":
        if __import__("os").geteuid() == 0:
            pytest.skip("root can write to read-only folders")
        out.parent.mkdir()
        out.parent.chmod(0o500)
        culprit = out.parent
    elif case == "under_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "ds.json"
        culprit = tmp_path / "afile"
    rc = import_nifti.run(_args(nifti_dir, out, "--recipe=brain", "--grid_size=8"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("import_nifti: error: ") and str(culprit) in err[0]
    if case not in ("under_file",):
        assert _files(out.parent) == []  # not even a temporary file
    assert not out.exists() and not out.with_suffix(".h5").exists()


def test_skip_bad_reports_and_skips(nifti_dir, tmp_path):
    arr = np.ones(SHAPE, np.float32)
    arr[0, 0, 0] = np.inf
    _save(nifti_dir / "img" / "s02_t1.nii.gz", arr, LAS)
    out = tmp_path / "o" / "ds.json"
    assert import_nifti.run(_args(nifti_dir, out, "--grid_size=8", "--val_fraction=0", "--skip_bad")) == 0
    desc = dataset.load_descriptor(out)
    assert desc.subsets == {"train": ["s01", "s03", "s04"]}
    assert [s["id"] for s in desc.extra["import"]["skipped"]] == ["s02"]
    assert "NaN or infinite" in desc.extra["import"]["skipped"][0]["error"]


def test_usage_errors_and_existing_output(nifti_dir, tmp_path, capsys):
    out = tmp_path / "o" / "ds.json"
    assert import_nifti.run(["import_nifti", f"--output={out}"]) == 2
    assert import_nifti.run(_args(nifti_dir, out, "--grid_size=8,8")) == 2
    assert import_nifti.run(_args(nifti_dir, out, "--resample=zoom")) == 2
    assert import_nifti.run(_args(nifti_dir, out, "--label_map=5-255")) == 2
    assert import_nifti.run(_args(nifti_dir, out, "--images=/nonexistent/{id}.nii.gz")) == 1
    assert import_nifti.run(_args(nifti_dir, out, "--grid_size=8", "--atlas=s99")) == 1
    assert _files(out.parent) == []
    assert import_nifti.run(_args(nifti_dir, out, "--grid_size=8")) == 0
    capsys.readouterr()
    assert import_nifti.run(_args(nifti_dir, out, "--grid_size=8")) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert import_nifti.run(_args(nifti_dir, out, "--grid_size=8", "--overwrite")) == 0


def test_landmark_csv_errors(nifti_dir, tmp_path, capsys):
    (nifti_dir / "lm" / "s02.csv").write_text("1,2\n")
    out = tmp_path / "o" / "ds.json"
    assert import_nifti.run(_args(nifti_dir, out, "--grid_size=8")) == 1
    assert "s02.csv: line 1: expected 3 values" in capsys.readouterr().err
    (nifti_dir / "lm" / "s02.csv").write_text("1,2,3\n")
    assert import_nifti.run(_args(nifti_dir, out, "--grid_size=8")) == 1
    assert "1 landmarks, but other subjects have 4" in capsys.readouterr().err
    (nifti_dir / "lm" / "s02.csv").write_text("1,2,30\n" * 4)
    assert import_nifti.run(_args(nifti_dir, out, "--grid_size=8")) == 1
    assert "outside the image" in capsys.readouterr().err
    assert _files(out.parent) == []


def test_landmarks_in_mm(nifti_dir):
    img = nib.load(str(nifti_dir / "img" / "s01_t1.nii.gz"))
    csv = nifti_dir / "mm.csv"
    world = PSR @ np.array([3, 4, 5, 1.0])
    csv.write_text(f"{world[0]},{world[1]},{world[2]}\n-1,-1,-1\n")
    pts = import_nifti.read_landmarks(csv, img, "mm")
    np.testing.assert_allclose(pts, [[3, 4, 5], [-1, -1, -1]], atol=1e-9)


def test_show_dataset_renders_a_png(nifti_dir, tmp_path, capsys):
    out = tmp_path / "o" / "ds.json"
    assert import_nifti.run(_args(nifti_dir, out, "--recipe=brain", "--grid_size=16", "--atlas=s01")) == 0
    png = tmp_path / "fig" / "x.png"
    assert show_dataset.run(["show_dataset", f"--dataset={out}", f"--out={png}", "--subjects=2"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "s01" in capsys.readouterr().out  # the atlas comes first
    assert show_dataset.run(["show_dataset", f"--dataset={tmp_path / 'nope.json'}", f"--out={png}"]) == 1


def test_ixi_recipe_on_real_subjects(shared_data, tmp_path):
    ids = ["IXI013-HH-1212", "IXI014-HH-1236", "IXI015-HH-1258"]
    if not all((shared_data / "ixi" / "t1" / f"{i}_T1.nii.gz").is_file() for i in ids):
        pytest.skip("IXI subjects not present")
    rc = import_ixi.run(["import_ixi", f"--ixi_dir={shared_data / 'ixi'}", f"--data_dir={tmp_path}",
                         f"--subjects={','.join(ids)}", "--split=2,1,0", "--grid_size=32", "--progress=false"])
    assert rc == 0
    desc = dataset.load_descriptor(tmp_path / "brain.json")
    assert desc.image_size == (32, 32, 32) and desc.image_type == "brain"
    assert len(desc.subsets["train"]) == 1 and len(desc.subsets["val"]) == 1 and desc.atlas in ids
    assert desc.segmentation_class_value["3rdVentricle"] == 4
    with h5py.File(desc.files["/"], "r") as h5:
        s = dataset.read_subject(h5, desc.atlas)
        vol, seg, a = s["volume"], s["segmentation"], s["attrs"]
        assert vol.shape == seg.shape == (32, 32, 32)
        labels = set(np.unique(seg)) - {0}
        assert len(labels) > 100 and labels <= set(desc.segmentation_class_value.values())
        assert "".join(nib.aff2axcodes(a["affine"])) == "RAS"
        assert 5.0 < a["spacing"][0] < 8.0 and np.allclose(a["spacing"], a["spacing"][0])
        # The brain fills the grid: labels reach within 4 voxels of the border along the longest axis.
        nz = np.nonzero(seg)
        assert max(int(n.max()) - int(n.min()) for n in nz) >= 24
        # Brighter inside the brain than in the padding/background.
        assert vol[seg > 0].mean() > 2 * vol[seg == 0].mean()
        # Back to the native grid through the stored geometry: labels agree with the DLMUSE map.
        geom = pp.Geometry.from_attrs(a)
        native = np.asarray(nib.load(a["source_file"].replace("/t1/", "/dlmuse_seg/").replace(
            "_T1.nii.gz", "_T1_DLMUSE.nii.gz")).dataobj)
        back = geom.to_original(seg, order="nearest")
        assert back.shape == native.shape
        assert ((back > 0) == (native > 0)).mean() > 0.95


def test_ixi_label_free_subject_to_subject(shared_data, tmp_path):
    ids = ["IXI013-HH-1212", "IXI014-HH-1236", "IXI015-HH-1258", "IXI033-HH-1259"]
    if not all((shared_data / "ixi" / "t1" / f"{i}_T1.nii.gz").is_file() for i in ids):
        pytest.skip("IXI subjects not present")
    rc = import_ixi.run(["import_ixi", f"--ixi_dir={shared_data / 'ixi'}", f"--data_dir={tmp_path}",
                         f"--subjects={','.join(ids)}", "--split=2,2,0", "--grid_size=32", "--skull=head",
                         "--atlas=none", "--progress=false"])
    assert rc == 0
    desc = dataset.load_descriptor(tmp_path / "brain.json")
    assert desc.atlas is None
    spec = pp.Preprocessing.from_dict(desc.extra["preprocessing"])
    assert spec.crop == "foreground" and spec.spacing_mm == 8.0 and not spec.needs_labels  # 256 mm / 32
    from ldr_tf.data.pairs import pairs_for

    assert sorted(pairs_for(desc, "train")) == sorted([(a, b) for a in desc.subsets["train"]
                                                       for b in desc.subsets["train"] if a != b])
    with h5py.File(desc.files["/"], "r") as h5:
        for key in desc.subsets["train"]:
            s = dataset.read_subject(h5, key)
            np.testing.assert_allclose(s["attrs"]["spacing"], 8.0, rtol=1e-6)
            # the whole head is on the grid: every label lies inside it, away from the border
            nz = np.nonzero(s["segmentation"])
            assert min(int(n.min()) for n in nz) >= 2 and max(int(n.max()) for n in nz) <= 29
            # the same volume comes out of the scan alone (no label map): what predict repeats
            img = nib.load(s["attrs"]["source_file"])
            vol, _, _, _ = pp.apply(spec, img)
            np.testing.assert_allclose(vol / 255.0, s["volume"], atol=1e-6)  # read_subject gives [0, 1]


def test_ct_recipe_on_real_slabs(shared_data, tmp_path):
    if not (shared_data / "totalseg_ct" / "example_ct.nii.gz").is_file():
        pytest.skip("totalseg_ct not present")
    rc = import_ct.run(["import_ct", f"--ct_dir={shared_data / 'totalseg_ct'}", f"--data_dir={tmp_path}",
                        "--grid_size=16", "--progress=false"])
    assert rc == 0
    desc = dataset.load_descriptor(tmp_path / "ct-smoke.json")
    assert desc.segmentation_class_value == {"liver": 255} and desc.image_type == "liver"
    with h5py.File(desc.files["/"], "r") as h5:
        for key in ("example_ct", "example_ct_dicom"):
            s = dataset.read_subject(h5, key)
            assert set(np.unique(s["segmentation"])) == {0, 255}
            # The liver fills most of the cropped grid; liver is soft tissue (inside the window).
            assert (s["segmentation"] == 255).mean() > 0.2
            assert 0.2 < s["volume"][s["segmentation"] == 255].mean() < 0.9
        assert "slices 82..111" in h5["example_ct"].attrs["source_note"]
    # The label map's own affine puts it on slices 0..29, where it does not match the CT: the check refuses it.
    img, lab, _ = import_ct.load_slab(shared_data / "totalseg_ct" / "example_ct.nii.gz",
                                      shared_data / "totalseg_ct" / "example_seg.nii.gz", (0, 30))
    with pytest.raises(ValueError, match="does not line up"):
        import_ct.check_liver_hu(img, lab, 5, "example_seg")
