"""Training: `config` (the run's TrainConfig and config.json), `trainer` (the tf.function training loop: teacher,
student, ALDK's alternating critic and student steps), `aldk` (the critic's losses and gradient penalty),
`teacher_flows` (teacher deformations for distillation: live or cached), `checkpoints` (rebuilding a run's network
from config.json and its checkpoint). The command is `python -m ldr_tf.train`."""
