"""``python -m ldr_tf.benchmark``: the derived figures (pure), the CLI end to end on tiny settings, its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldr_tf.deploy import benchmark_report

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=240):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    args = ("--conv_peak_runs=2", *args)  # a rough peak is enough here
    return subprocess.run([sys.executable, "-m", "ldr_tf.benchmark", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)  # fmt: skip


# ------------------------------------------------------------------------------------------- pure helpers


def _row(model, median, size=128, cascades=3, variant="xla=on fp32", macs=5e9, peak_mb=1000.0):
    return {"model": model, "size": [size] * 3, "cascades": cascades, "variant": variant,
            "compute_dtype": "bfloat16" if "bf16" in variant else "float32", "macs": macs, "params": 1000,
            "median_s": median, "min_s": median * 0.9, "max_s": median * 1.2, "first_call_s": 1.0,
            "peak_rss_mb": peak_mb, "call_peak_mb": 300.0, "error": None}  # fmt: skip


def test_add_derived_analytic():
    rows = [
        _row("teacher", 2.0),
        _row("student", 0.5),
        _row("student", 0.4, variant="xla=on bf16", macs=4e9),  # no teacher of this variant: no ratio
        _row("teacher", 1.0, cascades=2, macs=None),  # FLOPs unknown
    ]
    benchmark_report.add_derived(rows, {"float32": 100.0, "bfloat16": 200.0})
    teacher, student, bf16, unknown = rows
    assert teacher["gflops"] == pytest.approx(10.0)  # 2 x 5e9 MACs
    assert teacher["gflop_per_s"] == pytest.approx(5.0)  # 10 GFLOP / 2 s
    assert student["gflop_per_s"] == pytest.approx(20.0)
    assert student["floor_s"] == pytest.approx(0.1)  # 10 GFLOP / 100 GFLOP/s
    assert student["x_floor"] == pytest.approx(5.0)  # 0.5 s / 0.1 s
    assert bf16["floor_s"] == pytest.approx(0.04)  # 8 GFLOP at the bfloat16 peak
    for r in (teacher, student):
        assert r["time_ratio_student_teacher"] == pytest.approx(0.25)
        assert r["speedup_vs_teacher"] == pytest.approx(4.0)
    assert bf16["time_ratio_student_teacher"] is None
    assert unknown["gflops"] is None and unknown["floor_s"] is None and unknown["x_floor"] is None

    # one teacher, two students (e.g. the demo's exports): each student gets its ratio, the teacher none
    group = [_row("teacher", 1.0, size=64), _row("student", 0.5, size=64), _row("student", 0.25, size=64)]
    benchmark_report.add_derived(group, {"float32": 100.0})
    assert [r["time_ratio_student_teacher"] for r in group] == [None, pytest.approx(0.5), pytest.approx(0.25)]

    targets = benchmark_report.target_report(rows)
    assert [t["variant"] for t in targets] == ["xla=on fp32", "xla=on bf16"]
    fp32 = targets[0]
    assert not fp32["median_ok"] and not fp32["speedup_ok"] and fp32["memory_ok"]  # 0.5 s, 4x, +300 MB
    assert fp32["x_target"] == pytest.approx(0.5 / benchmark_report.TARGET_MEDIAN_S)
    assert targets[1]["speedup_ok"] is None  # no teacher measured for that variant
    light = [_row("teacher", 1.0), _row("student", 0.125)]
    benchmark_report.add_derived(light, {"float32": 100.0})
    (t,) = benchmark_report.target_report(light)
    assert t["median_ok"] and t["speedup_ok"] and t["memory_ok"]

    table = benchmark_report.format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["size", "model", "casc"]
    assert "0.500 [0.450-0.600]" in table and "0.25" in table


def test_target_report_misses():
    rows = [_row("teacher", 1.0), _row("student", 0.45)]
    rows[1]["call_peak_mb"] = 1200.0
    benchmark_report.add_derived(rows, {"float32": 100.0})
    (t,) = benchmark_report.target_report(rows)
    assert not t["median_ok"] and not t["speedup_ok"] and not t["memory_ok"]
    assert t["x_target"] == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run: 64^3, one cascade, teacher c=4 and the student, XLA sampler, float32, 2 timed calls (bfloat16
    exports are checked in test_export; here they would double the run)."""
    tmp = tmp_path_factory.mktemp("bench")
    out, work = tmp / "bench.json", tmp / "work"
    proc = _cli("--sizes=64", "--cascades=1", "--teacher_channels=4", "--runs=2", "--warmup=0", "--xla=on",
                "--bfloat16=off", f"--work_dir={work}", f"--out={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, work


def test_end_to_end_fields(tiny_run):
    payload, stdout, _ = tiny_run
    assert payload["complete"] is True
    assert payload["machine"]["cpu_count"] == os.cpu_count()
    assert isinstance(payload["runtime"]["onednn_enabled"], bool)
    peak = payload["conv_peak"]
    assert peak["gflop_per_s"]["float32"] == pytest.approx(max(
        peak["start"]["float32"]["gflop_per_s"], peak["end"]["float32"]["gflop_per_s"]))  # fmt: skip
    rows = {(r["model"], r["compute_dtype"]): r for r in payload["rows"]}
    assert sorted(rows) == [("student", "float32"), ("teacher", "float32")]
    for (_, dtype), r in rows.items():
        assert r["error"] is None, r["error"]
        assert r["size"] == [64, 64, 64] and r["cascades"] == 1 and r["xla_warp"] is True
        assert r["variant"] == f"xla=on {benchmark_report.SHORT_DTYPE[dtype]}"
        assert r["outputs"] == {"flow": [1, 64, 64, 64, 3], "warped": [1, 64, 64, 64, 1]} and r["finite"]
        assert len(r["times_s"]) == 2 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["load_s"] > 0 and r["first_call_s"] > 0 and r["import_s"] > 0
        # memory: the loaded process holds TensorFlow; the calls at least hold their outputs (4 MB at 64^3)
        assert r["peak_rss_mb"] >= r["rss_before_call_mb"] > 100
        assert 4 <= r["call_peak_mb"] <= r["peak_rss_mb"]
        # derived figures are consistent with the measured ones
        assert r["gflops"] == pytest.approx(2 * r["macs"] / 1e9)
        assert r["gflop_per_s"] == pytest.approx(r["gflops"] / r["median_s"])
        assert r["floor_s"] == pytest.approx(r["gflops"] / peak["gflop_per_s"][dtype])
        assert r["x_floor"] == pytest.approx(r["median_s"] / r["floor_s"])
        meta = json.loads((Path(r["path"]) / "ldr_tf_export.json").read_text())
        assert meta["xla_warp"] is True and meta["parameters"] == r["params"]
        assert meta["network"]["compute_dtype"] == dtype
    for dtype in ("float32",):
        s, t = rows["student", dtype], rows["teacher", dtype]
        assert s["time_ratio_student_teacher"] == pytest.approx(s["median_s"] / t["median_s"])
        assert t["speedup_vs_teacher"] == pytest.approx(t["median_s"] / s["median_s"])
        # the paper's LDR student has more FLOPs than a c=4 VTN teacher at 64^3
        assert s["params"] > 0 and t["params"] > 0 and s["macs"] > t["macs"] > 0
    assert "oneDNN" in stdout and "conv peak float32" in stdout
    assert "student" in stdout.split("size model")[-1] and "teacher" in stdout.split("size model")[-1]


def test_existing_export(tiny_run, tmp_path):
    """--models: an existing export gets the same parameter and FLOP counts as when it was built; --threads."""
    payload, _, _ = tiny_run
    built = next(r for r in payload["rows"] if r["model"] == "student" and r["compute_dtype"] == "float32")
    out = tmp_path / "again.json"
    proc = _cli(f"--models={built['path']}", "--runs=1", "--warmup=0", "--threads=1", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["source"] == "export" and row["error"] is None and row["model"] == "student"
    assert row["name"] == Path(built["path"]).name
    assert row["params"] == built["params"] and row["macs"] == built["macs"]
    assert row["size"] == built["size"] and row["xla_warp"] is True and len(row["times_s"]) == 1
    assert row["runtime"]["intra_op_threads"] == 1  # --threads reaches the measuring process


@pytest.mark.parametrize("args, message", [
    (["--xla=maybe"], "--xla: expected a comma-separated subset of on,off, got maybe"),
    (["--sizes=64,x"], "--sizes: expected comma-separated positive integers"),
    (["--reuse_exports"], "--reuse_exports: needs --work_dir"),
    (["--models=/nonexistent/export"], "/nonexistent/export: not a SavedModel directory"),
])  # fmt: skip
def test_bad_arguments(args, message):
    proc = _cli(*args, timeout=120)
    assert proc.returncode == 1
    assert f"ldr_tf.benchmark: error: {message}" in proc.stderr


@pytest.mark.slow
def test_plain_sampler(tmp_path):
    """--xla=off: the export is traced with the plain (non-XLA) sampler and says so."""
    out = tmp_path / "noxla.json"
    proc = _cli("--sizes=64", "--cascades=1", "--kinds=student", "--runs=1", "--warmup=0", "--xla=off",
                f"--out={out}", f"--work_dir={tmp_path / 'work'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["error"] is None and row["finite"] and row["variant"] == "xla=off fp32" and row["xla_warp"] is False
    assert row["time_ratio_student_teacher"] is None  # no teacher in this run
    meta = json.loads((Path(row["path"]) / "ldr_tf_export.json").read_text())
    assert meta["xla_warp"] is False
