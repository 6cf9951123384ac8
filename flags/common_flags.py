"""Flags shared by several command-line tools (dataset choice, seeds, CPU threading)."""

from absl import flags


def _once(name: str) -> bool:
    return name in flags.FLAGS


def define_data_flags() -> None:
    """--dataset, --data_dir, --image_size."""
    if _once("dataset"):
        return
    flags.DEFINE_string(
        "dataset", "liver",
        "liver | brain | demo | demo-brain (looked up as <data_dir>/<name>.json; demo datasets are generated on "
        "first use) or a path to a dataset .json.",
    )
    flags.DEFINE_string("data_dir", None, "Where named datasets live (default $LDR_TF_DATA_DIR or ~/.cache/ldr_tf/data).")
    flags.DEFINE_integer("image_size", None,
                         "Cubic grid size of the networks (default: the dataset's image_size; demo datasets are "
                         "generated at this size).")


def define_runtime_flags(flag_values=flags.FLAGS) -> None:
    """--seed, --threads, --inter_threads, --xla_warp (on `flag_values`, default the global FLAGS)."""
    if "seed" in flag_values:
        return
    fv = flag_values
    flags.DEFINE_integer("seed", 0, "Seed of every random choice (data order, augmentation, initialisation).",
                         flag_values=fv)
    flags.DEFINE_integer("threads", 0, "Intra-op threads (0 = all cores).", flag_values=fv)
    flags.DEFINE_integer("inter_threads", 0, "Inter-op threads (0 = TF default).", flag_values=fv)
    flags.DEFINE_bool("xla_warp", True, "Run the trilinear sampler through XLA (2-8x faster on CPU).", flag_values=fv)


def apply_runtime_flags(flag_values=flags.FLAGS) -> None:
    """Applies --threads / --inter_threads / --xla_warp; call before any TF op runs."""
    import tensorflow as tf

    from ldr_tf.ops import warp

    if flag_values.threads:
        tf.config.threading.set_intra_op_parallelism_threads(flag_values.threads)
    if flag_values.inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(flag_values.inter_threads)
    warp.set_xla_warp(flag_values.xla_warp)
