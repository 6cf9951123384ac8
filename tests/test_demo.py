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
