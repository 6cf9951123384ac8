"""Training from the command line, in subprocesses: resume and refusals, two workers, SIGTERM (apart from
test_train.py so that the test workers share the long ones)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from ldr_tf.data.synthetic import ensure_demo_dataset
from tests.helpers import REPO, SIZE


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ensure_demo_dataset("demo", data_dir=d, size=SIZE, subjects=5, progress=False)
    return d


def _run(args, env=None, timeout=240):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ldr_tf.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_two_steps_then_resume_and_refuse_overwrite(tmp_path, data_dir):
    out = tmp_path / "run"
    common = [f"--data_dir={data_dir}", "--dataset=demo", f"--image_size={SIZE}", "--model=student",
              "--student_stem=ldr", "--noaldk",
              "--affine=none", "--cascades=1", "--batch=1", "--val_every=2", "--val_pairs=2", f"--out_dir={out}"]
    r = _run(common + ["--steps=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["steps"] == 2 and cfg["network"]["stem"] == "ldr"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation"] and 0 <= summary["validation"][-1]["dice"] <= 1
    assert summary["last_window"]["steps"] == 2 and set(summary["last"]) <= set(summary["last_window"])
    assert list((out / "logs").iterdir()), "TensorBoard events are written"
    r = _run(common + ["--steps=2"])
    assert r.returncode == 1 and "already holds a run" in r.stderr
    r = _run(common + ["--steps=3", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    r = _run(common + ["--steps=4", "--resume", "--cascades=2"])
    assert r.returncode == 1 and "differ from the saved run" in r.stderr
    # a copied run resumes in the copy: the original is left as it was
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    r = _run([a for a in common if not a.startswith("--out_dir")] + [f"--out_dir={copy}", "--steps=4", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert json.loads((copy / "summary.json").read_text())["steps"] == 4
    assert json.loads((copy / "config.json").read_text())["train"]["out_dir"] == str(copy)


def test_cli_student_with_aldk_needs_a_teacher(tmp_path, data_dir):
    r = _run([f"--data_dir={data_dir}", "--dataset=demo", "--model=student", "--aldk", f"--out_dir={tmp_path / 'x'}",
              "--steps=1"])
    assert r.returncode == 1 and "needs --teacher" in r.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_on_localhost(tmp_path, data_dir):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    out = tmp_path / "mw"
    args = [f"--data_dir={data_dir}", "--dataset=demo", f"--image_size={SIZE}", "--model=student", "--student_stem=ldr",
            "--noaldk", "--affine=none", "--cascades=1", "--batch=2", "--steps=3", "--val_every=0",
            "--strategy=multi_worker",
            f"--out_dir={out}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = []
    for i in range(2):
        e = {**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen([sys.executable, "-m", "ldr_tf.train", *args], cwd=REPO, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert (out / "checkpoints" / "checkpoint").exists()
    assert not list(out.glob(".worker-*")), "the non-chief worker's scratch checkpoints are removed"


def test_sigterm_saves_a_checkpoint_and_exits_130(tmp_path, data_dir):
    """`kill` (SIGTERM) stops a run like Ctrl-C: a checkpoint of the current step, exit 130, resumable."""
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "ldr_tf.train", f"--data_dir={data_dir}", "--dataset=demo", f"--image_size={SIZE}",
            "--model=student", "--student_stem=ldr", "--noaldk", "--affine=none", "--cascades=1", "--batch=1",
            "--steps=100000",
            "--val_every=0", "--checkpoint_every=100000", "--log_every=1", f"--out_dir={out}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180

        def summary_bytes():  # the event file grows with every step's summaries (--log_every=1)
            return sum(f.stat().st_size for f in (out / "logs").glob("events*")) if (out / "logs").is_dir() else 0

        while time.time() < deadline and summary_bytes() < 2000:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    ckpts = list((out / "checkpoints").glob("ckpt-*.index"))
    assert len(ckpts) == 1 and int(ckpts[0].name.split("-")[1].split(".")[0]) > 0
