"""evaluate: identity = before registration, a run directory and its export score the same, the affine stage alone,
constant memory (scalar rows), the text/JSON reports and the prefix naming."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ldr_tf import evaluate
from ldr_tf.ops import metrics
from ldr_tf.data.dataset import load_descriptor
from ldr_tf.data.pairs import make_pair_dataset
from ldr_tf.deploy.loader import open_registrar
from ldr_tf.data.synthetic import ensure_demo_dataset
from tests.helpers import ENV, REPO, SIZE, make_run, student_network


@pytest.fixture(scope="module")
def desc(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return load_descriptor(ensure_demo_dataset("demo", data_dir=d, size=SIZE, subjects=5, progress=False))


@pytest.fixture(scope="module")
def student(shared_student):
    return shared_student


def _spacing(desc, key):
    path, group = desc.file_for(key)
    with h5py.File(path, "r") as h5:
        return np.asarray(h5[group].attrs["spacing"], np.float64)


def test_identity_scores_the_pairs_as_they_are(desc):
    res = evaluate.evaluate(open_registrar("identity"), desc, "2", progress=False)
    ds = make_pair_dataset(desc, "2", 1, augment=False, shuffle=False, repeat=False)
    batches = list(ds)
    assert len(res["pairs"]) == len(batches) == 2
    for row, b in zip(res["pairs"], batches):
        assert (row["fixed"], row["moving"]) == (b["id1"][0].numpy().decode(), b["id2"][0].numpy().decode())
        ov = metrics.label_overlap(b["fixed_seg"][0].numpy(), b["moving_seg"][0].numpy())
        assert row["dice"] == pytest.approx(ov["dice"], abs=1e-12) and row["labels"] == ov["labels"] > 0
        assert row["jaccard"] == pytest.approx(ov["jaccard"], abs=1e-12)
        fp, mp = b["fixed_points"][0].numpy(), b["moving_points"][0].numpy()
        ok = np.all(fp != -1, 1) & np.all(mp != -1, 1)
        assert ok.any()
        dist = np.linalg.norm(fp[ok] - mp[ok], axis=1)
        assert row["lm_dist_vox"] == pytest.approx(dist.mean(), rel=1e-5)
        sp = _spacing(desc, row["moving"])
        assert row["lm_dist_mm"] == pytest.approx(np.linalg.norm((fp[ok] - mp[ok]) * sp, axis=1).mean(), rel=1e-5)
        assert row["jac_std"] == 0 and row["folding_pct"] == 0
    # constant memory: a row holds scalars only (no flow, no volume kept per pair)
    assert all(isinstance(v, (str, int, float)) for r in res["pairs"] for v in r.values())
    s = res["summary"]
    assert s["pairs"] == 2 and s["dice"]["n"] == 2
    assert s["dice"]["mean"] == pytest.approx(np.mean([r["dice"] for r in res["pairs"]]))


def test_run_directory_and_its_export_give_the_same_numbers(desc, student):
    a = evaluate.evaluate(open_registrar(student["run"]), desc, "2", progress=False)
    b = evaluate.evaluate(open_registrar(student["export"]), desc, "2", progress=False)
    ident = evaluate.evaluate(open_registrar("identity"), desc, "2", progress=False)
    for ra, rb, ri in zip(a["pairs"], b["pairs"], ident["pairs"]):
        for c in ("dice", "jaccard", "lm_dist_vox", "lm_dist_mm", "jac_std", "folding_pct"):
            assert ra[c] == pytest.approx(rb[c], abs=1e-4), c
        assert ra["jac_std"] > 0 and ra["dice"] != pytest.approx(ri["dice"], abs=1e-6)  # the model did something


def test_affine_stage_alone_is_an_affine_map(desc, tmp_path):
    size = 48  # the lite affine stem needs >= 48; the 32^3 dataset is resampled onto the model's grid
    run = make_run(tmp_path / "lite", student_network(size, affine="lite"), seed=4, scale=0.05)
    reg = open_registrar(run, stage="affine")
    assert reg.image_size == (size,) * 3 and reg.metadata["stage"] == "affine"
    batch = next(iter(make_pair_dataset(desc, "2", 1, augment=False, shuffle=False, repeat=False,
                                        image_size=(size,) * 3)))
    flow = reg(batch["fixed"], batch["moving"])["flow"][0].reshape(-1, 3).astype(np.float64)
    x = np.moveaxis(np.indices((size,) * 3, dtype=np.float64), 0, -1).reshape(-1, 3)
    design = np.concatenate([x, np.ones((x.shape[0], 1))], 1)
    coef, *_ = np.linalg.lstsq(design, flow, rcond=None)
    assert np.abs(flow).max() > 0.1, "a non-trivial affine"
    assert np.abs(design @ coef - flow).max() < 1e-3 * max(1.0, np.abs(flow).max())
    full = open_registrar(run)(batch["fixed"], batch["moving"])["flow"][0].reshape(-1, 3)
    assert np.abs(design @ np.linalg.lstsq(design, full, rcond=None)[0] - full).max() > 1e-2  # the stems add to it
    res = evaluate.evaluate(reg, desc, "2", progress=False)
    row = res["pairs"][0]
    # landmarks are in voxels of the 48^3 grid; mm use the dataset spacing rescaled by 32/48 (isotropic here)
    sp = _spacing(desc, row["moving"])
    assert np.allclose(sp, sp[0])
    assert row["lm_dist_mm"] == pytest.approx(row["lm_dist_vox"] * sp[0] * SIZE / size, rel=1e-5)
    with pytest.raises(ValueError, match="no affine stage"):
        open_registrar(make_run(tmp_path / "plain", student_network()), stage="affine")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ValueError, match="needs the training run directory"):
        open_registrar(tmp_path / "x", stage="affine")


def test_report_files_and_prefix_with_dots(desc, student, tmp_path):
    out = tmp_path / "eval" / "student.v1.2"
    rep = evaluate.write_report(open_registrar(student["export"]), desc, out, "2", model=str(student["export"]),
                                progress=False)
    txt = (tmp_path / "eval" / "student.v1.2.txt").read_text().splitlines()
    assert txt[0] == "# fixed moving dice jaccard lm_dist_vox lm_dist_mm jac_std folding_pct seconds"
    rows = txt[1:3]
    assert all(len(line.split()) == 9 for line in rows)
    assert txt[3] == "Summary" and len(txt) == 4 + len(evaluate.COLUMNS)
    assert txt[4].startswith("dice: ") and "(" in txt[4]
    js = json.loads((tmp_path / "eval" / "student.v1.2.json").read_text())
    assert js["method"] == "export" and js["stage"] == "full" and js["parameters"] == rep["parameters"] > 0
    assert js["columns"] == list(evaluate.COLUMNS) and len(js["pairs"]) == 2
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["student.v1.2.json", "student.v1.2.txt"]
    assert float(rows[0].split()[2]) == pytest.approx(js["pairs"][0]["dice"], abs=1e-6)


def test_cli_identity(desc, tmp_path):
    out = tmp_path / "r" / "identity.v0"
    r = subprocess.run([sys.executable, "-m", "ldr_tf.evaluate", "--model=identity", f"--dataset={desc.path}",
                        "--subset=2", f"--out={out}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Summary" in r.stdout and f"wrote {out}.txt and {out}.json" in r.stdout
    js = json.loads((tmp_path / "r" / "identity.v0.json").read_text())
    assert js["method"] == "identity" and js["summary"]["pairs"] == 2
    r = subprocess.run([sys.executable, "-m", "ldr_tf.evaluate", f"--model={tmp_path / 'nothing'}",
                        f"--dataset={desc.path}", f"--out={out}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("ldr_tf.evaluate: error: ")
    assert "model not found" in r.stderr
