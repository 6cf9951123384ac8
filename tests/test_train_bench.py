"""`ldr_tf.train_bench`: each kind times the training run it names (the timing itself is a benchmark, not a test)."""

import types
from pathlib import Path

from ldr_tf import train_bench


def _fv():
    return types.SimpleNamespace(cascades=1, batch=2, warmup=1, steps=2, seed=0, channels=8, student_stem="ldr_half")


def test_kinds_are_the_teacher_and_the_three_students():
    d, o, t = Path("data"), Path("out"), Path("teacher")
    cfgs = {k: train_bench._config(_fv(), k, 64, d, o, t) for k in train_bench.KINDS}
    assert cfgs["teacher"].model == "teacher" and cfgs["teacher"].channels == 8
    s, dist, aldk = cfgs["student"], cfgs["student_distill"], cfgs["student_aldk"]
    assert (s.teacher, s.distill, s.aldk) == (None, "none", False)  # the plain student
    assert (dist.teacher, dist.distill, dist.aldk) == ("teacher", "l2", False)  # the default student
    assert (aldk.teacher, aldk.distill, aldk.aldk) == ("teacher", "none", True)
    for c in cfgs.values():
        assert c.steps == 3 and c.image_size == 64 and c.val_every == 0
        c.validate()
