"""Parameter counts, conv MACs and (optionally) CPU forward times of every network.

    python -m networks.summary --size=128                 # counts only, < 1 min (models built symbolically)
    python -m networks.summary --size=128 --time          # + warm forward times (batch 1, tf.function)

Cascades are timed as at inference: the traced function returns only ``agg_flow`` and ``warped`` (the
training-only outputs, the stems' own flows, are pruned).

`count_macs` and `time_forward` are reusable (the benchmark imports them).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import ldr_tf  # noqa: F401  (sets KERAS_BACKEND)
import keras
import numpy as np
import tensorflow as tf

from networks.affine import AffineLiteStem, AffineStem
from networks.cascade import CascadeConfig, RecursiveCascade
from networks.critic import Critic
from networks.ldr import LDR, LDRReleased
from networks.vtn import VTN

__all__ = ["count_macs", "count_params", "time_forward", "model_table", "main", "define_flags"]


def _full_shape(input_shape) -> tuple:
    shape = tuple(int(s) if s is not None else 1 for s in input_shape)
    if len(shape) != 5:
        raise ValueError(f"input_shape: expected (B, D, H, W, C), got {tuple(input_shape)}")
    return shape


def _ensure_built(model, shape) -> None:
    if not model.built:
        model.build(shape)


def count_params(model, input_shape) -> int:
    """Number of weights of `model` built for `input_shape` ``(B, D, H, W, C)`` (built symbolically if needed)."""
    shape = _full_shape(input_shape)
    _ensure_built(model, shape)
    return int(model.count_params())


def count_macs(model, input_shape) -> int:
    """Multiply-accumulates of the convolutions and transposed convolutions of one forward pass.

    The model is traced once (no computation runs) with a fully known `input_shape` ``(B, D, H, W, C)``
    (a None batch counts as 1), and every ``Conv3D`` op contributes ``prod(output[:4]) * prod(kernel)`` and
    every ``Conv3DBackpropInputV2`` (transposed conv) ``prod(input[:4]) * prod(kernel)``, i.e. the dense MAC
    count from the layer shapes. Warps, element-wise ops and the small affine matmuls are not counted.

    Args:
      model: a callable Keras model taking one ``[B, D, H, W, C]`` tensor.
      input_shape: its input shape.

    Returns:
      MACs for the whole batch (divide by B for one sample).
    """
    shape = _full_shape(input_shape)
    _ensure_built(model, shape)
    fn = tf.function(lambda x: model(x, training=False), autograph=False)
    graph = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    total = 0
    for op in graph.get_operations():
        if op.type == "Conv3D":
            kernel = op.inputs[1].shape.as_list()
            out = op.outputs[0].shape.as_list()
            total += int(np.prod(out[:4])) * int(np.prod(kernel))
        elif op.type == "Conv3DBackpropInputV2":
            kernel = op.inputs[1].shape.as_list()
            inp = op.inputs[2].shape.as_list()  # the transposed conv's input (out_backprop)
            total += int(np.prod(inp[:4])) * int(np.prod(kernel))
    return total


def time_forward(
    model, input_shape, runs: int = 5, warmup: int = 1, seed: int = 0, outputs=None
) -> dict:
    """Warm forward time of `model` inside one `tf.function` on random inputs in [0, 1].

    Args:
      model: a Keras model taking one ``[B, D, H, W, C]`` tensor.
      input_shape: fully known ``(B, D, H, W, C)``.
      runs: timed runs after `warmup` untimed ones (the first untimed run includes the trace).
      seed: seed of the random input.
      outputs: for a model returning a dict, the keys to return from the traced function (e.g.
        ``("agg_flow", "warped")`` for inference); TF prunes whatever they do not need (such as the
        training losses). None returns everything.

    Returns:
      dict with ``median``, ``min``, ``max`` seconds and the list ``times``; ``first`` = trace + first run.
    """
    shape = _full_shape(input_shape)
    _ensure_built(model, shape)
    x = tf.constant(np.random.default_rng(seed).random(shape, dtype=np.float32))
    def forward(t):
        out = model(t, training=False)
        return {k: out[k] for k in outputs} if outputs is not None else out

    fn = tf.function(forward, autograph=False)

    def run():
        out = fn(x)
        # Fetch one value of every output so that the whole graph has finished.
        for t in tf.nest.flatten(out):
            t.numpy()

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "times": times,
            "first": first}  # fmt: skip


def model_table(size: int, channels: int = 16, cascades: int = 3) -> list:
    """(row name, model factory, input shape, timed by default) for every network at a cubic `size`.

    Rows: the stems, the critic, then whole cascades with 1..`cascades` dense stems: the teacher
    (VTN affine + n VTN), the paper student with each head and with affine ``none`` / ``lite``, and the
    released student with the lite affine stem (its brain configuration).
    """
    pair = (1, size, size, size, 2)
    rows = [
        ("affine stem (VTN)", lambda: AffineStem(channels=channels), pair, False),
        (f"VTN dense stem (c={channels})", lambda: VTN(channels=channels), pair, True),
        ("released student stem (LDRReleased)", lambda: LDRReleased(), pair, True),
        ("paper student stem, head=deconv", lambda: LDR(head="deconv"), pair, True),
        ("paper student stem, head=upsample", lambda: LDR(head="upsample"), pair, True),
        ("lite affine stem (LDRUtilStem)", lambda: AffineLiteStem(), pair, False),
        ("critic (sigmoid)", lambda: Critic(), (1, size, size, size, 3), False),
    ]

    def cascade(**kw):
        return lambda: RecursiveCascade(CascadeConfig(image_size=(size,) * 3, channels=channels, **kw))

    for n in range(1, cascades + 1):
        timed = n == cascades
        rows.append((f"teacher: VTN affine + {n} VTN", cascade(stem="vtn", affine="vtn", cascades=n), pair, timed))
        for affine in ("none", "lite"):
            for head in ("deconv", "upsample"):
                rows.append((
                    f"student: affine {affine} + {n} LDR ({head})",
                    cascade(stem="ldr", affine=affine, cascades=n, student_head=head), pair, timed,
                ))  # fmt: skip
        rows.append((
            f"light student: lite + {n} LDR at half resolution (ldr_half)",
            cascade(stem="ldr_half", affine="lite", cascades=n), pair, timed,
        ))  # fmt: skip
        rows.append((
            f"released student: lite + {n} LDRReleased",
            cascade(stem="ldr_released", affine="lite", cascades=n), pair, False,
        ))  # fmt: skip
    return rows


def define_flags() -> None:
    """Defines the flags of ``python -m networks.summary``."""
    from absl import flags

    flags.DEFINE_integer("size", 128, "Cubic input size (a multiple of 64).")
    flags.DEFINE_integer("channels", 16, "VTN width c (16 = reference).")
    flags.DEFINE_integer("cascades", 3, "Whole cascades are listed for 1..cascades dense stems.")
    flags.DEFINE_boolean("time", False, "Also measure warm forward times (batch 1, tf.function) of the "
                         "stems and of the cascades with --cascades stems.")  # fmt: skip
    flags.DEFINE_integer("runs", 5, "Timed runs per model (median reported).")
    flags.DEFINE_string("out", None, "Optional JSON file for the table (written atomically).")


def _write_json(path: str, payload) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".summary-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv) -> None:
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    if FLAGS.size < 64 or FLAGS.size % 64:
        raise ValueError(f"--size: expected a multiple of 64 (every network here accepts it), got {FLAGS.size}")
    keras.utils.set_random_seed(0)
    rows = model_table(FLAGS.size, FLAGS.channels, FLAGS.cascades)
    results = []
    header = f"{'network':48s} {'params':>13s} {'GMACs':>8s}" + (f" {'forward s':>16s}" if FLAGS.time else "")
    print(f"Networks at {FLAGS.size}^3, batch 1 (GMACs: conv + transposed conv MACs per forward)")
    print(header, flush=True)
    for name, factory, shape, timed in rows:
        model = factory()
        row = {"network": name, "input_shape": list(shape), "params": count_params(model, shape),
               "gmacs": count_macs(model, shape) / 1e9}  # fmt: skip
        line = f"{name:48s} {row['params']:>13,d} {row['gmacs']:>8.2f}"
        if FLAGS.time and timed:
            keys = ("agg_flow", "warped") if isinstance(model, RecursiveCascade) else None
            t = time_forward(model, shape, runs=FLAGS.runs, outputs=keys)
            row["forward_s"] = t
            line += f" {t['median']:>7.3f} [{t['min']:.3f}-{t['max']:.3f}]"
        results.append(row)
        print(line, flush=True)
        del model
        keras.backend.clear_session()
    if FLAGS.out:
        _write_json(FLAGS.out, {"size": FLAGS.size, "channels": FLAGS.channels, "rows": results})


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
