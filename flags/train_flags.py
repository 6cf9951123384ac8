"""Flags of ``python -m ldr_tf.train`` (defined here, read only in ``ldr_tf.train.main``).

Defaults reproduce the paper's setup (128^3, batch 4, Adam 1e-4, 100k steps, RCN's step schedule).
``--preset=demo`` swaps in small values for every flag not given on the command line.
"""

from absl import flags

from flags import common_flags
from ldr_tf.training.config import DEFAULT_DISTILL_WEIGHT, DEFAULT_STUDENT_STEM, SIMILARITIES

PRESETS = {
    # What `make demo` uses: 64^3 synthetic data, narrow teacher, minutes on 2 cores.
    "demo": dict(
        dataset="demo", image_size=64, batch=2, steps=600, channels=8, cascades=1,
        val_every=200, val_pairs=8, checkpoint_every=200, log_every=20, lr_schedule="constant",
    ),
    # A few steps at 64^3 (the smallest grid of the VTN teacher): used by the tests and for smoke-checking an installation.
    "smoke": dict(
        dataset="demo", image_size=64, batch=1, steps=2, channels=4, cascades=1,
        val_every=2, val_pairs=2, checkpoint_every=1, log_every=1, lr_schedule="constant",
    ),
}


def define_train_flags() -> None:
    """Defines every training flag (idempotent)."""
    if "model" in flags.FLAGS:
        return
    common_flags.define_data_flags()
    common_flags.define_runtime_flags()
    flags.DEFINE_enum("model", "teacher", ["teacher", "student"], "What to train.")
    flags.DEFINE_enum("preset", None, sorted(PRESETS), "Small-value presets for flags not set explicitly.")
    flags.DEFINE_integer("cascades", 3, "Number N of dense cascades (VTN stems for the teacher, LDR for the student).")
    flags.DEFINE_enum(
        "affine", "auto", ["auto", "vtn", "lite", "none"],
        "Affine first stage: vtn (VTN affine subnetwork), lite (the light stem), none. auto = vtn for the teacher, "
        "lite for the student.",
    )
    flags.DEFINE_bool("identity_init", True,
                      "Start every stage at the identity (zero affine head, near-zero VTN flow head); "
                      "--noidentity_init keeps the original's random initial affine and large initial VTN flows.")
    flags.DEFINE_integer("channels", 16, "VTN width (16 = the reference network; 8 or 4 for small runs).")
    flags.DEFINE_enum("student_stem", DEFAULT_STUDENT_STEM, ["ldr", "ldr_released", "ldr_half"],
                      "ldr_half (default) = the light student: the paper's stems with every cascade at half "
                      "resolution (grid sizes multiples of 32, >= 48); ldr = the student as the paper describes it; "
                      "ldr_released = the original code's variant.")
    flags.DEFINE_string("student_head", None,
                        "How the student reaches full resolution: deconv | upsample (default: networks' default).")
    flags.DEFINE_integer("batch", 4, "Pairs per step (global batch under a distribution strategy).")
    flags.DEFINE_integer("steps", 100_000, "Training steps (student updates for --model=student).")
    flags.DEFINE_float("lr", 1e-4, "Adam learning rate (base).")
    flags.DEFINE_float("seg_weight", 0.0, "Weight of the optional label supervision: 1 - soft Dice between the fixed "
                       "and the warped moving label maps of the training pairs (VoxelMorph's semi-supervised mode); "
                       "0 = unsupervised. Inference stays image-only.")
    flags.DEFINE_integer("seg_labels", 16, "Labels drawn (new ones every step) for the --seg_weight Dice term.")
    flags.DEFINE_bool("seg_half", False, "Score the --seg_weight Dice term at half resolution (8x less memory; "
                      "needed at 128^3 on a 24 GB machine).")
    flags.DEFINE_enum(
        "lr_schedule", "step", ["step", "constant", "cosine"],
        "step: RCN's schedule, 1e-4 for the first 3/5 of training then halved every 1/5; constant; cosine decay to 0.",
    )
    flags.DEFINE_enum("similarity", "pearson", list(SIMILARITIES),
                      "Image term of the loss: pearson = 1 - the correlation over the whole volume (RCN's and the "
                      "paper's); lncc = 1 - the squared local correlation in an --lncc_window^3 box (ANTs SyN's, "
                      "VoxelMorph's, and the refinement's metric).")
    flags.DEFINE_integer("lncc_window", 5, "Box size of --similarity=lncc, in grid voxels (odd).")
    flags.DEFINE_float("reg_weight", 1.0, "Weight of the smoothness loss of every dense stem.")
    flags.DEFINE_float("affine_weight", 0.1, "Weight of the affine determinant and orthogonality losses.")
    flags.DEFINE_string("init_from", None,
                        "Start from the weights of another model (fine-tuning): an exported SavedModel, a pretrained "
                        "model's name (brain) or a training run directory (its latest checkpoint). The network "
                        "settings must match; the optimizer and the step count start fresh. Ignored when --resume "
                        "finds a checkpoint.")
    flags.DEFINE_bool("augment", True, "Random B-spline deformation of the moving image during training.")
    # Student / distillation
    flags.DEFINE_string("teacher", None,
                        "Teacher for --model=student: a training run directory (checkpoint) or an exported SavedModel.")
    flags.DEFINE_string("teacher_cache", None,
                        "Precomputed teacher flows (python -m ldr_tf.distill) instead of running the teacher.")
    flags.DEFINE_bool("aldk", False, "Adversarial learning with distilling knowledge (the paper's critic; student with "
                      "--teacher only). Off by default: on IXI it added nothing to direct distillation (README, ALDK).")
    flags.DEFINE_float("gamma", 0.3, "L_adv = gamma * l_rec + (1 - gamma) * l_dis.")
    flags.DEFINE_float("lambda_gp", 10.0, "Weight of the critic's gradient penalty (the paper: 0.1, with its "
                                          "sigmoid critic; 10 is WGAN-GP's, needed by the linear critic).")
    flags.DEFINE_float("beta", 0.1, "Joint deformation phi_hat = beta * phi_t + (1 - beta) * phi_s.")
    flags.DEFINE_integer("critic_steps", 1, "Critic updates after each student update that trains the critic.")
    flags.DEFINE_integer("critic_every", 1, "Train the critic after every k-th student update.")
    flags.DEFINE_float("critic_lr", None, "Critic learning rate (default: --lr).")
    flags.DEFINE_enum("critic_output", "linear", ["sigmoid", "linear"],
                      "Critic output activation: linear as in WGAN-GP (default), sigmoid as in the paper.")
    flags.DEFINE_enum("gp_point", "fixed", ["fixed", "random"],
                      "Where the gradient penalty is taken: fixed = the paper's phi_hat = beta phi_t + (1 - beta) "
                      "phi_s; random = a uniformly random point of that segment per sample (WGAN-GP).")
    flags.DEFINE_integer("critic_warmup", 0, "Critic-only steps before the student's first step (the student is "
                         "not touched by them).")
    flags.DEFINE_float("critic_beta1", 0.9, "Adam beta_1 of the critic (0.5 is common for GAN critics).")
    flags.DEFINE_enum("dis_loss", "abs", ["abs", "square", "feature", "wgan"],
                      "Student's discrimination loss: abs = |D(phi_s) - D(phi_t)| (WGAN generator gradient), "
                      "square = the paper's (D(phi_s) - D(phi_t))^2, feature = squared difference of the critic's "
                      "last feature maps, wgan = D(phi_t) - D(phi_s) (the WGAN generator loss).")
    flags.DEFINE_enum("critic_condition", "images", ["images", "warped", "none"],
                      "images: the critic sees the deformation with the pair it registers [fixed, moving]; warped: "
                      "with [fixed, moving warped by the deformation] (it can check correspondence); none: the "
                      "deformation only.")
    flags.DEFINE_enum("critic_flow", "total", ["total", "residual"],
                      "What the critic sees of a deformation: total = the whole flow (the paper's); residual = the "
                      "flow minus its least-squares affine part (the dense part, where student and teacher differ).")
    flags.DEFINE_enum("distill", "auto", ["auto", "none", "l2", "l1"],
                      "Direct distillation (student with --teacher): add --distill_weight x the mean squared (l2) or "
                      "absolute (l1) difference between the dense residuals of the student's and teacher's flows. "
                      "auto (default) = l2 when a teacher is given, none otherwise; none with a teacher = the plain "
                      "student (the teacher only logs flow_gap).")
    flags.DEFINE_float("distill_weight", DEFAULT_DISTILL_WEIGHT, "Weight of --distill (voxels^-2 for l2, voxels^-1 "
                       "for l1); the default was chosen on the IXI validation pairs (README, ALDK).")
    flags.DEFINE_enum("gp_norm", "rms", ["rms", "l2"],
                      "Gradient penalty norm: rms keeps the critic 1-Lipschitz w.r.t. the RMS distance between "
                      "deformations (voxels); l2 w.r.t. the Euclidean norm over all values (textbook WGAN-GP).")
    # Loop
    flags.DEFINE_string("out_dir", None, "Run directory: config.json, checkpoints, TensorBoard logs.")
    flags.DEFINE_bool("resume", False, "Continue the run in --out_dir from its latest checkpoint.")
    flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints.")
    flags.DEFINE_integer("val_every", 1000, "Steps between validations (Dice on validation pairs); 0 = never.")
    flags.DEFINE_integer("val_pairs", 20, "Validation pairs per validation (0 = all).")
    flags.DEFINE_integer("log_every", 50, "Steps between TensorBoard scalar summaries.")
    flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                      "tf.distribute strategy; multi_worker reads the cluster from $TF_CONFIG.")


def apply_preset(flag_values=flags.FLAGS) -> None:
    """Fills flags that were not given on the command line from ``--preset``."""
    name = flag_values.preset
    if not name:
        return
    for key, value in PRESETS[name].items():
        if not flag_values[key].present:
            flag_values[key].value = value
