"""``python -m tools.serving.client``: register NIfTI pairs with a model served by TensorFlow Serving.

Does what ``python -m ldr_tf.predict`` does (same preprocessing, same outputs, same ``result.json``), but the network
runs on a ``tensorflow_model_server`` (see ``tools/serving/README.md``) reached over gRPC (port 8500) or REST
(port 8501)::

    python -m tools.serving.client --server=localhost:8500 --protocol=grpc --model_name=ldr_student \\
        --metadata=exports/student --fixed=a.nii.gz --moving=b.nii.gz --moving_seg=b_seg.nii.gz --out_dir=out

``--metadata`` is the export directory (or its ``ldr_tf_export.json``): it gives the grid size and the preprocessing;
``--preprocessing`` overrides the latter as in predict. Preprocessing, mapping back and writing happen here; only
the two grid volumes travel to the server and the flow (and warped grid image) come back.

Sizes: a request carries ``2 * D*H*W`` float32 (16.8 MB at 128^3 over gRPC) and the ``register`` response
``4 * D*H*W`` float32 (33.6 MB). Both are over gRPC's default 4 MB message limit, so the channel raises
``grpc.max_send_message_length`` / ``grpc.max_receive_message_length`` (``--max_message_mb``, default 1024);
``tensorflow_model_server`` itself accepts messages up to 2 GB. REST sends the same tensors as JSON text
(about 6x larger and slow to encode: ~94 MB request / ~190 MB response at 128^3): use gRPC beyond 64^3.

Needs ``grpcio`` and ``tensorflow-serving-api`` (install the latter with ``pip install --no-deps
tensorflow-serving-api``: its metadata requires the full ``tensorflow`` wheel, which conflicts with tensorflow-cpu).
REST uses only the standard library.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from absl import flags

from ldr_tf import cli
from ldr_tf import predict as predict_lib
from ldr_tf.atomic import check_writable
from ldr_tf.deploy import native

FLAGS = flags.FLAGS
PROG = "tools.serving.client"
METADATA = "ldr_tf_export.json"


def define_flags(fv=FLAGS) -> None:
    """Every flag of the client (the pair/output flags are those of ``ldr_tf.predict``)."""
    if "server" in fv:
        return
    flags.DEFINE_string("server", "localhost:8500", "host:port of tensorflow_model_server (gRPC 8500, REST 8501).",
                        flag_values=fv)
    flags.DEFINE_enum("protocol", "grpc", ["grpc", "rest"], "How to talk to the server.", flag_values=fv)
    flags.DEFINE_string("model_name", "ldr_student", "Model name in the server's models.config.", flag_values=fv)
    flags.DEFINE_integer("model_version", None, "Serve this version (default: the server's latest).",
                         flag_values=fv)
    flags.DEFINE_string("metadata", None, "Export directory or its ldr_tf_export.json (grid size, preprocessing).",
                        flag_values=fv)
    flags.DEFINE_float("timeout", 300.0, "Seconds to wait for one model call.", flag_values=fv)
    flags.DEFINE_integer("max_message_mb", 1024, "gRPC send/receive message limit in MB.", flag_values=fv)
    predict_lib.define_pair_flags(fv)


def load_metadata(path: str | os.PathLike) -> dict:
    """``ldr_tf_export.json`` from an export directory or the file itself; ValueError naming the path."""
    path = Path(path)
    file = path / METADATA if path.is_dir() else path
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: --metadata: no {METADATA} there (give the export directory)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: unreadable export metadata ({' '.join(str(e).split())})") from None
    if not isinstance(meta, dict) or len(meta.get("image_size") or []) != 3:
        raise ValueError(f"{file}: not ldr-tf export metadata (no image_size)")
    return meta


# ------------------------------------------------------------------------------------------ wire formats


def rest_request_body(signature: str, inputs: dict) -> bytes:
    """TF Serving REST ``:predict`` body, columnar format: ``{"signature_name", "inputs": {name: nested list}}``.

    float32 arrays go out as the exact decimal form of each float32 value, so the server gets them bit for bit.
    """
    body = {"signature_name": signature,
            "inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}
    return json.dumps(body, separators=(",", ":")).encode()


def parse_rest_response(body: bytes, dtypes: dict | None = None) -> dict:
    """``{"outputs": {...}}`` of a columnar ``:predict`` response -> numpy arrays (float32 unless `dtypes`)."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ValueError(f"REST response is not JSON ({e})") from None
    if "error" in doc:
        raise ValueError(f"server error: {doc['error']}")
    outputs = doc.get("outputs")
    if not isinstance(outputs, dict):
        raise ValueError(f"REST response without named outputs (keys {sorted(doc)})")
    dtypes = dtypes or {}
    return {k: np.asarray(v, dtypes.get(k, np.float32)) for k, v in outputs.items()}


def grpc_request(model_name: str, signature: str, inputs: dict, version: int | None = None):
    """A ``tensorflow.serving.PredictRequest`` carrying `inputs` as TensorProtos."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = model_name
    req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = int(version)
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(np.ascontiguousarray(v)))
    return req


def parse_grpc_response(resp) -> dict:
    """``PredictResponse`` -> ``{name: numpy array}``."""
    import tensorflow as tf

    return {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}


def grpc_channel_options(max_message_mb: int = 1024) -> list:
    """Channel options raising gRPC's 4 MB default message limits (a 128^3 request is ~17 MB)."""
    n = int(max_message_mb) * 1024 * 1024
    return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]


# ------------------------------------------------------------------------------------------ registrar


class RemoteRegistrar:
    """The `ldr_tf.deploy.loader.Registrar` interface over a TF Serving model (for `ldr_tf.deploy.native.Predictor`).

    Args:
      server: ``host:port`` (gRPC port for ``"grpc"``, REST port for ``"rest"``).
      model_name: name of the model in the server's config.
      image_size: the model's grid ``(D, H, W)`` (from the export metadata).
      protocol: ``"grpc"`` or ``"rest"``.
      version: model version (None: the server's latest).
      timeout: seconds per call.
      max_message_mb: gRPC message limit (both directions).
      metadata: the export metadata (kept as `metadata`).
    """

    kind = "remote"

    def __init__(self, server: str, model_name: str, image_size, protocol: str = "grpc", version: int | None = None,
                 timeout: float = 300.0, max_message_mb: int = 1024, metadata: dict | None = None):
        if protocol not in ("grpc", "rest"):
            raise ValueError(f"protocol: expected 'grpc' or 'rest', got {protocol!r}")
        self.server = server
        self.model_name = model_name
        self.image_size = tuple(int(s) for s in image_size)
        self.protocol = protocol
        self.version = version
        self.timeout = float(timeout)
        self.metadata = metadata or {}
        self.parameters = self.metadata.get("parameters")
        self.last_bytes = {}  # request/response sizes of the last call
        self._channel = self._stub = None
        if protocol == "grpc":
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            self._channel = grpc.insecure_channel(server, options=grpc_channel_options(max_message_mb))
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _check(self, name: str, x) -> None:
        shape = tuple(np.shape(x))
        if len(shape) != 5 or shape[-1] != 1 or shape[1:4] != self.image_size:
            raise ValueError(f"{name}: expected [B, {', '.join(map(str, self.image_size))}, 1], got shape {shape}")

    def __call__(self, fixed, moving, moving_labels=None) -> dict:
        """Same contract as `ldr_tf.deploy.loader.Registrar.__call__` (numpy in, numpy out)."""
        self._check("fixed", fixed)
        self._check("moving", moving)
        inputs = {"fixed": np.asarray(fixed, np.float32), "moving": np.asarray(moving, np.float32)}
        signature = "register"
        if moving_labels is not None:
            labels = np.asarray(moving_labels)
            if labels.ndim == 4:
                labels = labels[..., None]
            self._check("moving_labels", labels)
            inputs["moving_labels"] = labels.astype(np.int32)
            signature = "register_labels"
        return self._call(signature, inputs)

    def flow(self, fixed, moving) -> np.ndarray:
        """The flow alone (``register_flow``: no warped image computed or sent back; exports before ldr-tf 0.3.1 lack
        that signature: ``register``'s flow then)."""
        self._check("fixed", fixed)
        self._check("moving", moving)
        inputs = {"fixed": np.asarray(fixed, np.float32), "moving": np.asarray(moving, np.float32)}
        signature = "register_flow" if "register_flow" in (self.metadata.get("signatures") or {}) else "register"
        return self._call(signature, inputs)["flow"]

    def _call(self, signature: str, inputs: dict) -> dict:
        if self.protocol == "grpc":
            return self._call_grpc(signature, inputs)
        return self._call_rest(signature, inputs)

    def _call_grpc(self, signature: str, inputs: dict) -> dict:
        import grpc

        req = grpc_request(self.model_name, signature, inputs, self.version)
        try:
            resp = self._stub.Predict(req, timeout=self.timeout)
        except grpc.RpcError as e:
            details = " ".join(str(e.details() or "").split())
            raise ValueError(f"{self.server}: gRPC {e.code().name}: {details}") from None
        self.last_bytes = {"request": req.ByteSize(), "response": resp.ByteSize()}
        return parse_grpc_response(resp)

    def _call_rest(self, signature: str, inputs: dict) -> dict:
        version = f"/versions/{self.version}" if self.version is not None else ""
        url = f"http://{self.server}/v1/models/{self.model_name}{version}:predict"
        body = rest_request_body(signature, inputs)
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", "")
            except ValueError:
                msg = ""
            raise ValueError(f"{url}: HTTP {e.code}: {' '.join(str(msg or e.reason).split())}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(f"{url}: cannot reach the server ({reason})") from None
        self.last_bytes = {"request": len(body), "response": len(data)}
        return parse_rest_response(data, {"warped_labels": np.int32})


# ------------------------------------------------------------------------------------------ CLI


def _main(fv) -> int:
    if not fv.metadata or not fv.out_dir:
        raise cli.UsageError("--metadata (the export directory or its ldr_tf_export.json) and --out_dir are required")
    pairs = predict_lib.pairs_from_flags(fv)
    out_dir = Path(fv.out_dir)
    check_writable(out_dir)
    for p in pairs:
        native.Predictor.check_outputs(out_dir / p["name"] if p["name"] else out_dir, fv.overwrite)
    if fv.pairs and (out_dir / "results.json").exists() and not fv.overwrite:
        raise ValueError(f"{out_dir / 'results.json'}: already exists (add --overwrite to replace the outputs)")
    meta = load_metadata(fv.metadata)
    spec = native.resolve_preprocessing(fv.preprocessing, meta, meta["image_size"], fv.no_crop)
    remote = RemoteRegistrar(fv.server, fv.model_name, meta["image_size"], fv.protocol, fv.model_version,
                             fv.timeout, fv.max_message_mb, meta)
    try:
        info = {k: meta.get(k) for k in ("model", "aldk", "cascades", "parameters", "trained_steps", "xla_warp")}
        info.update(server=fv.server, protocol=fv.protocol, model_name=fv.model_name, version=fv.model_version)
        # --refine runs here, on the client's CPU, on the flow the server returned
        predictor = native.Predictor(remote, spec, info, predict_lib.refiner_from_flags(fv, meta))
        if fv.warmup:
            predictor.warmup()
        results = native.run_pairs(predictor, pairs, out_dir, fv.mm, fv.overwrite, prog=PROG)
        print(f"{PROG}: last request {remote.last_bytes.get('request', 0) / 1e6:.1f} MB, response "
              f"{remote.last_bytes.get('response', 0) / 1e6:.1f} MB over {fv.protocol}", file=sys.stderr)
    finally:
        remote.close()
    if fv.pairs:
        from ldr_tf.atomic import write_json

        write_json({"model": info, "pairs": results}, out_dir / "results.json")
    print(f"wrote {out_dir}", flush=True)
    return 0


def run(argv) -> int:
    """In-process entry: ``run(["client", "--server=...", ...])`` -> exit status (0 ok, 1 error)."""
    return cli.run_argv(define_flags, _main, argv, PROG)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    return _main(FLAGS)


if __name__ == "__main__":
    define_flags()
    cli.run(main, PROG)
