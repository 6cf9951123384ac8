"""Training run directories: ``config.json``, ``checkpoints/``, ``logs/``.

A run directory is self-describing: ``config.json`` holds the training settings (``"train"``), the network
configuration (``"network"``, a ``networks.cascade.CascadeConfig`` dict), the dataset's preprocessing
(``"preprocessing"``) and the dataset identity (``"dataset"``). Export, distillation and evaluation rebuild the network
from it and restore the latest (or a chosen) checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from ldr_tf.training.config import load_run_config

__all__ = ["CHECKPOINT_DIR", "build_network", "restore_model", "latest_checkpoint", "weight_key", "assign_weights",
           "load_any_model"]

CHECKPOINT_DIR = "checkpoints"


def build_network(network_config: dict):
    """A built (variables created) ``RecursiveCascade`` for a network config dict."""
    from networks.cascade import CascadeConfig, RecursiveCascade

    cfg = CascadeConfig.from_dict(network_config)
    model = RecursiveCascade(cfg)
    model(tf.zeros([1, *cfg.image_size, 2], tf.float32), training=False)
    return model


def latest_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> str:
    """Path prefix of the newest checkpoint of a run (or the one of `step`); ValueError if there is none."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if step is None:
        prefix = tf.train.latest_checkpoint(str(ckpt_dir))
        if prefix is None:
            raise ValueError(f"{ckpt_dir}: no checkpoint found (has the run saved one yet?)")
        return prefix
    state = tf.train.get_checkpoint_state(str(ckpt_dir))
    for p in (state.all_model_checkpoint_paths if state else []):
        if p.endswith(f"-{step}"):
            return p
    raise ValueError(f"{ckpt_dir}: no checkpoint for step {step}")


def restore_model(run_dir: str | os.PathLike, step: int | None = None, overrides: dict | None = None):
    """Rebuilds a run's network and restores its weights. Returns ``(model, run_config_dict)``.

    `overrides` changes fields of the network config that do not change the weights (``compute_dtype``).
    """
    run_cfg = load_run_config(run_dir)
    model = build_network({**run_cfg["network"], **(overrides or {})})
    prefix = latest_checkpoint(run_dir, step)
    status = tf.train.Checkpoint(model=model).restore(prefix)
    status.expect_partial()  # optimizers and the critic are not needed here
    status.assert_existing_objects_matched()
    return model, run_cfg


def weight_key(path: str) -> str:
    """A weight's path below the model's own name (Keras numbers models: ``recursive_cascade_3/...``), no ``:0``."""
    return path.rsplit(":", 1)[0].split("/", 1)[-1]


def assign_weights(model, stored: dict, where: str) -> None:
    """Copies ``stored`` (``{weight_key: tensor or array}``) into `model`'s weights, matched by path.

    ValueError starting with `where` when a weight is missing, of another shape, or when `stored` holds weights the
    model does not have; nothing is assigned then.
    """
    weights = {weight_key(w.path): w for w in model.weights}
    if len(weights) != len(model.weights):
        raise ValueError(f"{where}: the network has weights of the same path; cannot match them by name")
    missing = [k for k in weights if k not in stored]
    wrong = [f"{k} {tuple(w.shape)} vs {tuple(stored[k].shape)}" for k, w in weights.items()
             if k in stored and tuple(w.shape) != tuple(stored[k].shape)]
    extra = sorted(set(stored) - set(weights))
    for what, names in (("missing weights", missing), ("weights of another shape", wrong),
                        ("weights the network does not have", extra)):
        if names:
            raise ValueError(f"{where}: {len(names)} {what} ({', '.join(names[:3])}"
                             f"{', ...' if len(names) > 3 else ''})")
    for k, w in weights.items():
        value = stored[k]
        w.assign(value.numpy() if hasattr(value, "numpy") else value)


def load_any_model(source: str | os.PathLike):
    """The network and its description from an export, a pretrained model's name or a training run directory.

    Returns ``(model, network_config, preprocessing)``; ValueError naming `source` when it is none of these.
    """
    from ldr_tf import pretrained

    path = pretrained.resolve(source)
    if (path / "saved_model.pb").is_file():
        from ldr_tf.deploy.savedmodel import model_from_export

        model, meta = model_from_export(path)
        return model, meta["network"], meta.get("preprocessing")
    if (path / "config.json").is_file():
        model, run_cfg = restore_model(path)
        return model, run_cfg["network"], run_cfg.get("preprocessing")
    raise ValueError(f"{source}: not found or neither an exported SavedModel (saved_model.pb) nor a training run "
                     "directory (config.json)")
