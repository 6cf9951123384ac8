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
import shutil
import tempfile
import time
from pathlib import Path

from absl import flags

from ldr_tf import cpu
from ldr_tf.training.config import DEFAULT_STUDENT_STEM
from ldr_tf.deploy.benchmark_report import (NOT_JUDGED, SHORT_DTYPE, add_derived, format_table, target_lines,
                                            target_report, targets_judged)
from ldr_tf.deploy.timing import apply_threads, measure_conv_peak, run_worker, tf_runtime_info, worker_main

FLAGS = flags.FLAGS
PROG = "ldr_tf.benchmark"
KINDS = ("teacher", "student")
DTYPES = {"off": "float32", "on": "bfloat16"}

__all__ = ["Case", "Settings", "run", "add_derived", "format_table", "target_report", "targets_judged"]


@dataclasses.dataclass
class Settings:
    """What to benchmark and how: the flags of ``python -m ldr_tf.benchmark`` (defaults and help in `define_flags`),
    read in `main`."""

    sizes: list
    cascades: list
    kinds: list
    xla: list
    bfloat16: list
    teacher_channels: int
    student_stem: str
    student_affine: str
    student_head: str | None
    models: list
    runs: int
    warmup: int
    conv_peak_runs: int
    threads: int
    inter_threads: int
    seed: int
    work_dir: str | None
    reuse_exports: bool
    out: str | None
    worker_timeout: float


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


def _cascade_config(s, kind: str, size: int, cascades: int, dtype: str) -> dict:
    from networks.cascade import CascadeConfig

    common = {"cascades": cascades, "image_size": (size,) * 3, "compute_dtype": dtype}
    if kind == "teacher":
        cfg = CascadeConfig(stem="vtn", affine="vtn", channels=s.teacher_channels, **common)
    else:
        extra = {"student_head": s.student_head} if s.student_head else {}
        cfg = CascadeConfig(stem=s.student_stem, affine=s.student_affine, **common, **extra)
    return cfg.to_dict()


def _built_cases(s) -> list:
    cases = []
    for bf16 in s.bfloat16:
        for xla in s.xla:
            for size in s.sizes:
                for n in s.cascades:
                    for kind in s.kinds:
                        dtype = DTYPES[bf16]
                        cfg = _cascade_config(s, kind, int(size), int(n), dtype)
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


def _build(config: dict, need_model: bool = True, seed: int = 0):
    """(model or None, params, MACs) of a config dict; the model is built with random weights (`seed`).

    Counting the MACs traces the model once; the counts are cached across the XLA / bfloat16 variants.
    """
    import keras

    from networks.cascade import CascadeConfig, RecursiveCascade
    from networks.summary import count_macs, count_params

    cfg = CascadeConfig.from_dict(config)
    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "compute_dtype"}, sort_keys=True)
    if not need_model and key in _COUNTS:
        return None, *_COUNTS[key]
    keras.utils.set_random_seed(seed)
    model = RecursiveCascade(cfg, name="cascade")
    shape = (1, *cfg.image_size, 2)
    model.build(shape)  # the weights (export needs them even when the counts come from the cache)
    if key not in _COUNTS:
        _COUNTS[key] = (count_params(model, shape), count_macs(model, shape))
    return model, *_COUNTS[key]


def _reusable(case: Case, seed: int) -> dict | None:
    """The metadata of an earlier export of exactly this case at ``case.path`` (--reuse_exports), else None."""
    meta = _export_meta(case.path)
    bench = meta.get("benchmark") or {}
    same = (json.dumps(meta.get("network"), sort_keys=True) == json.dumps(case.config, sort_keys=True)
            and meta.get("xla_warp") == case.xla_warp and bench.get("seed") == seed
            and bench.get("macs") is not None)  # fmt: skip
    return meta if same else None


def _prepare(s, case: Case, work_dir: Path) -> dict:
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
    if s.reuse_exports:
        meta = _reusable(case, s.seed)
        if meta is not None:
            row.update(params=meta["parameters"], macs=meta["benchmark"]["macs"], reused_export=True)
            return row
    previous = warp.xla_warp_enabled()
    warp.set_xla_warp(case.xla_warp)  # read when the export traces the sampler
    try:
        model, params, macs = _build(case.config, seed=s.seed)
        t0 = time.perf_counter()
        from ldr_tf.deploy.savedmodel import export_model

        metadata = {"model": case.model, "cascades": case.cascades, "network": case.config, "parameters": params,
                    "benchmark": {"seed": s.seed, "macs": macs},
                    "note": f"random weights (seed {s.seed}), written by {PROG}"}  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------- main


def _check_settings(s) -> None:
    def listed(name, allowed):
        values = getattr(s, name)
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"--{name}: expected a comma-separated subset of {','.join(allowed)}, got "
                             f"{','.join(values) or 'nothing'}")  # fmt: skip

    listed("xla", ("on", "off"))
    listed("bfloat16", ("off", "on"))
    listed("kinds", KINDS)
    for name in ("sizes", "cascades"):
        values = getattr(s, name)
        if not values or not all(str(v).isdigit() and int(v) > 0 for v in values):
            raise ValueError(f"--{name}: expected comma-separated positive integers, got {','.join(values)}")
    if s.runs < 1:
        raise ValueError(f"--runs: expected >= 1 timed calls, got {s.runs}")
    if s.reuse_exports and not s.work_dir:
        raise ValueError("--reuse_exports: needs --work_dir (the exports of a temporary directory are removed)")
    if s.conv_peak_runs < 1:
        raise ValueError(f"--conv_peak_runs: expected >= 1, got {s.conv_peak_runs}")
    if s.warmup < 0:
        raise ValueError(f"--warmup: expected >= 0, got {s.warmup}")
    if "on" in s.bfloat16 and not s.models:
        from networks.cascade import CascadeConfig

        if "compute_dtype" not in {f.name for f in dataclasses.fields(CascadeConfig)}:
            raise ValueError("--bfloat16=on: bfloat16 convolutions are not supported by this CascadeConfig (no "
                             "compute_dtype field); use --bfloat16=off")  # fmt: skip


def run(s: Settings) -> dict:
    """Runs the benchmark described by `s`; prints progress; returns the JSON payload."""
    _check_settings(s)
    cases = _export_cases(s.models) if s.models else _built_cases(s)  # bad configs fail here, early
    apply_threads(s.threads, s.inter_threads)  # the conv peak below runs in this process
    machine = cpu.machine_info()
    runtime = tf_runtime_info()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{PROG}: {machine['cpu_model']}, {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), "
          f"ISA {machine['isa']}, AVX-512 BF16 {'yes' if machine['avx512_bf16'] else 'no'}, AMX-BF16 "
          f"{'yes' if machine['amx_bf16'] else 'no'} (native bfloat16 "
          f"{'yes' if machine['native_bfloat16'] else 'no'}), {machine['memory_mb']} MB RAM, load average "
          f"{machine['loadavg']}", flush=True)  # fmt: skip
    print(f"TensorFlow {runtime['tensorflow']}: oneDNN {'on' if runtime['onednn_enabled'] else 'OFF'} "
          f"(TF_ENABLE_ONEDNN_OPTS={runtime['TF_ENABLE_ONEDNN_OPTS'] or 'unset'}); --threads={s.threads} "
          f"(intra-op {runtime['intra_op_threads']}, 0 = all {machine['cpus_usable']} cores), inter-op "
          f"{runtime['inter_op_threads']}; batch 1, {s.runs} timed calls after {1 + s.warmup} untimed",
          flush=True)  # fmt: skip
    if not runtime["onednn_enabled"]:
        print(f"warning: oneDNN is off: timings are not representative and no target is judged "
              f"({NOT_JUDGED})", flush=True)
    if "on" in s.bfloat16 and cpu.bfloat16_advice():
        print(f"warning: {cpu.bfloat16_advice()}", flush=True)

    dtypes = sorted({c.compute_dtype for c in cases} | {"float32"})
    peak = measure_conv_peak(dtypes, s.conv_peak_runs)
    _print_peak(peak, "at start")

    own_tmp = s.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="ldr-bench-")) if own_tmp else Path(s.work_dir)
    rows = []
    payload = {
        "tool": PROG, "started": started, "complete": False,
        "settings": {k: getattr(s, k) for k in ("sizes", "cascades", "kinds", "xla", "bfloat16", "runs",
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
                row.update(_prepare(s, case, work_dir))
                row["path"] = str(case.path)
                row.update(run_worker(case.path, s.worker_timeout, s.runs, s.warmup, s.seed, s.threads, s.inter_threads))
            except ValueError as e:
                row["error"] = str(e).splitlines()[0]
                print(f"    FAILED: {row['error']}", flush=True)
                continue
            finally:
                if own_tmp and case.source == "built" and case.path is not None:
                    shutil.rmtree(case.path, ignore_errors=True)  # a 3-cascade teacher export is ~0.2 GB
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
        end = measure_conv_peak(dtypes, s.conv_peak_runs)
        _print_peak(end, "at end")
        best = payload["conv_peak"]["gflop_per_s"]
        for name in best:
            best[name] = max(best[name], end[name]["gflop_per_s"])
        payload["conv_peak"]["end"] = end
        payload["complete"] = True
    finally:
        add_derived(rows, payload["conv_peak"]["gflop_per_s"])
        payload["machine"]["loadavg_end"] = cpu.loadavg()
        payload["wall_s"] = time.perf_counter() - t_start
        payload["targets"] = target_report(rows)
        payload["targets_judged"] = targets_judged(runtime, rows)
        if own_tmp:
            shutil.rmtree(work_dir, ignore_errors=True)
        if s.out:
            from ldr_tf.atomic import write_json

            write_json(payload, s.out)
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
    flags.DEFINE_string("student_stem", DEFAULT_STUDENT_STEM, "Student dense stem: ldr_half (the light student, default), ldr (the "
                        "paper's) or ldr_released.")
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
                        "each export is removed once measured). The full matrix of 48 exports takes ~7 GB.")  # fmt: skip
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
        return worker_main(FLAGS.model_dir, FLAGS.worker_out, FLAGS.runs, FLAGS.warmup, FLAGS.seed, FLAGS.threads,
                           FLAGS.inter_threads)
    from absl import logging

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TF's saver/signature INFO lines while exporting
    payload = run(Settings(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Settings)}))
    print()
    print(f"Inference through the SavedModel 'register' signature, batch 1, one random pair; median of "
          f"{FLAGS.runs} warm calls. GFLOP: convolutions x2 MACs. floor: GFLOP / measured conv peak. "
          "peak MB: whole process; call MB: the calls above the loaded model. S/T time: student median / "
          "teacher median (< 1: student faster). load: 1-min load average after the row (2 cores).")  # fmt: skip
    print(format_table(payload["rows"]))
    lines = target_lines(payload["targets"])
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
