"""networks.summary: analytic MAC counts, the timing helper, the CLI, and checkpoint coverage of each network."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from networks.affine import AffineLiteStem, AffineStem
from networks.critic import Critic
from networks.ldr import LDR, LDRReleased
from networks.summary import count_macs, count_params, time_forward
from networks.vtn import VTN

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("head", ["deconv", "upsample"])
def test_count_macs_of_the_paper_student_matches_hand_count(head):
    n, (a, b, c, d) = 32, (2, 4, 6, 8)
    expected = (
        (n // 2) ** 3 * 64 * 2 * a  # conv1 4^3 s2, MACs = output positions x k^3 x C_in x C_out
        + (n // 4) ** 3 * 64 * a * b
        + (n // 8) ** 3 * 64 * b * c
        + (n // 16) ** 3 * 64 * c * d
        + (n // 16) ** 3 * 64 * d * c  # deconv3: transposed conv, MACs = input positions x k^3 x C_in x C_out
        + (n // 8) ** 3 * 64 * (2 * c) * b  # deconv2 reads concat(deconv3, conv3)
        + (n // 4) ** 3 * 64 * (2 * b) * a
    )
    if head == "deconv":
        expected += (n // 2) ** 3 * 64 * (2 * a) * 3
    else:
        expected += (n // 2) ** 3 * 27 * (2 * a) * 3
    model = LDR(channels=(a, b, c, d), head=head)
    assert count_macs(model, (1, n, n, n, 2)) == expected
    assert count_macs(model, (2, n, n, n, 2)) == 2 * expected


def test_count_macs_of_the_reference_networks_at_128():
    # reference.md 2.7: VTN affine 1.95, VTN dense 8.2, released LDR 55.2, LDRUtilStem 1.0 GMACs
    shape = (1, 128, 128, 128, 2)
    for model, gmacs in ((AffineStem(), 1.95), (VTN(), 8.2), (LDRReleased(), 55.2), (AffineLiteStem(), 1.0)):
        assert count_macs(model, shape) / 1e9 == pytest.approx(gmacs, rel=0.03)


def test_count_params_builds_the_model():
    model = Critic(channels=(2, 2, 2, 2, 2))
    assert not model.built
    assert count_params(model, (None, 32, 32, 32, 3)) == model.count_params() > 0


def test_time_forward_returns_positive_times():
    model = LDR(channels=(2, 2, 2, 2))
    t = time_forward(model, (1, 16, 16, 16, 2), runs=3)
    assert len(t["times"]) == 3 and 0 < t["min"] <= t["median"] <= t["max"]


@pytest.mark.parametrize(
    "model, shape",
    [(AffineStem(channels=2), (1, 64, 64, 64, 2)), (AffineLiteStem(channels=(2, 2, 2, 2)), (1, 48, 48, 48, 2)),
     (VTN(channels=2), (1, 64, 64, 64, 2)), (LDR(channels=(2, 2, 2, 2)), (1, 16, 16, 16, 2)),
     (LDRReleased(encoders=(2, 2, 2, 2)), (1, 16, 16, 16, 2)), (Critic(channels=(2, 2, 2, 2, 2)), (1, 32, 32, 32, 3))],
    ids=lambda x: type(x).__name__ if not isinstance(x, tuple) else "",
)  # fmt: skip
def test_every_weight_is_checkpointed(model, shape, tmp_path):
    model.build(shape)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(path) if name.startswith("model/")]
    assert len(saved) == len(model.weights)


def test_summary_cli(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "networks.summary", "--size=64", "--channels=2", "--cascades=1", f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["network"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["released student stem (LDRReleased)"]["params"] == 280_659
    assert rows["paper student stem, head=deconv"]["params"] == 1_548_531
    assert rows["teacher: VTN affine + 1 VTN"]["params"] == (
        rows["affine stem (VTN)"]["params"] + rows["VTN dense stem (c=2)"]["params"]
    )
    assert "released student stem (LDRReleased)" in proc.stdout
    assert np.isclose(rows["VTN dense stem (c=2)"]["gmacs"], count_macs(VTN(channels=2), (1, 64, 64, 64, 2)) / 1e9)
    bad = subprocess.run([sys.executable, "-m", "networks.summary", "--size=96"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "--size: expected a multiple of 64" in bad.stderr
