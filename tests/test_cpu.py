"""CPU facts and the oneDNN default: `ldr_tf.cpu`, the package's environment set-up, benchmark target judging."""

import os
import subprocess
import sys

import pytest

from ldr_tf import cpu
from ldr_tf.deploy import benchmark_report

PROBE = """
import os, sys
import ldr_tf
from ldr_tf.ops import warp
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port as p
labels = tf.constant([[[[1, 2], [3, 4]], [[5, 6], [7, 8]]]], tf.int32)
warp.set_xla_warp(False)  # the plain TF kernels, where oneDNN's int32 complaints came from
out = warp.warp_labels(labels, tf.fill([1, 2, 2, 2, 3], 0.3))
print("RESULT", os.environ.get("TF_ENABLE_ONEDNN_OPTS"), p.IsMklEnabled(), int(tf.reduce_sum(out)))
"""


def _probe(env_value):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if env_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = env_value
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return line.split()[1:], proc.stderr


def test_import_turns_onednn_on_and_respects_an_explicit_zero():
    (value, enabled, total), stderr = _probe(None)
    assert value == "1" and enabled == "True"
    assert int(total) > 0
    # the label sampler no longer runs int32 ops that oneDNN rejects with an error line
    assert "DT_INT32" not in stderr
    (value, enabled, _), _ = _probe("0")
    assert value == "0" and enabled == "False"


@pytest.mark.parametrize("flags, isa, bf16", [
    ({"sse4_2", "avx", "avx2", "fma"}, "avx2", False),
    ({"avx", "avx2", "avx512f", "avx512_bf16"}, "avx512", True),
    ({"avx", "avx2", "avx512f", "amx_bf16"}, "avx512", True),
    ({"avx", "avx2", "avx512f"}, "avx512", False),
    ({"sse4_2"}, "sse", False),
    (set(), "unknown", False),
])
def test_isa_level_and_native_bfloat16(flags, isa, bf16):
    assert cpu.isa_level(flags) == isa
    assert cpu.has_native_bfloat16(flags) is bf16
    advice = cpu.bfloat16_advice(flags)
    assert (advice is None) is bf16
    if advice:
        assert "float32" in advice


@pytest.mark.parametrize("env, cap", [
    ({}, None),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "avx2"),
    ({"DNNL_MAX_CPU_ISA": "avx512_core_bf16"}, "avx512"),
    ({"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_cpu_max_isa=AVX"}, "avx"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}, "sse"),  # the lowest cap counts
    ({"ONEDNN_MAX_CPU_ISA": "ALL"}, None),
])
def test_isa_cap_from_the_environment(env, cap):
    assert cpu.isa_cap(env) == cap


def test_an_isa_cap_is_reported_and_hides_native_bfloat16(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu.has_native_bfloat16({"avx", "avx2", "avx512f", "avx512_bf16"})
    m = cpu.machine_info()
    if cpu.isa_level() == "avx512":
        assert m["isa"] == "avx2 (capped from avx512: emulated)" and m["isa_cap"] == "avx2"
    else:
        assert m["isa_cap"] is None or m["isa_cap"] == "avx2"


def test_machine_info_and_describe_name_the_isa_and_onednn():
    m = cpu.machine_info()
    assert m["isa"] in ("avx512", "avx2", "avx", "sse", "unknown")
    assert m["native_bfloat16"] == (m["avx512_bf16"] or m["amx_bf16"])
    line = cpu.describe(m, onednn=True)
    assert f"ISA {m['isa']}" in line and "oneDNN on" in line
    assert "oneDNN off" in cpu.describe(m, onednn=False)


def test_benchmark_judges_targets_only_with_onednn_on_everywhere():
    on, off = {"onednn_enabled": True}, {"onednn_enabled": False}
    assert benchmark_report.targets_judged(on, [{"runtime": on}, {"runtime": on}, {"error": "x"}])
    assert not benchmark_report.targets_judged(off, [{"runtime": on}])
    assert not benchmark_report.targets_judged(on, [{"runtime": on}, {"runtime": off}])
    assert not benchmark_report.targets_judged({"onednn_enabled": None}, [])
