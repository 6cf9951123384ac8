"""Pretrained models shipped inside the package: ``python -m ldr_tf.predict --model=brain ...``.

Each model is an ordinary export (``python -m ldr_tf.export``: a SavedModel with the ``register`` and
``register_labels`` signatures and ``ldr_tf_export.json``) in a folder of this package, so everything that takes an
exported model takes one of these names too (`resolve`). Its ``ldr_tf_export.json`` carries the preprocessing that
``predict`` repeats on any new scan and a ``card`` (data, training command and budget, scores, intended use, limits);
``python -m ldr_tf.pretrained`` prints the cards. ``tools/ship_pretrained.py`` puts a trained run here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> folder of this package
MODELS = {
    "brain": "brain-student",
}


def folder(name: str) -> Path:
    """The folder of the pretrained model `name` (whether or not it is installed)."""
    return HERE / MODELS[name]


def installed() -> dict:
    """``{name: folder}`` of the pretrained models present in this installation."""
    return {n: folder(n) for n in MODELS if (folder(n) / "saved_model.pb").is_file()}


def resolve(model: str | os.PathLike) -> Path:
    """A model argument as a path: a pretrained name (``brain``) becomes its package folder, anything else a Path.

    Raises:
      ValueError: a pretrained name whose files are missing from this installation (one line).
    """
    key = str(model)
    if key in MODELS:
        path = folder(key)
        if not (path / "saved_model.pb").is_file():
            raise ValueError(f"--model={key}: the pretrained model is not in this installation ({path} has no "
                             "saved_model.pb); reinstall ldr-tf or give an exported SavedModel directory")
        return path
    return Path(model)


def card(name: str) -> dict:
    """The model card (the ``card`` entry of the export metadata) of an installed pretrained model."""
    meta = json.loads((resolve(name) / "ldr_tf_export.json").read_text())
    return meta.get("card") or {}


def main() -> int:
    have = installed()
    for name in MODELS:
        if name not in have:
            print(f"{name}: not installed ({folder(name)})")
            continue
        meta = json.loads((have[name] / "ldr_tf_export.json").read_text())
        c = meta.get("card") or {}
        print(f"{name}: {have[name]}")
        print(f"  {meta.get('model')} ({meta.get('network', {}).get('stem')}, {meta.get('cascades')} cascades, "
              f"{meta.get('parameters')} parameters, grid {meta.get('image_size')}), "
              f"{meta.get('trained_steps')} training steps")
        for key in ("summary", "data", "training", "scores", "intended_use", "limits"):
            if c.get(key):
                value = c[key]
                if isinstance(value, dict) and isinstance(value.get("note"), str):
                    value = value["note"]  # the scores' summary line (the figures stay in ldr_tf_export.json)
                value = value if isinstance(value, str) else json.dumps(value)
                print(f"  {key}: {value}")
    return 0


