"""Refinement (instance optimisation): a network's flow improved for one pair by gradient descent, without labels.

A network registers a pair in one forward pass, with what it learned on average over its training pairs.
Refinement starts from that flow ``u0`` and takes ``steps`` Adam steps on a correction ``d`` that lives on a grid
`factor` times coarser than the network's (smooth by construction, and ``factor^3`` times cheaper), minimising

    - LNCC(fixed_c, warp(moving_c, u0_c + d))  +  smooth * smoothness(u0_c + d)

where ``_c`` is the coarse grid (images average-pooled, ``u0_c`` the pooled flow in coarse voxels), LNCC the mean
squared local correlation in a ``window^3`` box (`ldr_tf.ops.losses.local_ncc`: the CC metric of ANTs SyN) and `smoothness` the forward-difference
smoothness of `ldr_tf.ops.losses.smoothness_loss`. The result is ``u0 + upsample(d)`` on the network's grid. The
loop runs inside one XLA-compiled graph (one compilation per level setting and grid shape; the step count is an
input), with Adam written out so that no optimizer state outlives a call: the same inputs give the same flow.

The defaults were chosen on the IXI validation pairs with the shipped brain model (README, "Refinement"); labels
are never used.
"""

from __future__ import annotations

import tensorflow as tf

from ldr_tf.ops import warp
from ldr_tf.ops.losses import local_moments, local_ncc, smoothness_loss

__all__ = ["Refiner", "refine_flow", "objective_gradient", "DEFAULTS", "LEVELS"]

# Chosen on IXI validation pairs (brain model): Dice gain against folding and time (README, "Refinement"). Smoothness
# 2 (1 before 0.3): on 20 validation pairs the same Dice after 10 steps (0.603) with a quarter of the folding (0.012 %
# instead of 0.044 %), 0.002 less after 50 and 0.003 more after 50 + 20.
DEFAULTS = {"lr": 0.5, "smooth": 2.0, "window": 5, "factor": 2}
# `Refiner`'s levels, coarse to fine: half resolution (the defaults), then full resolution, smoother (at full
# resolution smoothness 1 folded 0.28 % of the grid's voxels on the validation pairs).
LEVELS = (dict(DEFAULTS), {"lr": 0.5, "smooth": 3.0, "window": 3, "factor": 1})
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-7
_COMPILED = {}  # level settings -> compiled refine_flow (`Refiner._compiled`)


def objective_gradient(fixed, moments, corners, u, smooth: float, window: int) -> tf.Tensor:
    """The gradient with respect to `u` of ``sum over the batch of -LNCC(fixed, warp(moving, u)) + smooth *
    smoothness(u)`` (the refinement's objective), where `corners` are ``warp.trilinear_corners(moving, grid + u)``
    and `moments` ``local_moments(fixed, window)``.

    By the chain rule through the warped image: the LNCC's gradient with respect to the warped image (automatic)
    times the interpolant's derivative with respect to the positions (`warp.interpolate_corners`: what automatic
    differentiation through `warp.warp` gives), plus the smoothness term's. `refine_flow` gathers the corners at
    the end of each step and passes them to the next one through the loop's state: inside one XLA computation the
    gathers were otherwise repeated in every consumer of the warped image and of its derivatives (a 64^3 step
    took 19 ms instead of 10 ms on 2 cores).
    """
    warped, dwarped = warp.interpolate_corners(*corners)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([warped, u])
        # samples are independent: the sum gives each its own gradient
        ncc = tf.reduce_sum(-local_ncc(fixed, warped, window, moments))
        reg = tf.reduce_sum(smooth * smoothness_loss(u, "none"))
    g_warped = tape.gradient(ncc, warped)
    return tf.reduce_sum(g_warped[..., None] * dwarped, axis=-2) + tape.gradient(reg, u)


def refine_flow(fixed, moving, flow, steps: int, lr: float = DEFAULTS["lr"], smooth: float = DEFAULTS["smooth"],
                window: int = DEFAULTS["window"], factor: int = DEFAULTS["factor"]) -> tf.Tensor:
    """`flow` (``[B, D, H, W, 3]``, pull, voxels) refined for `fixed`/`moving` (``[B, D, H, W, 1]``) by `steps`
    Adam steps (module docstring; `steps` may be a tensor). ``steps=0`` returns `flow` unchanged. Traceable (the
    loop is a ``tf.while_loop``); `Refiner` is the compiled form."""
    fixed = tf.convert_to_tensor(fixed, tf.float32)
    moving = tf.convert_to_tensor(moving, tf.float32)
    flow = tf.convert_to_tensor(flow, tf.float32)
    if factor > 1:
        pool = [1, factor, factor, factor, 1]
        fixed, moving = (tf.nn.avg_pool3d(x, pool, pool, "VALID") for x in (fixed, moving))
        base = tf.nn.avg_pool3d(flow, pool, pool, "VALID") / float(factor)
    else:
        base = flow
    b1, b2 = ADAM_BETAS
    moments = local_moments(fixed, window)  # the fixed image's, once (the same result, ~10 % faster a step)
    start = warp.identity_grid(tf.shape(base)[1:4], base.dtype)[None] + base  # the positions before the steps

    def body(i, d, m, v, corners):
        g = objective_gradient(fixed, moments, corners, base + d, smooth, window)
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g * g
        t = tf.cast(i + 1, tf.float32)
        step = lr * tf.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        d = d - step * m / (tf.sqrt(v) + ADAM_EPS)
        return i + 1, d, m, v, warp.trilinear_corners(moving, start + d)

    zeros = tf.zeros_like(base)
    state = (tf.constant(0), zeros, zeros, zeros, warp.trilinear_corners(moving, start))
    _, d, _, _, _ = tf.while_loop(lambda i, *_: i < steps, body, state)
    return flow + (warp.upsample_flow(d, factor) if factor > 1 else d)


class Refiner:
    """Refinement in levels, coarse to fine: ``steps[i]`` Adam steps of `refine_flow` with ``levels[i]``'s settings,
    each level starting from the previous one's flow; compiled once per level and grid shape.

    Args:
      steps: an int (the first level only) or one count per level (e.g. ``(50, 20)``: 50 steps at half
        resolution, then 20 at full resolution); a level with 0 steps is skipped.
      levels: the levels' settings (``factor``, ``smooth``, ``window``, ``lr``), `LEVELS` by default.

    Raises:
      ValueError: a negative or non-integer step count, more counts than levels, a window that is not an odd
        number >= 3, a factor < 1, lr <= 0, smooth < 0, or (at the call) a grid not divisible by a level's factor.
    """

    def __init__(self, steps, levels=None):
        levels = LEVELS if levels is None else tuple(levels)
        counts = (steps,) if not isinstance(steps, (tuple, list)) else tuple(steps)
        if len(counts) > len(levels):
            raise ValueError(f"refine steps: {len(counts)} counts for {len(levels)} levels, got {list(counts)}")
        self.levels = []
        for n, level in zip(counts, levels):
            if isinstance(n, bool) or int(n) != n or n < 0:
                raise ValueError(f"refine steps: expected integers >= 0, got {list(counts)}")
            window, factor = level.get("window", 3), level.get("factor", 1)
            lr, smooth = level.get("lr", 0.5), level.get("smooth", 1.0)
            if int(window) != window or window < 3 or window % 2 == 0:
                raise ValueError(f"refine window: expected an odd integer >= 3, got {window}")
            if int(factor) != factor or factor < 1:
                raise ValueError(f"refine factor: expected an integer >= 1, got {factor}")
            if not lr > 0 or not smooth >= 0:
                raise ValueError(f"refine lr/smooth: expected lr > 0 and smooth >= 0, got {lr}, {smooth}")
            if n:
                self.levels.append({"steps": int(n), "factor": int(factor), "smooth": float(smooth),
                                    "window": int(window), "lr": float(lr)})
        # One XLA compilation per level and grid shape; the step count is an input, so `compile` runs 0 steps.
        # Compiled, a 64^3 step takes ~10 ms on 2 cores (~20 ms with the gradient differentiated through the warp,
        # ~230 ms in TensorFlow's own kernels: the slice and pooling gradients).
        self._fns = [self._compiled({k: v for k, v in lv.items() if k != "steps"}) for lv in self.levels]

    @staticmethod
    def _compiled(kw):
        # One compiled function per level setting in the process: refiners that share a level (compare's
        # refine=50 and refine=50,20, a batch's pairs) share its compilations.
        key = tuple(sorted(kw.items()))
        if key not in _COMPILED:
            _COMPILED[key] = tf.function(lambda f, m, u, n: refine_flow(f, m, u, n, **kw), jit_compile=True,
                                         reduce_retracing=True)
        return _COMPILED[key]

    @property
    def steps(self) -> list:
        return [lv["steps"] for lv in self.levels]

    def to_dict(self) -> dict:
        return {"levels": [dict(lv) for lv in self.levels]}

    def _run(self, fixed, moving, flow, zero: bool = False) -> tf.Tensor:
        fixed, moving = tf.convert_to_tensor(fixed, tf.float32), tf.convert_to_tensor(moving, tf.float32)
        flow = tf.convert_to_tensor(flow, tf.float32)
        grid = tuple(flow.shape[1:4])
        for level, fn in zip(self.levels, self._fns):
            if any(s % level["factor"] for s in grid):
                raise ValueError(f"refine: the grid {grid} is not divisible by the factor {level['factor']}")
            flow = fn(fixed, moving, flow, tf.constant(0 if zero else level["steps"], tf.int32))
        return flow

    def compile(self, grid, batch: int = 1) -> None:
        """Compiles every level for ``[batch, *grid]`` inputs ahead of the first pair (runs 0 steps on zeros)."""
        zeros = tf.zeros((batch, *grid, 1))
        self._run(zeros, zeros, tf.zeros((batch, *grid, 3)), zero=True)

    def __call__(self, fixed, moving, flow) -> tf.Tensor:
        """The refined flow (a tensor) for NDHWC `fixed`, `moving` ``[B, D, H, W, 1]`` and `flow`."""
        return self._run(fixed, moving, flow)
