"""Slide reading without a model: the tile-wise reader, the level for a resolution, the tissue mask, the label
pyramid, and the errors a user sees for a slide that cannot be used."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from monai.data import TiffFileWSIReader

from monai_mdm.data import (
    TiffSlideReader, open_slide, select_level, slide_reader_class, tissue_mask, write_label_pyramid,
    write_synthetic_slide,
)  # fmt: skip

SHAPE = (300, 420)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    content = write_synthetic_slide(path, SHAPE, mpp=0.5, tile=64, cell=64, seed=1)
    return path, content


def test_reader_reads_regions_of_every_level_as_written(slide):
    path, content = slide
    reader = TiffSlideReader()
    wsi = open_slide(path, reader)
    assert reader.get_level_count(wsi) == 3
    assert [reader.get_size(wsi, n) for n in range(3)] == [(300, 420), (150, 210), (75, 105)]
    assert reader.get_mpp(wsi, 1) == pytest.approx((1.0, 1.0))
    # MONAI's own reader gives the same pixels (it decodes the whole level: fine at this size)
    expected, _ = TiffFileWSIReader().get_data(tifffile.TiffFile(path), location=(40, 60), size=(50, 70), level=0)
    patch, meta = reader.get_data(wsi, location=(40, 60), size=(50, 70), level=0)
    np.testing.assert_array_equal(patch, expected)
    np.testing.assert_array_equal(patch, content.region(40, 60, 50, 70).transpose(2, 0, 1))
    level1, _ = reader.get_data(wsi, location=(80, 120), size=(20, 30), level=1)
    np.testing.assert_array_equal(level1, content.level(2)[40:60, 60:90].transpose(2, 0, 1))
    # past the border: glass (white), as a scanner shows it
    edge, _ = reader.get_data(wsi, location=(290, 400), size=(20, 30), level=0)
    np.testing.assert_array_equal(edge[:, :10, :20], content.region(290, 400, 10, 20).transpose(2, 0, 1))
    assert (edge[:, 10:] == 255).all() and (edge[:, :, 20:] == 255).all()


def test_subifd_pyramids_read_as_the_generic_layout(slide, tmp_path):
    """OME-style pyramids nest the halved levels as SubIFDs of level 0; the reader finds the same levels."""
    path = tmp_path / "subifds.tif"
    write_synthetic_slide(path, SHAPE, mpp=0.5, tile=64, cell=64, seed=1, subifds=True)
    generic, nested = TiffSlideReader(), TiffSlideReader()
    a, b = open_slide(slide[0], generic), open_slide(path, nested)
    assert len(b.pages) == 1 and len(a.pages) == 3  # the layouts differ on disk
    assert [nested.get_size(b, n) for n in range(3)] == [generic.get_size(a, n) for n in range(3)]
    assert nested.get_mpp(b, 2) == pytest.approx((2.0, 2.0))
    for level in range(3):
        region = dict(location=(40, 60), size=(30, 40), level=level)
        np.testing.assert_array_equal(nested.get_data(b, **region)[0], generic.get_data(a, **region)[0])


def test_level_is_chosen_by_microns_per_pixel(slide):
    reader = TiffSlideReader()
    wsi = open_slide(slide[0], reader)
    assert select_level(reader, wsi, mpp=0.5) == (0, 0.5)
    assert select_level(reader, wsi, mpp=1.1) == (1, 1.0)  # within the 25 % tolerance
    assert select_level(reader, wsi, level=2) == (2, 2.0)
    with pytest.raises(ValueError, match=r"--mpp 0.7: .* no level within 25% of 0.7 um/px \(levels 0: 0.5, 1: 1, 2: 2"):
        select_level(reader, wsi, mpp=0.7)
    with pytest.raises(ValueError, match=r"--level 3: .* has levels 0..2"):
        select_level(reader, wsi, level=3)


def test_slide_without_resolution_names_mpp_and_level(tmp_path):
    path = tmp_path / "no_mpp.tif"
    write_synthetic_slide(path, (128, 128), mpp=None, tile=64, cell=64)
    reader = TiffSlideReader()
    wsi = open_slide(path, reader)
    with pytest.raises(ValueError, match=r"--mpp 0.62: .*no_mpp.tif' records no resolution .* --level"):
        select_level(reader, wsi, mpp=0.62)
    assert select_level(reader, wsi, level=0) == (0, None)


def test_tissue_mask_finds_the_tissue_cells(slide):
    path, content = slide
    reader = TiffSlideReader()
    mask, ratio = tissue_mask(reader, open_slide(path, reader))
    assert mask.shape == (75, 105) and ratio == 4
    cells = np.kron(content.cells >= 0, np.ones((16, 16), bool))[:75, :105]  # 64 px cells at level 2
    assert 0 < cells.mean() < 1
    assert (mask & cells).sum() > 0.5 * cells.sum() and not (mask & ~cells).any()
    # bands and subsampling: a mask capped at 40 px a side is the same mask, subsampled
    small, ratio = tissue_mask(reader, open_slide(path, reader), max_size=40)
    assert ratio == 12 and small.shape == mask[::3, ::3].shape


def test_blank_slide_finds_no_tissue(tmp_path):
    path = tmp_path / "blank.tif"
    write_synthetic_slide(path, (128, 192), tile=64, cell=64, tissue=0.0)
    reader = TiffSlideReader()
    with pytest.raises(ValueError, match=r"blank.tif': the tissue mask found no tissue .* --tissue_threshold"):
        tissue_mask(reader, open_slide(path, reader))


def test_files_that_are_no_slide_are_refused_by_name(tmp_path):
    reader = TiffSlideReader()
    with pytest.raises(FileNotFoundError, match=r"--slide: slide '.*missing.tif' not found"):
        open_slide(tmp_path / "missing.tif", reader)
    with pytest.raises(ValueError, match="--slide: no slide given"):
        open_slide("", reader)
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n not a slide")
    with pytest.raises(ValueError, match=r"--slide: '.*photo.png' is not a slide the tifffile backend can read .*tif"):
        open_slide(fake, reader)


def test_backends_are_named_and_missing_ones_say_what_to_install(monkeypatch):
    assert slide_reader_class("TiffFile") is TiffSlideReader
    with pytest.raises(ValueError, match=r"--backend 'pillow' is not a slide reader; choose one of tifffile"):
        slide_reader_class("pillow")
    monkeypatch.setattr("monai_mdm.data.wsi.optional_import", lambda name: (None, False))
    with pytest.raises(ImportError, match="pip install openslide-bin openslide-python"):
        slide_reader_class("openslide")
    with pytest.raises(ImportError, match="--backend cucim needs cuCIM"):
        slide_reader_class("cucim")


def test_label_pyramid_is_tiled_halved_and_tagged(tmp_path):
    labels = np.random.default_rng(0).integers(0, 3, (300, 520)).astype(np.uint8)
    path = write_label_pyramid(tmp_path / "mask.tif", labels, mpp=0.25, tile=128)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        # halved until a level fits in one tile
        assert [level.shape for level in levels] == [(300, 520), (150, 260), (75, 130), (38, 65)]
        np.testing.assert_array_equal(levels[0].asarray(), labels)
        np.testing.assert_array_equal(levels[2].asarray(), labels[::4, ::4])
        page = levels[1].keyframe
        assert page.is_tiled and page.tilewidth == 128
        assert page.tags["XResolution"].value == (20000, 1) and page.tags["ResolutionUnit"].value == 3  # 0.5 um/px
    assert [p.name for p in tmp_path.iterdir()] == ["mask.tif"]  # no temporary file left
