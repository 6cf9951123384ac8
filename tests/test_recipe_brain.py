"""`ldr_tf.recipes.brain`: the runs it trains and its command-line errors (the long runs themselves are not tested)."""

import subprocess
import sys
import types
from pathlib import Path

from ldr_tf.recipes import brain
from tests.helpers import ENV, REPO


def _fv(**over):
    base = dict(grid=128, batch=2, lr=1e-4, seed=3, seg_weight=1.0, teacher_cascades=2, channels=8,
                teacher_steps=20000, student_cascades=3, student_stem="ldr_half", student_steps=4000, gamma=0.9, aldk=False)
    return types.SimpleNamespace(**{**base, **over})


def test_students_differ_only_in_the_teacher_and_the_teacher_is_label_free_at_inference():
    cfgs = brain.make_configs(_fv(), Path("d/brain.json"), Path("w/runs"))
    t, s, p = cfgs["teacher"], cfgs["student"], cfgs["student_plain"]
    assert (t.model, t.affine, t.cascades, t.channels, t.steps) == ("teacher", "vtn", 2, 8, 20000)
    assert t.seg_half and t.seg_weight == 1.0  # 128^3: the Dice term at half resolution
    diff = {k for k, v in s.to_dict().items() if p.to_dict()[k] != v}
    assert diff == {"distill", "teacher", "out_dir", "gamma"}, diff  # gamma weighs nothing without ALDK
    assert (s.distill, s.aldk, p.distill, p.aldk) == ("l2", False, "none", False)
    assert brain.make_configs(_fv(aldk=True), Path("d.json"), Path("r"))["student"].aldk
    assert s.teacher == str(Path("w/runs/teacher")) and s.student_stem == "ldr_half" and s.steps == 4000
    for c in cfgs.values():
        c.validate()
    assert not brain.make_configs(_fv(grid=64), Path("d.json"), Path("r"))["teacher"].seg_half


def _run(*args):
    r = subprocess.run([sys.executable, "-m", "ldr_tf.recipes.brain", *args], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr.strip().splitlines()


def test_command_line_errors(tmp_path):
    status, err = _run("--stages=teacher,nope", f"--work_dir={tmp_path}")
    assert status == 2 and err[-1] == "ldr_tf.recipes.brain: usage error: --stages: unknown ['nope']; choose among " \
                                      "import, teacher, student, student_plain, export, compare"
    status, err = _run("--stages=teacher", f"--work_dir={tmp_path}")
    assert status == 1 and err[-1] == (f"ldr_tf.recipes.brain: error: {tmp_path / 'data' / 'brain.json'} not found: "
                                       "run the import stage first")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
