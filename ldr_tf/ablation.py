"""``python -m ldr_tf.ablation``: the table of an ablation with several seeds per arm, from a `ldr_tf.compare` run.

Name the compared methods ``<arm>_s<seed>`` (e.g. ``plain_s0``, ``plain_s1``, ``l2_s0``); a method without a seed
suffix is an arm of one run. For every arm the table gives

* the mean Dice over the pairs of each seed, then their mean ± standard deviation over the seeds;
* the **paired difference** to the baseline arm: per pair, the arm's Dice (averaged over its seeds) minus the
  baseline's (averaged over its seeds); the two directions of one subject pair (``a -> b`` and ``b -> a``) are one
  unit, since they share both scans; the mean over units and its 95 % Student-t interval (over pairs: the seeds'
  spread is not in it, see the next items), and how many pairs the arm improves;
* the difference of each seed's mean Dice to the baseline's with the same seed (same initial weights and data order
  in this project's runs), which shows whether the difference holds seed by seed;
* with ``--runs=<dir>``, training figures read from ``<dir>/<method>/summary.json`` where there is one: ``flow_gap``
  (RMS voxels between the student's and the teacher's flows, mean over the last log window) and steps/s, averaged
  over seeds.

Example::

    python -m ldr_tf.compare --dataset=brain.json --subset=test --paired --out=cmp \\
        --method=plain_s0=runs/plain_s0 --method=plain_s1=runs/plain_s1 --method=l2_s0=runs/l2_s0 ...
    python -m ldr_tf.ablation --compare=cmp.json --baseline=plain --runs=runs --out=ablation
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from absl import flags

from ldr_tf import cli

FLAGS = flags.FLAGS
_SEEDED = re.compile(r"^(?P<arm>.+)_s(?P<seed>\d+)$")


def define_flags() -> None:
    if "compare" in FLAGS:
        return
    flags.DEFINE_string("compare", None, "JSON written by python -m ldr_tf.compare (<out>.json).")
    flags.DEFINE_string("baseline", None, "Arm the others are compared with (default: the first arm).")
    flags.DEFINE_string("runs", None, "Folder holding the training runs, one per method name (for flow_gap, steps/s).")
    flags.DEFINE_string("out", None, "Writes <out>.md and <out>.json (default: print only).")


def _read_json(path: Path):
    """A JSON file, or ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def split_name(name: str) -> tuple[str, int | None]:
    """``"l2_s3"`` -> ``("l2", 3)``; a name without a seed suffix is its own arm (seed None)."""
    m = _SEEDED.match(name)
    return (m["arm"], int(m["seed"])) if m else (name, None)


def group_arms(names) -> dict[str, list[str]]:
    """Method names grouped by arm, arms in order of first appearance, seeds sorted."""
    arms: dict[str, list[str]] = {}
    for n in names:
        arms.setdefault(split_name(n)[0], []).append(n)
    return {a: sorted(ns, key=lambda n: (split_name(n)[1] is None, split_name(n)[1] or 0)) for a, ns in arms.items()}


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the mean of `values` (independent units)."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    if v.size < 2:
        raise ValueError(f"a confidence interval needs at least 2 units, got {v.size}")
    mean = float(v.mean())
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half


def _pair_dice(rows) -> dict[tuple[str, str], float]:
    out = {}
    for r in rows:
        key = (r["fixed"], r["moving"])
        if key in out:
            raise ValueError(f"pair {key[0]} -> {key[1]} is scored twice")
        out[key] = float(r["dice"])
    return out


def arm_pair_dice(pairs: dict, methods: list[str]) -> dict[tuple[str, str], float]:
    """Per pair, the Dice of an arm averaged over its seeds (every seed must hold the same pairs)."""
    per = [_pair_dice(pairs[m]) for m in methods]
    keys = set(per[0])
    for m, p in zip(methods, per):
        if set(p) != keys:
            raise ValueError(f"{m} was scored on other pairs than {methods[0]}")
    return {k: float(np.mean([p[k] for p in per])) for k in sorted(keys)}


def paired_difference(arm: dict, base: dict, level: float = 0.95) -> dict:
    """Mean difference arm − base over units (unordered subject pairs), its interval, pairs improved."""
    if set(arm) != set(base):
        raise ValueError("the arm and the baseline were scored on different pairs")
    units: dict[frozenset, list[float]] = {}
    for k in arm:
        units.setdefault(frozenset(k), []).append(arm[k] - base[k])
    per_unit = [float(np.mean(v)) for v in units.values()]
    mean, lo, hi = t_interval(per_unit, level)
    better = sum(arm[k] > base[k] for k in arm)
    return {"mean": mean, "low": lo, "high": hi, "units": len(per_unit), "pairs": len(arm), "better": int(better)}


def same_seed_differences(means: dict[str, float], methods: list[str], base_methods: list[str]) -> dict[str, float]:
    """Mean Dice (`means`: per method) of each seed of an arm minus the baseline's with the same seed (same initial
    weights and data order in this project's runs), for the seeds both have."""
    base = {split_name(m)[1]: m for m in base_methods if split_name(m)[1] is not None}
    return {f"s{seed}": means[m] - means[base[seed]] for m in methods
            if (seed := split_name(m)[1]) is not None and seed in base}


def summarise(compare_json: dict, baseline: str | None = None, runs: str | Path | None = None) -> list[dict]:
    """One row per arm (see the module docstring)."""
    pairs = compare_json["pairs"]
    arms = group_arms(pairs)
    if not arms:
        raise ValueError("the comparison holds no methods")
    baseline = baseline or next(iter(arms))
    if baseline not in arms:
        raise ValueError(f"baseline arm {baseline!r} not among the arms {sorted(arms)}")
    base = arm_pair_dice(pairs, arms[baseline])
    means = {m: float(np.mean([r["dice"] for r in rows])) for m, rows in pairs.items()}
    rows = []
    for arm, methods in arms.items():
        seed_means = [means[m] for m in methods]
        row = {"arm": arm, "methods": methods, "seeds": len(methods), "dice_mean": float(np.mean(seed_means)),
               "dice_seed_std": float(np.std(seed_means, ddof=1)) if len(methods) > 1 else None,
               "dice_per_seed": seed_means}
        if arm != baseline:
            row["vs_baseline"] = paired_difference(arm_pair_dice(pairs, methods), base)
            row["vs_baseline"]["per_seed"] = same_seed_differences(means, methods, arms[baseline])
        if runs is not None:
            row.update(_training_figures(Path(runs), methods))
        rows.append(row)
    return rows


def _training_figures(runs: Path, methods: list[str]) -> dict:
    gaps, rates = [], []
    for m in methods:
        path = runs / m / "summary.json"
        if not path.is_file():  # a method that is not a training run here (identity, ANTs, a teacher elsewhere)
            continue
        s = _read_json(path)
        window = s.get("last_window") or s.get("last") or {}
        if "flow_gap" in window:
            gaps.append(float(window["flow_gap"]))
        if s.get("steps_per_s"):
            rates.append(float(s["steps_per_s"]))
    return {"flow_gap": float(np.mean(gaps)) if gaps else None,
            "steps_per_s": float(np.mean(rates)) if rates else None}


def table(rows: list[dict], baseline: str) -> str:
    has_runs = any("flow_gap" in r for r in rows)
    head = ("| arm | seeds | Dice mean ± seed std | Dice per seed | vs " + baseline + " (95 % interval) | same seed |"
            " pairs better |")
    sep = "|---|---|---|---|---|---|---|"
    if has_runs:
        head += " flow_gap (voxels) | steps/s |"
        sep += "---|---|"
    lines = [head, sep]
    for r in rows:
        std = "" if r["dice_seed_std"] is None else f" ± {r['dice_seed_std']:.3f}"
        per = ", ".join(f"{d:.3f}" for d in r["dice_per_seed"])
        d = r.get("vs_baseline")
        diff = "-" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] ({d['units']} units)"
        better = "-" if d is None else f"{d['better']}/{d['pairs']}"
        same = "-" if not (d and d["per_seed"]) else ", ".join(f"{v:+.3f}" for v in d["per_seed"].values())
        line = f"| {r['arm']} | {r['seeds']} | {r['dice_mean']:.4f}{std} | {per} | {diff} | {same} | {better} |"
        if has_runs:
            gap = "-" if r.get("flow_gap") is None else f"{r['flow_gap']:.3f}"
            rate = "-" if r.get("steps_per_s") is None else f"{r['steps_per_s']:.2f}"
            line += f" {gap} | {rate} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.compare:
        raise cli.UsageError("--compare=<json written by python -m ldr_tf.compare> is required")
    path = Path(FLAGS.compare)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    data = _read_json(path)
    if not isinstance(data, dict) or "pairs" not in data:
        raise ValueError(f"{path}: not a comparison written by python -m ldr_tf.compare (no 'pairs')")
    rows = summarise(data, FLAGS.baseline, FLAGS.runs)
    baseline = FLAGS.baseline or rows[0]["arm"]
    text = (f"{data.get('dataset', '?')}, subset {data.get('subset', '?')}, "
            f"{len(next(iter(data['pairs'].values())))} pairs\n\n" + table(rows, baseline))
    print(text)
    if FLAGS.out:
        from ldr_tf.atomic import write_json, write_text

        write_text(Path(FLAGS.out + ".md"), text + "\n")
        write_json({"compare": str(path), "baseline": baseline, "arms": rows}, Path(FLAGS.out + ".json"))
        print(f"wrote {FLAGS.out}.md, {FLAGS.out}.json")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, "ldr_tf.ablation")
