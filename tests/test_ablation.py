"""The ablation table: arms grouped over seeds, paired differences over subject pairs, training figures."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ldr_tf import ablation

REPO = Path(__file__).resolve().parents[1]
PAIRS = [("a", "b"), ("b", "a"), ("c", "d"), ("d", "c"), ("e", "f"), ("f", "e")]


def _rows(dice):
    return [{"fixed": f, "moving": m, "dice": float(d)} for (f, m), d in zip(PAIRS, dice)]


def _compare():
    base = np.array([0.40, 0.42, 0.30, 0.34, 0.50, 0.48])
    return {"dataset": "x.json", "subset": "test", "pairs": {
        "plain_s0": _rows(base), "plain_s1": _rows(base + 0.02),
        "l2_s0": _rows(base + [0.03, 0.01, 0.05, 0.03, 0.00, 0.02]), "l2_s1": _rows(base + 0.04),
        "teacher": _rows(base + 0.1),
    }}


def test_arms_are_grouped_by_seed_suffix():
    assert ablation.split_name("aldk_l2_s12") == ("aldk_l2", 12)
    assert ablation.split_name("teacher") == ("teacher", None)
    assert ablation.group_arms(["l2_s1", "plain_s0", "l2_s0", "teacher"]) == {
        "l2": ["l2_s0", "l2_s1"], "plain": ["plain_s0"], "teacher": ["teacher"]}


def test_paired_difference_over_subject_pairs(tmp_path):
    rows = {r["arm"]: r for r in ablation.summarise(_compare(), "plain")}
    assert list(rows) == ["plain", "l2", "teacher"]
    assert rows["plain"]["dice_mean"] == pytest.approx(np.mean([0.40, 0.42, 0.30, 0.34, 0.50, 0.48]) + 0.01)
    assert rows["plain"]["dice_seed_std"] == pytest.approx(np.std([0.0, 0.02], ddof=1), abs=1e-12)
    assert "vs_baseline" not in rows["plain"] and rows["teacher"]["dice_seed_std"] is None
    # l2 minus plain per pair (seed-averaged): [0.025, 0.015, 0.035, 0.025, 0.01, 0.02]; units = subject pairs
    units = [0.02, 0.03, 0.015]
    half = stats.t.ppf(0.975, 2) * np.std(units, ddof=1) / np.sqrt(3)
    d = rows["l2"]["vs_baseline"]
    assert d["units"] == 3 and d["pairs"] == 6 and d["better"] == 6
    assert d["mean"] == pytest.approx(np.mean(units))
    assert (d["low"], d["high"]) == pytest.approx((np.mean(units) - half, np.mean(units) + half))
    assert rows["teacher"]["vs_baseline"]["mean"] == pytest.approx(0.09)
    assert rows["teacher"]["vs_baseline"]["per_seed"] == {}  # no seed to pair with
    assert d["per_seed"] == pytest.approx({"s0": 0.14 / 6, "s1": 0.02})


def test_mismatched_pairs_and_unknown_baseline_are_refused():
    data = _compare()
    data["pairs"]["l2_s1"] = data["pairs"]["l2_s1"][:4]
    with pytest.raises(ValueError, match="l2_s1 was scored on other pairs than l2_s0"):
        ablation.summarise(data, "plain")
    with pytest.raises(ValueError, match="baseline arm 'nope' not among"):
        ablation.summarise(_compare(), "nope")


def test_cli_reads_flow_gap_from_the_runs_and_writes_the_table(tmp_path):
    cmp_path = tmp_path / "cmp.json"
    data = _compare()
    data["pairs"]["identity"] = _rows([0.1] * 6)
    cmp_path.write_text(json.dumps(data))
    runs = tmp_path / "runs"
    for i, name in enumerate(["plain_s0", "plain_s1", "l2_s0", "l2_s1", "teacher"]):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps(
            {"steps_per_s": 2.0 + i, "last": {"flow_gap": 9.0}, "last_window": {"flow_gap": 1.0 + i, "steps": 25}}))
    out = tmp_path / "abl"
    r = subprocess.run([sys.executable, "-m", "ldr_tf.ablation", f"--compare={cmp_path}", "--baseline=plain",
                        f"--runs={runs}", f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    arms = {a["arm"]: a for a in json.loads((tmp_path / "abl.json").read_text())["arms"]}
    assert arms["plain"]["flow_gap"] == 1.5 and arms["l2"]["flow_gap"] == 3.5  # window means, over seeds
    assert arms["l2"]["steps_per_s"] == 4.5
    assert arms["identity"]["flow_gap"] is None  # compared, but not a run in --runs
    md = (tmp_path / "abl.md").read_text()
    assert "| l2 | 2 |" in md and "vs plain" in md
    # bad input: one line naming the file, non-zero exit
    (tmp_path / "bad.json").write_text("{")
    r = subprocess.run([sys.executable, "-m", "ldr_tf.ablation", f"--compare={tmp_path / 'bad.json'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "bad.json: not valid JSON" in r.stderr
