"""A stand-in for ``tensorflow_model_server``: a TEST DOUBLE, not a server for production.

It answers TF Serving's ``PredictionService/Predict`` over gRPC and the REST ``POST /v1/models/<name>:predict``
(plus ``GET /v1/models/<name>``) by running one exported SavedModel's signatures in this Python process, so the
client contract (request/response protos, JSON bodies, signature names, message limits, error codes) can be tested
where no Docker engine or model server binary is available. It serves one model, one version, with no batching,
no model reloading, no TLS and no monitoring; serve real traffic with ``tools/serving/docker-compose.yml``.

In tests::

    with StandinServer("exports/student", model_name="ldr_student", rest=True) as server:
        client.RemoteRegistrar(server.grpc_address, "ldr_student", (32, 32, 32))(fixed, moving)

By hand::

    python -m tools.serving.standin --model_dir=exports/student --port=8500 --rest_api_port=8501
"""

from __future__ import annotations

import json
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

__all__ = ["StandinServer"]

_REST_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(:predict)?$")


class _Model:
    """The SavedModel and its signatures (input names and dtypes)."""

    def __init__(self, model_dir: str):
        import tensorflow as tf

        self.loaded = tf.saved_model.load(str(model_dir))
        self.signatures = dict(self.loaded.signatures)
        self.inputs = {name: fn.structured_input_signature[1] for name, fn in self.signatures.items()}

    def run(self, signature: str, arrays: dict) -> dict:
        """Runs `signature` on numpy `arrays`; ValueError (-> INVALID_ARGUMENT / HTTP 400) on bad requests."""
        import tensorflow as tf

        if signature not in self.signatures:
            raise ValueError(f'Serving signature name: "{signature}" not found in signature def')
        specs = self.inputs[signature]
        if set(arrays) != set(specs):
            raise ValueError(f"signature {signature} takes inputs {sorted(specs)}, got {sorted(arrays)}")
        feed = {}
        for k, spec in specs.items():
            a = np.asarray(arrays[k])
            if not spec.shape.is_compatible_with(a.shape):
                raise ValueError(f"input {k}: expected shape {spec.shape}, got {a.shape}")
            feed[k] = tf.constant(a.astype(spec.dtype.as_numpy_dtype, copy=False))
        try:
            out = self.signatures[signature](**feed)
        except tf.errors.OpError as e:
            raise ValueError(" ".join((e.message or "").split())) from None
        return {k: v.numpy() for k, v in out.items()}


def _make_servicer(model: _Model, model_name: str, version: int):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (gRPC method name)
            spec = request.model_spec
            if spec.name != model_name:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
            if spec.HasField("version") and spec.version.value != version:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"Servable not found for request: Specific({spec.name}, {spec.version.value})")
            signature = spec.signature_name or "serving_default"
            try:
                arrays = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                out = model.run(signature, arrays)
            except (ValueError, TypeError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            wanted = list(request.output_filter) or list(out)
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name = model_name
            resp.model_spec.version.value = version
            resp.model_spec.signature_name = signature
            for k in wanted:
                if k not in out:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"output_filter: unknown output {k}")
                resp.outputs[k].CopyFrom(tf.make_tensor_proto(out[k]))
            return resp

    return Servicer()


def _make_rest_handler(model: _Model, model_name: str, version: int):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _reply(self, code: int, doc: dict) -> None:
            body = json.dumps(doc, separators=(",", ":")).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self):
            m = _REST_PATH.match(self.path)
            if not m:
                return None, "Malformed request: " + self.path
            name, ver, predict = m.groups()
            if name != model_name or (ver is not None and int(ver) != version):
                return None, f"Servable not found for request: {'Latest' if ver is None else 'Specific'}({name})"
            return predict, None

        def do_GET(self):  # noqa: N802
            predict, err = self._route()
            if err or predict:
                return self._reply(404, {"error": err or "use POST for :predict"})
            self._reply(200, {"model_version_status": [{"version": str(version), "state": "AVAILABLE",
                                                        "status": {"error_code": "OK", "error_message": ""}}]})

        def do_POST(self):  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))  # always drain the body first
            predict, err = self._route()
            if err or not predict:
                return self._reply(404, {"error": err or "only :predict is served"})
            try:
                doc = json.loads(raw)
                signature = doc.get("signature_name") or "serving_default"
                if "inputs" in doc:  # columnar format
                    inputs = doc["inputs"]
                    if not isinstance(inputs, dict):
                        sig_inputs = model.inputs.get(signature, {})
                        if len(sig_inputs) != 1:
                            raise ValueError("unnamed inputs need a signature with exactly one input")
                        inputs = {next(iter(sig_inputs)): inputs}
                    out = model.run(signature, {k: np.asarray(v) for k, v in inputs.items()})
                    return self._reply(200, {"outputs": {k: v.tolist() for k, v in out.items()}})
                if "instances" in doc:  # row format: one dict per batch element
                    rows = doc["instances"]
                    if not rows or not all(isinstance(r, dict) for r in rows):
                        raise ValueError("instances: expected a list of {input name: value} objects")
                    arrays = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
                    out = model.run(signature, arrays)
                    n = len(rows)
                    return self._reply(200, {"predictions": [{k: v[i].tolist() for k, v in out.items()}
                                                             for i in range(n)]})
                raise ValueError("Missing 'inputs' or 'instances' key")
            except (ValueError, KeyError, TypeError) as e:
                self._reply(400, {"error": " ".join(str(e).split())})

    return Handler


class StandinServer:
    """Serves one SavedModel like ``tensorflow_model_server`` would, for tests (see the module docstring).

    Args:
      model_dir: exported SavedModel directory.
      model_name: the name clients must use (``model_spec.name`` / the REST path).
      version: the version it reports (and accepts when a request names one).
      host: interface to bind (default loopback only).
      port: gRPC port (0 = pick a free one).
      rest: also serve REST; ``rest_port`` (0 = pick a free one).
      max_message_mb: gRPC message limits of the server (TF Serving uses 2 GB).
    """

    def __init__(self, model_dir, model_name: str = "ldr_student", version: int = 1, host: str = "127.0.0.1",
                 port: int = 0, rest: bool = False, rest_port: int = 0, max_message_mb: int = 2047):
        self.model_dir = str(model_dir)
        self.model_name = model_name
        self.version = int(version)
        self.host = host
        self._port, self._rest, self._rest_port = int(port), bool(rest), int(rest_port)
        self._max = int(max_message_mb) * 1024 * 1024
        self._grpc = self._http = self._thread = None
        self.grpc_port = self.rest_port = None

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def rest_address(self) -> str:
        return f"{self.host}:{self.rest_port}"

    def start(self) -> "StandinServer":
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        model = _Model(self.model_dir)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                                 options=[("grpc.max_send_message_length", self._max),
                                          ("grpc.max_receive_message_length", self._max)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _make_servicer(model, self.model_name, self.version), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{self.host}:{self._port}")
        if not self.grpc_port:
            raise OSError(f"cannot bind the gRPC port {self.host}:{self._port}")
        self._grpc.start()
        if self._rest:
            self._http = ThreadingHTTPServer((self.host, self._rest_port),
                                             _make_rest_handler(model, self.model_name, self.version))
            self.rest_port = self._http.server_address[1]
            self._thread = threading.Thread(target=self._http.serve_forever, name="standin-rest", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._grpc is not None:
            self._grpc.stop(grace=None)
            self._grpc = None

    def __enter__(self) -> "StandinServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="tools.serving.standin", description="Test double of tensorflow_model_server.")
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--model_name", default="ldr_student")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8500)
    ap.add_argument("--rest_api_port", type=int, default=8501, help="0 disables REST")
    args = ap.parse_args(argv)
    server = StandinServer(args.model_dir, args.model_name, host=args.host, port=args.port,
                           rest=args.rest_api_port != 0, rest_port=args.rest_api_port).start()
    print(f"stand-in (TEST DOUBLE) serving {args.model_name} from {args.model_dir}: gRPC {server.grpc_address}"
          + (f", REST {server.rest_address}" if server.rest_port else ""), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
