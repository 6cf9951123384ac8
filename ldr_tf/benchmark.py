"""``python -m ldr_tf.benchmark``: CPU inference speed of exported registration models, side by side in one run.

For every size in ``--sizes``, cascade count in ``--cascades`` and variant (``--xla`` sampler on/off, ``--bfloat16``
convolutions off/on) the teacher (VTN affine + n VTN stems) and the student (lite affine + n LDR stems) are built
with random weights (timing does not depend on training), exported with `ldr_tf.deploy.savedmodel.export_model`, and each
SavedModel is timed in a **fresh Python process** through its ``register(fixed, moving)`` signature, batch 1:

* import, load and first-call time (the first call includes the XLA compilation of the sampler), then
  ``--warmup`` untimed calls and ``--runs`` timed warm calls: median, min, max (each call includes fetching
  ``flow`` and ``warped`` as numpy arrays);
* memory: the process RSS before the first call, the peak RSS of the whole process (Python + TensorFlow +
  model), and the peak of the calls above the RSS before them (the kernel's high-water mark is reset with
  ``/proc/self/clear_refs`` between phases, so each phase's peak is its own);
* parameters, GFLOPs per call (`networks.summary.count_macs` x 2: convolutions and transposed convolutions
  only), achieved GFLOP/s, and the **FLOP floor**: the model's FLOPs divided by this machine's practical
  convolution peak in the model's compute dtype (3^3 convolutions, 32 -> 32 channels at 64^3 and 64 -> 64 at 32^3,
  float32 and bfloat16, the fastest of ``--conv_peak_runs`` warm calls, measured at the start and at the end of the
  run; the better figure is used);
* the student/teacher time ratio at the same size, cascade count and variant.

The thread counts, oneDNN state, CPU model and its BF16 support and the load average are printed and stored.
``--models=dir1,dir2`` benchmarks existing exports instead (e.g. the demo's). ``--out`` writes everything as
JSON (atomically).

Examples::

    python -m ldr_tf.benchmark --out=bench_out/benchmark.json   # 128^3 and 64^3, 1-3 cascades, XLA sampler, fp32
    python -m ldr_tf.benchmark --sizes=128 --cascades=3 --xla=on,off --bfloat16=off,on
    python -m ldr_tf.benchmark --models=demo_out/models/teacher,demo_out/models/student --threads=2

The machine is usually shared: compare rows of one run, look at the load average printed with each row, and repeat
a run before trusting a small difference.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

from ldr_tf import cpu

FLAGS = flags.FLAGS
PROG = "ldr_tf.benchmark"
KINDS = ("teacher", "student")
DTYPES = {"off": "float32", "on": "bfloat16"}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}
# Convolutions timed to estimate the machine's practical peak: (grid size, channels in = out), 3^3 kernels.
PEAK_CONVS = ((64, 32), (32, 64))
MB = 1e6  # memory figures are in MB = 10^6 bytes

__all__ = ["Case", "measure_export", "measure_conv_peak", "machine_info", "add_derived", "format_table",
           "target_report", "run"]


# ------------------------------------------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


machine_info = cpu.machine_info
_loadavg = cpu.loadavg


def tf_runtime_info() -> dict:
    """TensorFlow version, thread settings and oneDNN state of this process (imports TensorFlow)."""
    import tensorflow as tf

    onednn = cpu.onednn_enabled()
    return {
        "tensorflow": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "onednn_enabled": onednn,
    }


def _apply_threads(threads: int, inter_threads: int) -> None:
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    if inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_threads)


# -------------------------------------------------------------------------------------------------- memory


def _status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``VmHWM``) in MB, or None where there is none."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / MB
    return None


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS mark of this process to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    import resource

    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


# ------------------------------------------------------------------------------------------------- workers


def _timed_calls(fn, runs: int) -> list:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _stats(times: list) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def measure_export(model_dir: str, runs: int = 10, warmup: int = 1, seed: int = 0) -> dict:
    """Loads an export and times its ``register`` signature on one random pair (run in a fresh process).

    Args:
      model_dir: SavedModel directory written by `ldr_tf.deploy.savedmodel.export_model`.
      runs: timed warm calls (>= 1).
      warmup: untimed calls after the first one.
      seed: seed of the random float32 inputs in [0, 1].

    Returns:
      dict: ``load_s``, ``first_call_s``, ``median_s``, ``min_s``, ``max_s``, ``times_s`` (seconds);
      ``rss_before_call_mb``, ``load_peak_mb`` (peak up to then), ``first_call_peak_mb``,
      ``warm_call_peak_mb`` (peak RSS of each phase), ``peak_rss_mb`` (the process), ``call_peak_mb`` (the
      calls' peak above ``rss_before_call_mb``), ``peak_reset`` (whether phase peaks are exact), ``grid``,
      ``outputs`` (shapes), ``finite`` (outputs all finite).

    Raises:
      ValueError: the directory has no ``register`` signature with a static grid.
    """
    import numpy as np
    import tensorflow as tf

    t0 = time.perf_counter()
    loaded = tf.saved_model.load(model_dir)
    load_s = time.perf_counter() - t0
    if "register" not in loaded.signatures:
        raise ValueError(f"{model_dir}: no 'register' signature (has {sorted(loaded.signatures)})")
    reg = loaded.signatures["register"]
    spec = reg.structured_input_signature[1]["fixed"]
    grid = spec.shape.as_list()[1:4]
    if None in grid:
        raise ValueError(f"{model_dir}: the register signature has no static grid ({spec.shape})")
    rng = np.random.default_rng(seed)
    fixed = tf.constant(rng.random((1, *grid, 1), dtype=np.float32))
    moving = tf.constant(rng.random((1, *grid, 1), dtype=np.float32))
    outputs = {}

    def call():
        outputs.clear()  # the previous outputs do not count in this call's memory
        out = reg(fixed=fixed, moving=moving)
        outputs.update({k: v.numpy() for k, v in out.items()})  # the caller gets numpy arrays

    load_peak = _peak_mb()
    rss_before = _status_mb("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0
    first_peak = _peak_mb()
    reset = _reset_peak() and reset
    for _ in range(warmup):
        call()
    res = _stats(_timed_calls(call, runs))
    warm_peak = _peak_mb()
    peak = max(load_peak, first_peak, warm_peak) if reset else warm_peak
    res.update({
        "load_s": load_s,
        "first_call_s": first_s,
        "rss_before_call_mb": rss_before,
        "load_peak_mb": load_peak,
        "first_call_peak_mb": first_peak if reset else None,
        "warm_call_peak_mb": warm_peak if reset else None,
        "peak_rss_mb": peak,
        "call_peak_mb": max(first_peak, warm_peak) - rss_before,
        "peak_reset": reset,
        "grid": grid,
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
        "finite": bool(all(np.isfinite(v).all() for v in outputs.values())),
    })  # fmt: skip
    return res


def measure_conv_peak(dtypes=("float32", "bfloat16"), runs: int = 10) -> dict:
    """Practical convolution throughput of this machine: the best GFLOP/s of one call over `PEAK_CONVS`.

    Each case is one ``tf.nn.conv3d`` (3^3 kernel, SAME, batch 1) inside a `tf.function`, timed `runs` times
    after one untimed call. The peak is taken from the fastest call, not the median: it stands for what the
    machine can do (a FLOP floor), and on a shared machine the median mostly measures the other processes.

    Returns:
      ``{dtype: {"gflop_per_s": best, "cases": [{"size", "channels", "gflops", "min_s", "median_s",
      "gflop_per_s" (from min_s), "median_gflop_per_s"}]}}``.
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    conv = tf.function(lambda x, w: tf.nn.conv3d(x, w, [1] * 5, "SAME"))
    result = {}
    for name in dtypes:
        dtype = tf.as_dtype(name)
        cases = []
        for size, ch in PEAK_CONVS:
            x = tf.cast(rng.random((1, size, size, size, ch), dtype=np.float32), dtype)
            w = tf.cast(rng.normal(0, 0.05, (3, 3, 3, ch, ch)).astype(np.float32), dtype)
            conv(x, w).numpy()
            times = _timed_calls(lambda: conv(x, w).numpy(), runs)  # noqa: B023
            flops = 2.0 * size**3 * 27 * ch * ch
            best, median = min(times), statistics.median(times)
            cases.append({"size": size, "channels": ch, "gflops": flops / 1e9, "min_s": best, "median_s": median,
                          "gflop_per_s": flops / best / 1e9, "median_gflop_per_s": flops / median / 1e9})  # fmt: skip
        result[name] = {"gflop_per_s": max(c["gflop_per_s"] for c in cases), "cases": cases}
    return result


def _worker_main() -> int:
    """``--worker``: measure one export in this (fresh) process and write the JSON result to --worker_out."""
    import_t0 = time.perf_counter()
    import tensorflow as tf  # noqa: F401

    import_s = time.perf_counter() - import_t0
    _apply_threads(FLAGS.threads, FLAGS.inter_threads)
    loadavg = _loadavg()
    res = measure_export(FLAGS.model_dir, runs=FLAGS.runs, warmup=FLAGS.warmup, seed=FLAGS.seed)
    res.update({"import_s": import_s, "runtime": tf_runtime_info(), "loadavg": [loadavg, _loadavg()]})
    from ldr_tf.atomic import write_json

    write_json(res, FLAGS.worker_out)
    return 0


def _run_worker(model_dir: Path, timeout: float) -> dict:
    """Runs `_worker_main` on `model_dir` in a fresh interpreter; ValueError with its last error line on failure."""
    with tempfile.TemporaryDirectory(prefix="ldr-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "ldr_tf.benchmark", "--worker", f"--model_dir={model_dir}",
               f"--worker_out={out}", f"--runs={FLAGS.runs}", f"--warmup={FLAGS.warmup}", f"--seed={FLAGS.seed}",
               f"--threads={FLAGS.threads}", f"--inter_threads={FLAGS.inter_threads}"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ValueError(f"{model_dir}: the measuring process ran over --worker_timeout={timeout:g} s") from None
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            raise ValueError(f"{model_dir}: measuring process failed (rc {proc.returncode}): {last}")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    """One model to benchmark: built from a config (``path`` None until exported) or an existing export."""

    model: str  # "teacher" | "student" | what an export's metadata says
    size: tuple
    cascades: int | None
    xla_warp: bool | None
    compute_dtype: str
    config: dict | None = None  # CascadeConfig dict (None: unknown for an existing export)
    path: Path | None = None
    source: str = "built"  # "built" | "export"

    @property
    def variant(self) -> str:
        xla = "?" if self.xla_warp is None else ("on" if self.xla_warp else "off")
        return f"xla={xla} {SHORT_DTYPE.get(self.compute_dtype, self.compute_dtype)}"

    def label(self) -> str:
        n = "?" if self.cascades is None else self.cascades
        return f"{'x'.join(map(str, self.size))} {self.model} x{n} {self.variant}"


def _cascade_config(kind: str, size: int, cascades: int, dtype: str) -> dict:
    from networks.cascade import CascadeConfig

    common = {"cascades": cascades, "image_size": (size,) * 3, "compute_dtype": dtype}
    if kind == "teacher":
        cfg = CascadeConfig(stem="vtn", affine="vtn", channels=FLAGS.teacher_channels, **common)
    else:
        extra = {"student_head": FLAGS.student_head} if FLAGS.student_head else {}
        cfg = CascadeConfig(stem=FLAGS.student_stem, affine=FLAGS.student_affine, **common, **extra)
    return cfg.to_dict()


def _built_cases() -> list:
    cases = []
    for bf16 in FLAGS.bfloat16:
        for xla in FLAGS.xla:
            for size in FLAGS.sizes:
                for n in FLAGS.cascades:
                    for kind in FLAGS.kinds:
                        dtype = DTYPES[bf16]
                        cfg = _cascade_config(kind, int(size), int(n), dtype)
                        cases.append(Case(kind, (int(size),) * 3, int(n), xla == "on", dtype, cfg))
    return cases


def _export_cases(dirs) -> list:
    from ldr_tf.deploy.savedmodel import load_metadata

    cases = []
    for d in dirs:
        meta = load_metadata(d)
        network = meta.get("network") or None
        if len(meta.get("image_size") or []) != 3:
            raise ValueError(f"{d}: export metadata without a 3D image_size (got {meta.get('image_size')})")
        cases.append(Case(
            model=str(meta.get("model") or Path(d).name),
            size=tuple(int(s) for s in meta["image_size"]),
            cascades=meta.get("cascades", (network or {}).get("cascades")),
            xla_warp=meta.get("xla_warp"),
            compute_dtype=(network or {}).get("compute_dtype", "float32"),
            config=network, path=Path(d), source="export",
        ))  # fmt: skip
    return cases


_COUNTS = {}  # (params, MACs) by network config without its compute dtype (neither depends on it)


def _build(config: dict, need_model: bool = True):
    """(model or None, params, MACs) of a config dict; the model is built with random weights (seed --seed).

    Counting the MACs traces the model once; the counts are cached across the XLA / bfloat16 variants.
    """
    import keras

    from networks.cascade import CascadeConfig, RecursiveCascade
    from networks.summary import count_macs, count_params

    cfg = CascadeConfig.from_dict(config)
    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "compute_dtype"}, sort_keys=True)
    if not need_model and key in _COUNTS:
        return None, *_COUNTS[key]
    keras.utils.set_random_seed(FLAGS.seed)
    model = RecursiveCascade(cfg, name="cascade")
    shape = (1, *cfg.image_size, 2)
    model.build(shape)  # the weights (export needs them even when the counts come from the cache)
    if key not in _COUNTS:
        _COUNTS[key] = (count_params(model, shape), count_macs(model, shape))
    return model, *_COUNTS[key]


def _reusable(case: Case) -> dict | None:
    """The metadata of an earlier export of exactly this case at ``case.path`` (--reuse_exports), else None."""
    meta = _export_meta(case.path)
    bench = meta.get("benchmark") or {}
    same = (json.dumps(meta.get("network"), sort_keys=True) == json.dumps(case.config, sort_keys=True)
            and meta.get("xla_warp") == case.xla_warp and bench.get("seed") == FLAGS.seed
            and bench.get("macs") is not None)  # fmt: skip
    return meta if same else None


def _prepare(case: Case, work_dir: Path) -> dict:
    """Exports a built case (or counts the FLOPs of an existing export); returns the row's static fields."""
    import keras

    from ldr_tf.ops import warp

    row = {"params": None, "macs": None, "export_s": None}
    if case.source == "export":
        row["params"] = _export_meta(case.path).get("parameters")
        if case.config:
            try:
                _, params, macs = _build(case.config, need_model=False)
                row.update(macs=macs)
                row["params"] = row["params"] if row["params"] is not None else params
            except ValueError as e:  # an export from another version of the network code
                row["note"] = f"FLOPs unknown: {str(e).splitlines()[0]}"
        keras.backend.clear_session()
        return row
    tag = f"{case.model}-c{case.cascades}-xla{'on' if case.xla_warp else 'off'}-{case.compute_dtype}"
    case.path = work_dir / f"{case.size[0]}" / tag
    if FLAGS.reuse_exports:
        meta = _reusable(case)
        if meta is not None:
            row.update(params=meta["parameters"], macs=meta["benchmark"]["macs"], reused_export=True)
            return row
    previous = warp.xla_warp_enabled()
    warp.set_xla_warp(case.xla_warp)  # read when the export traces the sampler
    try:
        model, params, macs = _build(case.config)
        t0 = time.perf_counter()
        from ldr_tf.deploy.savedmodel import export_model

        metadata = {"model": case.model, "cascades": case.cascades, "network": case.config, "parameters": params,
                    "benchmark": {"seed": FLAGS.seed, "macs": macs},
                    "note": f"random weights (seed {FLAGS.seed}), written by {PROG}"}  # fmt: skip
        export_model(model, case.path, metadata, overwrite=True)
        row.update(params=params, macs=macs, export_s=time.perf_counter() - t0)
    finally:
        warp.set_xla_warp(previous)
        keras.backend.clear_session()
    recorded = _export_meta(case.path).get("xla_warp")
    if recorded is not None and bool(recorded) != case.xla_warp:
        raise ValueError(f"{case.path}: exported with xla_warp={recorded}, expected {case.xla_warp}")
    return row


def _export_meta(path: Path) -> dict:
    from ldr_tf.deploy.savedmodel import load_metadata

    try:
        return load_metadata(path)
    except ValueError:
        return {}


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


def _target_lines(report: list) -> list:
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


# ---------------------------------------------------------------------------------------------------- main


def _check_flags() -> None:
    def listed(name, allowed):
        values = getattr(FLAGS, name)
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"--{name}: expected a comma-separated subset of {','.join(allowed)}, got "
                             f"{','.join(values) or 'nothing'}")  # fmt: skip

    listed("xla", ("on", "off"))
    listed("bfloat16", ("off", "on"))
    listed("kinds", KINDS)
    for name in ("sizes", "cascades"):
        values = getattr(FLAGS, name)
        if not values or not all(str(v).isdigit() and int(v) > 0 for v in values):
            raise ValueError(f"--{name}: expected comma-separated positive integers, got {','.join(values)}")
    if FLAGS.runs < 1:
        raise ValueError(f"--runs: expected >= 1 timed calls, got {FLAGS.runs}")
    if FLAGS.reuse_exports and not FLAGS.work_dir:
        raise ValueError("--reuse_exports: needs --work_dir (the exports of a temporary directory are removed)")
    if FLAGS.conv_peak_runs < 1:
        raise ValueError(f"--conv_peak_runs: expected >= 1, got {FLAGS.conv_peak_runs}")
    if FLAGS.warmup < 0:
        raise ValueError(f"--warmup: expected >= 0, got {FLAGS.warmup}")
    if "on" in FLAGS.bfloat16 and not FLAGS.models:
        from networks.cascade import CascadeConfig

        if "compute_dtype" not in {f.name for f in dataclasses.fields(CascadeConfig)}:
            raise ValueError("--bfloat16=on: bfloat16 convolutions are not supported by this CascadeConfig (no "
                             "compute_dtype field); use --bfloat16=off")  # fmt: skip


def run() -> dict:
    """Runs the benchmark described by FLAGS; prints progress and the table; returns the JSON payload."""
    _check_flags()
    cases = _export_cases(FLAGS.models) if FLAGS.models else _built_cases()  # bad configs fail here, early
    _apply_threads(FLAGS.threads, FLAGS.inter_threads)  # the conv peak below runs in this process
    machine = machine_info()
    runtime = tf_runtime_info()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{PROG}: {machine['cpu_model']}, {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), "
          f"ISA {machine['isa']}, AVX-512 BF16 {'yes' if machine['avx512_bf16'] else 'no'}, AMX-BF16 "
          f"{'yes' if machine['amx_bf16'] else 'no'}, {machine['memory_mb']} MB RAM, load average "
          f"{machine['loadavg']}", flush=True)  # fmt: skip
    print(f"TensorFlow {runtime['tensorflow']}: oneDNN {'on' if runtime['onednn_enabled'] else 'OFF'} "
          f"(TF_ENABLE_ONEDNN_OPTS={runtime['TF_ENABLE_ONEDNN_OPTS'] or 'unset'}); --threads={FLAGS.threads} "
          f"(intra-op {runtime['intra_op_threads']}, 0 = all {machine['cpus_usable']} cores), inter-op "
          f"{runtime['inter_op_threads']}; batch 1, {FLAGS.runs} timed calls after {1 + FLAGS.warmup} untimed",
          flush=True)  # fmt: skip
    if not runtime["onednn_enabled"]:
        print(f"warning: oneDNN is off: timings are not representative and no target is judged "
              f"({NOT_JUDGED})", flush=True)
    if "on" in FLAGS.bfloat16 and cpu.bfloat16_advice():
        print(f"warning: {cpu.bfloat16_advice()}", flush=True)

    dtypes = sorted({c.compute_dtype for c in cases} | {"float32"})
    peak = measure_conv_peak(dtypes, FLAGS.conv_peak_runs)
    _print_peak(peak, "at start")

    own_tmp = FLAGS.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="ldr-bench-")) if own_tmp else Path(FLAGS.work_dir)
    rows = []
    payload = {
        "tool": PROG, "started": started, "complete": False,
        "settings": {k: getattr(FLAGS, k) for k in ("sizes", "cascades", "kinds", "xla", "bfloat16", "runs",
                                                     "warmup", "threads", "inter_threads", "seed",
                                                     "teacher_channels", "student_stem", "student_affine",
                                                     "student_head", "models")},
        "machine": machine, "runtime": runtime,
        "conv_peak": {"start": peak, "end": None, "gflop_per_s": {k: v["gflop_per_s"] for k, v in peak.items()}},
        "rows": rows,
    }  # fmt: skip
    t_start = time.perf_counter()
    try:
        for i, case in enumerate(cases, 1):
            row = {"model": case.model, "name": case.path.name if case.source == "export" else None,
                   "size": list(case.size), "cascades": case.cascades,
                   "variant": case.variant, "xla_warp": case.xla_warp, "compute_dtype": case.compute_dtype,
                   "source": case.source, "config": case.config, "error": None}  # fmt: skip
            rows.append(row)
            print(f"[{i}/{len(cases)}] {case.label()}" + (f" ({case.path})" if case.path else ""), flush=True)
            try:
                row.update(_prepare(case, work_dir))
                row["path"] = str(case.path)
                row.update(_run_worker(case.path, FLAGS.worker_timeout))
            except ValueError as e:
                row["error"] = str(e).splitlines()[0]
                print(f"    FAILED: {row['error']}", flush=True)
                continue
            finally:
                if own_tmp and case.source == "built" and case.path is not None:
                    shutil.rmtree(case.path, ignore_errors=True)  # a 3-cascade teacher export is ~0.4 GB
                    row["path"] = None
            if not row["finite"]:
                row["error"] = "non-finite outputs"
            export = (f"export {row['export_s']:.1f} s, " if row.get("export_s") else
                      "reused export, " if row.get("reused_export") else "")  # fmt: skip
            print(f"    {export}load {row['load_s']:.2f} s, first call {row['first_call_s']:.2f} s, median "
                  f"{row['median_s']:.3f} s [{row['min_s']:.3f}-{row['max_s']:.3f}], peak {row['peak_rss_mb']:.0f}"
                  f" MB (calls +{row['call_peak_mb']:.0f}), load average {row['loadavg'][1]}", flush=True)  # fmt: skip
        # Measured again at the end; the floor uses the better of the two (the machine is shared: the peak is a
        # property of the machine, a busy moment only hides it).
        end = measure_conv_peak(dtypes, FLAGS.conv_peak_runs)
        _print_peak(end, "at end")
        best = payload["conv_peak"]["gflop_per_s"]
        for name in best:
            best[name] = max(best[name], end[name]["gflop_per_s"])
        payload["conv_peak"]["end"] = end
        payload["complete"] = True
    finally:
        add_derived(rows, payload["conv_peak"]["gflop_per_s"])
        payload["machine"]["loadavg_end"] = _loadavg()
        payload["wall_s"] = time.perf_counter() - t_start
        payload["targets"] = target_report(rows)
        payload["targets_judged"] = targets_judged(runtime, rows)
        if own_tmp:
            shutil.rmtree(work_dir, ignore_errors=True)
        if FLAGS.out:
            from ldr_tf.atomic import write_json

            write_json(payload, FLAGS.out)
    return payload


def _print_peak(peak: dict, when: str) -> None:
    for name, p in peak.items():
        cases = ", ".join(f"{c['size']}^3 {c['channels']}->{c['channels']}: {c['gflop_per_s']:.0f} "
                          f"(median {c['median_gflop_per_s']:.0f})" for c in p["cases"])  # fmt: skip
        print(f"conv peak {name} {when}: {p['gflop_per_s']:.0f} GFLOP/s (3^3 convs, fastest call: {cases})",
              flush=True)


def define_flags() -> None:
    """Defines the flags of ``python -m ldr_tf.benchmark`` (idempotent)."""
    if "sizes" in FLAGS:
        return
    flags.DEFINE_list("sizes", ["128", "64"], "Cubic grid sizes (multiples of 64: the VTN teacher's stride).")
    flags.DEFINE_list("cascades", ["1", "2", "3"], "Numbers of dense stems.")
    flags.DEFINE_list("kinds", list(KINDS), "Which models to build: teacher, student.")
    flags.DEFINE_list("xla", ["on"], "XLA-compiled trilinear sampler: on, off or on,off (compared side by side).")
    flags.DEFINE_list("bfloat16", ["off"], "bfloat16 convolutions (CascadeConfig.compute_dtype): off, on or off,on.")
    flags.DEFINE_integer("teacher_channels", 16, "Teacher VTN width c (16 = reference).")
    flags.DEFINE_string("student_stem", "ldr", "Student dense stem: ldr (paper) or ldr_released.")
    flags.DEFINE_string("student_affine", "lite", "Student affine stage: lite, vtn or none.")
    flags.DEFINE_string("student_head", None, "Student head: deconv or upsample (default: CascadeConfig's).")
    flags.DEFINE_list("models", [], "Existing export directories to benchmark instead of building models "
                      "(--sizes, --cascades, --kinds, --xla and --bfloat16 are then ignored: the exports fix them).")
    flags.DEFINE_integer("runs", 10, "Timed warm calls per model.")
    flags.DEFINE_integer("warmup", 1, "Untimed calls after the first call.")
    flags.DEFINE_integer("conv_peak_runs", 10, "Timed calls per convolution of the machine's peak measurement.")
    flags.DEFINE_integer("threads", 0, "Intra-op threads of the measuring processes (0 = all cores).")
    flags.DEFINE_integer("inter_threads", 0, "Inter-op threads (0 = TF default).")
    flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
    flags.DEFINE_string("work_dir", None, "Where the exports are written and kept (default: a temporary directory; "
                        "each export is removed once measured). The full matrix of 48 exports takes ~14 GB.")  # fmt: skip
    flags.DEFINE_bool("reuse_exports", False, "With --work_dir: reuse an export written there by an earlier run "
                      "for the same network, variant and seed instead of exporting again.")  # fmt: skip
    flags.DEFINE_string("out", None, "JSON file for all results (written atomically).")
    flags.DEFINE_float("worker_timeout", 600.0, "Seconds one measuring process may take.")
    flags.DEFINE_bool("worker", False, "Internal: measure --model_dir in this process.")
    flags.DEFINE_string("model_dir", None, "Internal (--worker): the export to measure.")
    flags.DEFINE_string("worker_out", None, "Internal (--worker): where to write the result JSON.")


def main(argv) -> int:
    from ldr_tf import cli

    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.worker:
        return _worker_main()
    from absl import logging

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TF's saver/signature INFO lines while exporting
    payload = run()
    print()
    print(f"Inference through the SavedModel 'register' signature, batch 1, one random pair; median of "
          f"{FLAGS.runs} warm calls. GFLOP: convolutions x2 MACs. floor: GFLOP / measured conv peak. "
          "peak MB: whole process; call MB: the calls above the loaded model. S/T time: student median / "
          "teacher median (< 1: student faster). load: 1-min load average after the row (2 cores).")  # fmt: skip
    print(format_table(payload["rows"]))
    lines = _target_lines(payload["targets"])
    if lines and not payload["targets_judged"]:
        print(f"Targets: not judged ({NOT_JUDGED})")
    elif lines:
        print("Targets:")
        print("\n".join(lines))
    print(f"load average at the end: {payload['machine']['loadavg_end']} ({payload['wall_s']:.0f} s)")
    if FLAGS.out:
        print(f"wrote {FLAGS.out}")
    return 0


if __name__ == "__main__":
    from ldr_tf import cli

    define_flags()
    cli.run(main, PROG)
