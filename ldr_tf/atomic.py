"""Writing files so that nothing half-written is ever left: a temporary file beside the target, then a rename.

Every file the project writes for the user (datasets, run configs, exports' metadata, results, reports, figures,
NIfTI outputs) goes through `atomic_path`: the data are written to a hidden temporary file in the target's folder
(same file system, so the final `os.replace` is atomic), which gets the mode a plain ``open()`` would give (0666
minus the umask; ``mkstemp`` makes 0600) and replaces the target only once the writer has finished. If anything
fails the temporary file is removed and the target, new or old, is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_path", "write_text", "write_json", "plain_mode"]


def plain_mode(path) -> None:
    """Gives `path` the mode a plain ``open()`` would (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yields a temporary `Path` beside `path`; it replaces `path` when the block completes, else it is removed.

    Args:
      path: the file to write; its folder is created.
      suffix: of the temporary file (default: the target's suffixes, e.g. ``.nii.gz``, which some writers use to
        choose the format).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp" if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        plain_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> Path:
    """Writes `text` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj, path) -> Path:
    """Writes `obj` as indented JSON (non-JSON values through ``str``) to `path` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def check_writable(out_dir: str | os.PathLike) -> None:
    """ValueError unless `out_dir` is, or can be created as, a writable folder."""
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{out_dir}: cannot create the output folder ({probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{out_dir}: output folder is not writable")
