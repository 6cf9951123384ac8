"""``python -m ldr_tf.export``: a trained run -> one SavedModel with named serving signatures.

The whole cascade (affine stage, N dense stems, composition and the final warp) is inside the graph; no Python runs
at serve time. Signatures (batch dynamic, spatial size = the training grid, float32 images in [0, 1]):

* ``register(fixed, moving) -> {"flow", "warped"}`` (also ``serving_default``):
  ``fixed``/``moving`` ``[B, D, H, W, 1]`` float32; ``flow`` ``[B, D, H, W, 3]`` in voxels of the grid
  (``ldr_tf.ops.warp`` convention); ``warped`` the moving image warped onto the fixed one.
* ``register_labels(fixed, moving, moving_labels) -> {"flow", "warped", "warped_labels"}``: ``moving_labels``
  ``[B, D, H, W, 1]`` int32, warped without mixing labels (``ldr_tf.ops.warp.warp_labels``).

Next to ``saved_model.pb`` the export writes ``ldr_tf_export.json``: grid size, model kind, cascades, parameter
count, training data, the preprocessing that `ldr_tf.predict` must apply to new images, and ``xla_warp``.

XLA: by default (``--xla_warp``, `ldr_tf.ops.warp.xla_warp_enabled`) the trilinear sampler inside the graph is an
XLA-compiled function (2-8x faster on CPU). TensorFlow (``tf.saved_model.load``, ``saved_model_cli run``) runs it
as it is, but TensorFlow Serving disables XLA:CPU JIT by default: serve such an export with
``tensorflow_model_server --xla_cpu_compilation_enabled=true`` (experimental flag, tensorflow/serving#1858), or
export with ``--noxla_warp`` for a graph without XLA ops (the safe choice for GPU serving images, where XLA ops
have failed to find a compiler, tensorflow/serving#2214). The metadata records the choice.

Example::

    python -m ldr_tf.export --checkpoint=runs/student --out=exports/student            # XLA sampler
    python -m ldr_tf.export --checkpoint=runs/student --out=exports/student-noxla --noxla_warp
    python -m ldr_tf.export --saved_model=exports/old --out=exports/new   # an export again, in the current format

``--saved_model`` re-exports an existing export (its weights matched by variable path onto the network its metadata
describes): the current format, or other ``--xla_warp`` / ``--bfloat16`` choices, without the training run.
"""

from __future__ import annotations

import sys

from absl import flags, logging

from flags import common_flags
from ldr_tf import cli
from ldr_tf.deploy.savedmodel import SIGNATURES, export_run, load_metadata, reexport

FLAGS = flags.FLAGS


def define_flags() -> None:
    if "checkpoint" in FLAGS:
        return
    common_flags.define_runtime_flags()
    flags.DEFINE_string("checkpoint", None, "Training run directory (its latest checkpoint is exported).")
    flags.DEFINE_string("saved_model", None, "Instead of --checkpoint: an existing export, written again in the "
                                             "current format (weights and metadata kept).")
    flags.DEFINE_integer("step", None, "Export this step's checkpoint instead of the latest.")
    flags.DEFINE_string("out", None, "Output SavedModel directory (must not exist unless --overwrite).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing export at --out (only after the new one is complete).")
    flags.DEFINE_bool("bfloat16", False, "Run the convolutions in bfloat16 (float32 weights, flows and warps): "
                                         "faster on CPUs with AVX-512 BF16 (README, Benchmark).")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.checkpoint) == bool(FLAGS.saved_model) or not FLAGS.out:
        raise cli.UsageError("--out and one of --checkpoint (a training run directory) or --saved_model (an export) "
                             "are required")
    if FLAGS.saved_model and FLAGS.step is not None:
        raise cli.UsageError("--step chooses a checkpoint of --checkpoint; an export has one step")
    common_flags.apply_runtime_flags(FLAGS)
    if FLAGS.bfloat16:
        from ldr_tf import cpu

        if cpu.bfloat16_advice():
            print(f"ldr_tf.export: warning: {cpu.bfloat16_advice()}. The export is written as asked (it may run on "
                  "another machine); predict warns when it loads it on a CPU like this one.", file=sys.stderr,
                  flush=True)
    if FLAGS.saved_model:
        out = reexport(FLAGS.saved_model, FLAGS.out, FLAGS.overwrite, xla_warp=FLAGS.xla_warp, bfloat16=FLAGS.bfloat16)
    else:
        out = export_run(FLAGS.checkpoint, FLAGS.out, FLAGS.step, FLAGS.overwrite, xla_warp=FLAGS.xla_warp,
                         bfloat16=FLAGS.bfloat16)
    meta = load_metadata(out)
    logging.info("exported %s", out)
    xla = "on (TF Serving: --xla_cpu_compilation_enabled=true)" if meta["xla_warp"] else "off"
    print(f"exported {meta['model']} ({meta['cascades']} cascades, {meta['parameters']:,} parameters, grid "
          f"{'x'.join(map(str, meta['image_size']))}, step {meta['trained_steps']}) to {out}; signatures: "
          f"{', '.join(SIGNATURES)}; XLA sampler {xla}", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.export")
