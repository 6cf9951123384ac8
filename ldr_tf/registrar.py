"""One interface over every way of registering a pair on the network grid.

`open_registrar(spec)` accepts:

* an exported SavedModel directory (``python -m ldr_tf.export``): its ``register`` / ``register_labels`` signatures;
* a training run directory: the network rebuilt from ``config.json`` and its latest checkpoint
  (``stage="affine"`` keeps only the affine first stage: "the learned affine stage alone");
* ``identity``: the zero flow (the "before registration" baseline).

Calling a registrar with ``fixed``, ``moving`` (``[B, D, H, W, 1]`` float32 in [0, 1]) and optionally
``moving_labels`` (``[B, D, H, W, 1]`` int32) returns numpy arrays ``{"flow", "warped"[, "warped_labels"]}``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from ldr_tf import warp

__all__ = ["Registrar", "open_registrar"]


class Registrar:
    """A callable registration model with its description (`kind`, `image_size`, `metadata`, `parameters`)."""

    def __init__(self, kind: str, fn, fn_labels, image_size, metadata: dict, parameters: int | None,
                 keepalive=None):
        self.kind = kind
        self._fn = fn
        self._fn_labels = fn_labels
        self.image_size = tuple(image_size) if image_size else None
        self.metadata = metadata
        self.parameters = parameters
        self._keepalive = keepalive

    def check_shape(self, name: str, x) -> None:
        shape = tuple(x.shape)
        if len(shape) != 5 or shape[-1] != 1:
            raise ValueError(f"{name}: expected [B, D, H, W, 1], got shape {shape}")
        if self.image_size and shape[1:4] != self.image_size:
            raise ValueError(f"{name}: the model's grid is {self.image_size}, got spatial size {shape[1:4]} "
                             "(ldr_tf.predict resamples images onto the grid)")

    def __call__(self, fixed, moving, moving_labels=None) -> dict:
        self.check_shape("fixed", fixed)
        self.check_shape("moving", moving)
        fixed = tf.convert_to_tensor(fixed, tf.float32)
        moving = tf.convert_to_tensor(moving, tf.float32)
        if moving_labels is None:
            out = self._fn(fixed, moving)
        else:
            labels = tf.convert_to_tensor(moving_labels)
            if labels.shape.rank == 4:
                labels = labels[..., None]
            out = self._fn_labels(fixed, moving, tf.cast(labels, tf.int32))
        return {k: v.numpy() for k, v in out.items()}


def _identity() -> Registrar:
    def fn(fixed, moving):
        return {"flow": tf.zeros(tf.concat([tf.shape(fixed)[:4], [3]], 0)), "warped": moving}

    def fn_labels(fixed, moving, labels):
        return {**fn(fixed, moving), "warped_labels": labels}

    return Registrar("identity", fn, fn_labels, None, {"model": "identity"}, 0)


def _saved_model(path: Path) -> Registrar:
    from ldr_tf.export import load_metadata

    meta = load_metadata(path)
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # noqa: BLE001 (TF raises many types for corrupt models)
        raise ValueError(f"{path}: cannot load the SavedModel ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = [s for s in ("register", "register_labels") if s not in loaded.signatures]
    if missing:
        raise ValueError(f"{path}: SavedModel lacks the signature(s) {missing} (has {sorted(loaded.signatures)}); "
                         "export registration models with python -m ldr_tf.export")
    reg, reg_labels = loaded.signatures["register"], loaded.signatures["register_labels"]

    def fn(fixed, moving):
        return reg(fixed=fixed, moving=moving)

    def fn_labels(fixed, moving, labels):
        return reg_labels(fixed=fixed, moving=moving, moving_labels=labels)

    return Registrar("saved_model", fn, fn_labels, meta["image_size"], meta, meta.get("parameters"), loaded)


def _checkpoint(path: Path, stage: str, step: int | None) -> Registrar:
    from ldr_tf import runs

    model, run_cfg = runs.restore_model(path, step)

    @tf.function(reduce_retracing=True)
    def fn(fixed, moving):
        pair = tf.concat([fixed, moving], -1)
        if stage == "affine":
            flow = model.affine_flow(pair)
        else:
            flow = model(pair, training=False)["agg_flow"]
        return {"flow": flow, "warped": warp.warp(moving, flow)}

    @tf.function(reduce_retracing=True)
    def fn_labels(fixed, moving, labels):
        out = fn(fixed, moving)
        out["warped_labels"] = warp.warp_labels(labels, out["flow"])
        return out

    if stage == "affine" and run_cfg["network"].get("affine", "none") == "none":
        raise ValueError(f"{path}: this network has no affine stage (affine=none)")
    meta = {"model": run_cfg["train"].get("model"), "stage": stage, "network": run_cfg["network"],
            "preprocessing": run_cfg.get("preprocessing"), "training_data": run_cfg.get("dataset")}
    params = int(sum(int(np.prod(v.shape)) for v in model.weights))
    return Registrar("checkpoint", fn, fn_labels, run_cfg["network"]["image_size"], meta, params, model)


def open_registrar(spec: str | os.PathLike, stage: str = "full", step: int | None = None) -> Registrar:
    """A `Registrar` for ``identity``, a SavedModel directory or a training run directory."""
    if str(spec) == "identity":
        return _identity()
    if stage not in ("full", "affine"):
        raise ValueError(f"stage: expected 'full' or 'affine', got {stage!r}")
    path = Path(spec)
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
