"""Training: ALDK gradients reach critic and student, the gradient penalty, exact resume, NaN stop (the command
line in subprocesses: test_train_cli.py)."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from ldr_tf.data.dataset import load_descriptor
from ldr_tf.data.synthetic import ensure_demo_dataset
from ldr_tf.ops import losses
from ldr_tf.training import aldk
from ldr_tf.training.config import TrainConfig, network_config
from ldr_tf.training.trainer import Trainer, TrainingDiverged

SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ensure_demo_dataset("demo", data_dir=d, size=SIZE, subjects=5, progress=False)
    return d


def _cfg(out_dir, data_dir, **kw):
    base = dict(model="student", student_stem="ldr", dataset="demo", data_dir=str(data_dir), image_size=SIZE, cascades=1,
                affine="none", batch=1, steps=2, lr=1e-3, lr_schedule="constant", aldk=False, out_dir=str(out_dir),
                checkpoint_every=1, val_every=0, log_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(cfg, data_dir):
    desc = load_descriptor(Path(data_dir) / "demo.json")
    return Trainer(cfg, desc, network_config(cfg, (SIZE,) * 3))


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_dir):
    """A tiny trained registration run used as the 'teacher' (any run directory can teach)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = _cfg(out, data_dir, steps=1)
    t = _trainer(cfg, data_dir)
    from ldr_tf.atomic import write_json

    write_json({"train": cfg.to_dict(), "network": t.network_config}, out / "config.json")
    t.fit(progress=False)
    return out


def test_aldk_step_updates_student_and_critic_not_teacher(tmp_path, data_dir, teacher_run):
    # the paper's sigmoid critic: with the (default) linear output the last bias cancels out of D(phi_s) - D(phi_t)
    # and rightly gets no gradient
    cfg = _cfg(tmp_path / "s", data_dir, aldk=True, teacher=str(teacher_run), critic_output="sigmoid")
    t = _trainer(cfg, data_dir)
    student0, critic0 = _weights(t.model), _weights(t.critic)
    teacher0 = [v.numpy().copy() for v in t.teacher_fn.model.weights]
    batch = next(iter(t._train_dataset(0)))
    logs = t._train_step(batch, True)
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert {"dis", "critic", "gp", "d_student", "d_teacher"} <= set(logs)
    changed = [not np.array_equal(a, b.numpy()) for a, b in zip(student0, t.model.trainable_variables)]
    assert all(changed), "every student variable must receive a gradient"
    unchanged = [b.path for a, b in zip(critic0, t.critic.trainable_variables) if np.array_equal(a, b.numpy())]
    assert not unchanged, f"every critic variable must receive a gradient: {unchanged}"
    for a, b in zip(teacher0, t.teacher_fn.model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    # the student's gradient really contains the adversarial term: it differs from the reconstruction-only one
    pair = tf.concat([batch["fixed"], batch["moving"]], -1)
    phi_t = t.teacher_fn(pair)
    with tf.GradientTape() as tape:
        dis = tf.reduce_sum(aldk.discrimination_loss(t.critic, t.model(pair)["agg_flow"], phi_t, condition=pair))
    grads = tape.gradient(dis, t.model.trainable_variables)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


def test_gradient_penalty_of_a_linear_critic_is_analytic(rng):
    w = tf.constant(rng.standard_normal((1, 4, 4, 4, 3)).astype(np.float32) * 0.1)

    def critic(flow, training=True):
        return tf.reduce_sum(flow * w, axis=[1, 2, 3, 4])

    phi = tf.constant(rng.standard_normal((2, 4, 4, 4, 3)).astype(np.float32))
    expected = (np.linalg.norm(w.numpy()) - 1.0) ** 2
    np.testing.assert_allclose(aldk.gradient_penalty(critic, phi, norm="l2").numpy(), [expected, expected], rtol=1e-5)
    rms = (np.linalg.norm(w.numpy()) * np.sqrt(w.numpy().size) - 1.0) ** 2  # Lipschitz w.r.t. the RMS distance
    np.testing.assert_allclose(aldk.gradient_penalty(critic, phi).numpy(), [rms, rms], rtol=1e-5)


def test_gradient_penalty_matches_finite_differences(rng):
    from networks.critic import Critic

    keras.utils.set_random_seed(0)
    critic = Critic(channels=(2, 2, 2, 2, 2), output_activation="linear")
    phi = tf.constant(rng.standard_normal((1, 32, 32, 32, 3)).astype(np.float32))
    critic(phi)
    gp = float(aldk.gradient_penalty(critic, phi, norm="l2")[0])
    # The penalty uses the norm of g = dD/dphi. Along the unit direction v = g/|g| the directional derivative
    # equals |g|, so a central finite difference along v must reproduce the penalty; a random direction u
    # checks the gradient itself (<g, u>).
    with tf.GradientTape() as tape:
        tape.watch(phi)
        score = critic(phi)
    g = tape.gradient(score, phi)
    v = g / tf.norm(g)
    eps = 1e-2
    fd = (float(critic(phi + eps * v)[0]) - float(critic(phi - eps * v)[0])) / (2 * eps)
    np.testing.assert_allclose((fd - 1.0) ** 2, gp, rtol=2e-2, atol=1e-4)
    u = tf.constant(rng.standard_normal(phi.shape).astype(np.float32))
    u = u / tf.norm(u)
    fd_u = (float(critic(phi + eps * u)[0]) - float(critic(phi - eps * u)[0])) / (2 * eps)
    np.testing.assert_allclose(fd_u, float(tf.reduce_sum(g * u)), rtol=5e-2, atol=1e-4)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, data_dir, teacher_run):
    kw = dict(aldk=True, teacher=str(teacher_run), steps=4, critic_output="linear")
    straight = _trainer(_cfg(tmp_path / "a", data_dir, **kw), data_dir)
    straight.fit(progress=False)
    first = _trainer(_cfg(tmp_path / "b", data_dir, **{**kw, "steps": 2}), data_dir)
    first.fit(progress=False)
    resumed = _trainer(_cfg(tmp_path / "b", data_dir, **kw), data_dir)
    assert resumed.restore() == 2
    resumed.fit(progress=False)
    assert int(resumed.step.numpy()) == 4
    for a, b in zip(straight.model.trainable_variables + straight.critic.trainable_variables,
                    resumed.model.trainable_variables + resumed.critic.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert int(straight.optimizer.iterations.numpy()) == int(resumed.optimizer.iterations.numpy()) == 4


def test_logged_terms_are_means_over_each_log_window(tmp_path, data_dir):
    cfg = _cfg(tmp_path / "w", data_dir, steps=5, log_every=2, checkpoint_every=100)
    t = _trainer(cfg, data_dir)
    values = iter([1.0, 3.0, 5.0, 7.0, 11.0])  # per batch; the logs divide by the batch size (1 here)
    critic = iter([None, 4.0, None, None, 8.0])  # a term present on some steps only (critic_every > 1)

    def fake_step(batch, train_critic):
        c = next(critic)
        return {"loss": tf.constant(next(values)), **({} if c is None else {"critic": tf.constant(c)})}

    seen = {}
    t._train_step = fake_step
    t._summaries = lambda step, scalars, images=None: seen.update({step: scalars})
    history = t.fit(progress=False)
    assert [s for s in seen] == [2, 4, 5]
    assert seen[2]["train/loss"] == 2.0 and seen[2]["train/critic"] == 4.0
    assert seen[4]["train/loss"] == 6.0 and "train/critic" not in seen[4]
    assert history["window"] == {"loss": 11.0, "critic": 8.0, "steps": 1}
    assert history["train"] == {"loss": 11.0, "critic": 8.0}


def test_nan_loss_stops_with_a_clear_message(tmp_path, data_dir):
    t = _trainer(_cfg(tmp_path / "n", data_dir, lr=1e12, steps=20, checkpoint_every=100), data_dir)
    with pytest.raises(TrainingDiverged, match="became NaN/inf at step"):
        t.fit(progress=False)


def cache_flow_of(path, key):
    import h5py

    with h5py.File(path, "r") as h5:
        return np.asarray(h5[key][()], np.float32)


def test_teacher_cache_holds_the_teachers_flows_and_trains_a_student(tmp_path, data_dir, teacher_run):
    from ldr_tf import distill
    from ldr_tf.training import teacher_flows as teacher_lib
    from ldr_tf.data.pairs import make_pair_dataset, pairs_for

    desc = load_descriptor(Path(data_dir) / "demo.json")
    out = tmp_path / "flows.h5"
    rep = distill.build_cache(str(teacher_run), desc, out, progress=False)
    assert rep["pairs"] == len(pairs_for(desc, "1")) > 0
    assert not [p for p in tmp_path.iterdir() if p.name != "flows.h5"], "no temporary file left behind"
    cache = teacher_lib.TeacherCache(out)
    assert len(cache) == rep["pairs"] and cache.attrs["dtype"] == "float16"
    fn, _ = teacher_lib.load_registration_fn(teacher_run)
    b = next(iter(make_pair_dataset(desc, "1", batch_size=1, augment=False, shuffle=False, repeat=False)))
    want = fn(tf.concat([b["fixed"], b["moving"]], -1)).numpy()[0]
    got = cache.get(b["id1"][0].numpy().decode(), b["id2"][0].numpy().decode())
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)  # float16 storage
    with pytest.raises(ValueError, match="no teacher flow for pair nope -> s000"):
        cache.get("nope", "s000")
    cache.close()
    # --refine --shuffle --max_pairs: a seeded random subset, each flow the teacher's refined for its pair
    from ldr_tf.refine import Refiner

    refiner = Refiner(3)
    rep2 = distill.build_cache(str(teacher_run), desc, tmp_path / "refined.h5", max_pairs=1, progress=False,
                               refiner=refiner, shuffle=True, seed=5)
    refined = teacher_lib.TeacherCache(tmp_path / "refined.h5")
    assert rep2["pairs"] == len(refined) == 1 and json.loads(refined.attrs["refine"])["levels"][0]["steps"] == 3
    first = sorted(refined.keys)[0]
    ds = make_pair_dataset(desc, "1", batch_size=1, seed=5, augment=False, shuffle=True, repeat=False)
    b = next(b for b in ds if teacher_lib.pair_key(b["id1"][0].numpy().decode(), b["id2"][0].numpy().decode()) == first)
    want = refiner(b["fixed"], b["moving"], fn(tf.concat([b["fixed"], b["moving"]], -1))).numpy()[0]
    got = refined.get(b["id1"][0].numpy().decode(), b["id2"][0].numpy().decode())
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    assert np.abs(got - cache_flow_of(out, first)).max() > 1e-3  # refining changed the teacher's flow
    refined.close()
    # a student trains from a cache (augmented pairs: cached flows are mapped onto them) with ALDK; the cache holds
    # 1 of the (at least 6) training pairs: the student trains on it only (else, likely: "no teacher flow for pair")
    assert len(pairs_for(desc, "1")) >= 6
    cfg = _cfg(tmp_path / "s", data_dir, aldk=True, teacher_cache=str(tmp_path / "refined.h5"), steps=1, augment=True)
    t = _trainer(cfg, data_dir)
    assert t.teacher_fn is None and t.cache is not None  # flows come from the cache, no teacher is loaded
    critic0 = _weights(t.critic)
    t.fit(progress=False)
    assert int(t.step.numpy()) == 1
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(critic0, t.critic.trainable_variables))


def test_map_to_augmented_registers_the_augmented_pair():
    from ldr_tf.ops import warp
    from ldr_tf.training.teacher_flows import map_to_augmented

    n = 24
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32),) * 3, indexing="ij")
    moving = 0.5 + 0.25 * np.sin(2 * np.pi * z / n) * np.cos(2 * np.pi * y / n) + 0.2 * np.sin(2 * np.pi * x / n)
    field = lambda s, p: np.stack([s * np.sin(2 * np.pi * (y + p) / n), s * np.cos(2 * np.pi * (x + p) / n),  # noqa
                                   s * np.sin(2 * np.pi * (z + p) / n)], -1)[None].astype(np.float32)
    a, phi = field(1.5, 3.0), field(2.0, 7.0)  # augmentation of the moving image, teacher flow of the original pair
    moving = tf.constant(moving[None, ..., None].astype(np.float32))
    moving_aug = warp.warp(moving, a)  # moving'(x) = moving(x + a(x))
    target = warp.warp(moving, phi)  # what the teacher's flow makes of the original moving image
    psi = map_to_augmented(tf.constant(phi), tf.constant(a))
    inner = (slice(None),) + (slice(4, n - 4),) * 3
    err_mapped = np.abs(warp.warp(moving_aug, psi).numpy() - target.numpy())[inner].max()
    err_unmapped = np.abs(warp.warp(moving_aug, tf.constant(phi)).numpy() - target.numpy())[inner].max()
    assert err_mapped < 0.02 and err_mapped < 0.2 * err_unmapped, (err_mapped, err_unmapped)


def test_critic_warmup_updates_the_critic_only(tmp_path, data_dir, teacher_run):
    cfg = _cfg(tmp_path / "w", data_dir, aldk=True, teacher=str(teacher_run), critic_warmup=2, gp_point="random",
               critic_beta1=0.5)
    t = _trainer(cfg, data_dir)
    assert float(t.critic_optimizer.beta_1) == 0.5
    student0, critic0 = _weights(t.model), _weights(t.critic)
    logs = t.warm_up_critic(cfg.critic_warmup, iter(t._train_dataset(0)))
    assert {"critic", "gp", "d_student", "d_teacher"} <= set(logs) and all(np.isfinite(v) for v in logs.values())
    for a, b in zip(student0, t.model.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())  # the student is not touched
    assert int(t.step.numpy()) == 0
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(critic0, t.critic.trainable_variables))
    t.fit(progress=False)  # warm-up inside fit, then the two steps of the run
    assert int(t.step.numpy()) == cfg.steps == 2


def test_direct_distillation_and_the_residual_warped_critic(tmp_path, data_dir, teacher_run):
    """--distill=l2 with ALDK on the dense residual, conditioned on the warped moving image: one step trains the
    student with both terms and the critic on its 3 + 2 channel view."""
    cfg = _cfg(tmp_path / "d", data_dir, aldk=True, teacher=str(teacher_run), distill="l2", distill_weight=2.0,
               critic_flow="residual", critic_condition="warped")
    t = _trainer(cfg, data_dir)
    student0, critic0 = _weights(t.model), _weights(t.critic)
    batch = next(iter(t._train_dataset(0)))
    logs = t._train_step(batch, True)
    assert {"distill", "dis", "critic", "flow_gap"} <= set(logs)
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert float(logs["distill"]) > 0
    assert all(not np.array_equal(a, b.numpy()) for a, b in zip(student0, t.model.trainable_variables))
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(critic0, t.critic.trainable_variables))
    # the distillation term alone moves the student towards the teacher's dense residual
    pair = tf.concat([batch["fixed"], batch["moving"]], -1)
    phi_t = t.teacher_fn(pair)
    with tf.GradientTape() as tape:
        d = tf.reduce_sum(losses.distillation_loss(t.model(pair)["agg_flow"], phi_t, "l2"))
    grads = tape.gradient(d, t.model.trainable_variables)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads if g is not None)


def test_distill_needs_a_teacher(tmp_path, data_dir):
    with pytest.raises(ValueError, match="--distill=l1 needs --teacher"):
        _cfg(tmp_path / "x", data_dir, distill="l1").validate()


def test_init_from_copies_another_runs_weights_and_refuses_another_network(tmp_path, data_dir, teacher_run):
    from ldr_tf.training.checkpoints import restore_model

    source, _ = restore_model(teacher_run)
    t = _trainer(_cfg(tmp_path / "ft", data_dir, init_from=str(teacher_run)), data_dir)
    before = _weights(t.model)
    t.init_from(str(teacher_run))
    after = _weights(t.model)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))  # the seed's initial weights are replaced
    for a, b in zip(after, _weights(source)):
        np.testing.assert_array_equal(a, b)
    other = _trainer(_cfg(tmp_path / "other", data_dir, cascades=2), data_dir)
    with pytest.raises(ValueError, match=r"--init_from .*: its network differs from this run's: .*cascades"):
        other.init_from(str(teacher_run))
    with pytest.raises(ValueError, match=r"nowhere: not found"):
        other.init_from(str(tmp_path / "nowhere"))


def test_lncc_similarity_is_the_image_term(tmp_path, data_dir):
    from ldr_tf.ops import losses

    t = _trainer(_cfg(tmp_path / "lncc", data_dir, similarity="lncc", lncc_window=3, steps=1, lr=0.0,
                      checkpoint_every=100), data_dir)
    batch = next(iter(t._train_dataset(0)))
    out = t.model(tf.concat([batch["fixed"], batch["moving"]], -1), training=False)
    expected = float(losses.lncc_loss(batch["fixed"], out["warped"], 3))
    history = t.fit(progress=False)  # lr 0: the step sees the same batch and weights
    assert history["train"]["rec"] == pytest.approx(expected, rel=1e-4)
    assert 0.0 < expected < 1.0
