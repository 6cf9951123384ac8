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

__all__ = ["CHECKPOINT_DIR", "build_network", "restore_model", "latest_checkpoint"]

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
