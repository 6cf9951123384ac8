"""The export format: a trained network -> one SavedModel with the ``register``, ``register_labels`` and
``register_flow`` signatures and ``ldr_tf_export.json`` (the command and the format are described in
`ldr_tf.export`)."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
from pathlib import Path

from ldr_tf import __version__
from ldr_tf.atomic import write_json

METADATA = "ldr_tf_export.json"
SIGNATURES = ("register", "register_labels", "register_flow")


def _make_readable(root: Path) -> None:
    """Gives the export the permissions a plain ``mkdir``/``open`` would (temp dirs/files are private, 0700/0600),
    so that a server running as another user (the TF Serving container) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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


@contextlib.contextmanager
def _variables_in_name_order():
    """Keras' ExportArchive stores the endpoints' variables in the order it finds them, which differs from one
    export to the next: the same weights gave different variable files (and a new 20 MB blob for every re-export of
    a shipped model). Inside this context they are sorted by name (unique within a model), so an export's bytes
    depend only on its weights and graph. A no-op if Keras' private helper is not there."""
    try:
        from keras.src.export import saved_model_export_archive as archive_module
    except ImportError:  # another Keras layout: keep its order
        archive_module = None
    found = getattr(archive_module, "_list_variables_used_by_fns", None)
    if found is None:
        yield
        return

    def in_name_order(fns):
        return tuple(sorted(vs, key=lambda v: v.name) for vs in found(fns))

    archive_module._list_variables_used_by_fns = in_name_order
    try:
        yield
    finally:
        archive_module._list_variables_used_by_fns = found


def export_model(model, out: str | os.PathLike, metadata: dict, overwrite: bool = False,
                 xla_warp: bool | None = None) -> Path:
    """Writes `model` (a built ``RecursiveCascade``) as a SavedModel with the signatures above, atomically.

    Args:
      model: a built `networks.cascade.RecursiveCascade` (weights restored).
      out: output directory; nothing is left there if writing fails, and an existing one is replaced only once the
        new export is complete (with `overwrite`).
      metadata: stored in ``ldr_tf_export.json``, completed with the grid size, signatures and ``xla_warp``.
      overwrite: replace an existing `out`.
      xla_warp: trace the sampler through XLA (None: the current `ldr_tf.ops.warp.xla_warp_enabled`).

    Returns:
      The output path.
    """
    import keras
    import tensorflow as tf

    from ldr_tf.ops import warp

    out = Path(out)
    size = tuple(int(s) for s in model.config.image_size)
    use_xla = warp.xla_warp_enabled() if xla_warp is None else bool(xla_warp)
    fixed = tf.TensorSpec([None, *size, 1], tf.float32, name="fixed")
    moving = tf.TensorSpec([None, *size, 1], tf.float32, name="moving")
    labels = tf.TensorSpec([None, *size, 1], tf.int32, name="moving_labels")

    def register_flow(fixed, moving):
        # the flow alone (what predict, compare and the refinement use): the network's final full-grid warp is not
        # computed (a 128^3 student: ~0.04 s of ~0.3 s). Static shapes in the signature (the XLA sampler relaxes
        # them): [-1, D, H, W, 3] instead of all -1.
        res = model(tf.concat([fixed, moving], axis=-1), training=False)
        return {"flow": tf.ensure_shape(res["agg_flow"], [None, *size, 3])}

    def register(fixed, moving):
        flow = flow_fn(fixed, moving)["flow"]  # the network's output warp, the same op on the same tensors
        return {"flow": flow, "warped": tf.ensure_shape(warp.warp(moving, flow), [None, *size, 1])}

    def register_labels(fixed, moving, moving_labels):
        res = register_fn(fixed, moving)
        res["warped_labels"] = tf.ensure_shape(warp.warp_labels(moving_labels, res["flow"]), [None, *size, 1])
        return res

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    previous = warp.xla_warp_enabled()
    warp.set_xla_warp(use_xla)  # read when the endpoints are traced
    try:
        archive = keras.export.ExportArchive()
        # No archive.track(model): the endpoints capture the model's tf.Variables themselves, and tracking the
        # Keras wrappers as well stores every weight twice (keras-team/keras#23553: 2x the files, 2x the variable
        # memory of every process that loads the export, TF Serving included).
        # register calls the register_flow endpoint's tf.function and register_labels register's (each traced once, in
        # the save context), so the network's graph is stored once; traced inline in each, the SavedModel held it
        # twice and every load rebuilt both copies.
        flow_fn = archive.add_endpoint("register_flow", register_flow, input_signature=[fixed, moving])
        register_fn = archive.add_endpoint("register", register, input_signature=[fixed, moving])
        archive.add_endpoint("register_labels", register_labels, input_signature=[fixed, moving, labels])
        with _variables_in_name_order():
            archive.write_out(str(tmp), verbose=False)
        meta = {
            **metadata,
            "ldr_tf_version": __version__,
            "image_size": list(size),
            "xla_warp": use_xla,
            "serving": {
                "xla_cpu_compilation_enabled": use_xla,
                "note": ("the sampler is XLA-compiled: tensorflow_model_server needs "
                         "--xla_cpu_compilation_enabled=true (or re-export with --noxla_warp)") if use_xla else
                        "no XLA ops: any tensorflow_model_server runs it",
            },
            "input": "fixed and moving float32 in [0, 1] (the uint8 grid volume of ldr_tf.data.preprocess / 255)",
            "flow": "voxels of the grid, channel c along axis c (D, H, W), pull: warped(x) = moving(x + flow(x))",
            "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "signatures": {
                "register": {"inputs": {"fixed": [None, *size, 1], "moving": [None, *size, 1]},
                             "outputs": {"flow": [None, *size, 3], "warped": [None, *size, 1]}},
                "register_labels": {"inputs": {"fixed": [None, *size, 1], "moving": [None, *size, 1],
                                               "moving_labels": [None, *size, 1]},
                                    "outputs": {"flow": [None, *size, 3], "warped": [None, *size, 1],
                                                "warped_labels": [None, *size, 1]},
                                    "dtypes": {"moving_labels": "int32", "warped_labels": "int32"}},
                "register_flow": {"inputs": {"fixed": [None, *size, 1], "moving": [None, *size, 1]},
                                  "outputs": {"flow": [None, *size, 3]}},
                "serving_default": "same as register",
            },
        }
        write_json(meta, tmp / METADATA)
        _make_readable(tmp)
        _install_dir(tmp, out, overwrite)
    finally:
        warp.set_xla_warp(previous)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
               overwrite: bool = False, xla_warp: bool | None = None, bfloat16: bool = False) -> Path:
    """Restores a training run's checkpoint (the latest, or `step`) and exports it (see `export_model`).

    ``bfloat16=True`` rebuilds the network with ``compute_dtype="bfloat16"`` (same float32 weights) before export.
    """
    from ldr_tf.training import checkpoints as runs

    out = Path(out)
    if out.exists() and not overwrite:  # fail before the (slow) restore
        raise ValueError(f"{out} already exists (add --overwrite to replace it)")
    overrides = {"compute_dtype": "bfloat16"} if bfloat16 else {}
    model, run_cfg = runs.restore_model(run_dir, step, overrides=overrides)
    prefix = runs.latest_checkpoint(run_dir, step)
    train = run_cfg.get("train", {})
    metadata = {
        "model": train.get("model"),
        "aldk": train.get("aldk") if train.get("model") == "student" else None,
        "cascades": run_cfg["network"].get("cascades"),
        "network": {**run_cfg["network"], **overrides},
        "parameters": int(sum(int(v.numpy().size) for v in model.weights)),
        "checkpoint": str(prefix),
        "trained_steps": int(prefix.rsplit("-", 1)[-1]),
        "training_data": run_cfg.get("dataset"),
        "preprocessing": run_cfg.get("preprocessing"),
    }
    return export_model(model, out, metadata, overwrite=overwrite, xla_warp=xla_warp)


def model_from_export(export_dir: str | os.PathLike, overrides: dict | None = None):
    """Rebuilds the network of one of our exports and copies its weights in. Returns ``(model, metadata)``.

    The network comes from the export's metadata (``network``); each weight is taken from the SavedModel's variable of
    the same path (the variable names survive the export). ValueError naming the export when it is not ours, when a
    weight is missing or of another shape, or when the SavedModel holds variables the network does not have.
    `overrides` as in `export_run` (``compute_dtype``).
    """
    from ldr_tf.training.checkpoints import assign_weights, build_network, weight_key

    export_dir = Path(export_dir)
    meta = load_metadata(export_dir)
    if not isinstance(meta.get("network"), dict):
        raise ValueError(f"{export_dir}: {METADATA} has no network description (not written by ldr_tf.export?)")
    loaded = load_saved_model(export_dir)
    if "register" not in loaded.signatures:
        raise ValueError(f"{export_dir}: SavedModel lacks the register signature")
    stored = {}
    for sig in loaded.signatures.values():
        for v in sig.variables:
            stored[weight_key(v.name)] = v
    model = build_network({**meta["network"], **(overrides or {})})
    assign_weights(model, stored, f"{export_dir}: the export does not match its network description")
    return model, meta


def reexport(export_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
             xla_warp: bool | None = None, bfloat16: bool = False) -> Path:
    """Writes an existing export again in the current format (or with other `xla_warp` / `bfloat16` choices).

    The weights and the metadata (model, training, preprocessing, model card) are kept; ``reexported_from`` records
    the source's path, export time and ldr-tf version. `out` may not be `export_dir` itself.
    """
    src, out = Path(export_dir), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"{out}: --out is the export being read; write to another folder")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists (add --overwrite to replace it)")
    overrides = {"compute_dtype": "bfloat16" if bfloat16 else "float32"}
    model, meta = model_from_export(src, overrides)
    # export_model rewrites the format's own keys (version, grid, xla_warp, signatures, time) over these
    keep = {**meta, "network": {**meta["network"], **overrides},
            "reexported_from": {"path": str(src), "exported": meta.get("exported"),
                                "ldr_tf_version": meta.get("ldr_tf_version")}}
    return export_model(model, out, keep, overwrite=overwrite, xla_warp=xla_warp)


def load_saved_model(path: str | os.PathLike):
    """``tf.saved_model.load`` with a one-line ValueError naming `path` when it cannot be loaded."""
    import tensorflow as tf

    try:
        return tf.saved_model.load(str(path))
    except Exception as e:  # noqa: BLE001 (TF raises many types for corrupt models)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: cannot load the SavedModel ({type(e).__name__}: {first})") from None


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
        raise ValueError(f"{model_dir}: SavedModel without {METADATA}; export it with python -m ldr_tf.export") \
            from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable export metadata ({' '.join(str(e).split())})") from None
