"""Measuring an exported model on this CPU (`ldr_tf.benchmark`): load, first and warm calls, memory high-water marks
in a fresh process, and the machine's practical 3^3-convolution peak (the FLOP floor)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ldr_tf import cpu

# Convolutions timed to estimate the machine's practical peak: (grid size, channels in = out), 3^3 kernels.
PEAK_CONVS = ((64, 32), (32, 64))
MB = 1e6  # memory figures are in MB = 10^6 bytes

# ------------------------------------------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


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


def apply_threads(threads: int, inter_threads: int) -> None:
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


def worker_main(model_dir: str, out: str, runs: int, warmup: int, seed: int, threads: int, inter_threads: int) -> int:
    """Measures one export in this (fresh) process (`measure_export`) and writes the JSON result to `out`."""
    import_t0 = time.perf_counter()
    import tensorflow as tf  # noqa: F401

    import_s = time.perf_counter() - import_t0
    apply_threads(threads, inter_threads)
    loadavg = cpu.loadavg()
    res = measure_export(model_dir, runs=runs, warmup=warmup, seed=seed)
    res.update({"import_s": import_s, "runtime": tf_runtime_info(), "loadavg": [loadavg, cpu.loadavg()]})
    from ldr_tf.atomic import write_json

    write_json(res, out)
    return 0


def run_worker(model_dir: Path, timeout: float, runs: int, warmup: int, seed: int, threads: int,
               inter_threads: int) -> dict:
    """Runs `worker_main` on `model_dir` in a fresh interpreter (``python -m ldr_tf.benchmark --worker``); ValueError
    with its last error line on failure."""
    with tempfile.TemporaryDirectory(prefix="ldr-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "ldr_tf.benchmark", "--worker", f"--model_dir={model_dir}",
               f"--worker_out={out}", f"--runs={runs}", f"--warmup={warmup}", f"--seed={seed}",
               f"--threads={threads}", f"--inter_threads={inter_threads}"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ValueError(f"{model_dir}: the measuring process ran over --worker_timeout={timeout:g} s") from None
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            raise ValueError(f"{model_dir}: measuring process failed (rc {proc.returncode}): {last}")
        return json.loads(out.read_text())
