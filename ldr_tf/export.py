"""``python -m ldr_tf.export``: a trained run -> one SavedModel with named serving signatures.

The whole cascade (affine stage, N dense stems, composition and the final warp) is inside the graph; no Python runs
at serve time. Signatures (batch dynamic, spatial size = the training grid, float32 images in [0, 1]):

* ``register(fixed, moving) -> {"flow", "warped"}`` (also ``serving_default``):
  ``fixed``/``moving`` ``[B, D, H, W, 1]`` float32; ``flow`` ``[B, D, H, W, 3]`` in voxels of the grid
  (``ldr_tf.warp`` convention); ``warped`` the moving image warped onto the fixed one.
* ``register_labels(fixed, moving, moving_labels) -> {"flow", "warped", "warped_labels"}``: ``moving_labels``
  ``[B, D, H, W, 1]`` int32, warped without mixing labels (``ldr_tf.warp.warp_labels``).

Next to ``saved_model.pb`` the export writes ``ldr_tf_export.json``: grid size, model kind, cascades, parameter
count, training data and the preprocessing that `ldr_tf.predict` must apply to new images.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path

from absl import flags, logging

from flags import common_flags
from ldr_tf import __version__, cli
from ldr_tf.config import save_json_atomic

FLAGS = flags.FLAGS
METADATA = "ldr_tf_export.json"
SIGNATURES = ("register", "register_labels")


def define_flags() -> None:
    if "checkpoint" in FLAGS:
        return
    common_flags.define_runtime_flags()
    flags.DEFINE_string("checkpoint", None, "Training run directory (its latest checkpoint is exported).")
    flags.DEFINE_integer("step", None, "Export this step's checkpoint instead of the latest.")
    flags.DEFINE_string("out", None, "Output SavedModel directory (must not exist unless --overwrite).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing export at --out (only after the new one is complete).")


def _install_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Moves a finished export into place; an existing `out` is replaced only after the new one is complete."""
    if out.exists():
        if not overwrite:
            raise ValueError(f"{out} already exists (add --overwrite to replace it)")
        backup = out.with_name(f".{out.name}.old")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(out, backup)
        os.replace(tmp, out)
        shutil.rmtree(backup)
    else:
        os.replace(tmp, out)


def export_model(model, out: str | os.PathLike, metadata: dict, overwrite: bool = False) -> Path:
    """Writes `model` (a built ``RecursiveCascade``) as a SavedModel with the signatures above, atomically.

    Returns the output path. `metadata` is stored in ``ldr_tf_export.json`` next to the model, completed with the
    grid size and signature descriptions.
    """
    import keras
    import tensorflow as tf

    from ldr_tf import warp

    out = Path(out)
    size = tuple(int(s) for s in model.config.image_size)
    fixed = tf.TensorSpec([None, *size, 1], tf.float32, name="fixed")
    moving = tf.TensorSpec([None, *size, 1], tf.float32, name="moving")
    labels = tf.TensorSpec([None, *size, 1], tf.int32, name="moving_labels")

    def register(fixed, moving):
        res = model(tf.concat([fixed, moving], axis=-1), training=False)
        return {"flow": res["agg_flow"], "warped": res["warped"]}

    def register_labels(fixed, moving, moving_labels):
        res = register(fixed, moving)
        res["warped_labels"] = warp.warp_labels(moving_labels, res["flow"])
        return res

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("register", register, input_signature=[fixed, moving])
    archive.add_endpoint("register_labels", register_labels, input_signature=[fixed, moving, labels])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        archive.write_out(str(tmp), verbose=False)
        meta = {
            **metadata,
            "ldr_tf_version": __version__,
            "image_size": list(size),
            "xla_warp": warp.xla_warp_enabled(),
            "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "signatures": {
                "register": {"inputs": {"fixed": [None, *size, 1], "moving": [None, *size, 1]},
                             "outputs": ["flow", "warped"]},
                "register_labels": {"inputs": {"fixed": [None, *size, 1], "moving": [None, *size, 1],
                                               "moving_labels (int32)": [None, *size, 1]},
                                    "outputs": ["flow", "warped", "warped_labels"]},
            },
        }
        save_json_atomic(meta, tmp / METADATA)
        _install_dir(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
               overwrite: bool = False) -> Path:
    """Restores a training run's checkpoint and exports it (see `export_model`)."""
    from ldr_tf import runs

    out = Path(out)
    if out.exists() and not overwrite:  # fail before the (slow) restore
        raise ValueError(f"{out} already exists (add --overwrite to replace it)")
    model, run_cfg = runs.restore_model(run_dir, step)
    prefix = runs.latest_checkpoint(run_dir, step)
    train = run_cfg.get("train", {})
    metadata = {
        "model": train.get("model"),
        "aldk": train.get("aldk") if train.get("model") == "student" else None,
        "cascades": run_cfg["network"].get("cascades"),
        "network": run_cfg["network"],
        "parameters": int(sum(int(v.numpy().size) for v in model.weights)),
        "checkpoint": str(prefix),
        "trained_steps": int(prefix.rsplit("-", 1)[-1]),
        "training_data": run_cfg.get("dataset"),
        "preprocessing": run_cfg.get("preprocessing"),
    }
    return export_model(model, out, metadata, overwrite=overwrite)


def load_metadata(model_dir: str | os.PathLike) -> dict:
    """Reads ``ldr_tf_export.json`` of an export; ValueError naming the directory if it is not one of ours."""
    import json

    model_dir = Path(model_dir)
    if not (model_dir / "saved_model.pb").is_file():
        raise ValueError(f"{model_dir}: not a SavedModel directory (no saved_model.pb)")
    path = model_dir / METADATA
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{model_dir}: SavedModel without {METADATA}; export it with python -m ldr_tf.export") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable export metadata ({e})") from None


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.checkpoint or not FLAGS.out:
        raise cli.UsageError("--checkpoint (a training run directory) and --out are required")
    common_flags.apply_runtime_flags(FLAGS)
    out = export_run(FLAGS.checkpoint, FLAGS.out, FLAGS.step, FLAGS.overwrite)
    meta = load_metadata(out)
    logging.info("exported %s", out)
    print(f"exported {meta['model']} ({meta['cascades']} cascades, {meta['parameters']:,} parameters, grid "
          f"{'x'.join(map(str, meta['image_size']))}, step {meta['trained_steps']}) to {out}; signatures: "
          f"{', '.join(SIGNATURES)}", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.export")
