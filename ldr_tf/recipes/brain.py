"""``python -m ldr_tf.recipes.brain``: the IXI brain recipe, from the raw scans to a comparison with ANTs SyN.

Stages (``--stages``, all by default; each one resumes or skips what is already done, so the recipe can be run in
pieces, interrupted with Ctrl-C and started again):

1. ``import``: ``ldr_tf.data.ixi``: the 150 IXI T1 scans + 148-label DLMUSE maps -> ``brain.json`` + HDF5 at
   ``--grid``^3, split by subject 110 / 10 / 30 (train / val / test). ``--mode=subject`` (default): label-free
   preprocessing (the head found from intensities, ``--spacing_mm`` isotropic voxels centred on it: what predict
   repeats on any new scan) and subject-to-subject pairs (every ordered pair of training subjects; the comparison
   uses the 30 neighbour pairs of the test subjects). ``--mode=atlas``: the earlier setup, every scan cropped to its
   own label box and registered to one training subject (the atlas);
2. ``teacher``: VTN affine + ``--teacher_cascades`` VTN cascades (width ``--channels``), unsupervised;
3. ``student``: the light-weight student (lite affine + ``--student_cascades`` LDR stems) distilled from the teacher
   (the default distillation, ``DEFAULT_DISTILL``; ``--aldk`` adds the adversarial critic);
4. ``student_plain``: the same student without a teacher (the ablation);
5. ``export``: the three models as SavedModels;
6. ``compare``: identity, the teacher's affine stage alone, teacher, student, plain student and ANTs SyN
   (when ``antspyx`` is installed) on the test pairs, scored on the atlas' native grid (``ldr_tf.compare``).

Label supervision is optional (``--seg_weight``: a Dice term on the training pairs' label maps); inference is
image-only either way. Checkpoints every 250 steps: interrupt and run again to resume.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from flags import common_flags
from ldr_tf import cli
from ldr_tf.training.config import DEFAULT_DISTILL, DEFAULT_STUDENT_STEM, TrainConfig

FLAGS = flags.FLAGS
STAGES = ("import", "teacher", "student", "student_plain", "export", "compare")


def define_flags() -> None:
    if "work_dir" in FLAGS:
        return
    common_flags.define_runtime_flags()
    flags.DEFINE_string("ixi_dir", None, "The IXI folder (t1/, dlmuse_seg/, meta/); default ../shared/data/ixi.")
    flags.DEFINE_string("data_dir", None, "Where brain.json + brain.h5 go (default <work_dir>/data).")
    flags.DEFINE_string("work_dir", "brain_out", "Runs, models and the comparison.")
    flags.DEFINE_list("stages", list(STAGES), f"Stages to run, among {', '.join(STAGES)}.")
    flags.DEFINE_enum("mode", "subject", ["subject", "atlas"], "subject: label-free preprocessing and "
                      "subject-to-subject pairs; atlas: label-box crops and one atlas subject (the earlier recipe).")
    flags.DEFINE_integer("grid", 128, "Network grid (multiple of 64). With --mode=subject the voxels are "
                         "--spacing_mm, so 128 covers 256 mm: any adult head.")
    flags.DEFINE_float("spacing_mm", None, "Grid voxel size for --mode=subject (default 256 / --grid: 2 mm at 128).")
    flags.DEFINE_float("seg_weight", 0.0, "Label supervision of the teacher and the students (train --seg_weight).")
    flags.DEFINE_integer("teacher_cascades", 2, "VTN cascades of the teacher.")
    flags.DEFINE_integer("student_cascades", 2, "LDR cascades of the student.")
    flags.DEFINE_enum("student_stem", DEFAULT_STUDENT_STEM, ["ldr", "ldr_released", "ldr_half"],
                      "Student stems (train --student_stem): ldr_half = the light student, ldr = the paper's.")
    flags.DEFINE_integer("channels", 8, "Teacher (VTN) width; 16 = the reference network.")
    flags.DEFINE_integer("batch", 2, "Pairs per step.")
    flags.DEFINE_integer("teacher_steps", 6000, "Teacher training steps.")
    flags.DEFINE_integer("student_steps", 4000, "Student training steps (both students alike).")
    flags.DEFINE_float("lr", 1e-4, "Adam learning rate (RCN's step schedule).")
    flags.DEFINE_bool("aldk", False, "Train the student with ALDK (the adversarial critic) on top of the distillation.")
    flags.DEFINE_float("gamma", 0.9, "ALDK's L_adv = gamma * l_rec + (1 - gamma) * l_dis (README, ALDK: the paper's "
                                     "0.3 lets the adversarial term dominate).")
    flags.DEFINE_bool("ants", True, "Include ANTs SyN in the comparison when antspyx is installed.")
    flags.DEFINE_integer("max_pairs", 0, "Compare only the first N test pairs (0 = all 30).")


def _train(cfg: TrainConfig):
    """Runs or resumes one training run; a run already at its target step is left alone."""
    import json

    from ldr_tf import train

    out = Path(cfg.out_dir)
    ckpt = out / "checkpoints" / "checkpoint"
    if ckpt.exists():
        summary = out / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("steps") == cfg.steps:
            print(f"{out}: already trained ({cfg.steps} steps)")
            return
        return train.run(cfg, resume=True)
    return train.run(cfg)


def make_configs(fv, dataset: Path, runs: Path) -> dict:
    """The three training runs of the recipe from its flag values: ``{"teacher", "student", "student_plain"}``.

    Both students get the same network, data, budget and seed; they differ only in what they learn from the teacher.
    """
    common = dict(dataset=str(dataset), image_size=fv.grid, batch=fv.batch, lr=fv.lr, lr_schedule="step",
                  val_every=500, val_pairs=10, checkpoint_every=250, log_every=50, seed=fv.seed,
                  seg_weight=fv.seg_weight, seg_half=fv.grid >= 128)
    teacher = TrainConfig(model="teacher", affine="vtn", cascades=fv.teacher_cascades, channels=fv.channels,
                          steps=fv.teacher_steps, out_dir=str(runs / "teacher"), **common)
    student = dict(model="student", affine="lite", cascades=fv.student_cascades, student_stem=fv.student_stem,
                   steps=fv.student_steps, **common)
    return {
        "teacher": teacher,
        "student": TrainConfig(teacher=str(runs / "teacher"), distill=DEFAULT_DISTILL, aldk=fv.aldk,
                               gamma=fv.gamma, out_dir=str(runs / "student"), **student),
        "student_plain": TrainConfig(out_dir=str(runs / "student_plain"), **student),
    }


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    bad = sorted(set(FLAGS.stages) - set(STAGES))
    if bad:
        raise cli.UsageError(f"--stages: unknown {bad}; choose among {', '.join(STAGES)}")
    common_flags.apply_runtime_flags(FLAGS)
    work = Path(FLAGS.work_dir)
    data_dir = Path(FLAGS.data_dir) if FLAGS.data_dir else work / "data"
    runs, models = work / "runs", work / "models"
    dataset = data_dir / "brain.json"
    if "import" in FLAGS.stages and not dataset.is_file():
        from ldr_tf.data import ixi as import_ixi

        args = ["import_ixi", f"--data_dir={data_dir}", f"--grid_size={FLAGS.grid}"]
        if FLAGS.mode == "subject":
            args += ["--skull=head", "--atlas=none"]
            if FLAGS.spacing_mm:
                args.append(f"--spacing_mm={FLAGS.spacing_mm}")
        if FLAGS.ixi_dir:
            args.append(f"--ixi_dir={FLAGS.ixi_dir}")
        rc = import_ixi.run(args)
        if rc:
            raise ValueError("the IXI import failed (see above)")
    if not dataset.is_file():
        raise ValueError(f"{dataset} not found: run the import stage first")
    configs = make_configs(FLAGS, dataset, runs)
    for stage in ("teacher", "student", "student_plain"):
        if stage in FLAGS.stages:
            print(f"\n=== {stage} ===", flush=True)
            _train(configs[stage])
    if "export" in FLAGS.stages:
        from ldr_tf.deploy import savedmodel

        for name in configs:
            out = savedmodel.export_run(runs / name, models / name, overwrite=True)
            print(f"exported {out}")
    if "compare" in FLAGS.stages:
        import sys

        from ldr_tf import compare

        methods = [
            "identity",
            f"affine={runs / 'teacher'}:affine",
            f"teacher={models / 'teacher'}",
            f"student_plain={models / 'student_plain'}",
            f"student={models / 'student'}",
        ]
        try:
            import ants  # noqa: F401

            has_ants = True
        except ImportError:
            has_ants = False
        if FLAGS.ants and has_ants:
            methods.append("ants_syn=ants:SyN")
        elif FLAGS.ants:
            print("antspyx is not installed: ANTs SyN is left out (pip install '.[peers]')", file=sys.stderr)
        from ldr_tf.data.dataset import load_descriptor

        desc = load_descriptor(dataset)
        compare.run(methods, desc, "test", work / "compare" / "brain_test", FLAGS.max_pairs, FLAGS.threads or 2,
                    paired=not desc.atlas)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.recipes.brain")
