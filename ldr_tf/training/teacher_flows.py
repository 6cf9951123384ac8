"""Where the student's teacher deformations come from: a frozen teacher run on the fly, or a cache of flows.

* `load_registration_fn(path)` turns a training run directory (``config.json`` + checkpoints) or an exported
  SavedModel (``python -m ldr_tf.export``) into a callable ``pair [B, D, H, W, 2] -> flow [B, D, H, W, 3]``.
* `TeacherCache` is the file written by ``python -m ldr_tf.distill``: one HDF5 dataset per ordered pair, named
  ``"<fixed>-<moving>"`` with ``/`` replaced by ``_`` (as in the original code), holding the teacher's final flow
  on the network grid as float16 ``[D, H, W, 3]`` (gzip-compressed). float16 keeps ~3 significant digits: 0.008
  voxel steps near 10 voxels, well below the accuracy of any registration. Size per pair: ``D*H*W*3*2`` bytes
  before compression (1.5 MiB at 64^3, 12 MiB at 128^3).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from ldr_tf.ops import warp

__all__ = ["pair_key", "TeacherCache", "load_registration_fn", "map_to_augmented"]


def pair_key(fixed_id: str, moving_id: str) -> str:
    """Cache key of an ordered pair: ``"<fixed>-<moving>"`` with ``/`` replaced by ``_``."""
    return f"{fixed_id}-{moving_id}".replace("/", "_")


class TeacherCache:
    """Read access to a teacher-flow cache (an HDF5 file written by ``ldr_tf.distill``)."""

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: teacher cache not found (build it with python -m ldr_tf.distill)")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(f"{self.path}: not a readable teacher cache ({e})") from None
        self.attrs = dict(self._h5.attrs)
        self.keys = set(self._h5.keys())

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, fixed_id: str, moving_id: str) -> np.ndarray:
        """The cached flow ``[D, H, W, 3]`` float32 of a pair; ValueError naming the pair if absent."""
        key = pair_key(fixed_id, moving_id)
        if key not in self.keys:
            raise ValueError(
                f"{self.path}: no teacher flow for pair {fixed_id} -> {moving_id} (the cache holds "
                f"{len(self.keys)} pairs; rebuild it with python -m ldr_tf.distill on this dataset)"
            )
        return np.asarray(self._h5[key][()], np.float32)

    def lookup_batch(self, id1, id2) -> np.ndarray:
        """Flows of a batch of pairs, ``[B, D, H, W, 3]`` float32 (ids as bytes or str)."""
        dec = lambda s: s.decode() if isinstance(s, bytes) else str(s)  # noqa: E731
        return np.stack([self.get(dec(a), dec(b)) for a, b in zip(np.asarray(id1), np.asarray(id2))])

    def close(self) -> None:
        self._h5.close()


def map_to_augmented(teacher_flow, aug_flow, iterations: int = 10) -> tf.Tensor:
    """Maps a teacher flow computed on the original pair to the pair whose moving image was augmented.

    With ``moving'(x) = moving(x + a(x))`` and ``fixed(x) ~ moving(x + phi(x))``, the flow registering moving' is
    ``psi(x) = phi(x) + a_inv(x + phi(x))`` = ``compose(a_inv, phi)``, ``a_inv`` the inverse field of ``a``.
    """
    a_inv = warp.invert_flow(aug_flow, iterations=iterations)
    return warp.compose(a_inv, teacher_flow)


def load_registration_fn(path: str | os.PathLike, trainable: bool = False):
    """A frozen registration model as a callable ``pair [B, D, H, W, 2] -> final flow [B, D, H, W, 3]``.

    `path` is anything `ldr_tf.deploy.loader.open_registrar` opens: an exported SavedModel (its ``register``
    signature), a training run directory (the latest checkpoint restored into the network its ``config.json``
    describes) or a pretrained name. Returns ``(fn, info)`` with ``info = {"kind": "saved_model"|"checkpoint",
    "image_size": (D, H, W) or None}``; ``fn.model`` is the Keras network of a run (else None).
    """
    from ldr_tf.deploy.loader import open_registrar

    reg = open_registrar(path)  # one-line errors for a missing or wrong model
    if reg.model is not None:
        reg.model.trainable = trainable

    def fn(pair):
        return reg.flow_fn(pair)

    fn.model = reg.model
    fn.keepalive = reg
    return fn, {"kind": reg.kind, "image_size": reg.image_size}
