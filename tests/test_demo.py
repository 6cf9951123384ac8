"""The main job end to end (`python -m ldr_tf.demo`), with a few steps per stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "ldr_tf.demo", f"--out_dir={out}", "--subjects=6", "--teacher_steps=2",
           "--student_steps=2", "--channels=4"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("1. data", "2. teacher", "3. student (distilled)", "4. plain student (no teacher)", "5. export",
                  "6. evaluate", "7. figures"):
        assert f"=== {stage}" in r.stdout
    report = (out / "report.md").read_text()
    for method in ("identity", "affine (teacher's stage)", "teacher", "student (plain)", "student"):
        assert f"| {method} |" in report
    data = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in data["methods"]][0] == "identity"
    assert all(m["pairs"] == 2 for m in data["methods"])  # 6 subjects: 2 validation subjects, 2 ordered pairs
    for fig in data["figures"].values():
        assert (out / "figures" / fig).stat().st_size > 10_000
    for model in ("teacher", "student", "student_plain"):
        assert (out / "models" / model / "saved_model.pb").is_file()
    # a second run reuses every finished stage
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("reusing") >= 6
    assert "3b. student with ALDK" not in r.stdout  # ALDK only with --aldk
    assert json.loads((out / "runs" / "student" / "config.json").read_text())["train"]["distill"] == "l2"


def test_an_export_is_redone_when_its_run_was_trained_again(tmp_path, monkeypatch):
    """A retrained run writes a checkpoint of the same name: the demo must not reuse the export of the old one."""
    from ldr_tf import demo
    from ldr_tf.deploy import savedmodel
    from ldr_tf.training import checkpoints

    prefix = tmp_path / "run" / "checkpoints" / "ckpt-2"
    prefix.parent.mkdir(parents=True)
    index = Path(f"{prefix}.index")
    index.write_text("x")
    monkeypatch.setattr(checkpoints, "latest_checkpoint", lambda run_dir, step=None: str(prefix))
    exported = []

    def fake_export(run_dir, out, overwrite=False):
        out.mkdir(exist_ok=True)
        (out / savedmodel.METADATA).write_text(json.dumps({"checkpoint": str(prefix)}))
        exported.append(out)
        return out

    monkeypatch.setattr(savedmodel, "export_run", fake_export)
    out = tmp_path / "model"
    demo._export(tmp_path / "run", out, reuse=True)
    demo._export(tmp_path / "run", out, reuse=True)
    assert len(exported) == 1  # the second call reuses it
    later = (out / savedmodel.METADATA).stat().st_mtime + 10
    os.utime(index, (later, later))  # the run was trained again after the export
    demo._export(tmp_path / "run", out, reuse=True)
    assert len(exported) == 2
    demo._export(tmp_path / "run", out, reuse=False)
    assert len(exported) == 3
