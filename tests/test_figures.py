"""`ldr_tf.figures`: the report figures are real PNGs of the expected size, written atomically."""

import numpy as np
import pytest

from ldr_tf import figures


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_dice_vs_speed(tmp_path):
    rows = [{"name": "identity", "dice": 0.2, "seconds": 0.01}, {"name": "student", "dice": 0.5, "seconds": 0.8,
                                                                   "dice_std": 0.05},
            {"name": "ants_syn", "dice": 0.55, "seconds": 12.0}]
    out = figures.dice_vs_speed(rows, tmp_path / "fig.png")
    w, h = _png_size(out)
    assert 800 < w < 11 * 110 + 50 and 300 < h < w / 2  # two panels side by side (cropped to their content)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]  # no temporary file left


def test_slice_comparison_and_the_overlap_colours(tmp_path, rng):
    fixed = rng.random((8, 10, 12)).astype(np.float32)
    seg = np.zeros((8, 10, 12), np.int32)
    seg[2:6, 3:7, 4:9] = 3
    shifted = np.roll(seg, 1, axis=2)
    out = figures.slice_comparison(fixed, seg, [("before", fixed, shifted, 0.7), ("model", fixed, seg, 1.0)],
                                   tmp_path / "slices.png", axis=0)
    w, h = _png_size(out)
    assert 400 < w and 400 < h  # 2 rows x 3 columns (fixed + the two methods), cropped to their content
    rgb = figures._overlap_rgb(seg[4], shifted[4])
    assert (rgb[seg[4] == 0][shifted[4][seg[4] == 0] == 0] == 0).all()  # background: black
    match = (seg[4] == 3) & (shifted[4] == 3)
    assert (rgb[match] == 1).all()  # matched: white
    miss = (seg[4] != shifted[4])
    np.testing.assert_allclose(rgb[miss], np.tile([0.9, 0.1, 0.1], (miss.sum(), 1)))  # mismatched: red


def test_unwritable_destination_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        figures.dice_vs_speed([{"name": "a", "dice": 0.5, "seconds": 1.0}], tmp_path / "file" / "fig.png")
