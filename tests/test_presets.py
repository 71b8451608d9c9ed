"""The run script's image-size presets (rloss.presets): the A100 fork's table, the nearest preset to
the training images, and the DenseCRF weight rule anchored on the demo's value."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rloss.errors import DataError
from rloss.presets import PRESETS, choose, densecrf_weight, main


def write_tree(root, sizes) -> None:
    (root / "images").mkdir(parents=True)
    (root / "list").mkdir()
    lines = []
    for index, (height, width) in enumerate(sizes):
        Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(root / "images" / f"{index}.png")
        lines.append(f"images/{index}.png scribbles/{index}.png\n")
    (root / "list" / "train.txt").write_text("".join(lines))


def test_the_weight_rule_gives_the_demos_weight_back_and_falls_with_pixels_and_sigma():
    assert densecrf_weight(97, 1.0, 30) == pytest.approx(2e-6)
    assert densecrf_weight(194, 1.0, 30) == pytest.approx(2e-6 / 4)  # 4x the pixels
    assert densecrf_weight(97, 1.0, 60) == pytest.approx(2e-6 / 4)  # 4x the neighbours in sigma_xy
    assert densecrf_weight(194, 0.5, 60) == pytest.approx(2e-6)  # down-scaled by 2: the demo's loss again
    assert 1e-8 <= densecrf_weight(321, 1.0, 100) <= 1e-8 * 1.7  # the Caffe files' weight (1.64e-8)


@pytest.mark.parametrize("sizes, preset", [([(40, 40)] * 3, 40), ([(90, 120), (70, 80), (80, 99)], 80),
                                           ([(300, 500), (250, 260)], 256), ([(500, 375), (600, 600)], 513)])
def test_auto_takes_the_preset_nearest_the_median_short_side(tmp_path, sizes, preset):
    write_tree(tmp_path, sizes)
    assert choose(tmp_path, "auto") == PRESETS[preset]
    assert choose(tmp_path, "513") == PRESETS[513]


def test_presets_print_shell_assignments_and_refuse_bad_input(tmp_path, capsys):
    write_tree(tmp_path, [(40, 40)])
    assert main([str(tmp_path), "80"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["PRESET=80", "CROP_SIZE=129", "BATCH_SIZE=16", "BASE_LR=0.007"]
    assert "DENSECRF_SCALE=0.5" in lines and "BI_XY_STD=15.6" in lines
    assert main([str(tmp_path), "100"]) == 1
    assert "PRESET=100: expected auto or one of 40, 80, 256, 513" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"the image-size preset: cannot read the list file .*absent/list/train.txt"):
        choose(tmp_path / "absent", "auto")
