"""Put a trained run into the package as a pretrained model (`ldr_tf.pretrained`).

    python -m tools.ship_pretrained --run=brain_out/runs/half_seg --name=brain --card=card.json
    python -m tools.ship_pretrained --run=ldr_tf/pretrained/brain-student --name=brain   # re-ship an export

`--run` may also be an export (a SavedModel folder of ``ldr_tf.export``, a shipped model included): it is written
again in the current export format (``ldr_tf.export --saved_model``), keeping its weights and its card unless
``--card`` gives a new one.

Exports the run's latest checkpoint (or ``--step``) with ``ldr_tf.export``, removes this machine's paths from the
metadata (the checkpoint and dataset paths become file names), adds the model card read from ``--card`` (a JSON
object: ``summary``, ``data``, ``training``, ``scores``, ``intended_use``, ``limits``, ...) and replaces
``ldr_tf/pretrained/<folder>/`` in one rename. ``--refine=10`` records the refinement that ``predict`` applies by
default with this model (``--refine=auto``). Refuses when the pretrained models would exceed 40 MB in total.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from absl import flags

from ldr_tf import cli

FLAGS = flags.FLAGS
LIMIT_MB = 40.0


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def ship(run: str, name: str, card: dict, step: int | None = None, refine: list | None = None) -> Path:
    """Exports `run` into the package as `name` (module docstring). `refine`: the refinement ``predict
    --refine=auto`` applies (step counts, ``[]``: none), stored as the metadata's ``refine.steps``; None keeps the
    source export's."""
    from ldr_tf import pretrained
    from ldr_tf.deploy import savedmodel
    from ldr_tf.atomic import write_json

    if name not in pretrained.MODELS:
        raise ValueError(f"--name: expected one of {', '.join(pretrained.MODELS)}, got {name!r}")
    dest = pretrained.folder(name)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        if (Path(run) / "saved_model.pb").is_file():
            if step is not None:
                raise ValueError(f"{run}: --step chooses a checkpoint of a run; an export has one step")
            out = savedmodel.reexport(run, Path(tmp) / "model")
        else:
            out = savedmodel.export_run(run, Path(tmp) / "model", step=step)
        meta = savedmodel.load_metadata(out)
        meta.pop("reexported_from", None)  # this machine's path; the card says where the model comes from
        meta["checkpoint"] = Path(meta["checkpoint"]).name
        data = meta.get("training_data")
        if isinstance(data, str):
            meta["training_data"] = Path(data).name
        elif isinstance(data, dict) and isinstance(data.get("path"), str):
            meta["training_data"] = {**data, "path": Path(data["path"]).name}
        if card or "card" not in meta:
            meta["card"] = card
        if refine is not None:
            if any(refine):
                meta["refine"] = {**(meta.get("refine") or {}), "steps": [int(n) for n in refine]}
            else:
                meta.pop("refine", None)
        write_json(meta, out / savedmodel.METADATA)
        others = sum(folder_mb(p) for n, p in pretrained.installed().items() if n != name)
        total = others + folder_mb(out)
        if total > LIMIT_MB:
            raise ValueError(f"{run}: the pretrained models would take {total:.1f} MB (limit {LIMIT_MB:.0f} MB)")
        old = Path(tmp) / "old"
        if dest.exists():
            dest.rename(old)
        out.rename(dest)
    print(f"shipped {run} as --model={name}: {dest} ({folder_mb(dest):.1f} MB)")
    return dest


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.run or not FLAGS.name:
        raise cli.UsageError("--run and --name are required")
    card = {}
    if FLAGS.card:
        try:
            card = json.loads(Path(FLAGS.card).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{FLAGS.card}: unreadable model card ({' '.join(str(e).split())})") from None
        if not isinstance(card, dict):
            raise ValueError(f"{FLAGS.card}: the model card must be a JSON object")
    from ldr_tf.predict import refine_steps

    ship(FLAGS.run, FLAGS.name, card, FLAGS.step, None if FLAGS.refine is None else refine_steps(FLAGS.refine))
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("run", None, "Training run directory, or an export to write again in the current format.")
    flags.DEFINE_string("name", None, "Pretrained name (ldr_tf.pretrained.MODELS).")
    flags.DEFINE_string("card", None, "Model card JSON file.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("refine", None, "The refinement predict --refine=auto applies with this model (e.g. 10 or "
                        "50,20; 0: none). Default: the source export's.")
    cli.run(main, "tools.ship_pretrained")
