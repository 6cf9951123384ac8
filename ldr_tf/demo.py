"""``python -m ldr_tf.demo`` (what ``make demo`` runs): the whole method end to end on synthetic liver-like CT.

Stages (each prints its progress; finished stages are reused when the demo is run again with the same settings):

1. data: generate the embedded synthetic dataset (``--dataset=demo``: 24 subjects at 64^3, no download);
2. teacher: train the RCN teacher (VTN affine stage + VTN cascades, unsupervised);
3. student: train the light-weight student from the frozen teacher's deformations (the default distillation,
   ``ldr_tf.training.config.DEFAULT_DISTILL``; with ``--aldk`` also a student with the adversarial critic, 3b);
4. plain student: the same student, seed, data and schedule without a teacher, reconstruction loss only (the
   ablation);
5. export: teacher and the students as SavedModels;
6. evaluate: identity, the teacher's affine stage alone, teacher and students on every validation pair (Dice,
   Jaccard, landmark distance, Jacobian std, % folding, CPU seconds per pair through the SavedModel);
7. report: ``<out_dir>/report.md`` + ``report.json`` with a table like the paper's Table 1, a slice comparison like
   its Figure 2 and a Dice-vs-speed plot like its Figure 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from absl import flags, logging

from flags import common_flags
from ldr_tf import __version__, cli
from ldr_tf.atomic import write_json
from ldr_tf.training.config import DEFAULT_DISTILL, TrainConfig

FLAGS = flags.FLAGS
# Report names of the two optional students (the distilled default is "student").
PLAIN, ALDK = "student (plain)", "student (ALDK)"


def define_flags() -> None:
    if "teacher_steps" in FLAGS:
        return
    common_flags.define_runtime_flags()
    flags.DEFINE_string("out_dir", "demo_out", "Where everything goes (data, runs, models, evaluation, report).")
    flags.DEFINE_string("data_dir", None, "Dataset folder (default <out_dir>/data).")
    flags.DEFINE_integer("size", 64, "Grid size of the synthetic data and the networks (multiple of 64).")
    flags.DEFINE_integer("subjects", 24, "Synthetic subjects (a sixth of them, at least 2, form the validation subset).")
    flags.DEFINE_integer("cascades", 1, "Cascades of the teacher and of the student.")
    flags.DEFINE_integer("channels", 8, "Teacher (VTN) width; 16 is the reference network.")
    flags.DEFINE_integer("batch", 2, "Pairs per step.")
    flags.DEFINE_integer("teacher_steps", 400, "Teacher training steps.")
    flags.DEFINE_integer("student_steps", 250, "Student training steps (every student alike).")
    flags.DEFINE_bool("aldk", False, "Also train and evaluate a student with ALDK (the paper's adversarial critic, on "
                                     "top of the default distillation): about 2.5 more minutes.")
    flags.DEFINE_integer("critic_every", 2, "ALDK: train the critic after every k-th student step (its step, with "
                                            "the gradient penalty, costs about twice a student step).")
    flags.DEFINE_float("gamma", 0.9, "ALDK's L_adv = gamma * l_rec + (1 - gamma) * l_dis. The paper's 0.3 lets the "
                                     "adversarial term dominate a short run (README, ALDK).")
    flags.DEFINE_float("lr", 1e-4, "Adam learning rate of every run (constant schedule).")
    flags.DEFINE_bool("reuse", True, "Reuse stages already completed in --out_dir with the same settings.")


class Stages:
    """Runs named stages, timing them and printing a banner for each."""

    def __init__(self):
        self.seconds = {}
        self._t0 = time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n=== {name} ===", flush=True)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - t
        print(f"=== {name}: {self.seconds[name]:.0f} s (total {time.perf_counter() - self._t0:.0f} s) ===",
              flush=True)
        return out

    @property
    def total(self) -> float:
        return time.perf_counter() - self._t0


def _train(cfg: TrainConfig, reuse: bool) -> dict:
    from ldr_tf import train

    out = Path(cfg.out_dir)
    summary_path = out / "summary.json"
    if reuse and summary_path.is_file() and (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text())["train"]
        same = all(saved.get(k) == v for k, v in cfg.to_dict().items() if k != "dataset_path")
        summary = json.loads(summary_path.read_text())
        if same and summary.get("steps") == cfg.steps:
            print(f"reusing {out} (trained {cfg.steps} steps)")
            return summary
    if out.exists():
        import shutil

        shutil.rmtree(out)  # a stale or unfinished demo run of ours: start it again
    return train.run(cfg)


def _export(run_dir: Path, out: Path, reuse: bool) -> Path:
    from ldr_tf.deploy import savedmodel
    from ldr_tf.training import checkpoints as runs

    prefix = runs.latest_checkpoint(run_dir)
    meta_path = out / savedmodel.METADATA
    if reuse and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        # A retrained run writes a checkpoint of the same name: the export is current only if written after it.
        index = Path(f"{prefix}.index")
        newer = index.is_file() and meta_path.stat().st_mtime >= index.stat().st_mtime
        if meta.get("checkpoint") == str(prefix) and newer:
            print(f"reusing {out}")
            return out
    path = savedmodel.export_run(run_dir, out, overwrite=True)
    print(f"exported {path}")
    return path


def _evaluate(methods, desc, out_dir: Path) -> list:
    """Evaluates every (name, registrar) on the validation pairs; writes <out_dir>/<slug>.txt/.json."""
    from ldr_tf import evaluate

    rows = []
    for name, registrar in methods:
        print(f"-- {name}", flush=True)
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        res = evaluate.write_report(registrar, desc, out_dir / slug, "2", name=name)
        s = res["summary"]
        rows.append({
            "name": name, "parameters": registrar.parameters, "pairs": s["pairs"],
            **{f"{c}": s[c]["mean"] for c in evaluate.COLUMNS},
            **{f"{c}_std": s[c]["std"] for c in evaluate.COLUMNS},
        })
    return rows


def _figures(methods, desc, out_dir: Path, rows) -> dict:
    import tensorflow as tf

    from ldr_tf.ops import metrics
    from ldr_tf.data.pairs import make_pair_dataset
    from ldr_tf import figures

    batch = next(iter(make_pair_dataset(desc, "2", batch_size=1, augment=False, shuffle=False, repeat=False)))
    fixed = batch["fixed"].numpy()[0, ..., 0]
    fixed_seg = batch["fixed_seg"].numpy()[0]
    columns = []
    for name, registrar in methods:
        out = registrar(batch["fixed"], batch["moving"], batch["moving_seg"][..., None])
        seg = out["warped_labels"][0, ..., 0]
        dice = metrics.label_overlap(fixed_seg, seg)["dice"]
        columns.append(("moving (before)" if name == "identity" else name, out["warped"][0, ..., 0], seg, dice))
    pair = f"{batch['id1'][0].numpy().decode()} <- {batch['id2'][0].numpy().decode()}"
    fig2 = figures.slice_comparison(fixed, fixed_seg, columns, out_dir / "figure2_slices.png",
                                    title=f"validation pair {pair}: warped image (top), labels vs fixed "
                                          "(white = matched, red = mismatched)")
    speed = [{"name": r["name"], "dice": r["dice"], "dice_std": r["dice_std"], "seconds": r["seconds"]}
             for r in rows]
    fig1 = figures.dice_vs_speed(speed, out_dir / "figure1_dice_speed.png",
                                 title="synthetic liver CT, 64^3: Dice vs CPU time per pair (2 threads)")
    del tf
    return {"figure1": fig1.name, "figure2": fig2.name}


def _fmt(v, digits=3):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def write_report(out_dir: Path, rows, figs, stages: Stages, settings: dict, train_summaries: dict) -> Path:
    lines = [
        "# ldr-tf demo report",
        "",
        f"Synthetic liver-like CT (`--dataset=demo`), {settings['subjects']} subjects at {settings['size']}^3, "
        f"validation pairs: {rows[0]['pairs']}. ldr-tf {__version__}. Wall time {stages.total / 60:.1f} min.",
        "",
        "## Table 1: accuracy, smoothness, speed, size",
        "",
        "| method | Dice | Jaccard | landmark dist. (vox) | Jacobian std | % folding | CPU s / pair | parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {_fmt(r['dice'])} ± {_fmt(r['dice_std'])} | {_fmt(r['jaccard'])} | "
            f"{_fmt(r['lm_dist_vox'], 2)} | {_fmt(r['jac_std'])} | {_fmt(r['folding_pct'], 2)} | "
            f"{_fmt(r['seconds'], 4)} | {r['parameters']:,} |"
        )
    by = {r["name"]: r for r in rows}
    lines += ["", "Mean ± std over validation pairs; each pair's Dice/Jaccard is the mean over the labels of the fixed",
              "segmentation. CPU seconds: one registration through the exported SavedModel, warm, this machine's",
              f"threads, {settings['size']}^3 (see `python -m ldr_tf.benchmark` for 128^3 timings).", ""]
    if "student" in by and PLAIN in by:
        d = by["student"]["dice"] - by[PLAIN]["dice"]
        lines.append(f"**Distillation ablation**: the student distilled from the teacher has Dice "
                     f"{_fmt(by['student']['dice'])} vs {_fmt(by[PLAIN]['dice'])} without a teacher ({d:+.3f}), "
                     "same seed, data and steps.")
    if ALDK in by and "student" in by:
        d = by[ALDK]["dice"] - by["student"]["dice"]
        lines.append(f"**ALDK**: adding the adversarial critic gives Dice {_fmt(by[ALDK]['dice'])} ({d:+.3f} vs "
                     "the distilled student).")
    if "teacher" in by and "student" in by:
        ratio = by["teacher"]["seconds"] / max(by["student"]["seconds"], 1e-9)
        lines.append(f"**Student vs teacher**: Dice {_fmt(by['student']['dice'])} vs {_fmt(by['teacher']['dice'])}; "
                     f"{ratio:.1f}x the teacher's speed; {by['teacher']['parameters'] / by['student']['parameters']:.1f}x"
                     " fewer parameters.")
    lines += ["", "## Figures", "",
              f"![slice comparison](figures/{figs['figure2']})", "",
              "Figure 2-like: a slice of the warped moving image per method (top) and of its warped labels against "
              "the fixed labels (bottom; white = matched, red = mismatched).", "",
              f"![Dice vs speed](figures/{figs['figure1']})", "",
              "Figure 1-like: CPU seconds per pair (bars) and Dice (line); right: Dice vs seconds (log).", "",
              "## Training", "", "| run | steps | seconds | steps/s | last validation Dice (before) |", "|---|---|---|---|---|"]
    for name, s in train_summaries.items():
        v = s["validation"][-1] if s.get("validation") else {}
        lines.append(f"| {name} | {s['steps']} | {s['seconds']:.0f} | {_fmt(s.get('steps_per_s'), 2)} | "
                     f"{_fmt(v.get('dice'))} ({_fmt(v.get('dice_before'))}) |")
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in stages.seconds.items()]
    lines += ["", "## Reproduce a stage by hand", "", "```",
              f"python -m ldr_tf.train --model=teacher --dataset={settings['dataset']} --cascades={settings['cascades']} "
              f"--channels={settings['channels']} --batch={settings['batch']} --steps={settings['teacher_steps']} "
              f"--lr_schedule=constant --out_dir={settings['runs']}/teacher",
              f"python -m ldr_tf.train --model=student --student_stem=ldr --teacher={settings['runs']}/teacher "
              f"--dataset={settings['dataset']} --cascades={settings['cascades']} --steps={settings['student_steps']} "
              f"--lr_schedule=constant --out_dir={settings['runs']}/student",
              f"python -m ldr_tf.export --checkpoint={settings['runs']}/student --out={settings['models']}/student",
              f"python -m ldr_tf.evaluate --model={settings['models']}/student --dataset={settings['dataset']} "
              "--subset=2 --out=eval/student",
              "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    write_json({"settings": settings, "methods": rows, "figures": figs, "stages_seconds": stages.seconds,
                      "training": train_summaries, "wall_seconds": stages.total}, out_dir / "report.json")
    return path


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    common_flags.apply_runtime_flags(FLAGS)
    out = Path(FLAGS.out_dir)
    data_dir = Path(FLAGS.data_dir) if FLAGS.data_dir else out / "data"
    runs, models, evals, figs_dir = out / "runs", out / "models", out / "eval", out / "figures"
    for d in (runs, models, evals, figs_dir):
        d.mkdir(parents=True, exist_ok=True)
    stages = Stages()

    from ldr_tf.data import dataset, synthetic

    path = stages.run("1. data", synthetic.ensure_demo_dataset, "demo", data_dir=data_dir, size=FLAGS.size,
                      subjects=FLAGS.subjects, seed=0)
    desc = dataset.load_descriptor(path)
    common = dict(dataset=str(path), image_size=FLAGS.size, cascades=FLAGS.cascades, batch=FLAGS.batch,
                  lr=FLAGS.lr, lr_schedule="constant", val_pairs=4, log_every=20, seed=FLAGS.seed)
    teacher_cfg = TrainConfig(model="teacher", affine="vtn", channels=FLAGS.channels, steps=FLAGS.teacher_steps,
                              val_every=max(FLAGS.teacher_steps // 4, 1), checkpoint_every=FLAGS.teacher_steps,
                              out_dir=str(runs / "teacher"), **common)
    # The demo reproduces the paper's student (ldr) at toy scale; the light default (ldr_half) would run its stems
    # on a 32^3 grid here (README, "Student variants").
    student = dict(model="student", affine="lite", student_stem="ldr", steps=FLAGS.student_steps,
                   val_every=max(FLAGS.student_steps // 4, 1), checkpoint_every=FLAGS.student_steps, **common)
    teacher = dict(teacher=str(runs / "teacher"), distill=DEFAULT_DISTILL)
    student_cfg = TrainConfig(out_dir=str(runs / "student"), **teacher, **student)
    aldk_cfg = TrainConfig(aldk=True, gamma=FLAGS.gamma, critic_every=FLAGS.critic_every,
                           out_dir=str(runs / "student_aldk"), **teacher, **student)
    plain_cfg = TrainConfig(out_dir=str(runs / "student_plain"), **student)
    summaries = {}
    summaries["teacher"] = stages.run("2. teacher", _train, teacher_cfg, FLAGS.reuse)
    summaries["student"] = stages.run("3. student (distilled)", _train, student_cfg, FLAGS.reuse)
    if FLAGS.aldk:
        summaries[ALDK] = stages.run("3b. student with ALDK", _train, aldk_cfg, FLAGS.reuse)
    summaries[PLAIN] = stages.run("4. plain student (no teacher)", _train, plain_cfg, FLAGS.reuse)
    names = ["teacher", "student", "student_plain"] + (["student_aldk"] if FLAGS.aldk else [])

    def export_all():
        return {n: _export(runs / n, models / n, FLAGS.reuse) for n in names}

    exported = stages.run("5. export", export_all)

    from ldr_tf.deploy.loader import open_registrar

    methods = [
        ("identity", open_registrar("identity")),
        ("affine (teacher's stage)", open_registrar(runs / "teacher", stage="affine")),
        ("teacher", open_registrar(exported["teacher"])),
        (PLAIN, open_registrar(exported["student_plain"])),
        ("student", open_registrar(exported["student"])),
    ]
    if FLAGS.aldk:
        methods.append((ALDK, open_registrar(exported["student_aldk"])))
    rows = stages.run("6. evaluate", _evaluate, methods, desc, evals)
    figs = stages.run("7. figures", _figures, methods, desc, figs_dir, rows)
    settings = {"size": FLAGS.size, "subjects": FLAGS.subjects, "cascades": FLAGS.cascades,
                "channels": FLAGS.channels, "batch": FLAGS.batch, "teacher_steps": FLAGS.teacher_steps,
                "student_steps": FLAGS.student_steps, "distill": DEFAULT_DISTILL, "aldk": FLAGS.aldk,
                "critic_every": FLAGS.critic_every, "gamma": FLAGS.gamma, "lr": FLAGS.lr, "seed": FLAGS.seed,
                "dataset": str(path), "runs": str(runs), "models": str(models)}
    report = write_report(out, rows, figs, stages, settings, summaries)
    print("\n" + report.read_text().split("## Figures")[0])
    print(f"report: {report} (figures in {figs_dir}); total {stages.total / 60:.1f} min")
    logging.info("demo finished")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.demo")
