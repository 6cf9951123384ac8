"""predict: outputs on the fixed scan's grid with the documented conventions, resampling of any moving geometry,
timing split and Dice, CSV batches, and one-line errors that leave nothing behind."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from ldr_tf.ops import metrics
from ldr_tf import predict
from ldr_tf.deploy import native
from ldr_tf.data.preprocess import Preprocessing, recipe
from ldr_tf.deploy.loader import open_registrar
from tests.helpers import FIXED_SHAPE, MOVING_SHAPE, SIZE, fixed_affine, save_nifti

@pytest.fixture(scope="module")
def student(shared_student):
    return shared_student


def _args(student, scans, out_dir, *extra, segs=True):
    a = ["predict", f"--model={student['export']}", f"--fixed={scans['fixed']}", f"--moving={scans['moving']}",
         f"--out_dir={out_dir}", "--preprocessing=none"]
    if segs:
        a += [f"--moving_seg={scans['moving_seg']}", f"--fixed_seg={scans['fixed_seg']}"]
    return a + list(extra)


def test_outputs_live_on_the_fixed_grid_with_the_documented_conventions(student, scans, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict.run(_args(student, scans, out, "--mm")) == 0, capsys.readouterr().err
    f = nib.load(scans["fixed"])
    m = nib.load(scans["moving"])
    files = {p.name for p in out.iterdir()}
    assert files == {"warped.nii.gz", "warped_seg.nii.gz", "flow_vox.nii", "flow_mm_lps.nii", "result.json"}
    for name in ("warped.nii.gz", "warped_seg.nii.gz", "flow_vox.nii", "flow_mm_lps.nii"):
        img = nib.load(str(out / name))
        np.testing.assert_allclose(img.affine, f.affine, atol=1e-5)
        assert img.shape[:3] == FIXED_SHAPE
    flow = nib.load(str(out / "flow_vox.nii"))
    assert flow.shape == FIXED_SHAPE + (1, 3) and flow.header.get_intent()[0] == "vector"
    d = np.asarray(flow.dataobj)[:, :, :, 0, :].astype(np.float64)
    assert np.abs(d).max() > 0.5  # a real (random-weight) model and a reoriented scan: far from zero
    warped_seg = np.asarray(nib.load(str(out / "warped_seg.nii.gz")).dataobj)
    moving_labels = set(np.unique(np.asarray(nib.load(scans["moving_seg"]).dataobj)).tolist())
    assert set(np.unique(warped_seg).tolist()) <= moving_labels
    # pull convention in native voxels of the moving scan: warped(p) = moving(p + d(p))
    p = np.moveaxis(np.indices(FIXED_SHAPE, dtype=np.float64), 0, -1)
    q = p + d
    inside = np.all((q >= 0) & (q <= np.array(m.shape) - 1), axis=-1)
    expect = ndimage.map_coordinates(np.asarray(m.dataobj, np.float64), np.moveaxis(q, -1, 0), order=1)
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(warped[inside], expect[inside], atol=1e-2)
    # the ITK/ANTs field: LPS mm, fixed point + d = moving point
    mm = np.asarray(nib.load(str(out / "flow_mm_lps.nii")).dataobj)[:, :, :, 0, :].astype(np.float64)
    world_f = p @ f.affine[:3, :3].T + f.affine[:3, 3]
    world_m = q @ m.affine[:3, :3].T + m.affine[:3, 3]
    np.testing.assert_allclose(world_f + mm * np.array([-1, -1, 1]), world_m, atol=1e-3)

    res = json.loads((out / "result.json").read_text())
    assert set(native.TIMING_KEYS) <= set(res["seconds"]) and "model_load" in res["seconds"]
    assert "warmup" not in res["seconds"]  # a single pair is on the grid before the model is loaded: no warm-up
    assert all(v >= 0 for v in res["seconds"].values())
    assert res["labels"] == 3 and 0 <= res["dice"] <= 1 and 0 <= res["dice_before"] <= 1
    assert set(res["dice_per_label"]) == {"2", "17", "41"}
    ref = metrics.label_overlap(np.asarray(nib.load(scans["fixed_seg"]).dataobj), warped_seg)
    assert res["dice"] == pytest.approx(ref["dice"], abs=1e-9)
    assert res["fixed_shape"] == list(FIXED_SHAPE) and res["grid"] == [SIZE] * 3
    assert "pair: load" in capsys.readouterr().out

    # an output of an earlier version (gzipped flow) is a clash too
    old = tmp_path / "old"
    old.mkdir()
    (old / "flow_vox.nii.gz").write_bytes(b"old")
    assert predict.run(_args(student, scans, old)) == 1
    assert "flow_vox.nii.gz: already exists" in capsys.readouterr().err
    assert [p.name for p in old.iterdir()] == ["flow_vox.nii.gz"]
    (out / "flow_vox.nii.gz").write_bytes(b"old")
    # --overwrite replaces every output; one this run does not make (warped_seg, the old flow) does not survive
    assert predict.run(_args(student, scans, out, "--overwrite", "--nowarmup", segs=False)) == 0
    assert {p.name for p in out.iterdir()} == {"warped.nii.gz", "flow_vox.nii", "result.json"}
    assert "warmup" not in json.loads((out / "result.json").read_text())["seconds"]
    assert "dice" not in json.loads((out / "result.json").read_text())


class _Identity:
    """Zero flow on a fixed grid: what is left is the geometry of preprocessing and mapping back."""

    def __init__(self, size):
        self.inner = open_registrar("identity")
        self.image_size = size

    def __call__(self, fixed, moving, moving_labels=None):
        return self.inner(fixed, moving, moving_labels)

    def flow(self, fixed, moving):
        return self.inner.flow(fixed, moving)


def test_zero_flow_maps_through_world_coordinates_whatever_the_moving_orientation(scans, tmp_path):
    # Same world box, different shapes/voxel sizes/axis order: with a zero grid flow, every fixed voxel must look
    # up the moving scan at the same world point, i.e. "after" equals the affine-only "before" resampling.
    spec = recipe("none", grid_size=(SIZE,) * 3)
    r = native.Predictor(_Identity((SIZE,) * 3), spec).run(
        scans["fixed"], scans["moving"], tmp_path / "o", scans["moving_seg"], scans["fixed_seg"], write_mm=True)
    assert r["dice"] == pytest.approx(r["dice_before"], abs=0.01)
    assert 0.6 < r["dice_before"] < 0.97  # the subjects differ by a shift
    f = nib.load(scans["fixed"])
    m = nib.load(scans["moving"])
    d = np.asarray(nib.load(str(tmp_path / "o" / "flow_vox.nii")).dataobj)[:, :, :, 0, :]
    p = np.moveaxis(np.indices(FIXED_SHAPE, dtype=np.float64), 0, -1)
    to_m = np.linalg.inv(m.affine) @ f.affine
    np.testing.assert_allclose(p + d, p @ to_m[:3, :3].T + to_m[:3, 3], atol=1e-3)
    mm = np.asarray(nib.load(str(tmp_path / "o" / "flow_mm_lps.nii")).dataobj)
    assert np.abs(mm).max() < 1e-3


def test_brain_recipe_without_label_maps_falls_back_to_whole_scans(student, scans, tmp_path, capsys):
    # CSV batch: the first pair has both label maps (crop to their boxes), the second none (whole scans + a note)
    csv = scans["dir"] / "pairs.csv"
    rel = lambda k: Path(scans[k]).name  # noqa: E731  (paths relative to the CSV)
    csv.write_text("name,fixed,moving,moving_seg,fixed_seg\n"
                   f"a,{rel('fixed')},{rel('moving')},{rel('moving_seg')},{rel('fixed_seg')}\n"
                   f"b,{rel('moving')},{rel('fixed')},,\n")
    out = tmp_path / "batch"
    args = ["predict", f"--model={student['export']}", f"--pairs={csv}", f"--out_dir={out}",
            "--preprocessing=brain"]
    assert predict.run(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "note: the preprocessing crops/masks to labels, which needs both label maps (missing --fixed_seg, " \
           "--moving_seg): both scans were taken whole" in err
    summary = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in summary["pairs"]] == ["a", "b"]
    a, b = (json.loads((out / n / "result.json").read_text()) for n in ("a", "b"))
    assert a["preprocessing"]["crop"] == "labels" and a["preprocessing_note"] is None and "dice" in a
    assert b["preprocessing"]["crop"] == "none" and "whole" in b["preprocessing_note"]
    assert "warmup" in a["seconds"]  # a batch warms the model up while its first pair is put on the grid
    # one pair alone is resampled by SciPy (while TensorFlow imports), a batch by the XLA sampler: same result
    single = tmp_path / "single"
    assert predict.run(["predict", f"--model={student['export']}", f"--fixed={scans['fixed']}",
                        f"--moving={scans['moving']}", f"--fixed_seg={scans['fixed_seg']}",
                        f"--moving_seg={scans['moving_seg']}", f"--out_dir={single}", "--preprocessing=brain"]) == 0
    s = json.loads((single / "result.json").read_text())
    assert s["dice"] == pytest.approx(a["dice"], abs=1e-3) and s["dice_before"] == a["dice_before"]
    for name in ("flow_vox.nii", "warped.nii.gz"):
        np.testing.assert_allclose(np.asarray(nib.load(str(single / name)).dataobj),
                                   np.asarray(nib.load(str(out / "a" / name)).dataobj), atol=1e-2)
    assert nib.load(str(out / "b" / "warped.nii.gz")).shape == MOVING_SHAPE[2:] + MOVING_SHAPE[:2]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert predict.run(args) == 1
    assert "already exists" in capsys.readouterr().err.strip().splitlines()[-1]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_refine_auto_takes_the_models_recommendation():
    """--refine=auto (the default): the export's recommended steps (metadata ``refine.steps``), none without one;
    explicit counts and 0 win over it; a malformed entry is a one-line error."""
    from types import SimpleNamespace

    recommends = {"refine": {"steps": [3]}}
    assert predict.refiner_from_flags(SimpleNamespace(refine="auto"), recommends).steps == [3]
    assert predict.refiner_from_flags(SimpleNamespace(refine="auto"), {}) is None
    assert predict.refiner_from_flags(SimpleNamespace(refine="0"), recommends) is None
    assert predict.refiner_from_flags(SimpleNamespace(refine="5,2"), recommends).steps == [5, 2]
    with pytest.raises(ValueError, match="'refine' entry is malformed"):
        predict.recommended_refine({"refine": {"steps": ["10"]}})
    assert predict._refine_steps_ok("auto") and not predict._refine_steps_ok("automatic")


def test_refine_improves_the_image_match_and_is_recorded(student, scans, tmp_path, capsys):
    # --refine: the flow refined for the pair (ldr_tf.refine), the same in one-pair and batch runs (where its
    # compilation is part of the warm-up); settings and time in result.json; a bad value: one line, exit 1
    plain, refined = tmp_path / "plain", tmp_path / "refined"
    assert predict.run(_args(student, scans, plain, segs=False)) == 0
    assert predict.run(_args(student, scans, refined, "--refine=8,2", segs=False)) == 0, capsys.readouterr().err
    r = json.loads((refined / "result.json").read_text())
    assert [lv["steps"] for lv in r["model"]["refine"]["levels"]] == [8, 2] and r["seconds"]["refine"] > 0
    assert "refine" not in json.loads((plain / "result.json").read_text())["seconds"]
    assert "refine " in capsys.readouterr().out
    flows = [np.asarray(nib.load(str(d / "flow_vox.nii")).dataobj) for d in (plain, refined)]
    assert np.abs(flows[0] - flows[1]).max() > 0.05
    fixed = np.asarray(nib.load(scans["fixed"]).dataobj, np.float64)

    def mismatch(d):  # both scans are phantoms of the same anatomy with the same contrast
        w = np.asarray(nib.load(str(d / "warped.nii.gz")).dataobj, np.float64)
        return np.mean((w - fixed) ** 2)

    assert mismatch(refined) < mismatch(plain)
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"name,fixed,moving\na,{scans['fixed']},{scans['moving']}\n")
    batch = tmp_path / "batch"
    assert predict.run(["predict", f"--model={student['export']}", f"--pairs={csv}", f"--out_dir={batch}",
                        "--preprocessing=none", "--refine=8,2"]) == 0
    np.testing.assert_allclose(np.asarray(nib.load(str(batch / "a" / "flow_vox.nii")).dataobj), flows[1], atol=1e-3)
    for bad, why in (("-2", "expected auto or 1 or 2 step counts >= 0"), ("5,x", "expected auto or 1 or 2 step counts"),
                     ("1,2,3", "expected auto or 1 or 2 step counts >= 0")):
        assert predict.run(_args(student, scans, tmp_path / "bad", f"--refine={bad}", segs=False)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--refine={bad}: {why}" in err[0], err
    assert not (tmp_path / "bad").exists()


def test_batch_stops_at_a_bad_pair_with_the_pairs_before_it_complete(student, scans, tmp_path, capsys):
    # pairs are pipelined (the files of one pair are written while the next is registered): a failure must still
    # leave every earlier pair complete and nothing of the failing one
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + bytes(100))
    csv = tmp_path / "pairs.csv"
    csv.write_text("name,fixed,moving\n"
                   f"a,{scans['fixed']},{scans['moving']}\n"
                   f"b,{scans['moving']},{scans['fixed']}\n"
                   f"c,{scans['fixed']},{bad}\n"
                   f"d,{scans['fixed']},{scans['moving']}\n")
    out = tmp_path / "batch"
    args = ["predict", f"--model={student['export']}", f"--pairs={csv}", f"--out_dir={out}", "--preprocessing=none"]
    assert predict.run(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ldr_tf.predict: error: pair c: ") and str(bad) in err
    for name in ("a", "b"):
        assert sorted(p.name for p in (out / name).iterdir()) == ["flow_vox.nii", "result.json",
                                                                  "warped.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]  # nothing of c, d never started, no temp folder


@pytest.fixture(scope="module")
def plain_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain") / "sm"

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def f(self, x):
            return {"y": 2 * x}

    m = M()
    tf.saved_model.save(m, str(d), signatures={"serving_default": m.f})
    return d


BAD = ["missing", "4d", "nan", "plain_module", "not_saved_model", "run_dir", "under_file", "existing", "synthetic",
       "label_grid", "bad_recipe", "constant"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_1_and_nothing_left(case, student, scans, plain_module, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(student, scans, out)
    culprit = None
    d = tmp_path / "in"
    d.mkdir()
    if case == "missing":
        culprit = str(d / "nope.nii.gz")
        args[3] = f"--moving={culprit}"
    elif case == "4d":
        culprit = save_nifti(d / "m4.nii.gz", np.ones((8, 8, 8, 2), np.float32), np.eye(4))
        args[3] = f"--moving={culprit}"
        args = args[:6]
    elif case == "nan":
        data = np.asarray(nib.load(scans["fixed"]).dataobj).copy()
        data[3, 3, 3] = np.nan
        culprit = save_nifti(d / "fnan.nii.gz", data, fixed_affine())
        args[2] = f"--fixed={culprit}"
    elif case == "plain_module":
        culprit = "lacks the signature(s) register, register_labels"
        args[1] = f"--model={plain_module}"
    elif case == "not_saved_model":
        (d / "readme.txt").write_text("x")
        culprit = f"{d}: --model: not a SavedModel directory"
        args[1] = f"--model={d}"
    elif case == "run_dir":
        culprit = "export it first with python -m ldr_tf.export"
        args[1] = f"--model={student['run']}"
    elif case == "under_file":
        (d / "afile").write_text("x")
        out = d / "afile" / "out"
        culprit = "is not a folder"
        args[4] = f"--out_dir={out}"
    elif case == "existing":
        out.mkdir()
        (out / "warped.nii.gz").write_text("the user's file")
        culprit = str(out / "warped.nii.gz")
    elif case == "synthetic":
        args[5] = "--preprocessing=auto"
        culprit = "--preprocessing=liver|brain|brain-head|none or a spec .json"
    elif case == "label_grid":
        culprit = save_nifti(d / "seg_other.nii.gz", np.ones((8, 8, 8), np.int16), np.eye(4))
        args[6] = f"--moving_seg={culprit}"
        culprit += f": label map is on a different grid than its image ({scans['moving']})"
    elif case == "constant":
        culprit = save_nifti(d / "zeros.nii.gz", np.zeros(nib.load(scans["fixed"]).shape, np.float32), fixed_affine())
        args[2] = f"--fixed={culprit}"
        args[5] = "--preprocessing=brain"  # percentile normalisation
        culprit += ": intensity percentiles"
    elif case == "bad_recipe":
        args[5] = "--preprocessing=lung"
        culprit = "expected auto, liver, brain, brain-head, none or a .json file, got 'lung'"
    rc = predict.run(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err and err[-1].startswith("ldr_tf.predict: error: ") and culprit in err[-1], err[-3:]
    if case == "existing":
        assert [p.name for p in out.iterdir()] == ["warped.nii.gz"]
        assert (out / "warped.nii.gz").read_text() == "the user's file"
    else:
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_resolve_preprocessing_choices(tmp_path):
    meta = {"preprocessing": recipe("brain", grid_size=(128,) * 3).to_dict()}
    spec = native.resolve_preprocessing("auto", meta, (32, 32, 32))
    assert spec.grid_size == (32, 32, 32) and spec.crop == "labels" and spec.intensity == "percentile"
    assert native.resolve_preprocessing("auto", meta, (32,) * 3, no_crop=True).crop == "none"
    with pytest.raises(ValueError, match="trained on 'synthetic' data"):
        native.resolve_preprocessing("auto", {"preprocessing": {"kind": "synthetic"}}, (32,) * 3)
    with pytest.raises(ValueError, match="records no preprocessing"):
        native.resolve_preprocessing("auto", {}, (32,) * 3)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(Preprocessing(intensity="ct_window", window=400, level=40).to_dict()))
    s = native.resolve_preprocessing(str(spec_file), {}, (16, 16, 16))
    assert s.intensity == "ct_window" and s.window == 400 and s.grid_size == (16, 16, 16)
    spec_file.write_text(json.dumps({"crop": "sometimes"}))
    with pytest.raises(ValueError, match="spec.json: unreadable preprocessing spec"):
        native.resolve_preprocessing(str(spec_file), {}, (16, 16, 16))


def test_pairs_csv_errors(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("fixed,moving\n")
    with pytest.raises(ValueError, match="no pairs"):
        predict.read_pairs_csv(p)
    p.write_text("a,b\nx,y\n")
    with pytest.raises(ValueError, match="must name columns fixed and moving"):
        predict.read_pairs_csv(p)
    p.write_text("fixed,moving,name\nf,m,x\nf,m,x\n")
    with pytest.raises(ValueError, match="repeated"):
        predict.read_pairs_csv(p)
    p.write_text("fixed,moving,name\nf.nii,/abs/m.nii,../up\n")
    with pytest.raises(ValueError, match="not a plain folder name"):
        predict.read_pairs_csv(p)
    p.write_text("fixed,moving\nf.nii,/abs/m.nii\n")
    (row,) = predict.read_pairs_csv(p)
    assert row == {"name": "pair0001", "fixed": str(tmp_path / "f.nii"), "moving": "/abs/m.nii",
                   "moving_seg": None, "fixed_seg": None}
    with pytest.raises(ValueError, match="cannot read the pairs CSV"):
        predict.read_pairs_csv(tmp_path / "none.csv")


def test_cli_subprocess_exit_code(student, scans, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ENV, REPO

    r = subprocess.run([sys.executable, "-m", "ldr_tf.predict", f"--model={student['export']}",
                        f"--fixed={scans['fixed']}", f"--moving={tmp_path / 'missing.nii.gz'}",
                        f"--out_dir={tmp_path / 'o'}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (f"ldr_tf.predict: error: {tmp_path / 'missing.nii.gz'}: file not "
                                                 "found (--moving)")
    assert not (tmp_path / "o").exists()  # failed before creating anything


def test_cli_subprocess_registers_like_the_library_without_keras(student, scans, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ENV, REPO

    # the command's process imports TensorFlow without Keras (cli.without_keras)...
    probe = ("from ldr_tf import cli; cli.without_keras(); import sys, tensorflow; "
             "print('keras' in sys.modules, 'keras.src' in sys.modules)")
    env = {k: v for k, v in ENV.items() if k != "TF_USE_LEGACY_KERAS"}
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    import importlib.util

    if importlib.util.find_spec("tf_keras") is None:  # with the legacy package installed, TensorFlow imports it
        assert r.stdout.split() == ["False", "False"]
    # ... and registers exactly as the library does
    r = subprocess.run([sys.executable, "-m", "ldr_tf.predict", *_args(student, scans, tmp_path / "cli")[1:]],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert predict.run(_args(student, scans, tmp_path / "lib")) == 0
    for name in ("flow_vox.nii", "warped.nii.gz", "warped_seg.nii.gz"):
        a = np.asarray(nib.load(str(tmp_path / "cli" / name)).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "lib" / name)).dataobj)
        # (two processes: oneDNN's thread-dependent summation order moves the flow by ~1e-6 voxel, which the
        # phantom's sharp edges turn into up to ~4e-4 of intensity when other work shares the cores)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 if name == "warped.nii.gz" else 1e-4)
    dice = [json.loads((tmp_path / d / "result.json").read_text())["dice"] for d in ("cli", "lib")]
    assert dice[0] == pytest.approx(dice[1], abs=1e-4)


def test_overlay_png_of_a_prediction(student, scans, tmp_path, capsys):
    from tools import overlay

    out = tmp_path / "pred"
    assert predict.run(_args(student, scans, out)) == 0
    png = tmp_path / "figs" / "overlay.png"
    args = ["overlay", f"--fixed={scans['fixed']}", f"--moving={scans['moving']}", f"--warped={out / 'warped.nii.gz'}",
            f"--fixed_seg={scans['fixed_seg']}", f"--moving_seg={scans['moving_seg']}",
            f"--warped_seg={out / 'warped_seg.nii.gz'}", f"--out={png}", "--axis=1"]
    assert overlay.run(args) == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "slice" in printed and "across axis 1" in printed and "17" in printed
    assert sorted(p.name for p in png.parent.iterdir()) == ["overlay.png"]  # no temporary file left
    assert overlay.run(args) == 1  # exists
    assert "already exists" in capsys.readouterr().err
    bad = args[:3] + [f"--warped={scans['moving']}"] + args[4:-2] + [f"--out={tmp_path / 'x.png'}"]
    assert overlay.run(bad) == 1  # the moving scan is not on the fixed grid
    assert "differs from the fixed scan's" in capsys.readouterr().err


def test_flow_mm_lps_is_what_ants_applies(student, scans, tmp_path):
    # Independent check of the ITK/ANTs convention (LPS vectors, fixed point + d = moving point), on a moving scan
    # with permuted and flipped axes. Skipped where the optional antspyx is not installed.
    ants = pytest.importorskip("ants")
    out = tmp_path / "o"
    assert predict.run(_args(student, scans, out, "--mm", segs=False)) == 0
    fixed, moving = ants.image_read(scans["fixed"]), ants.image_read(scans["moving"])
    warped = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[str(out / "flow_mm_lps.nii")],
                                   interpolator="linear").numpy()
    ours = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    d = np.asarray(nib.load(str(out / "flow_vox.nii")).dataobj)[:, :, :, 0, :]
    q = np.moveaxis(np.indices(FIXED_SHAPE, dtype=np.float64), 0, -1) + d
    inside = np.all((q >= 0) & (q <= np.array(nib.load(scans["moving"]).shape) - 1), axis=-1)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(warped[inside], ours[inside], atol=1e-2)
