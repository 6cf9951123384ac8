"""TF Serving contract: the REST body the client sends, the gRPC client against an in-process stand-in server
(tools/serving/standin.py, a test double), equality with predict, message limits, errors, the config files."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("tensorflow_serving.apis.prediction_service_pb2_grpc")
grpc = pytest.importorskip("grpc")

from ldr_tf import predict  # noqa: E402
from ldr_tf.deploy.loader import open_registrar  # noqa: E402
from tests.helpers import ENV, REPO, SIZE  # noqa: E402
from tools.serving import client  # noqa: E402
from tools.serving.standin import StandinServer  # noqa: E402

SERVING = REPO / "tools" / "serving"
OUTPUT_FILES = ("warped.nii.gz", "warped_seg.nii.gz", "flow_vox.nii")


@pytest.fixture(scope="module")
def student(shared_student):
    return shared_student


@pytest.fixture(scope="module")
def server(student):
    with StandinServer(student["export"], model_name="ldr_student", rest=True) as s:
        yield s


@pytest.fixture(scope="module")
def predicted(student, scans, tmp_path_factory):  # noqa: F811
    """predict's outputs for the phantom pair (the reference for the client)."""
    out = tmp_path_factory.mktemp("predicted") / "out"
    args = ["predict", f"--model={student['export']}", f"--fixed={scans['fixed']}", f"--moving={scans['moving']}",
            f"--moving_seg={scans['moving_seg']}", f"--fixed_seg={scans['fixed_seg']}", "--preprocessing=brain",
            f"--out_dir={out}"]
    assert predict.run(args) == 0
    return out


def _inputs(batch=1, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.random((batch, SIZE, SIZE, SIZE, 1), dtype=np.float32)
    return f, np.roll(f, 3, 2), (f * 4).astype(np.int32)


def test_rest_body_decodes_to_the_exact_tensors_the_signature_needs(student):
    fixed, moving, labels = _inputs()
    body = client.rest_request_body("register_labels", {"fixed": fixed, "moving": moving, "moving_labels": labels})
    doc = json.loads(body)
    assert doc["signature_name"] == "register_labels" and set(doc["inputs"]) == {"fixed", "moving", "moving_labels"}
    decoded = {k: np.asarray(v, np.int32 if k == "moving_labels" else np.float32) for k, v in doc["inputs"].items()}
    np.testing.assert_array_equal(decoded["fixed"], fixed)  # bit for bit through JSON text
    np.testing.assert_array_equal(decoded["moving_labels"], labels)
    loaded = tf.saved_model.load(str(student["export"]))
    got = loaded.signatures["register_labels"](**{k: tf.constant(v) for k, v in decoded.items()})
    ref = open_registrar(student["export"])(fixed, moving, labels)
    for k in ("flow", "warped", "warped_labels"):
        np.testing.assert_array_equal(got[k].numpy(), ref[k])
    # and the response side: what the server sends back parses to the same arrays
    resp = json.dumps({"outputs": {k: v.numpy().tolist() for k, v in got.items()}}).encode()
    parsed = client.parse_rest_response(resp, {"warped_labels": np.int32})
    for k in ("flow", "warped", "warped_labels"):
        np.testing.assert_array_equal(parsed[k], ref[k])


def test_remote_registrar_grpc_and_rest_equal_the_local_model(student, server):
    fixed, moving, labels = _inputs(seed=1)
    ref = open_registrar(student["export"])(fixed, moving, labels)
    for protocol, address in (("grpc", server.grpc_address), ("rest", server.rest_address)):
        remote = client.RemoteRegistrar(address, "ldr_student", (SIZE,) * 3, protocol)
        got = remote(fixed, moving, labels)
        assert set(got) == {"flow", "warped", "warped_labels"}
        for k in got:
            assert got[k].dtype == ref[k].dtype
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{protocol} {k}")
        assert remote.last_bytes["request"] > 2 * 4 * SIZE ** 3
        remote.close()


def test_client_cli_over_grpc_equals_predict(server, student, scans, predicted, tmp_path):  # noqa: F811
    out = tmp_path / "client"
    r = subprocess.run([sys.executable, "-m", "tools.serving.client", f"--server={server.grpc_address}",
                        "--protocol=grpc", "--model_name=ldr_student", f"--metadata={student['export']}",
                        f"--fixed={scans['fixed']}", f"--moving={scans['moving']}",
                        f"--moving_seg={scans['moving_seg']}", f"--fixed_seg={scans['fixed_seg']}",
                        "--preprocessing=brain", f"--out_dir={out}"], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "over grpc" in r.stderr
    for name in OUTPUT_FILES:
        a = nib.load(str(out / name))
        b = nib.load(str(predicted / name))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj), err_msg=name)
        np.testing.assert_array_equal(a.affine, b.affine)
    ra = json.loads((out / "result.json").read_text())
    rb = json.loads((predicted / "result.json").read_text())
    assert ra["dice"] == rb["dice"] and ra["dice_before"] == rb["dice_before"]
    assert ra["model"]["protocol"] == "grpc" and ra["preprocessing"] == rb["preprocessing"]


def test_client_in_process_over_rest_equals_predict(server, student, scans, predicted, tmp_path):  # noqa: F811
    out = tmp_path / "rest"
    rc = client.run(["client", f"--server={server.rest_address}", "--protocol=rest", "--model_name=ldr_student",
                     f"--metadata={student['export'] / 'ldr_tf_export.json'}", f"--fixed={scans['fixed']}",
                     f"--moving={scans['moving']}", f"--moving_seg={scans['moving_seg']}",
                     f"--fixed_seg={scans['fixed_seg']}", "--preprocessing=brain", f"--out_dir={out}"])
    assert rc == 0
    for name in OUTPUT_FILES:
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / name)).dataobj),
                                      np.asarray(nib.load(str(predicted / name)).dataobj), err_msg=name)


def test_messages_over_4mb_need_the_raised_limits(server):
    fixed, moving, _ = _inputs(batch=16, seed=2)  # request 4.2 MB, response 8.4 MB: both over gRPC's 4 MB default
    remote = client.RemoteRegistrar(server.grpc_address, "ldr_student", (SIZE,) * 3)
    out = remote(fixed, moving)
    assert out["flow"].shape == (16, SIZE, SIZE, SIZE, 3)
    assert remote.last_bytes["request"] > 4 << 20 and remote.last_bytes["response"] > 4 << 20
    remote.close()
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server.grpc_address) as channel:  # default options: the response is refused
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(client.grpc_request("ldr_student", "register", {"fixed": fixed, "moving": moving}),
                         timeout=120)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_errors_reach_the_user_as_one_line(server, student, scans, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "o"
    base = ["client", f"--metadata={student['export']}", f"--fixed={scans['fixed']}",
            f"--moving={scans['moving']}", "--preprocessing=none", f"--out_dir={out}"]
    assert client.run(base + [f"--server={server.grpc_address}", "--model_name=other"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"tools.serving.client: error: {server.grpc_address}: gRPC NOT_FOUND: Servable not found for " \
                  "request: Latest(other)"
    assert client.run(base + [f"--server={server.rest_address}", "--protocol=rest", "--model_name=other"]) == 1
    assert "HTTP 404: Servable not found" in capsys.readouterr().err
    assert not out.exists()
    remote = client.RemoteRegistrar(server.grpc_address, "ldr_student", (SIZE,) * 3)
    with pytest.raises(ValueError, match=r"moving: expected \[B, 32, 32, 32, 1\]"):
        remote(np.zeros((1, SIZE, SIZE, SIZE, 1)), np.zeros((1, 8, 8, 8, 1)))
    req = client.grpc_request("ldr_student", "no_such_signature", {"fixed": np.zeros((1, SIZE, SIZE, SIZE, 1),
                                                                                     np.float32)})
    with pytest.raises(grpc.RpcError) as e:
        remote._stub.Predict(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no_such_signature" in e.value.details()
    remote.close()
    with pytest.raises(ValueError, match="no ldr_tf_export.json"):
        client.load_metadata(tmp_path)


def test_config_files_say_what_the_server_needs():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    for name, models in (("models.config", ["ldr_student"]), ("models_with_teacher.config",
                                                               ["ldr_student", "ldr_teacher"])):
        cfg = text_format.Parse((SERVING / name).read_text(), model_server_config_pb2.ModelServerConfig())
        got = [(c.name, c.base_path, c.model_platform) for c in cfg.model_config_list.config]
        assert got == [(m, f"/models/{m}", "tensorflow") for m in models]
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((SERVING / "docker-compose.yml").read_text())
    svc = compose["services"]["ldr-serving"]
    assert svc["image"] == "tensorflow/serving:2.21.0"
    assert set(svc["ports"]) == {"8500:8500", "8501:8501"}
    assert any(v.endswith(":/models/ldr_student/1:ro") for v in svc["volumes"])
    cmd = svc["command"]
    assert "--model_config_file=/models/models.config" in cmd and "--xla_cpu_compilation_enabled=true" in cmd
    assert any(c.startswith("--grpc_channel_arguments=") and "max_receive_message_length" in c for c in cmd)
    assert "tensorflow-serving-api" in (REPO / "Makefile").read_text()
    assert Path(client.__file__).parent == SERVING
