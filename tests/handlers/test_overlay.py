"""The evaluation overlays: MONAI's blend_images with one palette colour per class."""

from __future__ import annotations

import numpy as np

from monai_mdm.handlers.segmentation_report import _PALETTE, overlay


def test_each_class_is_blended_with_its_colour_and_the_background_is_left_as_it_is():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    classes = rng.integers(0, 15, (12, 20))
    out = overlay(image, classes, alpha=0.45)
    assert out.dtype == np.uint8 and out.shape == image.shape
    background = classes == 0
    assert np.array_equal(out[background], image[background])
    colour = _PALETTE[1 + (classes - 1) % (len(_PALETTE) - 1)]
    expected = 0.55 * image.astype(float) + 0.45 * colour
    assert np.abs(out[~background] - expected[~background]).max() <= 1.0  # rounding
    # past the palette's end a class repeats a class colour: never the background's black, never invisible
    assert np.abs(out[classes == 7].astype(int) - image[classes == 7]).max() > 0
