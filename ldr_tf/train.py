"""``python -m ldr_tf.train``: train the RCN teacher, or the light-weight student from it (distillation, ALDK).

Examples::

    python -m ldr_tf.train --model=teacher --cascades=3 --dataset=liver --out_dir=runs/teacher
    python -m ldr_tf.train --model=student --cascades=3 --dataset=liver --teacher=runs/teacher --out_dir=runs/student
    python -m ldr_tf.train --model=student --cascades=3 --dataset=liver --out_dir=runs/student-plain  # no teacher
    python -m ldr_tf.train --model=student --aldk ... --teacher=runs/teacher --out_dir=runs/student-aldk
    python -m ldr_tf.train --preset=demo --model=teacher --out_dir=/tmp/t                 # small, minutes on 2 cores

Writes ``<out_dir>/config.json`` first, then checkpoints (``checkpoints/``), TensorBoard logs (``logs/``) and
``summary.json`` at the end. ``--resume`` continues a run exactly from its latest checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags, logging

from flags import common_flags, train_flags
from ldr_tf import __version__, cli
from ldr_tf.atomic import write_json
from ldr_tf.data.dataset import open_dataset
from ldr_tf.training.config import TrainConfig, load_run_config, network_config, resolve_distill, student_description

FLAGS = flags.FLAGS
# Flags that may change when a run is resumed; any other flag given with --resume must match the saved run.
RESUMABLE = {"steps", "checkpoint_every", "val_every", "val_pairs", "log_every", "resume", "threads",
             "inter_threads", "xla_warp", "data_dir"}


def config_from_flags(flag_values=FLAGS) -> TrainConfig:
    """Freezes the training flags into a TrainConfig (presets applied, affine 'auto' resolved)."""
    fv = flag_values
    affine = fv.affine
    if affine == "auto":
        affine = "vtn" if fv.model == "teacher" else "lite"
    return TrainConfig(
        model=fv.model, dataset=fv.dataset, data_dir=fv.data_dir, image_size=fv.image_size, cascades=fv.cascades,
        affine=affine, channels=fv.channels, identity_init=fv.identity_init, student_stem=fv.student_stem, student_head=fv.student_head,
        batch=fv.batch, steps=fv.steps, lr=fv.lr, lr_schedule=fv.lr_schedule, similarity=fv.similarity,
        lncc_window=fv.lncc_window, reg_weight=fv.reg_weight,
        affine_weight=fv.affine_weight, seg_weight=fv.seg_weight, seg_labels=fv.seg_labels,
        seg_half=fv.seg_half, augment=fv.augment, init_from=fv.init_from, teacher=fv.teacher,
        teacher_cache=fv.teacher_cache,
        aldk=fv.aldk, gamma=fv.gamma, lambda_gp=fv.lambda_gp, beta=fv.beta, critic_steps=fv.critic_steps,
        critic_every=fv.critic_every, critic_lr=fv.critic_lr, critic_output=fv.critic_output, dis_loss=fv.dis_loss,
        critic_condition=fv.critic_condition, critic_flow=fv.critic_flow,
        distill=resolve_distill(fv.distill, fv.model, bool(fv.teacher or fv.teacher_cache)),
        distill_weight=fv.distill_weight, gp_norm=fv.gp_norm, gp_point=fv.gp_point,
        critic_warmup=fv.critic_warmup, critic_beta1=fv.critic_beta1,
        out_dir=fv.out_dir or "", checkpoint_every=fv.checkpoint_every, val_every=fv.val_every,
        val_pairs=fv.val_pairs, log_every=fv.log_every, strategy=fv.strategy, seed=fv.seed,
    )


def make_strategy(name: str):
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy([d.name for d in gpus] or ["/cpu:0"])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy: unknown strategy {name!r}")


def _resume_config(out_dir: Path, flag_values) -> TrainConfig:
    saved = TrainConfig.from_dict(load_run_config(out_dir)["train"])
    given = config_from_flags(flag_values).to_dict()
    updates, conflicts = {}, []
    for name, value in given.items():
        if name not in flag_values or not flag_values[name].present or name == "out_dir":
            continue
        if name in RESUMABLE:
            updates[name] = value
        elif value != getattr(saved, name):
            conflicts.append(f"--{name}={value} (run has {getattr(saved, name)})")
    if conflicts:
        raise ValueError(f"{out_dir}: --resume with settings that differ from the saved run: {', '.join(conflicts)}")
    # The run continues where it is now: a run folder that was copied or moved must not write into its old place.
    updates["out_dir"] = str(out_dir)
    return TrainConfig.from_dict({**saved.to_dict(), **updates})


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    train_flags.apply_preset(FLAGS)
    common_flags.apply_runtime_flags(FLAGS)
    if not FLAGS.out_dir:
        raise cli.UsageError("--out_dir is required")
    out_dir = Path(FLAGS.out_dir)
    if FLAGS.resume:
        cfg = _resume_config(out_dir, FLAGS)
    else:
        if (out_dir / "checkpoints" / "checkpoint").exists():
            raise ValueError(f"{out_dir} already holds a run; add --resume to continue it or pick another --out_dir")
        cfg = config_from_flags(FLAGS)
    run(cfg, resume=FLAGS.resume)
    return 0


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Trains one run described by `cfg` (what ``main`` does once the flags are frozen); returns the summary.

    Writes ``config.json`` before the first step and ``summary.json`` at the end (chief only).
    """
    cfg.validate()
    out_dir = Path(cfg.out_dir)

    from ldr_tf.training.trainer import Trainer

    desc = open_dataset(cfg.dataset, cfg.data_dir, cfg.image_size)
    size = (cfg.image_size,) * 3 if cfg.image_size else tuple(desc.image_size)
    net_cfg = network_config(cfg, size)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "dataset_path": str(desc.path)})
    strategy = make_strategy(cfg.strategy)
    trainer = Trainer(cfg, desc, net_cfg, strategy)
    params = int(sum(int(v.numpy().size) for v in trainer.model.trainable_variables))
    if trainer.chief:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json({
            "version": __version__,
            "train": cfg.to_dict(),
            "network": net_cfg,
            "preprocessing": desc.extra.get("preprocessing"),
            "dataset": {"path": str(desc.path), "image_type": desc.image_type, "image_size": list(size)},
            "parameters": params,
        }, out_dir / "config.json")
    if cfg.model == "student":
        what = student_description(cfg)
    else:
        what = "teacher"
    start = trainer.restore() if resume else 0
    if start == 0 and cfg.init_from:
        trainer.init_from(cfg.init_from)
    logging.info("training the %s: %d cascades, grid %s, %d parameters, steps %d -> %d, out_dir %s", what,
                 cfg.cascades, size, params, start, cfg.steps, out_dir)
    t0 = time.perf_counter()
    history = trainer.fit(progress=progress)
    seconds = time.perf_counter() - t0
    done = cfg.steps - start
    summary = {"model": what, "steps": cfg.steps, "seconds": seconds,
               "steps_per_s": done / seconds if seconds > 0 and done > 0 else None, "parameters": params,
               "last": history.get("train", {}), "last_window": history.get("window", {}),
               "validation": history["val"]}
    if trainer.chief:
        write_json(summary, out_dir / "summary.json")
        last_val = history["val"][-1] if history["val"] else None
        msg = f"{what}: {done} steps in {seconds:.0f} s ({summary['steps_per_s'] or 0:.2f} steps/s)"
        if last_val:
            msg += f"; validation Dice {last_val['dice']:.4f} (before registration {last_val['dice_before']:.4f})"
        print(msg, flush=True)
    return summary


if __name__ == "__main__":
    train_flags.define_train_flags()
    cli.run(main, "ldr_tf.train")
