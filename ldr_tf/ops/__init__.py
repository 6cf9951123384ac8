"""Tensor operations on NDHWC volumes: `warp` (pull-back warping, flow composition; the flow convention is documented
there), `sampling` (XLA resampling between grids and back to a scan's own grid), `losses` (similarity, smoothness,
Dice), `metrics` (Dice/Jaccard, Jacobian determinant, folding)."""
