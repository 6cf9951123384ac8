"""Export: SavedModel signatures equal the Keras model in a fresh process, the TF1 loader (saved_model_cli, like TF
Serving) runs them, the XLA flag is honoured and recorded, the teacher exports too, outputs are installed atomically.

The shared student export is the `shared_student` fixture of conftest.py (one export per test session).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from ldr_tf.deploy import savedmodel
from ldr_tf.training import checkpoints as runs
from ldr_tf.ops import warp
from tests.helpers import ENV, REPO, SIZE, make_run

def _inputs(size=SIZE, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, size, size, size, 1)
    # smooth-ish images so that flows and warps are not dominated by noise
    base = rng.random(shape).astype(np.float32)
    fixed = (base + np.roll(base, 1, 1) + np.roll(base, 1, 2)) / 3
    moving = np.roll(fixed, 2, 3) * 0.9 + 0.05
    labels = (fixed * 5).astype(np.int32)
    return fixed.astype(np.float32), moving.astype(np.float32), labels


def _keras_outputs(run_dir, fixed, moving, labels):
    model, _ = runs.restore_model(run_dir)
    res = model(tf.concat([fixed, moving], -1), training=False)
    flow = res["agg_flow"]
    return {"flow": flow.numpy(), "warped": res["warped"].numpy(),
            "warped_labels": warp.warp_labels(labels, flow).numpy()}


@pytest.fixture(scope="module")
def student(shared_student):
    s = shared_student
    fixed, moving, labels = _inputs()
    ref = _keras_outputs(s["run"], fixed, moving, labels)
    d = s["root"] / "arrays"
    d.mkdir(exist_ok=True)
    for k, v in dict(fixed=fixed, moving=moving, moving_labels=labels).items():
        np.save(d / f"{k}.npy", v)
    return {**s, "ref": ref, "arrays": d}


@pytest.fixture(scope="module")
def noxla_export(student, tmp_path_factory):
    """The same run exported by the CLI with --noxla_warp, over an existing folder (--overwrite)."""
    out = tmp_path_factory.mktemp("noxla") / "export"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    r = subprocess.run([sys.executable, "-m", "ldr_tf.export", f"--checkpoint={student['run']}", f"--out={out}",
                        "--noxla_warp", "--overwrite"], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "XLA sampler off" in r.stdout
    return out


def _library(export_dir):
    """The graph function library of a SavedModel."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(export_dir) / "saved_model.pb").read_bytes())
    return sm.meta_graphs[0].graph_def.library


def _xla_functions(export_dir) -> list:
    """Names of the graph functions marked _XlaMustCompile=True in a SavedModel."""
    return [f.signature.name for f in _library(export_dir).function if f.attr["_XlaMustCompile"].b]


def test_flows_are_not_trivial(student):
    # guards the equality tests below against a model that outputs (almost) nothing
    flow = student["ref"]["flow"]
    assert 0.2 < float(np.abs(flow).mean()) < 20.0
    assert np.mean(student["ref"]["warped_labels"] != np.load(student["arrays"] / "moving_labels.npy")) > 0.05


def test_fresh_process_matches_keras_for_both_signatures_and_exports(student, noxla_export, tmp_path):
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "d = sys.argv[1]; out = {}\n"
        "args = {k: tf.constant(np.load(f'{d}/{k}.npy')) for k in ('fixed', 'moving', 'moving_labels')}\n"
        "for tag, path in (('xla', sys.argv[2]), ('noxla', sys.argv[3])):\n"
        "    m = tf.saved_model.load(path)\n"
        "    r = m.signatures['register'](fixed=args['fixed'], moving=args['moving'])\n"
        "    rl = m.signatures['register_labels'](**args)\n"
        "    d0 = m.signatures['serving_default'](fixed=args['fixed'], moving=args['moving'])\n"
        "    rf = m.signatures['register_flow'](fixed=args['fixed'], moving=args['moving'])\n"
        "    assert set(rf) == {'flow'}\n"
        "    out[f'{tag}_flow_only'] = rf['flow'].numpy()\n"
        "    out.update({f'{tag}_{k}': v.numpy() for k, v in r.items()})\n"
        "    out.update({f'{tag}_labels_{k}': v.numpy() for k, v in rl.items()})\n"
        "    out[f'{tag}_default_flow'] = d0['flow'].numpy()\n"
        "np.savez(sys.argv[4], **out)\n"
    )
    res = tmp_path / "out.npz"
    r = subprocess.run([sys.executable, "-c", script, str(student["arrays"]), str(student["export"]),
                        str(noxla_export), str(res)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(res)
    ref = student["ref"]
    for tag in ("xla", "noxla"):
        for k in ("flow", "warped"):
            np.testing.assert_allclose(got[f"{tag}_{k}"], ref[k], atol=1e-5, rtol=0, err_msg=f"{tag} {k}")
            np.testing.assert_allclose(got[f"{tag}_labels_{k}"], ref[k], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[f"{tag}_default_flow"], ref["flow"], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got[f"{tag}_flow_only"], got[f"{tag}_flow"])  # register_flow: the same graph
        labels = got[f"{tag}_labels_warped_labels"]
        assert labels.dtype == np.int32 and labels.shape == ref["warped_labels"].shape
        # flows agree to 1e-5: only exact ties between two labels may flip
        assert np.mean(labels != ref["warped_labels"]) < 1e-4


def test_registrar_flow_and_exports_without_register_flow(student, tmp_path):
    """`Registrar.flow` is register's flow without the warp; an export of ldr-tf 0.3.0 or earlier (no register_flow
    signature) falls back to register's flow."""
    from ldr_tf.deploy.loader import open_registrar

    f, m = (np.load(student["arrays"] / f"{k}.npy") for k in ("fixed", "moving"))
    reg = open_registrar(student["export"])
    flow = reg(f, m)["flow"]
    np.testing.assert_array_equal(reg.flow(f, m), flow)
    loaded = tf.saved_model.load(str(student["export"]))
    old = tmp_path / "old"
    tf.saved_model.save(loaded, str(old), signatures={k: loaded.signatures[k] for k in ("register", "register_labels")})
    meta = savedmodel.load_metadata(student["export"])
    meta["signatures"].pop("register_flow")
    (old / savedmodel.METADATA).write_text(json.dumps(meta))
    before = open_registrar(old)
    assert "register_flow" not in tf.saved_model.load(str(old)).signatures
    np.testing.assert_array_equal(before.flow(f, m), flow)
    with pytest.raises(ValueError, match="fixed: the model's grid is"):
        reg.flow(f[:, :-1], m)


def test_metadata_and_xla_choice_are_recorded_and_compiled_in(student, noxla_export):
    meta = savedmodel.load_metadata(student["export"])
    assert meta["image_size"] == [SIZE] * 3 and meta["model"] == "student" and meta["cascades"] == 1
    assert meta["trained_steps"] == 1 and meta["parameters"] > 1_000_000
    assert meta["preprocessing"]["kind"] == "synthetic"
    assert meta["xla_warp"] is True and meta["serving"]["xla_cpu_compilation_enabled"] is True
    assert _xla_functions(student["export"]), "the XLA export must hold XLA-compiled functions"
    meta2 = savedmodel.load_metadata(noxla_export)
    assert meta2["xla_warp"] is False and not _xla_functions(noxla_export)
    # installed over the old folder: nothing of it is left, no temporary folder next to it, readable by others
    assert not (noxla_export / "stale.txt").exists()
    assert [p.name for p in noxla_export.parent.iterdir()] == ["export"]
    for p in [noxla_export, *noxla_export.rglob("*")]:
        assert p.stat().st_mode & 0o004, f"{p} is not world-readable (TF Serving may run as another user)"


def _saved_model_cli(*args):
    exe = Path(sys.executable).with_name("saved_model_cli")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    return subprocess.run(cmd + list(args), env=ENV, capture_output=True, text=True, timeout=300)


def test_saved_model_cli_show_lists_the_signatures(student):
    r = _saved_model_cli("show", "--all", "--dir", str(student["export"]))
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    for sig in ("register", "register_labels", "register_flow", "serving_default"):
        assert f"signature_def['{sig}']" in text
    block = text.split("signature_def['register_labels']")[1].split("signature_def[")[0]
    assert "inputs['moving_labels']" in block and "DT_INT32" in block
    assert f"shape: (-1, {SIZE}, {SIZE}, {SIZE}, 3)" in block  # flow: static grid in the signature
    assert "outputs['warped_labels']" in block and "tensorflow/serving/predict" in block


def test_saved_model_cli_run_tf1_loader_xla_export(student, tmp_path):
    # The TF1 SavedModelBundle-style loader, as TF Serving: catches untracked Keras 3 variables; runs the XLA sampler.
    a = student["arrays"]
    r = _saved_model_cli("run", "--dir", str(student["export"]), "--tag_set", "serve", "--signature_def", "register",
                         "--inputs", f"fixed={a / 'fixed.npy'};moving={a / 'moving.npy'}", "--outdir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "flow.npy"), student["ref"]["flow"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "warped.npy"), student["ref"]["warped"], atol=1e-5, rtol=0)


def test_teacher_vtn_64_with_affine_exports_the_same_way(tmp_path):
    from networks.cascade import CascadeConfig

    net = CascadeConfig(stem="vtn", cascades=1, affine="vtn", image_size=(64,) * 3, channels=4).to_dict()
    run = make_run(tmp_path / "teacher", net, model="teacher", seed=1, scale=0.02)
    out = savedmodel.export_run(run, tmp_path / "export")
    meta = savedmodel.load_metadata(out)
    assert meta["model"] == "teacher" and meta["network"]["stem"] == "vtn" and meta["image_size"] == [64] * 3
    fixed, moving, labels = _inputs(64, batch=1, seed=2)
    ref = _keras_outputs(run, fixed, moving, labels)
    assert float(np.abs(ref["flow"]).mean()) > 0.05  # the affine stage and the stem both move things
    loaded = tf.saved_model.load(str(out))
    got = loaded.signatures["register_labels"](fixed=tf.constant(fixed), moving=tf.constant(moving),
                                               moving_labels=tf.constant(labels))
    np.testing.assert_allclose(got["flow"].numpy(), ref["flow"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["warped"].numpy(), ref["warped"], atol=1e-5, rtol=0)
    assert np.mean(got["warped_labels"].numpy() != ref["warped_labels"]) < 1e-4


def test_existing_output_is_refused_before_restoring(student, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        savedmodel.export_run(student["run"], out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="no checkpoint|not a training run"):
        savedmodel.export_run(tmp_path / "nothing", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_load_metadata_errors(tmp_path):
    with pytest.raises(ValueError, match="not a SavedModel"):
        savedmodel.load_metadata(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ValueError, match="without ldr_tf_export.json"):
        savedmodel.load_metadata(tmp_path)
    (tmp_path / "ldr_tf_export.json").write_text("{oops")
    with pytest.raises(ValueError, match="unreadable export metadata"):
        savedmodel.load_metadata(tmp_path)
    (tmp_path / "ldr_tf_export.json").write_text(json.dumps({"image_size": [1, 2, 3]}))
    assert savedmodel.load_metadata(tmp_path)["image_size"] == [1, 2, 3]


def test_bfloat16_export_is_close_to_float32(student, tmp_path):
    out = savedmodel.export_run(student["run"], tmp_path / "bf16", bfloat16=True)
    meta = savedmodel.load_metadata(out)
    assert meta["network"]["compute_dtype"] == "bfloat16"
    loaded = tf.saved_model.load(str(out))
    args = {k: tf.constant(np.load(student["arrays"] / f"{k}.npy")) for k in ("fixed", "moving")}
    got = loaded.signatures["register"](**args)
    assert got["flow"].dtype == tf.float32
    ref = student["ref"]["flow"]
    err = np.abs(got["flow"].numpy() - ref)
    # bfloat16 keeps 8 mantissa bits in the convolutions: flows agree to a small fraction of their size
    assert err.mean() < 0.02 * np.abs(ref).mean() + 1e-3 and err.max() < 0.5


def test_every_weight_is_stored_once(student):
    """keras-team/keras#23553: ExportArchive.track() stored each weight twice (2x files, 2x memory in TF Serving)."""
    stored = sum(int(np.prod(shape)) for name, shape in tf.train.list_variables(str(student["export"] / "variables" /
                                                                                   "variables"))
                 if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH"))
    assert stored == savedmodel.load_metadata(student["export"])["parameters"]


def test_the_network_graph_is_stored_once(student):
    """register calls the register_flow function and register_labels register's: the network is traced once (not
    inline in each endpoint), so a SavedModel load rebuilds one copy of it (predict never calls register_labels)."""
    library = _library(student["export"]).function
    names = [f.signature.name for f in library]

    def one(name):
        found = [f for f in library if re.fullmatch(rf"__inference_{name}_\d+", f.signature.name)]
        assert len(found) == 1, (name, names)
        return found[0]

    def calls(f):
        return {n.attr["f"].func.name for n in f.node_def if n.op in ("StatefulPartitionedCall", "PartitionedCall")}

    flow, register, labels = (one(n) for n in ("register_flow", "register", "register_labels"))
    assert flow.signature.name in calls(register) and register.signature.name in calls(labels)
    # the network (its convolutions) is reached from register_flow; register and register_labels hold none
    by_name = {f.signature.name: f for f in library}
    reached, todo = set(), [flow.signature.name]
    while todo:
        name = todo.pop()
        if name in by_name and name not in reached:
            reached.add(name)
            todo.extend(calls(by_name[name]))
    assert any(n.op == "Conv3D" for name in reached for n in by_name[name].node_def)
    assert not any(n.op == "Conv3D" for f in (register, labels) for n in f.node_def)


def test_reexport_keeps_weights_and_metadata(student, tmp_path):
    """An existing export written again (ldr_tf.export --saved_model): same outputs, metadata kept, the source
    recorded; the CLI refuses --step with it."""
    out = savedmodel.reexport(student["export"], tmp_path / "again", xla_warp=False)
    old, new = savedmodel.load_metadata(student["export"]), savedmodel.load_metadata(out)
    assert new["reexported_from"]["path"] == str(student["export"]) and new["xla_warp"] is False
    for k in ("model", "parameters", "trained_steps", "checkpoint", "preprocessing", "network"):
        assert new[k] == old[k], k
    # weights stored in name order (trainable first), whatever the process: Keras' own order changed from one export
    # to the next, so re-exporting a shipped model rewrote its 20 MB of weights
    for d in (student["export"], out):
        stored = tf.train.load_checkpoint(str(d / "variables" / "variables"))
        loaded = tf.saved_model.load(str(d))
        variables = loaded.signatures["register"].variables
        for i, v in enumerate(sorted(variables, key=lambda v: (not v.trainable, v.name))):
            np.testing.assert_array_equal(stored.get_tensor(f"_all_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"),
                                          v.numpy(), err_msg=f"{d}: {v.name}")
    fixed, moving, labels = _inputs()
    m = tf.saved_model.load(str(out))
    got = m.signatures["register_labels"](fixed=tf.constant(fixed), moving=tf.constant(moving),
                                          moving_labels=tf.constant(labels))
    for k in ("flow", "warped"):
        np.testing.assert_allclose(got[k].numpy(), student["ref"][k], atol=1e-5, rtol=0, err_msg=k)
    with pytest.raises(ValueError, match="already exists"):
        savedmodel.reexport(student["export"], out)
    with pytest.raises(ValueError, match="is the export being read"):
        savedmodel.reexport(out, out, overwrite=True)
    r = subprocess.run([sys.executable, "-m", "ldr_tf.export", f"--saved_model={out}", f"--out={tmp_path / 'x'}",
                        "--step=3"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--step" in r.stderr and not (tmp_path / "x").exists()


def test_reexport_refuses_an_export_that_does_not_match_its_metadata(student, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(student["export"], bad)
    meta = savedmodel.load_metadata(bad)
    meta["network"]["cascades"] = meta["network"]["cascades"] + 1
    (bad / savedmodel.METADATA).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"bad: the export does not match its network description: \d+ missing"):
        savedmodel.reexport(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (bad / "saved_model.pb").write_bytes(b"not a protobuf")
    from ldr_tf.deploy.loader import open_registrar

    for load in (lambda: savedmodel.reexport(bad, tmp_path / "out"), lambda: open_registrar(bad)):
        with pytest.raises(ValueError, match=r"bad: cannot load the SavedModel \("):
            load()
    assert not (tmp_path / "out").exists()
