"""The benchmark's derived figures (GFLOP, FLOP floor, student/teacher ratios), its table and its targets."""

from __future__ import annotations

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}

# ------------------------------------------------------------------------------------------------- results


def add_derived(rows: list, peak: dict) -> None:
    """Adds GFLOPs, achieved GFLOP/s, the FLOP floor and the student/teacher ratios to the measured `rows`.

    Args:
      rows: dicts with ``model``, ``size``, ``cascades``, ``variant``, ``compute_dtype``, ``macs`` (or None) and,
        when measured, ``median_s``.
      peak: the practical convolution peak, ``{dtype: GFLOP/s}``; a dtype missing there gives no floor.

    Each row gets ``gflops`` (2 x MACs / 1e9), ``gflop_per_s`` (FLOPs / median), ``peak_gflop_per_s`` (of its
    compute dtype), ``floor_s`` (FLOPs / peak) and ``x_floor`` (median / floor). In a (size, cascades, variant)
    group with exactly one measured teacher, every student gets ``time_ratio_student_teacher`` (student median /
    teacher median, < 1 = student faster) and ``speedup_vs_teacher`` (its inverse); the teacher gets them too when
    the group has exactly one student. Other rows get None.
    """
    groups = {}
    for r in rows:
        macs, median = r.get("macs"), r.get("median_s")
        r["gflops"] = 2.0 * macs / 1e9 if macs else None
        p = peak.get(r.get("compute_dtype"))
        r["peak_gflop_per_s"] = p
        ok = r["gflops"] is not None and median
        r["gflop_per_s"] = r["gflops"] / median if ok else None
        r["floor_s"] = r["gflops"] / p if (r["gflops"] is not None and p) else None
        r["x_floor"] = median / r["floor_s"] if (ok and r["floor_s"]) else None
        r["time_ratio_student_teacher"] = r["speedup_vs_teacher"] = None
        groups.setdefault((tuple(r["size"]), r["cascades"], r["variant"]), []).append(r)
    for members in groups.values():
        teachers = [r for r in members if r["model"] == "teacher" and r.get("median_s")]
        students = [r for r in members if r["model"] == "student" and r.get("median_s")]
        if len(teachers) != 1:
            continue
        for r in students:
            r["time_ratio_student_teacher"] = r["median_s"] / teachers[0]["median_s"]
            r["speedup_vs_teacher"] = 1.0 / r["time_ratio_student_teacher"]
        if len(students) == 1:
            teachers[0]["time_ratio_student_teacher"] = students[0]["time_ratio_student_teacher"]
            teachers[0]["speedup_vs_teacher"] = students[0]["speedup_vs_teacher"]


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def format_table(rows: list) -> str:
    """The readable table: one line per row, sorted by size (largest first), variant, cascades, model."""
    head = (f"{'size':>5} {'model':10} {'casc':>4} {'variant':12} {'params':>11} {'GFLOP':>7} {'first s':>7} "
            f"{'median s [min-max]':>22} {'GFLOP/s':>7} {'floor s':>7} {'xfloor':>6} {'peak MB':>7} "
            f"{'call MB':>7} {'S/T time':>8} {'load':>5}")  # fmt: skip
    lines = [head, "-" * len(head)]
    key = lambda r: (-r["size"][0], r["variant"], r["cascades"] or 0, r["model"], _name(r))  # noqa: E731
    for r in sorted(rows, key=key):
        if r.get("error"):
            lines.append(f"{r['size'][0]:>5} {_name(r):10} {_fmt(r['cascades'], 'd'):>4} {r['variant']:12} "
                         f"FAILED: {r['error']}")  # fmt: skip
            continue
        timing = f"{r['median_s']:.3f} [{r['min_s']:.3f}-{r['max_s']:.3f}]"
        lines.append(
            f"{r['size'][0]:>5} {_name(r):10} {_fmt(r['cascades'], 'd'):>4} {r['variant']:12} "
            f"{_fmt(r['params'], ',d'):>11} {_fmt(r['gflops'], '.1f'):>7} {r['first_call_s']:>7.2f} {timing:>22} "
            f"{_fmt(r['gflop_per_s'], '.1f'):>7} {_fmt(r['floor_s'], '.3f'):>7} {_fmt(r['x_floor'], '.1f'):>6} "
            f"{r['peak_rss_mb']:>7.0f} {r['call_peak_mb']:>7.0f} {_fmt(r['time_ratio_student_teacher'], '.2f'):>8} "
            f"{_fmt(_row_load(r), '.1f'):>5}"
        )  # fmt: skip
    return "\n".join(lines)


def _name(row: dict) -> str:
    """Table name of a row: the model kind, or an existing export's directory name."""
    return str(row.get("name") or row["model"])[:10]


def _row_load(row: dict) -> float | None:
    """The 1-minute load average when the row's measuring process ended (None if unknown)."""
    try:
        return float(row["loadavg"][1][0])
    except (KeyError, IndexError, TypeError):
        return None


TARGET_MEDIAN_S = 0.15  # the light student's target (2 cores, oneDNN on, AVX-512)
TARGET_SPEEDUP = 5.0  # at least 5x the 3-cascade teacher's speed, same size and variant, same run
TARGET_CALL_MB = 1000.0  # memory of the student call itself (above the loaded model)


NOT_JUDGED = ("oneDNN was off in the measuring process; run without TF_ENABLE_ONEDNN_OPTS=0, which "
              "import ldr_tf turns on")


def targets_judged(runtime: dict, rows: list) -> bool:
    """PASS/MISS against the targets only when oneDNN was on here and in every worker that measured a row."""
    states = [runtime.get("onednn_enabled")] + [(r.get("runtime") or {}).get("onednn_enabled") for r in rows
                                                if r.get("runtime")]
    return all(s is True for s in states)


def target_report(rows: list) -> list:
    """The issue's targets for every measured 3-cascade student at 128^3 (one entry per variant).

    Targets: median <= 0.15 s; at least 5x the speed of the teacher of the same run; the calls' own peak memory
    (above the loaded model) <= 1 GB (the whole process's peak RSS is reported beside it).
    """
    report = []
    for r in rows:
        if r["model"] != "student" or r["cascades"] != 3 or tuple(r["size"]) != (128, 128, 128) or r.get("error"):
            continue
        report.append({
            "variant": r["variant"],
            "median_s": r["median_s"],
            "median_ok": r["median_s"] <= TARGET_MEDIAN_S,
            "x_target": r["median_s"] / TARGET_MEDIAN_S,
            "floor_s": r["floor_s"],
            "x_floor": r["x_floor"],
            "speedup_vs_teacher": r["speedup_vs_teacher"],
            "speedup_ok": (None if r["speedup_vs_teacher"] is None
                           else r["speedup_vs_teacher"] >= TARGET_SPEEDUP),
            "peak_rss_mb": r["peak_rss_mb"],
            "call_peak_mb": r["call_peak_mb"],
            "memory_ok": r["call_peak_mb"] <= TARGET_CALL_MB,
        })  # fmt: skip
    return report


def target_lines(report: list) -> list:
    lines = []
    for t in report:
        ok = lambda b: "n/a" if b is None else ("PASS" if b else "MISS")  # noqa: E731
        speed = (f"{t['speedup_vs_teacher']:.2f}x the teacher's speed vs >= {TARGET_SPEEDUP:g}x "
                 f"({ok(t['speedup_ok'])})"
                 if t["speedup_vs_teacher"] else "teacher not measured")
        floor = (f", {t['x_floor']:.1f}x the FLOP floor {t['floor_s']:.3f} s" if t["x_floor"] else "")
        lines.append(
            f"  3-cascade student 128^3 {t['variant']}: median {t['median_s']:.3f} s vs target "
            f"{TARGET_MEDIAN_S} s ({ok(t['median_ok'])}, {t['x_target']:.2f}x the target{floor}); {speed}; calls "
            f"+{t['call_peak_mb']:.0f} MB vs {TARGET_CALL_MB:.0f} MB ({ok(t['memory_ok'])}), process peak "
            f"{t['peak_rss_mb']:.0f} MB"
        )  # fmt: skip
    return lines
