"""The frozen configuration of a training run, written to ``<out_dir>/config.json`` before training starts.

Flags are read once in ``ldr_tf.train.main`` and frozen into a `TrainConfig`; everything downstream (the trainer,
``ldr_tf.export``, ``ldr_tf.distill``) reads the run directory's ``config.json`` instead of flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

__all__ = ["TrainConfig", "load_run_config", "DEFAULT_STUDENT_STEM", "DEFAULT_DISTILL", "DEFAULT_DISTILL_WEIGHT",
           "resolve_distill", "student_description"]


# The default student: the light one (README, "Student variants"); every command's --student_stem defaults to it.
DEFAULT_STUDENT_STEM = "ldr_half"
SIMILARITIES = ("pearson", "lncc")  # the image term (--similarity): losses.correlation_loss, losses.lncc_loss

# How a student learns from its teacher by default: direct distillation of the dense residual (l2, weight 0.3), without
# ALDK. Chosen on the IXI validation pairs (README, "Distillation on IXI brains"): l2 +0.024 Dice over the plain
# student at weight 1, ALDK alone +0.000, ALDK + l2 no better than l2 at half the training speed; weight 0.3 +0.032
# (0.1 +0.028, 3 +0.016, 10 -0.016).
DEFAULT_DISTILL = "l2"
DEFAULT_DISTILL_WEIGHT = 0.3


def resolve_distill(distill: str, model: str, has_teacher: bool) -> str:
    """``--distill=auto``: `DEFAULT_DISTILL` for a student given a teacher, else none (the plain student)."""
    if distill != "auto":
        return distill
    return DEFAULT_DISTILL if model == "student" and has_teacher else "none"


def student_description(cfg: "TrainConfig") -> str:
    """What a student run learns from, in words (logs, summaries)."""
    parts = []
    if cfg.distill != "none":
        parts.append(f"direct distillation ({cfg.distill}, weight {cfg.distill_weight:g})")
    if cfg.aldk:
        parts.append("ALDK")
    if parts:
        return "student with " + " + ".join(parts)
    return "student without distillation (reconstruction loss only)"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "teacher"  # teacher | student
    dataset: str = "liver"
    dataset_path: str = ""  # resolved descriptor path
    data_dir: str | None = None
    image_size: int | None = None
    cascades: int = 3
    affine: str = "vtn"
    channels: int = 16
    identity_init: bool = True
    student_stem: str = DEFAULT_STUDENT_STEM
    student_head: str | None = None
    batch: int = 4
    steps: int = 100_000
    lr: float = 1e-4
    lr_schedule: str = "step"
    similarity: str = "pearson"
    lncc_window: int = 5
    reg_weight: float = 1.0
    affine_weight: float = 0.1
    seg_weight: float = 0.0
    seg_labels: int = 16
    seg_half: bool = False
    augment: bool = True
    init_from: str | None = None
    teacher: str | None = None
    teacher_cache: str | None = None
    aldk: bool = False
    gamma: float = 0.3
    lambda_gp: float = 10.0
    beta: float = 0.1
    critic_steps: int = 1
    critic_every: int = 1
    critic_lr: float | None = None
    critic_output: str = "linear"
    dis_loss: str = "abs"
    critic_condition: str = "images"
    critic_flow: str = "total"
    distill: str = "none"
    distill_weight: float = DEFAULT_DISTILL_WEIGHT
    gp_norm: str = "rms"
    gp_point: str = "fixed"
    critic_warmup: int = 0
    critic_beta1: float = 0.9
    out_dir: str = ""
    checkpoint_every: int = 1000
    val_every: int = 1000
    val_pairs: int = 20
    log_every: int = 50
    strategy: str = "default"
    seed: int = 0

    @property
    def uses_critic(self) -> bool:
        return self.model == "student" and self.aldk

    @property
    def uses_teacher(self) -> bool:
        """ALDK and direct distillation need the teacher's flows; a plain student uses them only when given (to log
        flow_gap)."""
        return self.model == "student" and (self.aldk or self.distill != "none"
                                            or bool(self.teacher or self.teacher_cache))

    def validate(self) -> None:
        """Raises ValueError for inconsistent settings, naming the flag."""
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"--similarity: expected one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        if self.lncc_window < 1 or self.lncc_window % 2 == 0:
            raise ValueError(f"--lncc_window must be an odd number >= 1, got {self.lncc_window}")
        if self.cascades < 1:
            raise ValueError(f"--cascades must be >= 1, got {self.cascades}")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        if self.seg_weight < 0 or self.seg_labels < 1:
            raise ValueError(f"--seg_weight must be >= 0 and --seg_labels >= 1, got {self.seg_weight}, "
                             f"{self.seg_labels}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"--gamma must lie in [0, 1], got {self.gamma}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--beta must lie in [0, 1], got {self.beta}")
        if self.critic_warmup < 0 or not 0.0 <= self.critic_beta1 < 1.0:
            raise ValueError(f"--critic_warmup must be >= 0 and --critic_beta1 in [0, 1), got {self.critic_warmup}, "
                             f"{self.critic_beta1}")
        if self.critic_steps < 1 or self.critic_every < 1:
            raise ValueError("--critic_steps and --critic_every must be >= 1")
        if self.uses_critic and not (self.teacher or self.teacher_cache):
            raise ValueError("--model=student with ALDK needs --teacher (run dir or SavedModel) or --teacher_cache "
                             "(python -m ldr_tf.distill); drop --aldk for the student without a teacher")
        if self.distill not in ("none", "l2", "l1") or self.distill_weight < 0:
            raise ValueError(f"--distill must be none, l2 or l1 and --distill_weight >= 0, got {self.distill}, "
                             f"{self.distill_weight}")
        if self.critic_flow not in ("total", "residual") or self.critic_condition not in ("images", "warped", "none"):
            raise ValueError(f"--critic_flow must be total or residual and --critic_condition images, warped or none, "
                             f"got {self.critic_flow}, {self.critic_condition}")
        if self.model == "student" and self.distill != "none" and not (self.teacher or self.teacher_cache):
            raise ValueError(f"--distill={self.distill} needs --teacher (run dir or SavedModel) or --teacher_cache")
        if not self.out_dir:
            raise ValueError("--out_dir is required")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def load_run_config(run_dir: str | os.PathLike) -> dict:
    """Reads ``<run_dir>/config.json`` (keys: "train", "network", "preprocessing"). One-line error if absent."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not a training run directory (no config.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable run config ({e})") from None


def network_config(cfg: TrainConfig, image_size) -> dict:
    """The CascadeConfig dict of the network a run trains."""
    from networks.cascade import CascadeConfig

    size = tuple(int(s) for s in image_size)
    if cfg.model == "teacher":
        net = CascadeConfig(stem="vtn", cascades=cfg.cascades, affine=cfg.affine, image_size=size,
                            channels=cfg.channels, identity_init=cfg.identity_init)
    else:
        kwargs = dict(stem=cfg.student_stem, cascades=cfg.cascades, affine=cfg.affine, image_size=size,
                      identity_init=cfg.identity_init)
        if cfg.student_head:
            kwargs["student_head"] = cfg.student_head
        net = CascadeConfig(**kwargs)
    return net.to_dict()
