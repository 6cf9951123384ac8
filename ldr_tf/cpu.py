"""What this CPU can do, and what TensorFlow made of it: ISA level, native bfloat16, oneDNN state.

Speed on a CPU depends on three facts that differ from machine to machine, so every timing this project prints
comes with them (`describe`):

* the SIMD level (``avx512`` / ``avx2`` / ``avx`` / ``sse``) of the CPU;
* whether it computes bfloat16 natively (AVX-512 BF16 or AMX-BF16). Without it, bfloat16 convolutions are emulated
  and were measured about 11x slower than float32 on an AVX2 CPU: `bfloat16_advice` says whether to use them;
* whether TensorFlow's oneDNN kernels are on in this process (``import ldr_tf`` turns them on, see the package
  docstring).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["machine_info", "isa_level", "has_native_bfloat16", "onednn_enabled", "describe", "bfloat16_advice"]

MB = 1e6


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where it is not readable, e.g. not Linux)."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# ISA levels from lowest to highest, each with the CPU flag (and the cap-value prefixes) that mean it.
ISA_LEVELS = (("unknown", None, ()), ("sse", "sse4_2", ("sse",)), ("avx", "avx", ("avx",)),
              ("avx2", "avx2", ("avx2",)), ("avx512", "avx512f", ("avx512", "avx10", "amx")))
_RANK = {name: i for i, (name, _, _) in enumerate(ISA_LEVELS)}


def isa_level(flags: set | None = None) -> str:
    """``avx512``, ``avx2``, ``avx``, ``sse`` or ``unknown`` (no flags readable)."""
    flags = cpu_flags() if flags is None else flags
    return next((name for name, needed, _ in reversed(ISA_LEVELS) if needed in flags), "unknown")


def has_native_bfloat16(flags: set | None = None) -> bool:
    """True when the CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX-BF16) and no ISA cap hides it."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags) and isa_cap() in (None, "avx512")


def isa_cap(env=None) -> str | None:
    """The ISA level the kernels are capped to by the environment (``avx2``, ``avx``, ``sse``), or None.

    ``ONEDNN_MAX_CPU_ISA=AVX2`` (or ``DNNL_MAX_CPU_ISA``) makes oneDNN use its AVX2 kernels and
    ``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` makes XLA emit AVX2 code: on an AVX-512 machine the two together emulate
    the instruction set of an AVX2-only CPU (not its caches, clocks or memory), which is how the benchmark's "AVX2
    (emulated)" figures were measured. The lowest cap of the two counts.
    """
    env = os.environ if env is None else env
    values = [env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or ""]
    values += [part.split("=", 1)[1] for part in (env.get("XLA_FLAGS") or "").split()
               if part.startswith("--xla_cpu_max_isa=")]
    levels = [lv for lv in (_cap_level(v.strip().lower()) for v in values) if lv]
    return min(levels, key=_RANK.get) if levels else None


def _cap_level(value: str) -> str | None:
    """The ISA level a cap value names (its longest matching prefix: avx2 before avx), or None."""
    matches = [(len(p), name) for name, _, prefixes in ISA_LEVELS for p in prefixes if value.startswith(p)]
    return max(matches)[1] if matches else None


def loadavg() -> list | None:
    parts = _read("/proc/loadavg").split()
    return [float(p) for p in parts[:3]] if len(parts) >= 3 else None


def machine_info() -> dict:
    """CPU model, core counts, ISA level and the SIMD flags relevant to the convolutions, memory, load average."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "unknown")
    flags = cpu_flags()
    mem = next((int(line.split()[1]) * 1024 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), None)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    isa, cap = isa_level(flags), isa_cap()
    capped = cap is not None and _RANK[cap] < _RANK[isa]
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "isa": f"{cap} (capped from {isa}: emulated)" if capped else isa,
        "isa_cap": cap if capped else None,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "native_bfloat16": has_native_bfloat16(flags),
        "memory_mb": round(mem / MB) if mem else None,
        "loadavg": loadavg(),
    }


def onednn_enabled() -> bool | None:
    """Whether TensorFlow's oneDNN kernels are on in this process (imports TensorFlow); None if unknown."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # noqa: PLC0415
    except ImportError:
        return None
    try:
        return bool(_pywrap_util_port.IsMklEnabled())
    except AttributeError:
        return None


def describe(machine: dict | None = None, onednn: bool | None = None) -> str:
    """One line for logs and reports: ``AMD EPYC, 2 CPUs, ISA avx512, native bf16 yes, oneDNN on``."""
    m = machine or machine_info()
    state = onednn if onednn is not None else onednn_enabled()
    one = "unknown" if state is None else ("on" if state else "off")
    return (f"{m['cpu_model']}, {m['cpus_usable']} CPUs, ISA {m['isa']}, native bf16 "
            f"{'yes' if m['native_bfloat16'] else 'no'}, oneDNN {one} "
            f"(TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS') or 'unset'})")


def bfloat16_advice(flags: set | None = None) -> str | None:
    """None when bfloat16 convolutions are worth using here, else one line saying why not."""
    if has_native_bfloat16(flags):
        return None
    return ("this CPU has no native bfloat16 (AVX-512 BF16 or AMX): bfloat16 convolutions are emulated and were "
            "measured about 11x slower than float32 on such a CPU; use float32")


if __name__ == "__main__":  # python -m ldr_tf.cpu
    print(describe())
