"""Figures of the reports: a slice comparison like the paper's Figure 2 and a Dice-vs-speed plot like its Figure 1.

Used by ``python -m ldr_tf.demo`` and ``python -m ldr_tf.compare``; plain functions over NumPy arrays and result
rows, writing PNGs atomically (matplotlib, Agg backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldr_tf.atomic import atomic_path

__all__ = ["slice_comparison", "dice_vs_speed", "save_figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Saves a matplotlib figure as PNG through a temporary file, then closes it."""
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        _plt().close(fig)
    return path


def _overlap_rgb(fixed_seg: np.ndarray, warped_seg: np.ndarray) -> np.ndarray:
    """White where the warped labels match the fixed ones (foreground), red where they do not."""
    rgb = np.zeros(fixed_seg.shape + (3,), np.float32)
    fg = (fixed_seg > 0) | (warped_seg > 0)
    match = fg & (fixed_seg == warped_seg)
    miss = fg & ~match
    rgb[match] = 1.0
    rgb[miss] = (0.9, 0.1, 0.1)
    return rgb


def slice_comparison(fixed, fixed_seg, columns, out, axis: int = 0, index: int | None = None, title: str = ""):
    """The paper's Figure 2: per method, a slice of the warped image and of the warped labels vs the fixed labels.

    Args:
      fixed, fixed_seg: ``[D, H, W]`` fixed image (0..1) and labels.
      columns: list of ``(name, warped [D, H, W], warped_seg [D, H, W], dice)``; the first is usually the moving
        image itself ("before registration").
      out: PNG path. axis, index: which slice (default: the middle of `axis`).
    """
    plt = _plt()
    index = fixed.shape[axis] // 2 if index is None else index
    take = lambda v: np.take(v, index, axis=axis)  # noqa: E731
    n = len(columns) + 1
    fig, ax = plt.subplots(2, n, figsize=(2.3 * n, 4.9))
    ax[0, 0].imshow(take(fixed), cmap="gray", vmin=0, vmax=1)
    ax[0, 0].set_title("fixed", fontsize=9)
    ax[1, 0].imshow(_overlap_rgb(take(fixed_seg), take(fixed_seg)))
    ax[1, 0].set_title("fixed labels", fontsize=9)
    for j, (name, warped, warped_seg, dice) in enumerate(columns, start=1):
        ax[0, j].imshow(take(warped), cmap="gray", vmin=0, vmax=1)
        ax[0, j].set_title(name, fontsize=9)
        ax[1, j].imshow(_overlap_rgb(take(fixed_seg), take(warped_seg)))
        ax[1, j].set_title(f"Dice {dice:.3f}" if dice == dice else "", fontsize=9)
    for a in ax.ravel():
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title or "warped images (top) and labels: white = matched, red = mismatched (bottom)", fontsize=10)
    return save_figure(fig, out)


def dice_vs_speed(rows, out, title: str = "Dice vs CPU time per pair"):
    """The paper's Figure 1: CPU seconds per pair as bars, Dice as a line, one entry per method.

    Args:
      rows: list of dicts with ``name``, ``dice``, ``seconds`` (and optional ``dice_std``).
      out: PNG path.
    """
    plt = _plt()
    names = [r["name"] for r in rows]
    secs = [r["seconds"] for r in rows]
    dice = [r["dice"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(rows))
    ax[0].bar(x, secs, color="#8fb3d9")
    ax[0].set_ylabel("CPU seconds per pair")
    ax[0].set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    twin = ax[0].twinx()
    twin.plot(x, dice, "o-", color="#c0392b")
    twin.set_ylabel("Dice", color="#c0392b")
    ax[0].set_title("bars: CPU time, line: Dice", fontsize=9)
    for r in rows:
        s = max(r["seconds"], 1e-4)
        ax[1].errorbar(s, r["dice"], yerr=r.get("dice_std"), fmt="o", capsize=3)
        ax[1].annotate(r["name"], (s, r["dice"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax[1].set_xscale("log")
    ax[1].xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels of a short log range collide
    ax[1].set_xlabel("CPU seconds per pair (log)")
    ax[1].set_ylabel("Dice")
    ax[1].grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(wspace=0.42)  # room for the twin axis' label between the panels
    return save_figure(fig, out)
