"""One interface over every way of registering a pair on the network grid.

`open_registrar(spec)` accepts:

* an exported SavedModel directory (``python -m ldr_tf.export``): its ``register`` / ``register_labels`` signatures
  (and ``register_flow`` for the flow alone; exports before ldr-tf 0.3.1 lack it: ``register``'s flow then);
* a training run directory: the network rebuilt from ``config.json`` and its latest checkpoint
  (``stage="affine"`` keeps only the affine first stage: "the learned affine stage alone");
* ``identity``: the zero flow (the "before registration" baseline).

Calling a registrar with ``fixed``, ``moving`` (``[B, D, H, W, 1]`` float32 in [0, 1]) and optionally
``moving_labels`` (``[B, D, H, W, 1]`` int32) returns numpy arrays ``{"flow", "warped"[, "warped_labels"]}``;
``registrar.flow(fixed, moving)`` returns the flow alone, without computing the warped image.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from ldr_tf.ops import warp

__all__ = ["Registrar", "open_registrar", "inference_only"]


class Registrar:
    """A callable registration model with its description.

    Attributes:
      kind: ``"identity"``, ``"saved_model"`` or ``"checkpoint"``.
      image_size: ``(D, H, W)`` grid the model takes, or None (identity: any size).
      metadata: dict (the export's ``ldr_tf_export.json``, or the run's config summary).
      parameters: number of weights, or None.
      flow_fn: tensor-level ``pair [B, D, H, W, 2] (fixed first) -> flow [B, D, H, W, 3]``, traceable inside a
        ``tf.function`` (the frozen teacher of distillation).
      model: the Keras network of a training run (``kind == "checkpoint"``), else None.
    """

    def __init__(self, kind: str, fn, fn_labels, image_size, metadata: dict, parameters: int | None,
                 keepalive=None, flow_fn=None, model=None):
        self.kind = kind
        self._fn = fn
        self._fn_labels = fn_labels
        self.flow_fn = flow_fn
        self.model = model
        self.image_size = tuple(int(s) for s in image_size) if image_size else None
        self.metadata = metadata
        self.parameters = parameters
        self._keepalive = keepalive  # the loaded SavedModel / Keras model behind fn

    def check_shape(self, name: str, x) -> None:
        """ValueError naming `name` unless `x` is ``[B, D, H, W, 1]`` on the model's grid."""
        shape = tuple(x.shape)
        if len(shape) != 5 or shape[-1] != 1:
            raise ValueError(f"{name}: expected [B, D, H, W, 1], got shape {shape}")
        if self.image_size and shape[1:4] != self.image_size:
            raise ValueError(f"{name}: the model's grid is {self.image_size}, got spatial size {shape[1:4]} "
                             "(ldr_tf.predict resamples images onto the grid)")

    def __call__(self, fixed, moving, moving_labels=None) -> dict:
        """Registers `moving` onto `fixed`.

        Args:
          fixed, moving: ``[B, D, H, W, 1]`` float32 in [0, 1] on the model's grid.
          moving_labels: optional ``[B, D, H, W, 1]`` (or ``[B, D, H, W]``) integer labels of `moving`.

        Returns:
          numpy ``{"flow": [B, D, H, W, 3], "warped": [B, D, H, W, 1]}`` plus ``"warped_labels"``
          ``[B, D, H, W, 1]`` int32 with `moving_labels`.

        Raises:
          ValueError: wrong shapes, or the model failed (one line).
        """
        self.check_shape("fixed", fixed)
        self.check_shape("moving", moving)
        fixed = tf.convert_to_tensor(fixed, tf.float32)
        moving = tf.convert_to_tensor(moving, tf.float32)
        try:
            if moving_labels is None:
                out = self._fn(fixed, moving)
            else:
                labels = tf.convert_to_tensor(moving_labels)
                if labels.shape.rank == 4:
                    labels = labels[..., None]
                self.check_shape("moving_labels", labels)
                out = self._fn_labels(fixed, moving, tf.cast(labels, tf.int32))
        except tf.errors.OpError as e:
            raise ValueError(f"{self.kind} model call failed: {type(e).__name__}: "
                             f"{(e.message or '').strip().splitlines()[0] if e.message else ''}") from None
        return {k: np.asarray(v) for k, v in out.items()}

    def flow(self, fixed, moving) -> np.ndarray:
        """The flow ``[B, D, H, W, 3]`` (numpy) alone: as ``self(fixed, moving)["flow"]``, without the warped image."""
        self.check_shape("fixed", fixed)
        self.check_shape("moving", moving)
        pair = tf.concat([tf.convert_to_tensor(fixed, tf.float32), tf.convert_to_tensor(moving, tf.float32)], -1)
        try:
            return np.asarray(self.flow_fn(pair))
        except tf.errors.OpError as e:
            raise ValueError(f"{self.kind} model call failed: {type(e).__name__}: "
                             f"{(e.message or '').strip().splitlines()[0] if e.message else ''}") from None


def _identity() -> Registrar:
    def fn(fixed, moving):
        return {"flow": tf.zeros(tf.concat([tf.shape(fixed)[:4], [3]], 0)), "warped": moving}

    def fn_labels(fixed, moving, labels):
        return {**fn(fixed, moving), "warped_labels": labels}

    def flow_fn(pair):
        return tf.zeros(tf.concat([tf.shape(pair)[:4], [3]], 0))

    return Registrar("identity", fn, fn_labels, None, {"model": "identity"}, 0, flow_fn=flow_fn)


def _signature_grid(signature) -> tuple | None:
    """(D, H, W) of the ``fixed`` input of a loaded signature, or None if it is not fully static."""
    spec = signature.structured_input_signature[1].get("fixed")
    if spec is None or spec.shape.rank != 5:
        return None
    dims = spec.shape.as_list()[1:4]
    return tuple(dims) if None not in dims else None


def _saved_model(path: Path) -> Registrar:
    from ldr_tf.deploy.savedmodel import METADATA, load_metadata, load_saved_model

    loaded = load_saved_model(path)
    missing = [s for s in ("register", "register_labels") if s not in loaded.signatures]
    if missing:
        raise ValueError(f"{path}: SavedModel lacks the signature(s) {', '.join(missing)} (it has "
                         f"{', '.join(sorted(loaded.signatures)) or 'none'}); export registration models with "
                         "python -m ldr_tf.export")
    reg, reg_labels = loaded.signatures["register"], loaded.signatures["register_labels"]
    meta = load_metadata(path) if (path / METADATA).exists() else {}
    grid = _signature_grid(reg)
    if grid is None:
        raise ValueError(f"{path}: the register signature has no static grid size "
                         f"({reg.structured_input_signature[1]})")
    if meta.get("image_size") and tuple(meta["image_size"]) != grid:
        raise ValueError(f"{path}: {METADATA} says grid {tuple(meta['image_size'])} but the signature takes {grid}")

    if (meta.get("network") or {}).get("compute_dtype") == "bfloat16":
        from ldr_tf import cpu

        if cpu.bfloat16_advice():
            print(f"warning: {path}: bfloat16 export: {cpu.bfloat16_advice()} (re-export without --bfloat16)",
                  file=sys.stderr, flush=True)

    def fn(fixed, moving):
        return reg(fixed=fixed, moving=moving)

    def fn_labels(fixed, moving, labels):
        return reg_labels(fixed=fixed, moving=moving, moving_labels=labels)

    flow_sig = loaded.signatures.get("register_flow", reg)  # exports before 0.3.1: register's flow

    def flow_fn(pair):
        return flow_sig(fixed=pair[..., :1], moving=pair[..., 1:2])["flow"]

    return Registrar("saved_model", fn, fn_labels, grid, meta, meta.get("parameters"), loaded, flow_fn=flow_fn)


def _checkpoint(path: Path, stage: str, step: int | None) -> Registrar:
    from ldr_tf.training import checkpoints as runs
    from ldr_tf.training.config import load_run_config

    if stage == "affine" and load_run_config(path)["network"].get("affine", "none") == "none":
        raise ValueError(f"{path}: --stage=affine: this network has no affine stage (affine=none)")
    model, run_cfg = runs.restore_model(path, step)

    @tf.function(reduce_retracing=True)
    def flow_fn(pair):
        if stage == "affine":
            return model.affine_stage(pair, training=False)["flow"]
        return model(pair, training=False)["agg_flow"]

    @tf.function(reduce_retracing=True)
    def fn(fixed, moving):
        flow = flow_fn(tf.concat([fixed, moving], -1))
        return {"flow": flow, "warped": warp.warp(moving, flow)}

    @tf.function(reduce_retracing=True)
    def fn_labels(fixed, moving, labels):
        out = fn(fixed, moving)
        out["warped_labels"] = warp.warp_labels(labels, out["flow"])
        return out

    meta = {"model": run_cfg.get("train", {}).get("model"), "stage": stage, "network": run_cfg["network"],
            "preprocessing": run_cfg.get("preprocessing"), "training_data": run_cfg.get("dataset")}
    counted = model.affine_stem if stage == "affine" else model
    params = int(sum(int(np.prod(v.shape)) for v in counted.weights))
    return Registrar("checkpoint", fn, fn_labels, run_cfg["network"]["image_size"], meta, params, model,
                     flow_fn=flow_fn, model=model)


def inference_only() -> None:
    """Settings for a process that only runs models (predict, the serving client): Grappler's graph rewriting off.

    Grappler rewrote a loaded SavedModel at its first call: constant folding took about 0.8 s of a 128^3 student's
    2 s first call, the other passes 0.2 s more (first call 1.04 s with constant folding off, 0.85 s with every
    pass off), and neither made a measurable difference to the warm calls (0.16 s); a short command pays the
    first call once, so they go.
    """
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def open_registrar(spec: str | os.PathLike, stage: str = "full", step: int | None = None) -> Registrar:
    """A `Registrar` for ``identity``, a SavedModel directory, a pretrained model's name (`ldr_tf.pretrained`) or a
    training run directory."""
    from ldr_tf import pretrained

    if str(spec) == "identity":
        return _identity()
    if stage not in ("full", "affine"):
        raise ValueError(f"stage: expected 'full' or 'affine', got {stage!r}")
    path = pretrained.resolve(spec)
    if not path.exists():
        raise ValueError(f"{path}: model not found (give a SavedModel directory, a training run directory or "
                         "'identity')")
    if (path / "saved_model.pb").is_file():
        if stage != "full":
            raise ValueError(f"{path}: --stage=affine needs the training run directory, not the export")
        return _saved_model(path)
    if (path / "config.json").is_file():
        return _checkpoint(path, stage, step)
    raise ValueError(f"{path}: neither a SavedModel (saved_model.pb) nor a training run directory (config.json)")
