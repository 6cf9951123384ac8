"""The training loop: teacher (unsupervised RCN), student without ALDK (ablation) and student with ALDK.

One ``tf.function`` step per student/teacher update, run through ``strategy.run`` so the same code serves the
default strategy, ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy``; Python does checkpoints, validation,
summaries and the progress bar between steps.

Losses (per sample, then summed over the batch as in the reference; see `ldr_tf.ops.losses`):

* teacher / student without ALDK: ``L_u = l_rec + reg_weight * sum_k smooth(u_k) + affine_weight * (det + ortho)
  [+ seg_weight * l_seg]``;
* ``--distill=l2|l1`` adds ``distill_weight * l_distill`` to ``L_u``: the distance between the dense residuals of the
  student's and the teacher's flows (`ldr_tf.ops.losses.distillation_loss`), a direct-distillation baseline;
* student with ALDK: ``gamma * L_u + (1 - gamma) * l_dis`` (one gamma for the whole unsupervised loss, as the
  released code: the reconstruction and the regularisers keep the same ratio as without ALDK, so the ablation
  changes one thing), then after every ``critic_every``-th student update, ``critic_steps`` critic updates on the
  flows of that same batch (`ldr_tf.training.aldk`).

Every student given a teacher (``--teacher``/``--teacher_cache``, with or without ALDK) logs ``flow_gap``, the RMS
distance in voxels between its total flow and the teacher's for the same pair.

The data stream is a pure function of (seed, element index), so the data position of a run is its step: a
resumed run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ldr_tf import cli
from ldr_tf.training import aldk
from ldr_tf.ops import losses, metrics
from ldr_tf.training import teacher_flows as teacher_lib
from ldr_tf.ops import warp as warp_ops
from ldr_tf.training.config import TrainConfig
from ldr_tf.progress import Progress
from ldr_tf.training.checkpoints import CHECKPOINT_DIR, build_network

__all__ = ["RCNStepSchedule", "make_schedule", "Trainer", "TrainingDiverged", "student_loss"]


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


def student_loss(rec, regs, cfg: TrainConfig, dis=None):
    """Per-sample training loss: ``L_u = rec + regs`` without a discrimination term, ``gamma * L_u + (1 - gamma) *
    dis`` with one (ALDK). `regs` holds every regulariser and the optional label term, already weighted."""
    unsupervised = rec + regs
    if dis is None:
        return unsupervised
    return cfg.gamma * unsupervised + (1.0 - cfg.gamma) * dis


@keras.saving.register_keras_serializable(package="ldr_tf")
class RCNStepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """RCN's schedule: `base` for the first 3/5 of training, then halved at every further fifth."""

    def __init__(self, base: float, total_steps: int):
        self.base = float(base)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        fifth = tf.floor(step * 5.0 / float(max(self.total_steps, 1)))
        return self.base * tf.pow(0.5, tf.maximum(0.0, fifth - 2.0))

    def get_config(self):
        return {"base": self.base, "total_steps": self.total_steps}


def make_schedule(kind: str, base: float, total_steps: int):
    if kind == "constant":
        return base
    if kind == "step":
        return RCNStepSchedule(base, total_steps)
    if kind == "cosine":
        return keras.optimizers.schedules.CosineDecay(base, max(total_steps, 1))
    raise ValueError(f"--lr_schedule: unknown schedule {kind!r}")


def _plain(value):
    """Lists and tuples alike (a network config read from JSON has lists where a fresh one may have tuples)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


class Trainer:
    """Builds models, optimizers, data and checkpoints for one run, and trains.

    Args:
      cfg: the frozen run configuration.
      descriptor: the dataset (``ldr_tf.data.dataset.Descriptor``).
      network_config: a ``CascadeConfig`` dict for the model being trained.
      strategy: a ``tf.distribute.Strategy`` (the default strategy when None).
    """

    def __init__(self, cfg: TrainConfig, descriptor, network_config: dict, strategy=None):
        self.cfg = cfg
        self.desc = descriptor
        self.network_config = network_config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.chief = _is_chief(self.strategy)
        self.image_size = tuple(network_config["image_size"])
        self.out_dir = Path(cfg.out_dir)
        self.teacher_fn = None
        self.cache = None

        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            # The model is built first so its initial weights depend on the seed only (same with and without ALDK).
            self.model = build_network(network_config)
            self.optimizer = keras.optimizers.Adam(make_schedule(cfg.lr_schedule, cfg.lr, cfg.steps))
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            objects = dict(step=self.step, model=self.model, optimizer=self.optimizer)
            if cfg.uses_critic:
                from networks.critic import Critic

                self.critic = Critic(output_activation=cfg.critic_output)
                view = aldk.make_view(tf.zeros([1, 1, 1, 1, 2]), cfg.critic_flow, cfg.critic_condition)
                self.critic(tf.zeros([1, *self.image_size, view.channels()]))  # flow (+ fixed, moving)
                self.critic_optimizer = keras.optimizers.Adam(cfg.critic_lr or cfg.lr, beta_1=cfg.critic_beta1)
                self.critic_optimizer.build(self.critic.trainable_variables)
                objects.update(critic=self.critic, critic_optimizer=self.critic_optimizer)
            if cfg.uses_teacher and not cfg.teacher_cache:
                self.teacher_fn, info = teacher_lib.load_registration_fn(cfg.teacher)
                if info["image_size"] and tuple(info["image_size"]) != self.image_size:
                    raise ValueError(f"--teacher {cfg.teacher}: grid {info['image_size']} differs from the "
                                     f"student's {self.image_size}")
        if cfg.uses_teacher and cfg.teacher_cache:
            self.cache = teacher_lib.TeacherCache(cfg.teacher_cache)
        self.checkpoint = tf.train.Checkpoint(**objects)
        ckpt_dir = self.out_dir / CHECKPOINT_DIR
        if not self.chief:  # other workers must save too (collectives), into a scratch dir
            ckpt_dir = self.out_dir / f".worker-{self.strategy.cluster_resolver.task_id}"
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(ckpt_dir), max_to_keep=3,
                                                  checkpoint_name="ckpt")
        self.writer = tf.summary.create_file_writer(str(self.out_dir / "logs")) if self.chief else None
        self.label_values = None
        if cfg.seg_weight > 0:
            values = sorted({int(v) for v in (descriptor.segmentation_class_value or {}).values()} - {0})
            if not values:
                raise ValueError(f"--seg_weight: the dataset {descriptor.path} names no segmentation labels "
                                 "(segmentation_class_value)")
            self.label_values = tf.constant(values, tf.int32)
        self._train_step = tf.function(self._distributed_step)
        self._forward = tf.function(self._forward_fn, reduce_retracing=True)
        self._identity_dice = None

    # ------------------------------------------------------------------------------------------ data

    def _train_dataset(self, start_step: int):
        from ldr_tf.data.pairs import make_pair_dataset

        cfg = self.cfg

        # A teacher cache that holds only some of the training pairs (ldr_tf.distill --max_pairs): train on those.
        keep = None
        if self.cache is not None:
            cached = self.cache.keys
            logging.info("teacher cache %s: %d pairs; the student trains on the cached training pairs only",
                         self.cache.path, len(cached))

            def keep(fixed, moving):
                return teacher_lib.pair_key(fixed, moving) in cached

        def per_worker(ctx):
            ds = make_pair_dataset(
                self.desc, "1", batch_size=ctx.get_per_replica_batch_size(cfg.batch), seed=cfg.seed,
                augment=cfg.augment, shuffle=True, repeat=True, start_step=start_step, input_context=ctx,
                image_size=self.image_size, keep=keep,
            )
            if self.cache is not None:
                ds = ds.map(self._add_cached_teacher_flow)
            return ds

        return self.strategy.distribute_datasets_from_function(per_worker)

    def _add_cached_teacher_flow(self, batch):
        flow = tf.numpy_function(self.cache.lookup_batch, [batch["id1"], batch["id2"]], tf.float32)
        flow.set_shape(batch["aug_flow"].shape)
        return {**batch, "teacher_flow": flow}

    def _val_dataset(self):
        from ldr_tf.data.pairs import make_pair_dataset

        ds = make_pair_dataset(self.desc, "2", batch_size=1, seed=self.cfg.seed, augment=False, shuffle=False,
                               repeat=False, image_size=self.image_size)
        return ds.take(self.cfg.val_pairs) if self.cfg.val_pairs > 0 else ds

    # ------------------------------------------------------------------------------------------ steps

    def _teacher_flow(self, batch, pair):
        if self.cache is not None:
            flow = batch["teacher_flow"]
            if self.cfg.augment:
                flow = teacher_lib.map_to_augmented(flow, batch["aug_flow"])
            return flow
        return tf.stop_gradient(self.teacher_fn(pair))

    def _replica_step(self, batch, train_critic: bool):
        cfg = self.cfg
        fixed, moving = batch["fixed"], batch["moving"]
        pair = tf.concat([fixed, moving], axis=-1)
        phi_t = self._teacher_flow(batch, pair) if cfg.uses_teacher else None
        condition = aldk.make_view(pair, cfg.critic_flow, cfg.critic_condition)
        with tf.GradientTape() as tape:
            out = self.model(pair, training=True)
            if cfg.similarity == "lncc":
                rec = losses.lncc_loss(fixed, out["warped"], cfg.lncc_window, "none")
            else:
                rec = losses.correlation_loss(fixed, out["warped"], "none")
            reg = losses.cascade_regularisers(out, self.model.affine_stem is not None)
            regs = cfg.reg_weight * reg["smoothness"] + cfg.affine_weight * (reg["det_loss"] + reg["ortho_loss"])
            if cfg.seg_weight > 0:
                seed = tf.stack([tf.constant(cfg.seed, tf.int64), self.step])
                seg = losses.sampled_dice_loss(batch["fixed_seg"], batch["moving_seg"], out["agg_flow"],
                                               self.label_values, cfg.seg_labels, seed, "none", cfg.seg_half)
                regs = regs + cfg.seg_weight * seg
            if cfg.distill != "none":
                distill = losses.distillation_loss(out["agg_flow"], phi_t, cfg.distill, "none")
                regs = regs + cfg.distill_weight * distill
            per_sample = student_loss(rec, regs, cfg, dis=None)
            if cfg.uses_critic:
                dis = aldk.discrimination_loss(self.critic, out["agg_flow"], phi_t, cfg.dis_loss, condition)
                per_sample = student_loss(rec, regs, cfg, dis)
            loss = tf.reduce_sum(per_sample)
        variables = self.model.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        logs = {
            "loss": loss,
            "rec": tf.reduce_sum(rec),
            "smooth": tf.reduce_sum(reg["smoothness"]),
            "det": tf.reduce_sum(reg["det_loss"]),
            "ortho": tf.reduce_sum(reg["ortho_loss"]),
        }
        if cfg.seg_weight > 0:
            logs["seg"] = tf.reduce_sum(seg)
        if cfg.distill != "none":
            logs["distill"] = tf.reduce_sum(distill)
        if cfg.uses_critic:
            logs["dis"] = tf.reduce_sum(dis)
        if phi_t is not None:
            logs["flow_gap"] = tf.reduce_sum(tf.sqrt(tf.reduce_mean(tf.square(out["agg_flow"] - phi_t), [1, 2, 3, 4])))
        if train_critic:
            logs.update(self._critic_updates(out["agg_flow"], phi_t, condition, cfg.critic_steps))
        return logs

    def _critic_updates(self, phi_s, phi_t, condition, steps: int) -> dict:
        """`steps` critic updates on one batch's flows (constants for the critic); returns the last terms."""
        cfg = self.cfg
        phi_s = tf.stop_gradient(phi_s)
        cvars = self.critic.trainable_variables
        for k in range(steps):
            seed = tf.stack([tf.constant(cfg.seed, tf.int64) + 7919 * (k + 1), self.step])
            with tf.GradientTape() as ctape:
                terms = aldk.critic_losses(self.critic, phi_s, phi_t, cfg.beta, cfg.lambda_gp, condition,
                                           cfg.gp_norm, cfg.gp_point, seed)
                closs = tf.reduce_sum(terms["loss"])
            cgrads = ctape.gradient(closs, cvars)
            self.critic_optimizer.apply_gradients(zip(cgrads, cvars))
        return {"critic": closs, "d_student": tf.reduce_sum(terms["d_student"]),
                "d_teacher": tf.reduce_sum(terms["d_teacher"]), "gp": tf.reduce_sum(terms["gp"])}

    def _critic_only_step(self, batch):
        """One critic update on a batch with the student's current flows; the student is not touched."""
        fixed, moving = batch["fixed"], batch["moving"]
        pair = tf.concat([fixed, moving], axis=-1)
        phi_t = self._teacher_flow(batch, pair)
        phi_s = self.model(pair, training=False)["agg_flow"]
        condition = aldk.make_view(pair, self.cfg.critic_flow, self.cfg.critic_condition)
        return self._critic_updates(phi_s, phi_t, condition, 1)

    def warm_up_critic(self, steps: int, iterator) -> dict:
        """`steps` critic-only updates (``--critic_warmup``) before the student's first step; returns the last
        terms (per pair)."""
        fn = tf.function(self._critic_only_step)
        logs = {}
        for _ in range(steps):
            raw = self.strategy.run(fn, args=(next(iterator),))
            logs = {k: float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)) / self.cfg.batch
                    for k, v in raw.items()}
        return logs

    def _distributed_step(self, batch, train_critic: bool):
        per_replica = self.strategy.run(self._replica_step, args=(batch, train_critic))
        # Sums over the global batch; divided by the batch size below for per-pair log values.
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

    def _forward_fn(self, pair, moving_seg):
        out = self.model(pair, training=False)
        warped_seg = warp_ops.warp_labels(moving_seg, out["agg_flow"])
        return out["agg_flow"], out["warped"], warped_seg

    # ------------------------------------------------------------------------------------------ loop

    def restore(self) -> int:
        """Restores the latest checkpoint of this run directory, if any; returns the step."""
        if self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
            logging.info("restored %s (step %d)", self.manager.latest_checkpoint, int(self.step.numpy()))
        return int(self.step.numpy())

    def init_from(self, source: str) -> None:
        """Fine-tuning: copies the weights of `source` (export, pretrained name or run directory) into the model.

        The source's network description must equal this run's (apart from ``compute_dtype``); ValueError naming the
        differing settings otherwise. A source trained on another preprocessing is allowed, with a warning.
        """
        from ldr_tf.training.checkpoints import assign_weights, load_any_model, weight_key

        model, net_cfg, preprocessing = load_any_model(source)
        ignore = {"compute_dtype"}
        keys = (set(net_cfg) | set(self.network_config)) - ignore
        differ = [f"{k}={net_cfg.get(k)!r} (this run: {self.network_config.get(k)!r})" for k in sorted(keys)
                  if _plain(net_cfg.get(k)) != _plain(self.network_config.get(k))]
        if differ:
            raise ValueError(f"--init_from {source}: its network differs from this run's: {'; '.join(differ)}")
        ours = self.desc.extra.get("preprocessing")
        if preprocessing != ours:
            logging.warning("--init_from %s: it was trained on other preprocessing (%s) than this dataset's (%s)",
                            source, (preprocessing or {}).get("recipe"), (ours or {}).get("recipe"))
        assign_weights(self.model, {weight_key(w.path): w for w in model.weights}, f"--init_from {source}")
        logging.info("initialised the model from %s (%d weights)", source, len(model.weights))

    def save(self) -> str:
        path = self.manager.save(checkpoint_number=int(self.step.numpy()))
        if not self.chief:
            shutil.rmtree(self.manager.directory, ignore_errors=True)
        return path

    def validate(self) -> dict:
        """Mean Dice/Jaccard (over pairs; each pair = mean over the fixed map's labels), before and after."""
        dice, jacc, before, images = [], [], [], None
        for batch in self._val_dataset():
            if not bool(batch["has_seg"][0]):
                continue
            pair = tf.concat([batch["fixed"], batch["moving"]], -1)
            _, warped, warped_seg = self._forward(pair, batch["moving_seg"])
            fixed_seg = batch["fixed_seg"][0].numpy()
            r = metrics.label_overlap(fixed_seg, warped_seg[0].numpy())
            dice.append(r["dice"])
            jacc.append(r["jaccard"])
            if self._identity_dice is None:
                before.append(metrics.label_overlap(fixed_seg, batch["moving_seg"][0].numpy())["dice"])
            if images is None:
                mid = batch["fixed"].shape[1] // 2
                images = tf.concat([batch["fixed"][:, mid], batch["moving"][:, mid], warped[:, mid]], axis=2)
        if self._identity_dice is None and before:
            self._identity_dice = float(np.nanmean(before))
        if not dice:
            return {}
        return {"dice": float(np.nanmean(dice)), "jaccard": float(np.nanmean(jacc)),
                "dice_before": self._identity_dice, "pairs": len(dice), "images": images}

    def _summaries(self, step: int, scalars: dict, images=None) -> None:
        if self.writer is None:
            return
        with self.writer.as_default(step=step):
            for k, v in scalars.items():
                if v is not None and np.isscalar(v):
                    tf.summary.scalar(k, v)
            if images is not None:
                tf.summary.image("val/fixed_moving_warped", tf.clip_by_value(images, 0.0, 1.0))
        self.writer.flush()

    def fit(self, progress: bool = True) -> dict:
        """Trains from the current step to ``cfg.steps``. Returns the last step's logs (``"train"``, per-pair means),
        their means over the last log window (``"window"``: the ``log_every`` steps before the end, with its
        ``"steps"``; TensorBoard's ``train/*`` scalars are these window means) and the validation history.

        Ctrl-C (SIGINT) and SIGTERM (``kill``, job schedulers, ``docker stop``) save a checkpoint of the current step
        before the run stops (then KeyboardInterrupt propagates); resume with ``--resume``.
        """
        with cli.sigterm_as_interrupt():
            return self._fit(progress)

    def _fit(self, progress: bool) -> dict:
        cfg = self.cfg
        start = int(self.step.numpy())
        history = {"val": []}
        if start >= cfg.steps:
            logging.info("nothing to do: the run is at step %d of %d", start, cfg.steps)
            return history
        iterator = iter(self._train_dataset(start))
        if start == 0 and cfg.uses_critic and cfg.critic_warmup:
            warm = self.warm_up_critic(cfg.critic_warmup, iter(self._train_dataset(0)))
            logging.info("critic warm-up: %d steps, critic loss %.4g (student untouched)", cfg.critic_warmup,
                         warm.get("critic", float("nan")))
        bar = Progress(cfg.steps, label=f"train {cfg.model}", enabled=progress and self.chief, interval=30)
        bar.update(start)
        t_last, n_last = time.perf_counter(), start
        logs = {}
        window = {}  # key -> [sum, count] of the per-pair logs since the last log point (critic terms: its steps only)
        try:
            for step in range(start, cfg.steps):
                train_critic = cfg.uses_critic and (step + 1) % cfg.critic_every == 0
                raw = self._train_step(next(iterator), train_critic)
                self.step.assign_add(1)
                logs = {k: float(v) / cfg.batch for k, v in raw.items()}
                if not all(math.isfinite(v) for v in logs.values()):
                    bad = ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
                    raise TrainingDiverged(
                        f"a loss became NaN/inf at step {step + 1} ({bad}); the last good checkpoint is "
                        f"{self.manager.latest_checkpoint or 'none'}; lower --lr or check the data"
                    )
                for k, v in logs.items():
                    acc = window.setdefault(k, [0.0, 0])
                    acc[0] += v
                    acc[1] += 1
                done = step + 1
                now = time.perf_counter()
                rate = (done - n_last) / max(now - t_last, 1e-9)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    lr = self.optimizer.learning_rate
                    mean = {k: total / count for k, (total, count) in window.items()}
                    history["window"] = {**mean, "steps": done - n_last}
                    window = {}
                    self._summaries(done, {**{f"train/{k}": v for k, v in mean.items()},
                                           "train/lr": float(np.asarray(lr)), "train/steps_per_s": rate})
                    t_last, n_last = now, done
                if cfg.val_every and (done % cfg.val_every == 0 or done == cfg.steps) and self.chief:
                    val = self.validate()
                    if val:
                        history["val"].append({"step": done, **{k: v for k, v in val.items() if k != "images"}})
                        self._summaries(done, {"val/dice": val["dice"], "val/jaccard": val["jaccard"],
                                               "val/dice_before": val["dice_before"]}, val["images"])
                        logging.info("step %d: validation Dice %.4f (before registration %.4f) on %d pairs",
                                     done, val["dice"], val["dice_before"] or float("nan"), val["pairs"])
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    self.save()
                shown = {k: logs[k] for k in ("loss", "rec", "dis", "critic") if k in logs}
                bar.update(done, list(shown.items()))
        except KeyboardInterrupt:
            path = self.save()
            logging.warning("interrupted at step %d; saved %s (resume with --resume)", int(self.step.numpy()), path)
            raise
        history["train"] = logs
        return history
