"""`ldr_tf.cli`: the exit statuses and one-line messages every command shares."""

import subprocess
import sys

import pytest
from absl import flags

from ldr_tf import cli
from tests.helpers import ENV, REPO


def _define(fv):
    flags.DEFINE_string("path", None, "A file.", flag_values=fv)
    flags.DEFINE_integer("n", 1, "A number.", flag_values=fv)


def _body(fv):
    if fv.path is None:
        raise cli.UsageError("--path is required")
    if fv.path == "bad":
        raise ValueError(f"{fv.path}: not a NIfTI file\n(second line is dropped)")
    if fv.path == "oserror":
        raise FileNotFoundError(2, "No such file or directory", "x.nii.gz")
    if fv.path == "bug":
        raise RuntimeError("a bug is not swallowed")
    return 0


@pytest.mark.parametrize("argv, status, message", [
    (["prog", "--path=ok"], 0, None),
    (["prog"], 2, "prog: usage error: --path is required"),
    (["prog", "--n=x"], 2, "prog: usage error: flag --n=x: invalid literal for int() with base 10: 'x'"),
    (["prog", "--nope=1"], 2, "prog: usage error: Unknown command line flag 'nope'"),
    (["prog", "--path=ok", "extra"], 2, "prog: usage error: unexpected arguments: extra"),
    (["prog", "--path=bad"], 1, "prog: error: bad: not a NIfTI file (second line is dropped)"),
    (["prog", "--path=oserror"], 1, "prog: error: [Errno 2] No such file or directory: 'x.nii.gz'"),
])
def test_run_argv_statuses_and_one_line_messages(argv, status, message, capsys):
    assert cli.run_argv(_define, _body, argv, "prog") == status
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ([message] if message else [])


def test_run_argv_help_and_bugs(capsys):
    assert cli.run_argv(_define, _body, ["prog", "--help"], "prog") == 0
    assert "--path" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="a bug is not swallowed"):
        cli.run_argv(_define, _body, ["prog", "--path=bug"], "prog")


def test_python_m_commands_share_the_convention(tmp_path):
    """A real command through absl's app: a bad flag value exits 2, a missing input file 1, one line each."""
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "ldr_tf.export", *args], cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=120)
        return r.returncode, r.stderr.strip().splitlines()

    status, err = run("--step=x")
    assert status == 2 and err[-1].startswith("ldr_tf.export: usage error: flag --step=x")
    status, err = run(f"--checkpoint={tmp_path / 'none'}", f"--out={tmp_path / 'o'}")
    assert status == 1 and err[-1].startswith(f"ldr_tf.export: error: {tmp_path / 'none'}")
    assert not (tmp_path / "o").exists()


def test_sigterm_removes_half_written_outputs_and_exits_130(tmp_path):
    """A command stopped by `kill` (SIGTERM) cleans up like Ctrl-C: its temporary file is gone, the target untouched."""
    import signal
    import time

    target = tmp_path / "out.h5"
    target.write_text("the user's old file")
    script = f"""
import sys, time
from pathlib import Path
from ldr_tf import cli
from ldr_tf.atomic import atomic_path

def main(argv):
    with atomic_path({str(target)!r}) as tmp:
        tmp.write_text("half")
        print("writing", flush=True)
        time.sleep(60)
    return 0

cli.run(main, "slow")
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "slow: interrupted" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"] and target.read_text() == "the user's old file"
