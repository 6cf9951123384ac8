"""``python -m ldr_tf.train_bench``: training throughput (steps per second) of the teacher and the students.

For every ``--sizes`` grid it trains, on the synthetic ``demo`` data generated at that size, with the real training
step of `ldr_tf.training.trainer.Trainer` (data pipeline, augmentation, losses, optimizer; no validation or checkpoints
between the timed steps):

1. the teacher (VTN affine + ``--cascades`` VTN stems of width ``--channels``);
2. ``student``: the plain student (lite affine + ``--cascades`` student stems, no teacher);
3. ``student_distill``: the default student, distilled from that teacher (``--distill=l2``: the frozen teacher's
   forward pass on every batch; with a ``--teacher_cache`` the teacher's cost is a file read instead);
4. ``student_aldk``: the student with ALDK from that teacher (the teacher's forward pass and one critic step per
   student step).

Each is traced and run for ``--warmup`` steps, then timed over ``--steps`` steps. The CPU, its ISA level and
whether oneDNN is on are printed first: training speed depends on them more than on anything else (README,
Performance). Everything runs in a temporary folder (``--work_dir`` to keep it).

Examples::

    python -m ldr_tf.train_bench                                   # 64^3 and 128^3, batch 2, 1 cascade
    python -m ldr_tf.train_bench --sizes=64 --kinds=teacher,student --steps=20
    ONEDNN_MAX_CPU_ISA=AVX2 python -m ldr_tf.train_bench           # oneDNN kernels limited to AVX2 (emulation)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from absl import flags

from ldr_tf import cli, cpu
from ldr_tf.training.config import DEFAULT_DISTILL, DEFAULT_STUDENT_STEM

FLAGS = flags.FLAGS
PROG = "ldr_tf.train_bench"
KINDS = ("teacher", "student", "student_distill", "student_aldk")


def define_flags() -> None:
    if "sizes" in FLAGS:
        return
    from flags import common_flags

    common_flags.define_runtime_flags()
    flags.DEFINE_list("sizes", ["64", "128"], "Cubic grid sizes (multiples of 64).")
    flags.DEFINE_list("kinds", list(KINDS), f"What to time, among {', '.join(KINDS)}.")
    flags.DEFINE_integer("cascades", 1, "Cascades of the teacher and of the students.")
    flags.DEFINE_integer("channels", 8, "Teacher (VTN) width.")
    flags.DEFINE_string("student_stem", DEFAULT_STUDENT_STEM, "Student stem (networks.cascade.STEMS; ldr_half = the light student).")
    flags.DEFINE_integer("batch", 2, "Pairs per step.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps (the first one traces the step).")
    flags.DEFINE_integer("steps", 10, "Timed steps.")
    flags.DEFINE_string("work_dir", None, "Keep the data and runs here (default: a temporary folder, removed).")


def time_steps(trainer, warmup: int, steps: int) -> dict:
    """Runs `warmup` then `steps` training steps of `trainer`; returns first-step, warm-step and steps/s figures."""
    iterator = iter(trainer._train_dataset(0))
    critic = trainer.cfg.uses_critic
    t = time.perf_counter()
    trainer._train_step(next(iterator), critic)
    first = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        trainer._train_step(next(iterator), critic)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = trainer._train_step(next(iterator), critic)
        float(out["loss"])  # wait for the step
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    return {"first_step_s": first, "median_step_s": median, "steps_per_s": 1.0 / median}


def _config(fv, kind: str, size: int, data_dir: Path, out: Path, teacher: Path | None):
    from ldr_tf.training.config import TrainConfig

    common = dict(dataset="demo", data_dir=str(data_dir), image_size=size, cascades=fv.cascades,
                  batch=fv.batch, steps=fv.warmup + fv.steps, lr_schedule="constant", val_every=0,
                  checkpoint_every=10**9, out_dir=str(out), seed=fv.seed)
    if kind == "teacher":
        return TrainConfig(model="teacher", affine="vtn", channels=fv.channels, **common)
    aldk, distill = kind == "student_aldk", kind == "student_distill"
    return TrainConfig(model="student", affine="lite", student_stem=fv.student_stem, aldk=aldk,
                       distill=DEFAULT_DISTILL if distill else "none",
                       teacher=str(teacher) if aldk or distill else None, gamma=0.9, **common)


def bench(fv, size: int, kinds, work: Path) -> list:
    import keras

    from ldr_tf.data.dataset import open_dataset
    from ldr_tf.training.config import network_config
    from ldr_tf.training.trainer import Trainer

    data_dir = work / "data"
    desc = open_dataset("demo", str(data_dir), size)
    teacher_dir = work / f"teacher{size}"
    rows = []
    needed = list(kinds)
    if {"student_aldk", "student_distill"} & set(needed) and "teacher" not in needed:
        needed.insert(0, "teacher")  # these students need a teacher run to load (its speed is then shown too)
    for kind in needed:
        out = teacher_dir if kind == "teacher" else work / f"{kind}{size}"
        cfg = _config(fv, kind, size, data_dir, out, teacher_dir)
        keras.backend.clear_session()
        trainer = Trainer(cfg, desc, network_config(cfg, (size,) * 3))
        row = {"kind": kind, "size": size, "batch": cfg.batch, "cascades": cfg.cascades,
               "parameters": int(sum(int(v.numpy().size) for v in trainer.model.trainable_variables)),
               **time_steps(trainer, fv.warmup, fv.steps)}
        if kind == "teacher":
            out.mkdir(parents=True, exist_ok=True)
            from ldr_tf.atomic import write_json

            write_json({"train": cfg.to_dict(), "network": network_config(cfg, (size,) * 3)},
                             out / "config.json")
            trainer.save()
        rows.append(row)
        print(f"  {size}^3 {kind:15s} {row['parameters']:>11,} params: first step {row['first_step_s']:.1f} s, "
              f"median {row['median_step_s']:.3f} s/step = {row['steps_per_s']:.2f} steps/s", flush=True)
    return rows


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    bad = sorted(set(FLAGS.kinds) - set(KINDS))
    if bad or not FLAGS.kinds:
        raise cli.UsageError(f"--kinds: expected a subset of {','.join(KINDS)}, got {','.join(FLAGS.kinds)}")
    if FLAGS.steps < 1 or FLAGS.warmup < 1:
        raise cli.UsageError("--steps and --warmup must be >= 1")
    sizes = [int(s) for s in FLAGS.sizes]
    from flags import common_flags

    common_flags.apply_runtime_flags(FLAGS)
    print(f"{PROG}: {cpu.describe()}; batch {FLAGS.batch}, {FLAGS.cascades} cascade(s), teacher width "
          f"{FLAGS.channels}, {FLAGS.warmup} untimed + {FLAGS.steps} timed steps", flush=True)
    work = Path(FLAGS.work_dir) if FLAGS.work_dir else Path(tempfile.mkdtemp(prefix="ldr-train-bench-"))
    try:
        rows = [r for size in sizes for r in bench(FLAGS, size, FLAGS.kinds, work)]
    finally:
        if not FLAGS.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| grid | model | parameters | steps/s | s/step | first step s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}^3 | {r['kind']} | {r['parameters']:,} | {r['steps_per_s']:.2f} | "
              f"{r['median_step_s']:.3f} | {r['first_step_s']:.1f} |")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, PROG)
