"""``python -m ldr_tf.distill``: precompute the teacher's deformations of the training pairs (a teacher-flow cache).

The cache is one HDF5 file (format: `ldr_tf.training.teacher_flows.TeacherCache`): the teacher's final flow of every training
pair, float16, gzip-compressed, keyed ``"<fixed>-<moving>"``. The student then trains with
``--teacher_cache=<file>`` instead of running the teacher at every step; flows of augmented pairs are derived from
the cached ones exactly (``ldr_tf.training.teacher_flows.map_to_augmented``), so the student always learns from the deformation
of the pair it sees.

Example::

    python -m ldr_tf.distill --teacher=runs/teacher --dataset=demo --out=runs/teacher/flows.h5

``--refine=50,20`` refines each teacher flow for its pair (`ldr_tf.refine`, as ``predict --refine``): the cache then
holds the deformations of the teacher + per-pair optimisation, a stronger teacher than the network alone.
``--shuffle`` with ``--max_pairs`` caches a seeded random subset of the pairs instead of the first ones.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from absl import flags

from flags import common_flags
from ldr_tf import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    if "teacher" in FLAGS:
        return
    common_flags.define_data_flags()
    common_flags.define_runtime_flags()
    flags.DEFINE_string("teacher", None, "Teacher: a training run directory or an exported SavedModel.")
    flags.DEFINE_string("subset", "1", "Scheme or subset whose pairs are cached (default: training scheme 1).")
    flags.DEFINE_string("out", None, "Output HDF5 file.")
    flags.DEFINE_integer("batch", 1, "Pairs per teacher call.")
    flags.DEFINE_integer("max_pairs", 0, "Cache only the first N pairs (0 = all).")
    flags.DEFINE_bool("shuffle", False, "Take the pairs in a random order drawn with --seed (with --max_pairs: a random "
                      "subset).")
    from ldr_tf.predict import define_refine_flag

    define_refine_flag(FLAGS, "Refine each teacher flow for its pair first (steps at half[,full] resolution, as "
                       "predict --refine; e.g. 50,20). Empty: off.")


def build_cache(teacher: str, desc, out: str | os.PathLike, subset: str = "1", batch: int = 1,
                max_pairs: int = 0, progress: bool = True, refiner=None, shuffle: bool = False, seed: int = 0) -> dict:
    """Runs the teacher on every pair of `subset` (the first `max_pairs`, in a random order drawn with `seed` when
    `shuffle`), refines each flow with `refiner` (an `ldr_tf.refine.Refiner`) if given, and writes the cache
    atomically. Returns a small report."""
    import h5py
    import tensorflow as tf

    from ldr_tf.atomic import atomic_path
    from ldr_tf.progress import Progress

    from ldr_tf.data.pairs import make_pair_dataset, pairs_for
    from ldr_tf.training.teacher_flows import load_registration_fn, pair_key

    out = Path(out)
    fn, info = load_registration_fn(teacher)
    size = info["image_size"] or tuple(desc.image_size)
    pairs = pairs_for(desc, subset)
    n = min(len(pairs), max_pairs) if max_pairs else len(pairs)
    ds = make_pair_dataset(desc, subset, batch_size=1, seed=seed, augment=False, shuffle=shuffle, repeat=False,
                           image_size=size).take(n).rebatch(batch)
    call = tf.function(fn) if info["kind"] == "checkpoint" else fn
    bar = Progress(n, label="distill", unit="pair", enabled=progress)
    t0, done = time.perf_counter(), 0
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update({"teacher": str(teacher), "dataset": str(desc.path), "subset": subset,
                             "image_size": list(size), "dtype": "float16", "units": "voxels of the grid",
                             "refine": json.dumps(refiner.to_dict() if refiner is not None else None),
                             "shuffle": bool(shuffle), "seed": int(seed)})
            for b in ds:
                flows = call(tf.concat([b["fixed"], b["moving"]], -1))
                if refiner is not None:
                    flows = refiner(b["fixed"], b["moving"], flows)
                flows = flows.numpy().astype(np.float16)
                for i in range(flows.shape[0]):
                    key = pair_key(b["id1"][i].numpy().decode(), b["id2"][i].numpy().decode())
                    h5.create_dataset(key, data=flows[i], compression="gzip", compression_opts=4,
                                      chunks=(min(16, size[0]),) + tuple(size[1:]) + (3,))
                done += flows.shape[0]
                bar.update(done)
    nbytes = out.stat().st_size
    return {"pairs": done, "bytes": nbytes, "bytes_per_pair": nbytes / max(done, 1),
            "seconds": time.perf_counter() - t0, "image_size": list(size)}


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.teacher or not FLAGS.out:
        raise cli.UsageError("--teacher and --out are required")
    common_flags.apply_runtime_flags(FLAGS)
    from ldr_tf.data.dataset import open_dataset
    from ldr_tf.predict import refiner_from_flags

    refiner = refiner_from_flags(FLAGS)
    desc = open_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size)
    rep = build_cache(FLAGS.teacher, desc, FLAGS.out, FLAGS.subset, FLAGS.batch, FLAGS.max_pairs,
                      refiner=refiner, shuffle=FLAGS.shuffle, seed=FLAGS.seed)
    print(f"cached {rep['pairs']} teacher flows ({'x'.join(map(str, rep['image_size']))}) in {rep['seconds']:.0f} s: "
          f"{FLAGS.out}, {rep['bytes'] / 2**20:.1f} MiB ({rep['bytes_per_pair'] / 2**20:.2f} MiB per pair)")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.distill")
