"""From scans on disk to training pairs.

`nifti` (reading and checking NIfTI files) -> `preprocess` (reorientation, field of view, resampling onto the network
grid, intensities: the recipe `predict` repeats) -> `importer` / `ixi` (folders of scans -> the dataset format) ->
`dataset` (the format: a JSON descriptor + one HDF5 file) -> `pairs` (which pairs to register, the tf.data pipeline)
with `augment` (random B-spline deformations); `synthetic` makes the embedded demo data.
"""
